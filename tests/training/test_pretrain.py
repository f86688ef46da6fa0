"""training.pretrain on a tiny phantom cache: a real run, checkpoints, exact resume, SIGTERM, params."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from phantom_cache import tiny_argv, tiny_cache
from training import optim, pretrain
from training.params import load_params


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_cache(tmp_path_factory.mktemp("pre"), n=6, seed=11)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss/total"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_finite_losses_and_loadable_checkpoints(cache: Path, straight_run: Path) -> None:
    from napari_ctvlp.engine.checkpoint import load_checkpoint

    run = straight_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # 6 samples / batch 3 = 2 steps x 2 epochs
    for r in rows:
        for key in ("loss/total", "loss/local", "loss/global", "loss/irc", "loss/mlr"):
            assert np.isfinite(r[key]), (key, r)
        assert r["loss/global"] > 0 and r["loss/irc"] > 0
    assert rows[0]["lr"] > rows[-1]["lr"]  # cosine decay after the warm-up step
    loaded = load_checkpoint(run / "final")
    assert loaded.config.image_size == (32, 32, 32)
    assert loaded.preprocessing == json.loads((cache / "cache.json").read_text())["preprocess"]
    assert loaded.meta["training"]["step"] == 4
    latest = run / json.loads((run / "latest.json").read_text())["checkpoint"]
    names = {p.name for p in latest.iterdir()}
    assert {"model.safetensors", "config.json", "training_state.safetensors", "training_state.json",
            "rng_rank0.safetensors", "rng_rank0.json"} <= names
    assert not [p for p in run.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".ckpt", ".bin")]
    assert list((run / "tb").iterdir())  # TensorBoard event file
    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    assert pretrain.main(tiny_argv(cache, run.parent, "full")) == 2  # exists, no --resume


@pytest.fixture(scope="module")
def straight_run(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 4-step run, shared by the checks below."""
    out = tmp_path_factory.mktemp("runs")
    assert pretrain.main(tiny_argv(cache, out, "full")) == 0
    return out / "full"


