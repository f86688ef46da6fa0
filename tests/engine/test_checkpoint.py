"""Tests of safe checkpoints: exact round trip, frozen text tensors, pickle refusal, validation."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from napari_ctvlp.engine.anatomy import ANATOMY_NAMES
from napari_ctvlp.engine.checkpoint import (
    RETIRED_TENSOR_PREFIXES,
    CheckpointError,
    default_checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from napari_ctvlp.engine.networks import CTVLP, CTVLPConfig

PREP = {"image_size": [32, 32, 32], "spacing_mm": [3.0, 1.5, 1.5], "hu_window": [-1000.0, 1000.0]}
A = len(ANATOMY_NAMES)


class _Boom:
    """Unpickling this creates ``marker``: proves whether a file was ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[CTVLP, Path]:
    torch.manual_seed(0)
    model = CTVLP(CTVLPConfig.tiny()).eval()
    out = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny", preprocessing=PREP,
                          training={"data": "phantom", "steps": 3, "seed": 0})
    return model, out


@pytest.fixture()
def ckpt_copy(tiny_ckpt: tuple[CTVLP, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_ckpt[1], tmp_path / "copy"))


def _edit_config(directory: Path, edit) -> None:
    doc = json.loads((directory / "config.json").read_text())
    edit(doc)
    (directory / "config.json").write_text(json.dumps(doc))


def _outputs(model: CTVLP) -> list[torch.Tensor]:
    image = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))
    masks = torch.zeros(1, A, 32, 32, 32, dtype=torch.bool)
    masks[0, 0, :16] = True
    masks[0, 2, 8:24, 8:24, 8:24] = True
    with torch.no_grad():
        tokens = model.encode_image(image)
        pooled = model.pool_anatomies(tokens, model.masks_to_tokens(masks), return_attention=True)
        tags = model.decode_tags(tokens)
        text = model.encode_text(["Pleural effusion.", "No cardiomegaly."])
    return [tokens, pooled.embeddings, pooled.attention, tags.maps, tags.logits, text]


def test_round_trip_is_exact(tiny_ckpt: tuple[CTVLP, Path]) -> None:
    model, path = tiny_ckpt
    assert sorted(p.name for p in path.iterdir()) == ["MODEL_CARD.md", "config.json", "model.safetensors"]
    for target in (path, path / "config.json", path / "model.safetensors"):
        loaded = load_checkpoint(target)
        assert loaded.path == path and loaded.config == model.config
        assert not loaded.model.training
        ref, got = model.state_dict(), loaded.model.state_dict()
        assert ref.keys() == got.keys()
        for k in ref:
            assert torch.equal(ref[k], got[k]), k
    for a, b in zip(_outputs(model), _outputs(loaded.model)):
        assert torch.equal(a, b)
    assert loaded.preprocessing == PREP
    assert loaded.meta["training"] == {"data": "phantom", "steps": 3, "seed": 0}
    assert loaded.meta["version"] and loaded.meta["format_version"] == 1
    assert loaded.meta["text_encoder"]["stored_tensors"] == "all"
    assert [a["name"] for a in loaded.meta["anatomy_table"]["anatomies"]] == list(ANATOMY_NAMES)
    assert loaded.meta["anatomy_table"]["abnormalities"]["Pleural effusion"] == "lung"
    assert "Research use only" in loaded.model_card


def test_config_json_content(tiny_ckpt: tuple[CTVLP, Path]) -> None:
    doc = json.loads((tiny_ckpt[1] / "config.json").read_text())
    assert doc["format"] == "napari-ctvlp-checkpoint" and doc["format_version"] == 1
    for key in ("napari_ctvlp_version", "architecture", "anatomy_table", "preprocessing",
                "text_encoder", "training", "created"):
        assert key in doc, key
    assert doc["architecture"] == CTVLPConfig.tiny().to_dict()
    assert doc["text_encoder"]["name"] == "minilm"


