"""The ``builtin`` segmentation backend: the project's own small model (MOSMOS-style fine-tuned UNETR).

A seg checkpoint is a directory (default: ``napari_ctvlp/models/builtin_seg_phantom/``)::

    config.json         format, architecture (SegModelConfig), classes, preprocessing, training, metrics
    model.safetensors   tensors only (never a pickle)
    MODEL_CARD.md       what it is, how it was trained, its limits

Inference: :func:`~napari_ctvlp.engine.preprocess.preprocess` onto the model grid, MONAI
``sliding_window_inference`` (ROI = the network input, overlap 0.5, Gaussian blending), argmax,
classes -> organ labels, then :func:`~napari_ctvlp.engine.preprocess.to_source_grid` (nearest)
back onto the input grid. Voxels outside the model grid get 0 (background).

This module imports torch only inside functions (napari imports the segmentation package at
start-up).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..volume import CTVolume, ProgressCallback, report

if TYPE_CHECKING:
    import torch

    from ..networks.seg_model import BuiltinSegNet, SegModelConfig

__all__ = [
    "SEG_FORMAT",
    "ENV_WEIGHTS",
    "LoadedSegModel",
    "builtin_labels",
    "default_weights_path",
    "keep_largest_components",
    "load_seg_checkpoint",
    "predict_classes",
    "in_auto",
    "save_seg_checkpoint",
    "unavailable_reason",
]

logger = logging.getLogger(__name__)

SEG_FORMAT = "napari-ctvlp-seg-checkpoint"
SEG_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "MODEL_CARD.md"
#: Environment variable naming another seg checkpoint directory for the ``builtin`` backend.
ENV_WEIGHTS = "NAPARI_CTVLP_BUILTIN_SEG"
_TRAIN_HINT = "train one with `python -m training.finetune_seg --data phantom --out runs/seg` and set {env}=runs/seg/checkpoint"


@dataclass(frozen=True)
class LoadedSegModel:
    """Result of :func:`load_seg_checkpoint`.

    Attributes:
        model: :class:`~napari_ctvlp.engine.networks.seg_model.BuiltinSegNet` in eval mode.
        config: its architecture.
        preprocessing: ``PreprocessConfig.to_dict()`` of the model grid.
        meta: the rest of ``config.json`` (``classes``, ``training``, ``metrics``, ...).
        path: the checkpoint directory.
    """

    model: BuiltinSegNet
    config: SegModelConfig
    preprocessing: dict[str, Any]
    meta: dict[str, Any]
    path: Path


def default_weights_path() -> Path:
    """The weights the backend uses: ``$NAPARI_CTVLP_BUILTIN_SEG`` or the shipped ``builtin_seg_phantom``."""
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "models" / "builtin_seg_phantom"


def _missing(path: Path) -> str | None:
    if not path.is_dir():
        return f"built-in segmentation weights not found: {path} does not exist"
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            return f"built-in segmentation weights incomplete: {path / name} is missing"
    return None


def unavailable_reason(*, fast: bool = True, weights: str | Path | None = None) -> str | None:
    """None if the built-in model can run (weights present, torch and MONAI installed), else why and the fix."""
    path = Path(weights) if weights is not None else default_weights_path()
    problem = _missing(path)
    if problem:
        return f"{problem}; {_TRAIN_HINT.format(env=ENV_WEIGHTS)}"
    import importlib.util

    for mod in ("torch", "monai", "safetensors"):
        if importlib.util.find_spec(mod) is None:
            return f"the built-in segmentation model needs {mod}: pip install napari-ctvlp"
    return None


def save_seg_checkpoint(
    model: BuiltinSegNet,
    directory: str | Path,
    *,
    preprocessing: dict[str, Any],
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    model_card: str | None = None,
    weights_dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write a seg checkpoint directory (safetensors + JSON config + model card; no pickle).

    Args:
        model: the network.
        directory: output directory (created).
        preprocessing: ``PreprocessConfig.to_dict()`` of the model grid.
        training: JSON-safe record of the run.
        metrics: JSON-safe evaluation (Dice/HD95 per organ).
        model_card: Markdown for ``MODEL_CARD.md`` (a short generated one if None).
        weights_dtype: ``"float32"`` or ``"float16"`` (half the size, loaded back as float32).
        overwrite: replace an existing checkpoint.
    """
    import torch
    from safetensors.torch import save_file

    from ..networks.seg_model import SEG_CLASSES, BuiltinSegNet

    if not isinstance(model, BuiltinSegNet):
        raise ValueError(f"model must be a BuiltinSegNet, got {type(model).__name__}")
    if weights_dtype not in ("float32", "float16"):
        raise ValueError(f"weights_dtype must be 'float32' or 'float16', got {weights_dtype!r}")
    size = tuple(int(s) for s in preprocessing.get("image_size", ()))
    if len(size) != 3 or any(g < r for g, r in zip(size, model.config.roi_size)):
        raise ValueError(f"preprocessing image_size {size} must be 3 sizes >= the model ROI {model.config.roi_size}")
    out = Path(directory).expanduser()
    if not overwrite and (out / WEIGHTS_NAME).exists():
        raise ValueError(f"{out} already holds a seg checkpoint; pass overwrite=True to replace it")
    doc = {
        "format": SEG_FORMAT,
        "format_version": SEG_FORMAT_VERSION,
        "architecture": model.config.to_dict(),
        "classes": [{"name": c.name, "phrase": c.phrase, "organ_values": list(c.organ_values),
                     "output_value": c.output_value} for c in SEG_CLASSES],
        "preprocessing": preprocessing,
        "weights_dtype": weights_dtype,
        "training": training or {},
        "metrics": metrics or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(doc, indent=2) + "\n"  # fails early on non-JSON values
    cast = getattr(torch, weights_dtype)
    tensors = {k: v.detach().to("cpu", cast if v.is_floating_point() else v.dtype).contiguous().clone()
               for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "napari_ctvlp_format": SEG_FORMAT})
    os.chmod(tmp, 0o644)  # safetensors writes 0600; a shipped model must be readable by all
    os.replace(tmp, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(text)
    if model_card is None:
        model_card = (f"# Built-in organ segmentation model\n\nArchitecture: `{model.config.to_dict()}`\n\n"
                      f"Training: `{json.dumps(training or {})}`\n\nMetrics: `{json.dumps(metrics or {})}`\n")
    (out / CARD_NAME).write_text(model_card)
    return out


def load_seg_checkpoint(path: str | Path, *, device: str = "cpu") -> LoadedSegModel:
    """Load and validate a seg checkpoint written by :func:`save_seg_checkpoint`.

    Raises:
        ValueError: missing files, a pickle file (never opened), another format or version,
            classes that differ from this napari-ctvlp's, or tensors that do not match.
    """
    import torch
    from safetensors.torch import load_file

    from ..checkpoint import PICKLE_SUFFIXES, RETIRED_TENSOR_PREFIXES, sniff_unsafe
    from ..networks.seg_model import SEG_CLASSES, BuiltinSegNet, SegModelConfig

    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"refusing to load {p}: pickle-based files can execute code; use a seg checkpoint directory")
    problem = _missing(p)
    if problem:
        raise ValueError(problem)
    cfg_path = p / CONFIG_NAME
    try:
        doc = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != SEG_FORMAT:
        raise ValueError(f"{cfg_path}: not a {SEG_FORMAT} (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("format_version") != SEG_FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {doc.get('format_version')!r} is not {SEG_FORMAT_VERSION}")
    names = [c.get("name") for c in doc.get("classes", [])]
    if names != [c.name for c in SEG_CLASSES]:
        raise ValueError(f"{cfg_path}: classes {names} differ from this napari-ctvlp's {[c.name for c in SEG_CLASSES]}")
    try:
        config = SegModelConfig.from_dict(doc["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_path}: invalid architecture: {exc}") from exc
    reason = sniff_unsafe(p / WEIGHTS_NAME)
    if reason is not None:
        raise ValueError(f"refusing to load {p / WEIGHTS_NAME}: {reason}; only safetensors files are loaded")
    model = BuiltinSegNet(config)
    expected = model.state_dict()
    try:
        tensors = load_file(str(p / WEIGHTS_NAME), device="cpu")
    except Exception as exc:  # safetensors raises its own types for corrupt files
        raise ValueError(f"{p / WEIGHTS_NAME} is not a readable safetensors file: {exc}") from exc
    tensors = {k: v for k, v in tensors.items() if k in expected or not k.startswith(RETIRED_TENSOR_PREFIXES)}
    bad = [f"missing {k!r}" for k in expected if k not in tensors]
    bad += [f"unexpected {k!r}" for k in tensors if k not in expected]
    bad += [f"{k!r} shape {tuple(tensors[k].shape)} != {tuple(expected[k].shape)}"
            for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if bad:
        raise ValueError(f"{p / WEIGHTS_NAME} does not match its architecture: {'; '.join(bad[:10])}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    model.to(torch.device(device)).eval()
    meta = {k: v for k, v in doc.items() if k not in ("architecture", "preprocessing")}
    return LoadedSegModel(model, config, dict(doc["preprocessing"]), meta, p)


def predict_classes(
    model: BuiltinSegNet,
    image: np.ndarray,
    *,
    device: str = "cpu",
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    keep_largest: bool = True,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Class ids (uint8, ``image.shape``) by sliding-window inference over a model-grid image.

    Args:
        model: the network (eval mode).
        image: ``float32 [D, H, W]`` in ``[-1, 1]``, each side >= the model ROI.
        device: torch device.
        overlap: sliding-window overlap (0.5 as in UNETR/MOSMOS).
        sw_batch_size: windows per forward pass.
        keep_largest: for the single-piece organs (:data:`SINGLE_COMPONENT_CLASSES`) keep the
            largest connected component; voxels of the other pieces take their next most likely
            class (removes stray islands, which dominate HD95).
        progress: ``progress(done, total, message)`` per window batch.
    """
    import torch
    from monai.inferers import sliding_window_inference

    if image.ndim != 3:
        raise ValueError(f"image must be [D, H, W], got shape {image.shape}")
    roi = model.config.roi_size
    if any(s < r for s, r in zip(image.shape, roi)):
        raise ValueError(f"image shape {image.shape} is smaller than the model ROI {roi}")
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    n_win = int(np.prod([1 + int(np.ceil(max(0, s - r) / max(1, r * (1 - overlap)))) for s, r in zip(image.shape, roi)]))
    total = max(1, int(np.ceil(n_win / sw_batch_size)))
    done = [0]

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        out = model(batch)
        done[0] += 1
        report(progress, min(done[0], total), total, "builtin segmentation: sliding window")
        return out

    with torch.inference_mode():
        logits = sliding_window_inference(x, roi, sw_batch_size, predictor, overlap=overlap, mode="gaussian")
    scores = logits[0].float().cpu().numpy()
    classes = scores.argmax(0).astype(np.uint8)
    return keep_largest_components(classes, scores) if keep_largest else classes


#: Classes that are one connected structure in a chest CT (stray islands of them are errors).
SINGLE_COMPONENT_CLASSES: tuple[str, ...] = (
    "lung_left", "lung_right", "trachea", "esophagus", "heart", "aorta", "spine", "body",
)


def keep_largest_components(classes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component of each :data:`SINGLE_COMPONENT_CLASSES` class.

    Args:
        classes: ``uint8 [D, H, W]`` class ids (argmax of ``scores``).
        scores: ``[K, D, H, W]`` logits; removed voxels take their best other class.
    """
    from scipy import ndimage

    from ..networks.seg_model import SEG_CLASS_NAMES

    out = classes.copy()
    for name in SINGLE_COMPONENT_CLASSES:
        c = SEG_CLASS_NAMES.index(name)
        mask = out == c
        if not mask.any():
            continue
        lab, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        counts = np.bincount(lab.ravel())
        counts[0] = 0
        stray = mask & (lab != counts.argmax())
        if stray.any():
            s = scores[:, stray]
            s[c] = -np.inf
            out[stray] = s.argmax(0).astype(np.uint8)
    return out


_CACHE: dict[tuple[str, float, str], LoadedSegModel] = {}
_CACHE_LOCK = threading.Lock()


def _cached(path: Path, device: str) -> LoadedSegModel:
    key = (str(path.resolve()), (path / WEIGHTS_NAME).stat().st_mtime, device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = load_seg_checkpoint(path, device=device)
        return _CACHE[key]


def builtin_labels(
    volume: CTVolume,
    *,
    weights: str | Path | None = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Organ labels (``uint8``, ``volume.shape``, values of ``ORGAN_LABELS``) from the built-in model.

    Args:
        volume: CT in HU.
        weights: seg checkpoint directory; default :func:`default_weights_path`.
        device: torch device.
        progress: ``progress(done, total, message)``.

    Raises:
        ValueError: the weights are missing or invalid (checked before any work).
    """
    from ..networks.seg_model import classes_to_organs
    from ..preprocess import PreprocessConfig, preprocess, to_source_grid

    path = Path(weights).expanduser() if weights is not None else default_weights_path()
    problem = _missing(path)
    if problem:
        raise ValueError(f"{problem}; {_TRAIN_HINT.format(env=ENV_WEIGHTS)}")
    t0 = time.perf_counter()
    loaded = _cached(path, device)
    report(progress, 0, 1, "builtin segmentation: preprocessing")
    prepared = preprocess(volume, config=PreprocessConfig.from_dict(loaded.preprocessing))
    classes = predict_classes(loaded.model, prepared.image, device=device, progress=progress)
    organs = classes_to_organs(classes)
    out = to_source_grid(organs, prepared, order=0, cval=0)
    logger.info("builtin segmentation of %s in %.2f s", volume.shape, time.perf_counter() - t0)
    return np.ascontiguousarray(out, dtype=np.uint8)


def in_auto() -> bool:
    """Whether ``backend="auto"`` may pick this backend: only when ``$NAPARI_CTVLP_BUILTIN_SEG`` names
    weights. The shipped weights know only synthetic phantoms (real-CT body Dice 0.43, lungs < 0.1),
    so "auto" keeps preferring TotalSegmentator / the HU threshold; ``backend="builtin"`` always works."""
    return bool(os.environ.get(ENV_WEIGHTS))
