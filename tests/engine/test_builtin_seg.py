"""Built-in segmentation network (UNETR-style + MOSMOS pixel-tag maps) and the ``builtin`` backend."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from napari_ctvlp.engine.anatomy import ORGAN_LABELS  # noqa: E402
from napari_ctvlp.engine.networks.seg_model import (  # noqa: E402
    SEG_CLASS_NAMES,
    SEG_CLASSES,
    BuiltinSegNet,
    SegModelConfig,
    classes_to_organs,
    init_from_ctvlp,
    organs_to_classes,
)
from napari_ctvlp.engine.preprocess import PreprocessConfig  # noqa: E402
from napari_ctvlp.engine.segmentation import (  # noqa: E402
    BACKENDS,
    SegmentationUnavailable,
    register_default_backends,
    segment,
)
from napari_ctvlp.engine.segmentation.builtin import (  # noqa: E402
    ENV_WEIGHTS,
    builtin_labels,
    default_weights_path,
    keep_largest_components,
    load_seg_checkpoint,
    save_seg_checkpoint,
    unavailable_reason,
)

TINY = dict(roi_size=(16, 16, 16), patch_size=(4, 4, 4), hidden_size=16, depth=2, num_heads=2, mlp_dim=32,
            feature_size=4, tag_embed_dim=8)
ORGAN_VALUES = {0} | {o.value for o in ORGAN_LABELS}


def _tiny_checkpoint(tmp_path: Path, **overrides) -> tuple[Path, BuiltinSegNet]:
    torch.manual_seed(0)
    model = BuiltinSegNet(SegModelConfig(**{**TINY, **overrides}))
    pre = PreprocessConfig.for_image_size((24, 24, 24))
    path = save_seg_checkpoint(model, tmp_path / "seg", preprocessing=pre.to_dict(), training={"test": True})
    return path, model


def _phantom(size=(48, 64, 64), seed=3):
    from napari_ctvlp.phantom import make_phantom

    return make_phantom(seed=seed, size=size)


def test_class_mapping_round_trip() -> None:
    organs = np.array([o.value for o in ORGAN_LABELS] + [0], dtype=np.uint8)
    classes = organs_to_classes(organs)
    names = [SEG_CLASSES[c].name for c in classes]
    assert names[:7] == ["lung_left", "lung_right", "lung_left", "lung_left", "lung_right", "lung_right", "lung_right"]
    assert names[-1] == "background" and names[-2] == "body"
    back = classes_to_organs(classes)
    assert set(back.tolist()) <= ORGAN_VALUES
    assert np.array_equal(organs_to_classes(back), classes)  # lobes collapse to lungs, then stable
    with pytest.raises(ValueError, match="classes"):
        classes_to_organs(np.array([len(SEG_CLASSES)]))


@pytest.mark.parametrize(
    "bad, match",
    [(dict(patch_size=(3, 4, 4)), "powers of two"), (dict(roi_size=(18, 16, 16)), "divisible"),
     (dict(output_stride=4), "output_stride"), (dict(hidden_size=15), "num_heads")],
)
def test_config_rejects_bad_values(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        SegModelConfig(**{**TINY, **bad})


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(use_pta=False), dict(output_stride=2), dict(roi_size=(16, 32, 32), patch_size=(4, 8, 8))],
)
def test_forward_shapes(overrides) -> None:
    cfg = SegModelConfig(**{**TINY, **overrides})
    model = BuiltinSegNet(cfg)
    x = torch.randn(2, 1, *cfg.roi_size)
    out = model.forward_train(x)
    assert out.logits.shape == (2, len(SEG_CLASSES), *cfg.roi_size)
    if cfg.use_pta:
        assert out.pta_logits.shape == out.logits.shape
        n = int(np.prod(cfg.token_grid))
        assert out.tag_maps.shape == (2, len(SEG_CLASSES), n)
        assert torch.allclose(out.tag_maps.sum(-1), torch.ones(2, len(SEG_CLASSES)), atol=1e-4)
    else:
        assert out.pta_logits is None and not hasattr(model, "tag_decoder")
    (out.logits.mean() + (out.pta_logits.mean() if cfg.use_pta else 0)).backward()
    assert model.vit.patch_embed.weight.grad is not None
    with pytest.raises(ValueError, match="expected"):
        model(torch.randn(1, 1, 8, 8, 8))


def test_keep_largest_component_relabels_stray_islands() -> None:
    k = len(SEG_CLASSES)
    left, body, bone = (SEG_CLASS_NAMES.index(n) for n in ("lung_left", "body", "bone"))
    scores = np.zeros((k, 12, 12, 12), np.float32)
    scores[body] = 1.0
    scores[left, 1:7, 1:7, 1:7] = 5.0  # the lung
    scores[left, 9:11, 9:11, 9:11] = 5.0  # a stray island, where "bone" is the runner-up
    scores[bone, 9:11, 9:11, 9:11] = 2.0
    scores[bone, 0, 0, 0:3] = 5.0  # bone may have several pieces
    scores[bone, 11, 11, 9:12] = 5.0
    classes = scores.argmax(0).astype(np.uint8)
    out = keep_largest_components(classes, scores)
    assert (out[1:7, 1:7, 1:7] == left).all()
    assert (out[9:11, 9:11, 9:11] == bone).all()
    assert (out[0, 0, 0:3] == bone).all() and (out[11, 11, 9:12] == bone).all()
    expected = np.zeros(out.shape, bool)
    expected[1:7, 1:7, 1:7] = True
    assert np.array_equal(out == left, expected)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path, model = _tiny_checkpoint(tmp_path)
    loaded = load_seg_checkpoint(path)
    assert loaded.config == model.config and loaded.preprocessing["image_size"] == [24, 24, 24]
    x = torch.randn(1, 1, 16, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in path.iterdir())
    with pytest.raises(ValueError, match="already holds"):
        save_seg_checkpoint(model, path, preprocessing=loaded.preprocessing)
    half = save_seg_checkpoint(model, tmp_path / "half", preprocessing=loaded.preprocessing, weights_dtype="float16")
    assert (half / "model.safetensors").stat().st_size < 0.6 * (path / "model.safetensors").stat().st_size
    with torch.no_grad():
        assert torch.allclose(load_seg_checkpoint(half).model(x), model(x), atol=5e-2)


def test_load_refuses_pickle_and_mismatch(tmp_path: Path) -> None:
    pkl = tmp_path / "model.pt"
    pkl.write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="pickle"):
        load_seg_checkpoint(pkl)
    path, _ = _tiny_checkpoint(tmp_path)
    cfg = (path / "config.json").read_text().replace('"hidden_size": 16', '"hidden_size": 32')
    (path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="does not match"):
        load_seg_checkpoint(path)


def test_load_refuses_pickle_renamed_safetensors(tmp_path: Path) -> None:
    """A pickle hiding under model.safetensors is named as such before any loader opens it."""
    import pickle

    path, _ = _tiny_checkpoint(tmp_path)
    (path / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ValueError, match="refusing to load .*pickle"):
        load_seg_checkpoint(path)


def test_missing_weights_fail_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nothing"
    monkeypatch.setenv(ENV_WEIGHTS, str(missing))
    assert default_weights_path() == missing
    reason = unavailable_reason()
    assert reason is not None and str(missing) in reason and "finetune_seg" in reason
    vol = _phantom(size=(32, 48, 48)).volume
    t0 = time.perf_counter()
    with pytest.raises(SegmentationUnavailable, match="weights not found"):
        segment(vol, backend="builtin")
    with pytest.raises(ValueError, match="weights not found"):
        builtin_labels(vol)
    assert time.perf_counter() - t0 < 5.0  # fails fast: nothing is loaded or fetched


def test_backend_on_input_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _tiny_checkpoint(tmp_path)
    monkeypatch.setenv(ENV_WEIGHTS, str(path))
    assert "builtin" in BACKENDS and unavailable_reason() is None
    vol = _phantom(size=(40, 48, 56)).volume
    calls = []
    seg = segment(vol, backend="builtin", progress=lambda d, t, m: calls.append(m))
    assert seg.backend == "builtin"
    assert seg.labels.shape == vol.shape and seg.labels.dtype == np.uint8
    assert set(np.unique(seg.labels).tolist()) <= ORGAN_VALUES
    assert any("sliding window" in m for m in calls)


def test_auto_uses_builtin_only_with_user_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default weights are phantom-only: backend="auto" skips them unless $NAPARI_CTVLP_BUILTIN_SEG is set."""
    path, _ = _tiny_checkpoint(tmp_path)
    try:
        monkeypatch.delenv(ENV_WEIGHTS, raising=False)
        register_default_backends()
        assert BACKENDS["builtin"].auto is False
        monkeypatch.setenv(ENV_WEIGHTS, str(path))
        register_default_backends()
        assert BACKENDS["builtin"].auto is True
        vol = _phantom(size=(32, 48, 48)).volume
        off = dataclasses.replace(BACKENDS["totalsegmentator"], unavailable_reason=lambda *, fast=True: "off")
        monkeypatch.setitem(BACKENDS, "totalsegmentator", off)
        assert segment(vol).backend == "builtin"
    finally:
        monkeypatch.delenv(ENV_WEIGHTS, raising=False)
        register_default_backends()