def test_overwrite_and_preprocessing_checks(tiny_ckpt: tuple[CTVLP, Path], tmp_path: Path) -> None:
    model, path = tiny_ckpt
    with pytest.raises(CheckpointError, match="overwrite=True"):
        save_checkpoint(model, path, preprocessing=PREP)
    with pytest.raises(CheckpointError, match="image_size"):
        save_checkpoint(model, tmp_path / "x", preprocessing={"image_size": [64, 64, 64]})
    with pytest.raises(CheckpointError, match="training is not JSON"):
        save_checkpoint(model, tmp_path / "y", preprocessing=PREP, training={"obj": object()})
    out = save_checkpoint(model, tmp_path / "z", preprocessing=PREP, model_card="# custom\n",
                          weights_dtype="float16")
    loaded = load_checkpoint(out)
    assert loaded.model_card == "# custom\n"
    for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_frozen_text_backbone_omitted_and_restored(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = CTVLPConfig.tiny(text_encoder="minilm", text_random_init=None, text_trainable_layers=1)
    model = CTVLP(cfg).eval()
    frozen = set(model.frozen_state_names())
    assert "text.backbone.embeddings.word_embeddings.weight" in frozen
    with torch.no_grad():  # a "trained" top layer must come from the checkpoint, not the base
        model.text.backbone.encoder.layer[5].output.dense.weight.add_(0.5)
    path = save_checkpoint(model, tmp_path / "minilm", preprocessing=PREP)
    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        stored = set(fh.keys())
    assert not stored & frozen
    assert "text.backbone.encoder.layer.5.output.dense.weight" in stored
    assert (path / "model.safetensors").stat().st_size < 12e6  # MiniLM alone is ~90 MB
    doc = json.loads((path / "config.json").read_text())
    assert doc["text_encoder"]["stored_tensors"] == "trainable"
    loaded = load_checkpoint(path)
    ref, got = model.state_dict(), loaded.model.state_dict()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    with torch.no_grad():
        assert torch.equal(model.encode_text(["Emphysema."]), loaded.model.encode_text(["Emphysema."]))
    # a different base encoder than the one trained with is detected
    _edit_config(path, lambda d: d["text_encoder"].update(base_sha256="0" * 64))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_torch_save_pickle_is_refused_unopened(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    target = tmp_path / "model.pt"
    torch.save({"weights": _Boom(marker)}, target)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(target)
    directory = tmp_path / "only_pt"
    directory.mkdir()
    shutil.copy(target, directory / "model.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(directory)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch_zip"])
def test_pickle_renamed_safetensors_is_refused(ckpt_copy: Path, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "unpickled"
    weights = ckpt_copy / "model.safetensors"
    if kind == "pickle":
        weights.write_bytes(pickle.dumps(_Boom(marker), protocol=4))
        expected = "Python pickle"
    else:
        torch.save({"w": _Boom(marker)}, weights)
        expected = "zip archive"
    for target in (ckpt_copy, weights):
        with pytest.raises(CheckpointError, match=expected):
            load_checkpoint(target)
    assert not marker.exists()


def test_architecture_shape_mismatch_names_tensor(ckpt_copy: Path) -> None:
    _edit_config(ckpt_copy, lambda d: d["architecture"].update(hidden_size=48))
    with pytest.raises(CheckpointError, match=r"tensor 'vit\.pos_embed' has shape \(1, 64, 32\).*\(1, 64, 48\)"):
        load_checkpoint(ckpt_copy)


def test_tampered_tensor_names_tensor(ckpt_copy: Path) -> None:
    weights = ckpt_copy / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["anatomy_pooling.queries"] = torch.zeros(A + 1, 32)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"'anatomy_pooling\.queries' has shape \(8, 32\)"):
        load_checkpoint(ckpt_copy)
    del tensors["anatomy_pooling.queries"]
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"missing tensor 'anatomy_pooling\.queries'.*unexpected tensor 'extra\.weight'"):
        load_checkpoint(ckpt_copy)


def test_retired_map_projections_are_dropped_on_load(ckpt_copy: Path, tiny_ckpt: tuple[CTVLP, Path]) -> None:
    """Checkpoints from before the maps became the decoder's cross-attention still load."""
    weights = ckpt_copy / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["tag_decoder.map_q.weight"] = torch.zeros(32, 32)
    tensors["tag_decoder.map_k.bias"] = torch.zeros(32)
    save_file(tensors, str(weights))
    loaded = load_checkpoint(ckpt_copy)
    assert "tag_decoder.map_q.weight" not in loaded.model.state_dict()
    for a, b in zip(_outputs(loaded.model), _outputs(load_checkpoint(tiny_ckpt[1]).model)):
        torch.testing.assert_close(a, b)
    tensors["tag_decoder.other.weight"] = torch.zeros(2)  # only the retired names are forgiven
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'tag_decoder\.other\.weight'"):
        load_checkpoint(ckpt_copy)


def test_shipped_demo_checkpoint_has_no_untrained_map_projection() -> None:
    path = default_checkpoint_path()
    assert path is not None
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith(RETIRED_TENSOR_PREFIXES)]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["architecture"].pop("depth"), "missing CTVLPConfig key.*depth"),
        (lambda d: d["architecture"].update(fancy_option=1), "unknown CTVLPConfig key.*fancy_option"),
        (lambda d: d.pop("anatomy_table"), "missing key.*anatomy_table"),
        (lambda d: d.update(format="something-else"), "format 'something-else'"),
        (lambda d: d.update(format_version=2), "format_version 2.*upgrade"),
        (lambda d: d["anatomy_table"]["anatomies"][1].update(name="pleura"), "unknown anatomy 'pleura'"),
        (lambda d: d["anatomy_table"]["anatomies"][1].update(organ_labels=[99]), "anatomy 'heart'.*organ labels"),
        (lambda d: d["anatomy_table"]["abnormalities"].update(Foo="lung"), "unknown abnormality 'Foo'"),
        (lambda d: d["architecture"].update(anatomies=["lung", "heart"]), "do not match architecture anatomies"),
        (lambda d: d["text_encoder"].update(stored_tensors="some"), "stored_tensors"),
        (lambda d: d["preprocessing"].update(image_size=[16, 16, 16]), "image_size"),
    ],
)
def test_bad_config_is_refused_with_a_named_reason(ckpt_copy: Path, edit, message: str) -> None:
    _edit_config(ckpt_copy, edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt_copy)


def test_missing_files_and_default_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    default = default_checkpoint_path()
    assert default is None or (default / "config.json").is_file()
    assert issubclass(CheckpointError, ValueError)
