"""MOSMOS segmentation fine-tuning (``python -m training.finetune_seg``) on tiny phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from napari_ctvlp.engine.networks.seg_model import SEG_CLASSES, BuiltinSegNet, SegModelConfig  # noqa: E402
from napari_ctvlp.engine.segmentation.builtin import load_seg_checkpoint  # noqa: E402
from training import finetune_seg  # noqa: E402
from training.losses import seg_pta_loss  # noqa: E402

TINY_ARGS = ["--steps", "3", "--train-phantoms", "1", "--val-phantoms", "1", "--phantom-size", "32,48,48",
             "--grid-size", "16,32,32", "--roi-size", "16,16,16", "--patch-size", "4", "--hidden-size", "16",
             "--depth", "2", "--feature-size", "4", "--weights-dtype", "float32", "--log-every", "1"]


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "run"
    assert finetune_seg.main(["--data", "phantom", "--out", str(out), *TINY_ARGS, *extra]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_class"]) == {c.name for c in SEG_CLASSES[1:]}
    assert np.isfinite(metrics["loss_first10"]) and np.isfinite(metrics["loss_last10"])
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    return metrics


def test_finetune_pta_writes_metrics_and_loadable_checkpoint(tmp_path: Path) -> None:
    metrics = _run(tmp_path)
    assert metrics["use_pta"] is True and metrics["cases"] == 1
    assert 0.0 <= metrics["per_class"]["body"]["dice"] <= 1.0
    loaded = load_seg_checkpoint(tmp_path / "run" / "checkpoint")
    assert loaded.config.use_pta and loaded.config.roi_size == (16, 16, 16)
    assert loaded.preprocessing["image_size"] == [16, 32, 32]
    assert loaded.meta["training"]["steps"] == 3 and "per_class" in loaded.meta["metrics"]
    # evaluation alone, raw argmax: same held-out phantom, metrics written to another folder
    ev = tmp_path / "eval"
    argv = ["--data", "phantom", "--out", str(ev), "--eval-only", str(tmp_path / "run" / "checkpoint"),
            "--val-phantoms", "1", "--phantom-size", "32,48,48", "--no-postprocess"]
    assert finetune_seg.main(argv) == 0
    again = json.loads((ev / "metrics.json").read_text())
    assert again["postprocess"] is False and again["cases"] == 1 and set(again["per_class"]) == set(metrics["per_class"])


def test_finetune_without_pta(tmp_path: Path) -> None:
    metrics = _run(tmp_path, "--no-pta")
    assert metrics["use_pta"] is False
    assert not load_seg_checkpoint(tmp_path / "run" / "checkpoint").config.use_pta


def test_loss_decreases_on_a_fixed_batch() -> None:
    """L_seg + 0.8 L_pta goes down when fitting one phantom crop (the optimisation is real)."""
    from napari_ctvlp.phantom import make_phantom
    from napari_ctvlp.engine.preprocess import PreprocessConfig

    ph = make_phantom(seed=5, size=(32, 48, 48))
    grid = finetune_seg.to_grid([(ph.volume, ph.organs)], PreprocessConfig.for_image_size((16, 32, 32)))
    x, y = finetune_seg.sample_batch(grid, (16, 16, 16), 2, np.random.default_rng(0))
    torch.manual_seed(0)
    model = BuiltinSegNet(SegModelConfig(roi_size=(16, 16, 16), patch_size=(4, 4, 4), hidden_size=16, depth=2,
                                         num_heads=2, mlp_dim=32, feature_size=4, tag_embed_dim=8))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    losses = []
    for _ in range(12):
        out = model.forward_train(xt)
        loss = seg_pta_loss(out.logits, out.pta_logits, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])


def test_init_from_ctvlp_checkpoint(tmp_path: Path) -> None:
    from napari_ctvlp.engine.checkpoint import save_checkpoint
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig
    from napari_ctvlp.engine.preprocess import PreprocessConfig

    cfg = CTVLPConfig.tiny(image_size=(16, 32, 32), patch_size=(4, 8, 8), hidden_size=16)
    torch.manual_seed(0)
    ctvlp = CTVLP(cfg)
    pre = PreprocessConfig.for_image_size(cfg.image_size)
    ckpt = save_checkpoint(ctvlp, tmp_path / "ctvlp", preprocessing=pre.to_dict())
    out = tmp_path / "run"
    args = ["--data", "phantom", "--out", str(out), "--init-checkpoint", str(ckpt), "--steps", "1",
            "--train-phantoms", "1", "--val-phantoms", "1", "--phantom-size", "32,48,48", "--grid-size", "16,32,32",
            "--feature-size", "4"]
    assert finetune_seg.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["init"]["copied"] > 0 and metrics["init"]["tag_embeddings"] is True
    loaded = load_seg_checkpoint(out / "checkpoint")
    assert loaded.config.roi_size == (16, 32, 32) and loaded.config.patch_size == (4, 8, 8)
    assert loaded.preprocessing["spacing_mm"] == pytest.approx(list(pre.spacing_mm))


def test_folder_data_and_bad_arguments(tmp_path: Path) -> None:
    from napari_ctvlp.phantom import write_phantom_dataset

    root = tmp_path / "ds"
    write_phantom_dataset(root, n=2, seed=1, size=(32, 48, 48))
    out = tmp_path / "run"
    args = ["--data", str(root), "--out", str(out), "--val-count", "1", *TINY_ARGS]
    assert finetune_seg.main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["cases"] == 1
    assert finetune_seg.main(["--data", str(tmp_path / "missing"), "--out", str(out), *TINY_ARGS]) == 2
    assert finetune_seg.main(["--data", str(root), "--out", str(out), "--val-count", "5", *TINY_ARGS]) == 2
    with pytest.raises(SystemExit):
        finetune_seg.main(["--data", "phantom", "--out", str(out), "--grid-size", "1,2"])