def test_init_from_ctvlp_copies_encoder() -> None:
    from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig

    ctvlp = CTVLP(CTVLPConfig.tiny()).eval()
    cfg = SegModelConfig.from_ctvlp(ctvlp.config, feature_size=4)
    assert cfg.roi_size == ctvlp.config.image_size and cfg.tag_embed_dim == ctvlp.config.embed_dim
    seg = BuiltinSegNet(cfg)
    info = init_from_ctvlp(seg, ctvlp)
    assert info["copied"] > 0 and not info["skipped"] and info["tag_embeddings"]
    assert torch.equal(seg.vit.pos_embed, ctvlp.vit.pos_embed)
    last = f"decoder.layers.{len(seg.tag_decoder.decoder.layers) - 1}.multihead_attn.in_proj_weight"  # the maps
    assert torch.equal(seg.tag_decoder.get_parameter(last), ctvlp.tag_decoder.get_parameter(last))
    with torch.no_grad():
        expected = ctvlp.encode_tags([c.phrase for c in SEG_CLASSES])  # as the CTVLP decodes its tags
    assert torch.allclose(seg.tag_embeddings, expected)


@pytest.mark.slow
def test_shipped_weights_segment_a_phantom(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped phantom model on an unseen 128^3 phantom: lungs and body found (speed: benchmarks)."""
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    if unavailable_reason() is not None:
        pytest.skip(f"no shipped builtin weights: {unavailable_reason()}")
    ph = _phantom(size=(128, 128, 128), seed=777)
    labels = builtin_labels(ph.volume)
    assert labels.shape == ph.volume.shape
    ref, pred = organs_to_classes(ph.organs), organs_to_classes(labels)
    for name in ("lung_left", "lung_right", "body"):
        c = [s.name for s in SEG_CLASSES].index(name)
        dice = 2 * np.sum((ref == c) & (pred == c)) / (np.sum(ref == c) + np.sum(pred == c))
        assert dice > 0.8, (name, dice)
