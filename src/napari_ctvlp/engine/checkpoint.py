"""Safe checkpoints: ``model.safetensors`` + ``config.json`` (+ ``MODEL_CARD.md``).

A checkpoint is a directory::

    ctvlp_phantom_demo/
        config.json        format, version, architecture, anatomy table, preprocessing, training
        model.safetensors  tensors only (never a pickle); frozen pretrained text-backbone tensors
                           are omitted and restored from the base text encoder at load time
        MODEL_CARD.md      what the model is, how it was trained, what it must not be used for

Pickle-based files (``torch.save`` output, ``.pt``/``.pth``/``.bin``/``.ckpt``/``.pkl``) are
refused without being opened by a pickle loader: unpickling can execute arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_ctvlp.engine.anatomy import ABNORMALITIES, ABNORMALITY_BY_NAME, ANATOMY_BY_NAME
from napari_ctvlp.engine.networks.config import CTVLPConfig

if TYPE_CHECKING:
    import torch

    from napari_ctvlp.engine.networks.ctvlp import CTVLP

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "save_checkpoint",
    "load_checkpoint",
    "default_checkpoint_path",
    "anatomy_table",
    "FORMAT",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

FORMAT = "napari-ctvlp-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "MODEL_CARD.md"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
_REQUIRED_KEYS = ("format", "format_version", "architecture", "anatomy_table", "preprocessing", "text_encoder")
_STORE_DTYPES = ("float32", "float16", "bfloat16")


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe (pickle), malformed or does not match the architecture."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """Result of :func:`load_checkpoint`.

    Attributes:
        model: the :class:`CTVLP` in eval mode on the requested device.
        config: its architecture.
        preprocessing: the preprocessing dict saved with it (``PreprocessConfig.to_dict()``).
        meta: the rest of ``config.json``: ``version``, ``format_version``, ``training``,
            ``anatomy_table``, ``text_encoder``, ``created``.
        model_card: text of ``MODEL_CARD.md`` or None.
        path: the checkpoint directory.
    """

    model: CTVLP
    config: CTVLPConfig
    preprocessing: dict[str, Any]
    meta: dict[str, Any]
    model_card: str | None
    path: Path


# ---------------------------------------------------------------------- helpers
def anatomy_table(config: CTVLPConfig) -> dict[str, Any]:
    """The anatomy table stored with a model: its anatomy groups and abnormality -> anatomy map."""
    unknown = [a for a in config.anatomies if a not in ANATOMY_BY_NAME]
    if unknown:
        raise CheckpointError(f"config anatomies {unknown} are not in the anatomy table ({', '.join(ANATOMY_BY_NAME)})")
    return {
        "anatomies": [
            {"name": a.name, "phrase": a.phrase, "organ_labels": list(a.organ_labels), "dilate_mm": a.dilate_mm}
            for a in (ANATOMY_BY_NAME[n] for n in config.anatomies)
        ],
        "abnormalities": {ab.name: ab.anatomy for ab in ABNORMALITIES if ab.anatomy in config.anatomies},
    }


def _validate_anatomy_table(table: Any, config: CTVLPConfig, where: Path) -> None:
    if not isinstance(table, dict) or not isinstance(table.get("anatomies"), list) \
            or not isinstance(table.get("abnormalities"), dict):
        raise CheckpointError(f"{where}: anatomy_table must have an 'anatomies' list and an 'abnormalities' map")
    names = []
    for entry in table["anatomies"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in ANATOMY_BY_NAME:
            raise CheckpointError(
                f"{where}: unknown anatomy {name!r} in anatomy_table; this napari-ctvlp knows "
                f"{', '.join(ANATOMY_BY_NAME)}"
            )
        known = list(ANATOMY_BY_NAME[name].organ_labels)
        if list(entry.get("organ_labels", [])) != known:
            raise CheckpointError(
                f"{where}: anatomy {name!r} was trained on organ labels {entry.get('organ_labels')}, "
                f"but this napari-ctvlp defines it as {known}"
            )
        names.append(name)
    if tuple(names) != config.anatomies:
        raise CheckpointError(
            f"{where}: anatomy_table anatomies {names} do not match architecture anatomies {list(config.anatomies)}"
        )
    for abnormality, anatomy in table["abnormalities"].items():
        if abnormality not in ABNORMALITY_BY_NAME:
            raise CheckpointError(f"{where}: unknown abnormality {abnormality!r} in anatomy_table")
        if anatomy not in config.anatomies:
            raise CheckpointError(
                f"{where}: abnormality {abnormality!r} is mapped to anatomy {anatomy!r}, which the model does not pool"
            )
        if ABNORMALITY_BY_NAME[abnormality].anatomy != anatomy:
            logger.warning("%s: %s was trained in anatomy %r, the current table uses %r",
                           where, abnormality, anatomy, ABNORMALITY_BY_NAME[abnormality].anatomy)


def _check_preprocessing(preprocessing: Any, config: CTVLPConfig, where: str) -> None:
    if not isinstance(preprocessing, dict):
        raise CheckpointError(f"{where}: preprocessing must be a dict, got {type(preprocessing).__name__}")
    size = preprocessing.get("image_size")
    if size is not None and tuple(int(s) for s in size) != config.image_size:
        raise CheckpointError(
            f"{where}: preprocessing image_size {tuple(size)} differs from the model input grid {config.image_size}"
        )


def _frozen_checksum(state: dict[str, torch.Tensor], names: list[str]) -> str:
    """SHA-256 over the frozen tensors (name, shape, dtype, bytes), to detect a changed base encoder."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(names):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def sniff_unsafe(path: Path) -> str | None:
    """Why ``path`` is not a safetensors file (None if its header looks right). Never unpickles."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if n + 8 <= size and head[8:9] == b"{":
            return None
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive (torch.save output containing pickled data)"
    if head[:1] == b"\x80":
        return "it is a Python pickle (torch.save / pickle.dump output)"
    return "it has no safetensors header"


#: Bytes per element of the safetensors dtypes (``BOOL`` .. ``F64``).
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
#: Largest safetensors JSON header read (the format itself caps it at 100 MB).
_MAX_SAFETENSORS_HEADER = 100_000_000


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` from the JSON header of a safetensors file, without loading tensors.

    Every entry is checked against the file: known dtype, non-negative shape, byte range inside
    the data section and of exactly ``prod(shape) * itemsize`` bytes.

    Raises:
        CheckpointError: the header is missing, too large, not JSON or inconsistent with the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise CheckpointError(f"{path}: safetensors header length {n} does not fit the {size}-byte file")
        raw = fh.read(n)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_size = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in doc.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(v) for v in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed safetensors header entry {name!r}") from exc
        itemsize = _SAFETENSORS_DTYPE_BYTES.get(dtype)
        if itemsize is None or any(v < 0 for v in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r} / shape {shape} that cannot be loaded")
        count = 1
        for v in shape:
            count *= v
        if not 0 <= begin <= end <= data_size or end - begin != count * itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({dtype}, shape {shape}) claims bytes {begin}..{end} but the file's "
                f"data section has {data_size} bytes (truncated or corrupt file)"
            )
        out[str(name)] = (dtype, shape)
    return out


def architecture_min_parameters(config: CTVLPConfig) -> int:
    """A lower bound of the parameter count of the image encoder ``config`` describes, without building it.

    Per ViT block at least ``qkv + proj`` (``4 C^2``) and the MLP (``2 C M``), plus the patch
    embedding and the position embedding; the text side, decoder and biases are not counted.
    """
    c, m = int(config.hidden_size), int(config.mlp_dim)
    tokens = 1
    patch = int(config.in_channels)
    for s, p in zip(config.image_size, config.patch_size):
        tokens *= int(s) // int(p)
        patch *= int(p)
    return int(config.depth) * (4 * c * c + 2 * c * m) + tokens * c + patch * c


def _check_size_against_weights(config: CTVLPConfig, header: dict[str, tuple[str, tuple[int, ...]]],
                                config_path: Path, weights: Path) -> None:
    """Refuse an architecture larger than the weights file before the model is built (and allocated)."""
    stored = 0
    for _dtype, shape in header.values():
        count = 1
        for v in shape:
            count *= v
        stored += count
    need = architecture_min_parameters(config)
    if need > stored:
        raise CheckpointError(
            f"{config_path}: its architecture (ViT width {config.hidden_size}, depth {config.depth}, MLP "
            f"{config.mlp_dim}, input {config.image_size}) has at least {need:,} image-encoder parameters, but "
            f"{weights.name} holds only {stored:,}; refusing to build it (config.json does not belong to these weights)"
        )


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"refusing to load {path}: pickle-based checkpoints (.pt/.pth/.bin/.ckpt/.pkl) can execute code "
        "when loaded and are never opened; use a napari-ctvlp checkpoint directory with "
        f"{WEIGHTS_NAME} + {CONFIG_NAME} (written by save_checkpoint)"
    )


def _resolve(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint directory, weights file) for a directory, its config.json or its weights file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse_pickle(p)
    if p.is_dir():
        directory, weights = p, p / WEIGHTS_NAME
        if not weights.is_file():
            pickles = sorted(q.name for q in p.iterdir() if q.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise _refuse_pickle(p / pickles[0])
            raise CheckpointError(f"checkpoint directory {p} has no {WEIGHTS_NAME}")
    elif p.name == CONFIG_NAME:
        directory, weights = p.parent, p.parent / WEIGHTS_NAME
    elif p.suffix.lower() == ".safetensors":
        directory, weights = p.parent, p
    else:
        raise CheckpointError(f"{p} is not a checkpoint (expected a directory, {CONFIG_NAME} or {WEIGHTS_NAME})")
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {weights.name}")
    reason = sniff_unsafe(weights)
    if reason is not None:
        raise CheckpointError(f"refusing to load {weights}: {reason}; only safetensors files are loaded")
    if not (directory / CONFIG_NAME).is_file():
        raise CheckpointError(f"checkpoint {directory} has no {CONFIG_NAME}")
    return directory, weights


def _default_card(config: CTVLPConfig, training: dict[str, Any], stored: str) -> str:
    lines = [
        "# napari-ctvlp model",
        "",
        "Fine-grained 3D chest-CT vision-language model (CA-GCL anatomy pooling, MOSMOS tag decoder).",
        "",
        "**Research use only. Not a medical device; not for diagnosis or treatment decisions.**",
        "",
        "## Architecture",
        f"- input grid {config.image_size}, patch {config.patch_size}, ViT width {config.hidden_size}, "
        f"depth {config.depth}, heads {config.num_heads}",
        f"- joint embedding {config.embed_dim}; text encoder `{config.text_encoder}` "
        f"({'random init' if config.text_random_init else 'pretrained'}, stored tensors: {stored})",
        f"- anatomies: {', '.join(config.anatomies)}",
        "",
        "## Training",
    ]
    lines += [f"- {k}: {v}" for k, v in training.items()] or ["- (not recorded)"]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- public API
def save_checkpoint(
    model: CTVLP,
    directory: str | Path,
    *,
    preprocessing: dict[str, Any],
    training: dict[str, Any] | None = None,
    model_card: str | None = None,
    overwrite: bool = False,
    weights_dtype: str = "float32",
) -> Path:
    """Write ``model`` as a safe checkpoint directory.

    Args:
        model: the model to save.
        directory: output directory (created).
        preprocessing: the preprocessing the model expects (``PreprocessConfig.to_dict()``).
        training: JSON-safe record of the training run (data, steps, seed, ...).
        model_card: Markdown for ``MODEL_CARD.md`` (a short generated card if None).
        overwrite: replace an existing checkpoint in ``directory``.
        weights_dtype: store floating tensors as ``float32`` (exact) or ``float16``/``bfloat16``
            (half the size; loaded back into float32).

    Returns:
        The checkpoint directory.
    """
    import torch
    from safetensors.torch import save_file

    from napari_ctvlp import __version__
    from napari_ctvlp.engine.networks.ctvlp import CTVLP

    if not isinstance(model, CTVLP):
        raise CheckpointError(f"model must be a CTVLP, got {type(model).__name__}")
    if weights_dtype not in _STORE_DTYPES:
        raise CheckpointError(f"weights_dtype must be one of {_STORE_DTYPES}, got {weights_dtype!r}")
    config = model.config
    out = Path(directory).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"checkpoint directory {out} exists and is a file")
    if not overwrite and any((out / n).exists() for n in (WEIGHTS_NAME, CONFIG_NAME)):
        raise CheckpointError(f"{out} already holds a checkpoint; pass overwrite=True to replace it")
    _check_preprocessing(preprocessing, config, "save_checkpoint")
    training = dict(training or {})
    for key, value in (("preprocessing", preprocessing), ("training", training)):
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"save_checkpoint: {key} is not JSON-serialisable: {exc}") from exc

    state = model.state_dict()
    frozen = model.frozen_state_names()
    stored = "trainable" if frozen else "all"
    cast = getattr(torch, weights_dtype)
    tensors = {
        k: (v.detach().to("cpu", cast if v.is_floating_point() else v.dtype)).contiguous().clone()
        for k, v in state.items() if k not in set(frozen)
    }
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "napari_ctvlp_version": __version__,
        "architecture": config.to_dict(),
        "anatomy_table": anatomy_table(config),
        "preprocessing": preprocessing,
        "text_encoder": {
            "name": config.text_encoder,
            "stored_tensors": stored,
            "omitted_tensors": len(frozen),
            "base_sha256": _frozen_checksum(state, frozen) if frozen else None,
        },
        "weights_dtype": weights_dtype,
        "training": training,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    weights_tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(weights_tmp), metadata={"format": "pt", "napari_ctvlp_format": FORMAT})
    os.replace(weights_tmp, out / WEIGHTS_NAME)
    _write_atomic(out / CONFIG_NAME, (json.dumps(doc, indent=2) + "\n").encode())
    card = model_card if model_card is not None else _default_card(config, training, stored)
    _write_atomic(out / CARD_NAME, card.encode())
    logger.info("saved checkpoint %s (%d tensors stored, %d frozen omitted)", out, len(tensors), len(frozen))
    return out


#: Tensors of layers that older versions stored and this one no longer has; dropped on load.
#: ``tag_decoder.map_q/map_k``: a separate map projection that no loss trained (the pixel-tag maps
#: are now the decoder's own cross-attention weights).
RETIRED_TENSOR_PREFIXES: tuple[str, ...] = ("tag_decoder.map_q.", "tag_decoder.map_k.")


def load_checkpoint(path: str | Path, *, device: str = "cpu") -> LoadedCheckpoint:
    """Load and validate a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: checkpoint directory, its ``config.json`` or its ``model.safetensors``.
        device: torch device for the model.

    Raises:
        CheckpointError: pickle files (never unpickled), unknown format or version, missing or
            unknown architecture keys, an unknown anatomy table, an architecture larger than the
            weights file holds (checked from the safetensors header before the model is built),
            missing/unexpected tensors or shape mismatches (each named).
    """
    import torch
    from safetensors.torch import load_file

    from napari_ctvlp.engine.networks.ctvlp import CTVLP

    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"invalid device {device!r}: {exc}") from exc
    directory, weights = _resolve(path)
    config_path = directory / CONFIG_NAME
    try:
        doc = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    missing = [k for k in _REQUIRED_KEYS if k not in doc]
    if missing:
        raise CheckpointError(f"{config_path} is missing key(s): {', '.join(missing)}")
    if doc["format"] != FORMAT:
        raise CheckpointError(f"{config_path}: format {doc['format']!r} is not {FORMAT!r}")
    version = doc["format_version"]
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise CheckpointError(
            f"{config_path}: format_version {version!r} is not supported (this napari-ctvlp reads "
            f"{FORMAT_VERSION}){'; upgrade napari-ctvlp' if newer else ''}"
        )
    try:
        config = CTVLPConfig.from_dict(doc["architecture"], strict=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: invalid architecture: {exc}") from exc
    _validate_anatomy_table(doc["anatomy_table"], config, config_path)
    _check_preprocessing(doc["preprocessing"], config, str(config_path))
    text_meta = doc["text_encoder"]
    stored = text_meta.get("stored_tensors") if isinstance(text_meta, dict) else None
    if stored not in ("trainable", "all"):
        raise CheckpointError(f"{config_path}: text_encoder.stored_tensors must be 'trainable' or 'all', got {stored!r}")
    if text_meta.get("name") != config.text_encoder:
        raise CheckpointError(
            f"{config_path}: text_encoder.name {text_meta.get('name')!r} differs from architecture "
            f"text_encoder {config.text_encoder!r}"
        )

    header = read_safetensors_header(weights)  # shapes only, nothing loaded
    _check_size_against_weights(config, header, config_path, weights)
    try:
        model = CTVLP(config)
    except ValueError as exc:
        raise CheckpointError(f"cannot build the model of {directory}: {exc}") from exc
    expected = model.state_dict()
    frozen = model.frozen_state_names() if stored == "trainable" else []
    if stored == "trainable" and not frozen:
        raise CheckpointError(f"{config_path}: says frozen text tensors were omitted, but the architecture freezes none")
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights} is not a readable safetensors file: {exc}") from exc
    retired = [k for k in tensors if k.startswith(RETIRED_TENSOR_PREFIXES) and k not in expected]
    if retired:
        logger.info("%s: ignoring %d tensor(s) of retired layers (%s)", weights, len(retired), ", ".join(retired))
        tensors = {k: v for k, v in tensors.items() if k not in set(retired)}
    wanted = [k for k in expected if k not in set(frozen)]
    problems = [f"missing tensor {k!r}" for k in wanted if k not in tensors]
    problems += [f"unexpected tensor {k!r}" for k in tensors if k not in expected or k in set(frozen)]
    problems += [
        f"tensor {k!r} has shape {tuple(tensors[k].shape)} in the checkpoint but {tuple(expected[k].shape)} "
        "in the architecture"
        for k in wanted if k in tensors and tensors[k].shape != expected[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... ({len(problems)} problems)" if len(problems) > 20 else "")
        raise CheckpointError(f"{weights} does not match its architecture: {shown}")
    if frozen:
        base = text_meta.get("base_sha256")
        if base and _frozen_checksum(expected, frozen) != base:
            raise CheckpointError(
                f"{directory}: the installed base text encoder {config.text_encoder!r} differs from the one "
                "this checkpoint was trained with (frozen-tensor checksum mismatch)"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=False)
    model.to(torch_device).eval()
    card_path = directory / CARD_NAME
    meta = {k: v for k, v in doc.items() if k not in ("architecture", "preprocessing")}
    meta["version"] = doc.get("napari_ctvlp_version")
    return LoadedCheckpoint(
        model=model,
        config=config,
        preprocessing=dict(doc["preprocessing"]),
        meta=meta,
        model_card=card_path.read_text() if card_path.is_file() else None,
        path=directory,
    )


def default_checkpoint_path() -> Path | None:
    """The demo checkpoint shipped in ``napari_ctvlp/models/ctvlp_phantom_demo`` (None if absent)."""
    import napari_ctvlp

    path = Path(napari_ctvlp.__file__).resolve().parent / "models" / "ctvlp_phantom_demo"
    return path if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file() else None
