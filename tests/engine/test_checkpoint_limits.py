"""A checkpoint's config.json is checked against its safetensors header before the model is built (issue 14).

A crafted config (width 8192, depth 48) used to build an 8.7 GB+ model before the weights were
looked at; now the safetensors header (shapes only, no tensor loaded) bounds what may be built.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from napari_ctvlp.engine import checkpoint as ckpt_mod
from napari_ctvlp.engine.checkpoint import CheckpointError, load_checkpoint, read_safetensors_header


@pytest.fixture()
def ckpt_copy(tiny_checkpoint_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint_dir, tmp_path / "copy"))


def _edit_architecture(directory: Path, **changes: object) -> None:
    doc = json.loads((directory / "config.json").read_text())
    doc["architecture"].update(changes)
    (directory / "config.json").write_text(json.dumps(doc))


def _no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make building the model fail loudly: the refusal must come before it."""
    import napari_ctvlp.engine.networks.ctvlp as ctvlp

    def refuse(self: object, *args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the config was checked against the weights")

    monkeypatch.setattr(ctvlp.CTVLP, "__init__", refuse)


def test_oversized_architecture_is_refused_before_building(ckpt_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _edit_architecture(ckpt_copy, hidden_size=8192, depth=48, num_heads=16, mlp_dim=32768)
    _no_build(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt_copy)
    message = str(info.value)
    assert "width 8192, depth 48" in message and "refusing to build it" in message, message
    assert "\n" not in message


def test_deeper_architecture_than_the_weights_is_refused_before_building(ckpt_copy: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _edit_architecture(ckpt_copy, depth=400)
    _no_build(monkeypatch)
    with pytest.raises(CheckpointError, match="holds only"):
        load_checkpoint(ckpt_copy)


def test_matching_config_still_loads(ckpt_copy: Path) -> None:
    loaded = load_checkpoint(ckpt_copy)
    stored = sum(v.numel() for v in loaded.model.state_dict().values())
    assert ckpt_mod.architecture_min_parameters(loaded.config) <= stored


def test_header_entries_outside_the_file_are_refused(ckpt_copy: Path) -> None:
    weights = ckpt_copy / "model.safetensors"
    header = read_safetensors_header(weights)
    assert header and all(isinstance(shape, tuple) for _, shape in header.values())
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    doc = json.loads(raw[8 : 8 + n])
    name = next(k for k in doc if k != "__metadata__")
    doc[name]["shape"] = [1 << 20, 1 << 20]  # claims 4 TB for one tensor
    body = json.dumps(doc).encode()
    weights.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(ckpt_copy)