def test_stop_and_resume_equals_uninterrupted(cache: Path, straight_run: Path, tmp_path: Path) -> None:
    assert pretrain.main(tiny_argv(cache, tmp_path, "split", "--stop-after", "2")) == 0
    assert len(_losses(tmp_path / "split")) == 2 and not (tmp_path / "split" / "final").exists()
    assert pretrain.main(tiny_argv(cache, tmp_path, "split", "--resume")) == 0
    straight, split = _losses(straight_run), _losses(tmp_path / "split")
    assert len(straight) == 4
    np.testing.assert_allclose(split, straight, rtol=1e-6, atol=1e-7)
    # the model after resuming equals the uninterrupted one
    from safetensors.numpy import load_file

    a = load_file(str(straight_run / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_sigterm_saves_at_step_boundary_and_resumes(cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "term"
    metrics = run / "metrics.jsonl"

    def _kill_after_first_step() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            if metrics.is_file() and metrics.read_text().strip():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=_kill_after_first_step, daemon=True)
    killer.start()
    assert pretrain.main(tiny_argv(cache, tmp_path, "term")) == 0
    killer.join()
    done = len(_losses(run))
    assert 1 <= done < 4
    latest = json.loads((run / "latest.json").read_text())
    assert latest["step"] == done and not (run / "final").exists()
    assert getattr(signal.getsignal(signal.SIGTERM), "__name__", "") != "_on_sigterm"  # handler restored
    assert pretrain.main(tiny_argv(cache, tmp_path, "term", "--resume")) == 0
    assert len(_losses(run)) == 4 and (run / "final" / "model.safetensors").is_file()


def test_ablation_switches_and_bad_parameters(cache: Path, tmp_path: Path) -> None:
    argv = tiny_argv(cache, tmp_path, "abl", "--no-global", "--no-text-aug", "--no-mosmos", "--max-steps", "2")
    assert pretrain.main(argv) == 0
    params = json.loads((tmp_path / "abl" / "params.json").read_text())
    assert params["loss"]["use_global"] is False and params["loss"]["mosmos"] is False
    assert params["data"]["augment_text"] is False and params["optim"]["max_steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "abl" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss/global"] == 0.0 and "loss/irc" not in r for r in rows)
    with pytest.raises(ValueError, match="unknown parameter"):
        load_params(None, overrides=["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_params(None, overrides=["optim.lr"])
    with pytest.raises(ValueError, match="unknown model parameter"):
        load_params(None, overrides=["model.depthh=2"])
    with pytest.raises(ValueError, match="preset"):
        load_params(None, overrides=["model.preset=huge"])
    assert load_params(None, overrides=["optim.lr=3e-4"]).optim["lr"] == pytest.approx(3e-4)
    assert pretrain.main(tiny_argv(cache, tmp_path, "nothing", "--resume")) == 2  # no checkpoint
    assert pretrain.main(tiny_argv(tmp_path / "missing", tmp_path, "nocache")) == 2


def test_pretrained_text_layers_get_their_own_rate() -> None:
    """Pretrained text layers train at optim.text_lr (collapse otherwise); new layers at optim.lr."""
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig

    model = CTVLP(CTVLPConfig.tiny(text_random_init=None))  # the real MiniLM, top layer trainable
    groups = {g["name"]: g for g in optim.param_groups(model, 0.05, text_lr=1e-5, lr=3e-4)}
    assert groups["text_decay"]["lr"] == 1e-5 and groups["decay"]["lr"] == 3e-4
    text_ids = {id(p) for g in ("text_decay", "text_no_decay") for p in groups[g]["params"]}
    backbone = {id(p) for n, p in model.named_parameters() if n.startswith("text.backbone.") and p.requires_grad}
    assert text_ids == backbone and backbone
    assert id(model.text.projection.weight) in {id(p) for p in groups["decay"]["params"]}  # new layer: full rate
    assert groups["text_no_decay"]["weight_decay"] == 0.0 and groups["text_decay"]["weight_decay"] == 0.05
    random_text = CTVLP(CTVLPConfig.tiny())  # a randomly initialised text backbone is not "pretrained"
    assert {g["name"] for g in optim.param_groups(random_text, 0.05, text_lr=1e-5, lr=3e-4)} == {"decay", "no_decay"}
    params = load_params(None, overrides=["optim.text_lr=2e-5"])
    assert params.optim["text_lr"] == 2e-5 and params.optim["text_warmup_steps"] is None


def test_head_lr_gives_the_direct_heads_their_own_rate() -> None:
    """optim.head_lr: the direct statistics heads and the text head train at their own rate."""
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig

    model = CTVLP(CTVLPConfig.tiny(image_size=(16, 32, 32), patch_size=(8, 16, 16), stem="conv", feature_stride=8,
                                   statistics_edges=(-0.5, 0.0, 0.5), statistics_heads="anatomy", text_head="mlp"))
    groups = {g["name"]: g for g in optim.param_groups(model, 0.05, lr=3e-4, head_lr=1e-3)}
    assert groups["head_decay"]["lr"] == 1e-3 and groups["head_no_decay"]["weight_decay"] == 0.0
    heads = {id(p) for g in ("head_decay", "head_no_decay") for p in groups[g]["params"]}
    expected = {id(p) for n, p in model.named_parameters()
                if n.startswith(("statistics.anatomy_direct", "text.projection")) and p.requires_grad}
    assert heads == expected and expected
    assert all(g["lr"] == 3e-4 for n, g in groups.items() if not n.startswith("head_"))
    assert not heads & {id(p) for p in groups["decay"]["params"]}
    assert {g["name"] for g in optim.param_groups(model, 0.05, lr=3e-4)} == {"decay", "no_decay"}
    assert load_params(None, overrides=["optim.head_lr=1e-3"]).optim["head_lr"] == 1e-3


def test_killed_resave_of_the_latest_checkpoint_stays_resumable(cache: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14: a run killed while writing final/, resumed, then killed again while it re-saves the
    very checkpoint latest.json points to, must still resume (the re-save used to delete it first)."""
    import shutil

    from napari_ctvlp.engine import checkpoint as ckpt_mod

    out = tmp_path / "runs"
    assert pretrain.main(tiny_argv(cache, out, "twice")) == 0
    run = out / "twice"
    shutil.rmtree(run / "final")  # the first kill: during final/
    pointed = json.loads((run / "latest.json").read_text())["checkpoint"]
    real_save = ckpt_mod.save_checkpoint

    def killed(*args, **kwargs):  # the second kill: in the middle of the re-save of that checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(tiny_argv(cache, out, "twice", "--resume"))
    assert (run / pointed / "model.safetensors").is_file() and (run / pointed / "training_state.json").is_file()
    monkeypatch.setattr(ckpt_mod, "save_checkpoint", real_save)
    assert pretrain.main(tiny_argv(cache, out, "twice", "--resume")) == 0
    assert (run / "final" / "model.safetensors").is_file()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no staging left
    assert _losses(run) == _losses(out / "twice")  # metrics intact (4 steps)
    assert len(_losses(run)) == 4


def test_hybrid_encoder_with_sentence_pooling_trains_and_resumes_exactly(cache: Path, tmp_path: Path) -> None:
    """The phantom_cpu recipe's parts at tiny size: conv stem, dense features, sentence-pooled texts,
    image augmentation, the sentence contrast; a split run equals the straight one."""
    extra = ("--set", "model.stem=conv", "--set", "model.feature_stride=4",
             "--set", "model.stem_windows=[[-1.0, -0.3], [-0.16, 0.24]]", "--set", "model.text_pooling=sentences",
             "--set", "data.augment_image=true", "--set", "loss.sentence_weight=1.0")
    assert pretrain.main(tiny_argv(cache, tmp_path, "straight", *extra)) == 0
    assert pretrain.main(tiny_argv(cache, tmp_path, "split", *extra, "--stop-after", "2")) == 0
    assert pretrain.main(tiny_argv(cache, tmp_path, "split", *extra, "--resume")) == 0
    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert len(straight) == 4 and all(np.isfinite(straight))
    np.testing.assert_allclose(split, straight, rtol=1e-6, atol=1e-7)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss/sentence"]) and r["loss/sentence"] > 0 for r in rows)
    from napari_ctvlp.engine.checkpoint import load_checkpoint

    loaded = load_checkpoint(tmp_path / "straight" / "final")
    assert loaded.config.stem == "conv" and loaded.config.token_grid == (8, 8, 8)
    assert loaded.config.text_pooling == "sentences" and loaded.config.stem_windows == ((-1.0, -0.3), (-0.16, 0.24))


def test_export_halves_the_weights_and_keeps_the_record(cache: Path, straight_run: Path, tmp_path: Path) -> None:
    import torch

    from napari_ctvlp.engine.checkpoint import load_checkpoint
    from training.export import main as export_main

    card = tmp_path / "card.md"
    card.write_text("# test card\n")
    out = tmp_path / "shipped"
    assert export_main(["--checkpoint", str(straight_run / "final"), "--out", str(out), "--model-card", str(card)]) == 0
    src, dst = load_checkpoint(straight_run / "final"), load_checkpoint(out)
    assert dst.meta["weights_dtype"] == "float16" and dst.model_card == "# test card\n"
    assert dst.meta["training"] == src.meta["training"] and dst.config == src.config
    a, b = src.model.state_dict(), dst.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k].half().float(), rtol=0, atol=0, msg=k)
    assert export_main(["--checkpoint", str(straight_run / "final"), "--out", str(out)]) == 2  # exists
    assert export_main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
