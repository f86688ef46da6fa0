"""The widgets' one door into the engine: layers -> CTVolume, pipeline calls, result -> rows.

Keeping every engine call here means the Qt classes only deal with plain rows and arrays.
Heavy modules (torch, the pipeline) are imported inside the functions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_ctvlp._layers import (
    DISPLAY_AXIS_LABELS,
    LABEL_KIND_KEY,
    ORGAN_KIND,
    TOTALSEG_KIND,
    VOLUME_KEY,
    DisplayGeometry,
    layer_geometry,
    volume_affine_from_layer,
)
from napari_ctvlp.engine.anatomy import ANATOMY_BY_NAME, ORGAN_LABELS, organ_label_names
from napari_ctvlp.engine.volume import CTVolume, ProgressCallback
from napari_ctvlp.widgets.export_panel import ExportSource
from napari_ctvlp.widgets.results_table import ResultRow

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ layers
def layer_kind(layer: Any) -> str:
    """``"image"``, ``"labels"``, ... of a napari layer (public API only)."""
    return type(layer).__name__.lower()


def layer_display(layer: Any, volume: CTVolume | None = None) -> DisplayGeometry:
    """How ``layer`` shows its CT: the reader's :class:`DisplayGeometry`, or the identity (the
    layer data *is* the volume array) for layers made elsewhere."""
    geometry = layer_geometry(layer.metadata)
    vol = volume if volume is not None else layer.metadata.get(VOLUME_KEY)
    if geometry is not None and isinstance(vol, CTVolume) and geometry.display_shape(vol.shape) == tuple(
            layer.data.shape):
        return geometry
    return DisplayGeometry(scale=tuple(float(s) for s in np.asarray(layer.scale)[-3:]),  # type: ignore[arg-type]
                           translate=tuple(float(t) for t in np.asarray(layer.translate)[-3:]))  # type: ignore[arg-type]


def layer_volume(layer: Any) -> CTVolume:
    """The CT of an Image layer: the reader's ``metadata["ctvlp_volume"]`` or one built from
    ``layer.data`` and ``layer.scale``/``translate`` (the RAS affine of our display frame when the
    layer has its axis labels, else a diagonal affine).

    Raises:
        ValueError: not an Image layer, multiscale, RGB or not 3D.
    """
    kind = layer_kind(layer)
    if kind != "image":
        raise ValueError(f"layer {layer.name!r} is a {kind} layer; choose a CT Image layer")
    if getattr(layer, "multiscale", False):
        raise ValueError(f"layer {layer.name!r} is multiscale; open the CT at a single resolution")
    if getattr(layer, "rgb", False):
        raise ValueError(f"layer {layer.name!r} is an RGB image, not a CT")
    if layer.ndim != 3:
        raise ValueError(f"layer {layer.name!r} has {layer.ndim} dimensions; a 3D CT volume is needed")
    volume = layer.metadata.get(VOLUME_KEY)
    geometry = layer_geometry(layer.metadata)
    if isinstance(volume, CTVolume):
        shown = geometry.display_shape(volume.shape) if geometry is not None else volume.shape
        if tuple(shown) == tuple(layer.data.shape):
            return volume
    array = np.asarray(layer.data)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"layer {layer.name!r} has {array.dtype} data; CT values (HU) are needed")
    scale = tuple(float(s) for s in layer.scale)
    if min(abs(s) for s in scale) <= 0:
        raise ValueError(f"layer {layer.name!r} has a zero scale {scale}")
    spacing = tuple(abs(s) for s in scale)
    if tuple(str(a) for a in layer.axis_labels) == DISPLAY_AXIS_LABELS:
        affine = volume_affine_from_layer(layer.scale, layer.translate)
    else:
        affine = np.eye(4)
        affine[:3, :3] = np.diag(spacing[::-1])
        affine[:3, 3] = np.asarray(layer.translate, dtype=float)[::-1]
    from nibabel.orientations import aff2axcodes

    return CTVolume(array, spacing, affine, tuple(aff2axcodes(affine)),  # type: ignore[arg-type]
                    {"path": layer.name, "format": "layer"})


def _layer_data_to_world(layer: Any) -> np.ndarray:
    """4x4 matrix of ``layer.data_to_world`` (from the public point mapping)."""
    ndim = layer.ndim
    origin = np.asarray(layer.data_to_world(np.zeros(ndim)), dtype=float)[-3:]
    out = np.eye(4)
    out[:3, 3] = origin
    for d in range(3):
        point = np.zeros(ndim)
        point[ndim - 3 + d] = 1.0
        out[:3, d] = np.asarray(layer.data_to_world(point), dtype=float)[-3:] - origin
    return out


def map_signed_permutation(src: np.ndarray, index_map: np.ndarray, dst_shape: tuple[int, ...]) -> np.ndarray | None:
    """``src`` placed on a grid of ``dst_shape`` when ``index_map`` (4x4, src index -> dst index)
    only permutes, flips and shifts whole voxels and ``src`` lies inside that grid (the rest is
    0, e.g. a DICOM-SEG covering only the segmented slices); else None."""
    lin, shift = np.asarray(index_map[:3, :3], float), np.asarray(index_map[:3, 3], float)
    if not np.allclose(np.abs(lin).sum(axis=1), 1.0, atol=1e-3) or not np.allclose(
            np.abs(lin).max(axis=1), 1.0, atol=1e-3):
        return None
    if not np.allclose(shift, np.round(shift), atol=1e-2):
        return None
    src_axis = [int(np.argmax(np.abs(lin[r]))) for r in range(3)]
    if sorted(src_axis) != [0, 1, 2]:
        return None
    moved = np.asarray(src).transpose(src_axis)
    where = []
    for r in range(3):
        sign, t, n = float(np.sign(lin[r, src_axis[r]])), int(round(shift[r])), moved.shape[r]
        if sign < 0:  # dst = t - src: src 0..n-1 lands on t-n+1..t
            moved = np.flip(moved, axis=r)
            t = t - n + 1
        if t < 0 or t + n > dst_shape[r]:
            return None
        where.append(slice(t, t + n))
    if moved.shape == tuple(dst_shape):
        return moved
    out = np.zeros(tuple(dst_shape), dtype=moved.dtype)
    out[tuple(where)] = moved
    return out


def layer_mask(layer: Any, volume: CTVolume, *, ct_layer: Any = None) -> np.ndarray:
    """The label map of a Labels layer on the volume grid of ``volume`` (a copy: never modified).

    The mask may be shown with another voxel order than the CT (a label file read by our reader
    whose axes are flipped or permuted relative to the CT, or napari's "New labels layer"): it is
    accepted when it lies on the CT's voxel grid in the world, and mapped onto it.

    Raises:
        ValueError: not a Labels layer, not integers, or not on the CT's grid.
    """
    kind = layer_kind(layer)
    if kind != "labels":
        raise ValueError(f"layer {layer.name!r} is a {kind} layer; the mask must be a Labels layer")
    data = np.asarray(layer.data)
    if data.dtype.kind not in "iub":
        raise ValueError(f"mask layer {layer.name!r} must hold integer labels, got {data.dtype}")
    if data.ndim != 3:
        raise ValueError(f"mask layer {layer.name!r} has {data.ndim} dimensions; the CT has 3")
    mask_volume = layer.metadata.get(VOLUME_KEY)
    mask_geometry = layer_geometry(layer.metadata)
    out = None
    if isinstance(mask_volume, CTVolume) and mask_geometry is not None and mask_geometry.display_shape(
            mask_volume.shape) == data.shape:
        # exact: the file affines of both (index of mask volume array -> index of CT volume array)
        index_map = np.linalg.inv(volume.display_affine) @ mask_volume.display_affine
        out = map_signed_permutation(mask_geometry.from_display(data), index_map, volume.shape)
    if out is None and ct_layer is not None:
        ct_geometry = layer_display(ct_layer, volume)
        index_map = np.linalg.inv(_layer_data_to_world(ct_layer)) @ _layer_data_to_world(layer)
        shown = map_signed_permutation(data, index_map, tuple(ct_layer.data.shape))
        out = None if shown is None else ct_geometry.from_display(shown)
    if out is None and ct_layer is None and data.shape == volume.shape:
        out = data
    if out is None:
        raise ValueError(f"mask layer {layer.name!r} (shape {data.shape}) is not on the CT's voxel grid "
                         f"(shape {volume.shape}): use a label map computed on this CT")
    return np.array(out, copy=True)


def mask_kind(labels: np.ndarray, metadata: dict[str, Any] | None = None) -> str:
    """``"organ"`` or ``"totalseg"``: what the values of a mask layer mean.

    The layer metadata says so when our reader or widget made it; otherwise the values decide:
    TotalSegmentator ``total`` ids run to 117, our organ labels to 15, and every TotalSegmentator
    map of a CT holds vertebrae, ribs or other ids above 15.
    """
    kind = (metadata or {}).get(LABEL_KIND_KEY)
    if kind in (ORGAN_KIND, TOTALSEG_KIND):
        return str(kind)
    top = int(labels.max()) if labels.size else 0
    return TOTALSEG_KIND if top > max(o.value for o in ORGAN_LABELS) else ORGAN_KIND


def mask_segmentation(labels: np.ndarray, volume: CTVolume, kind: str) -> Any:
    """An ``OrganSegmentation`` of a mask on the volume grid (TotalSegmentator ids mapped)."""
    from napari_ctvlp.engine.segmentation import from_label_file

    return from_label_file(labels, like=volume, kind=kind)  # type: ignore[arg-type]


def organ_layer_kwargs(labels: np.ndarray, volume: CTVolume, names: dict[int, str]) -> dict[str, Any]:
    """Keyword arguments of the organ Labels layer (names, colours; from ``_layers``)."""
    from napari_ctvlp._layers import organ_labels_layer

    _, kwargs, _ = organ_labels_layer(labels, volume, names=names)
    kwargs.pop("name", None)
    return kwargs


def result_centroids(result: Any) -> dict[str, np.ndarray | None]:
    """Centroid of every anatomy of a detection's organ labels (computed once, in the worker)."""
    from napari_ctvlp.engine.segmentation.stats import anatomy_centroids

    return anatomy_centroids(result_labels(result)[0])


# ------------------------------------------------------------------------- choices
def default_checkpoint() -> Path | None:
    """The shipped demo checkpoint folder, if any."""
    from napari_ctvlp.engine.checkpoint import default_checkpoint_path

    return default_checkpoint_path()


def model_card_text(path: str | Path | None) -> str:
    """``MODEL_CARD.md`` of a checkpoint folder (or why there is none)."""
    from napari_ctvlp.engine.checkpoint import CARD_NAME

    if path is None:
        return "No checkpoint selected: no demo model is shipped with this build. Use Browse... to pick one."
    card = Path(path) / CARD_NAME
    if not card.is_file():
        return f"{path}: no {CARD_NAME} in this checkpoint folder."
    try:
        return card.read_text(encoding="utf-8")
    except OSError as exc:
        return f"{card}: cannot read the model card ({exc})"


def segmentation_backends() -> dict[str, str | None]:
    """``{backend: None or why it is unavailable}``."""
    from napari_ctvlp.engine.segmentation import available_backends

    return available_backends()


def segmentation_picker_items() -> list[tuple[str, str, bool, str]]:
    """``(backend, item text, ready, tooltip)`` per backend, in ``auto`` order, for the picker.

    The text says whether the backend is ready (``"totalsegmentator: not ready (weights missing)"``);
    the tooltip gives its description, each missing piece (for TotalSegmentator: each model
    folder) and the fix (``napari-ctvlp weights import PATH`` / ``weights download``).
    """
    from napari_ctvlp.engine.segmentation import backend_readiness

    items = []
    for name, r in backend_readiness().items():
        if r.ready:
            text, tip = f"{name}: ready", r.description
        else:
            why = " ".join((r.reason or "", *r.missing)).lower()
            short = "not installed" if "not installed" in why else "weights missing" if "weights" in why else "unavailable"
            text = f"{name}: not ready ({short})"
            lines = [r.description, f"unavailable: {r.reason}"]
            lines += [f"missing: {m}" for m in r.missing if m != r.reason]
            tip = "\n".join(lines)
        items.append((name, text, r.ready, tip))
    return items


def cuda_unavailable_reason() -> str | None:
    """None when CUDA can be used, else a tooltip saying why not."""
    import torch

    if torch.cuda.is_available():
        return None
    return "CUDA is not available (no GPU, or this torch build is CPU-only)"


# ------------------------------------------------------------------------ detection
def run_detection(volume: CTVolume, *, checkpoint: str | None, segmentation: Any, device: str,
                  progress: ProgressCallback | None, cancel: Any) -> Any:
    """``engine.pipeline.detect`` with the widget's choices (runs in the worker thread)."""
    from napari_ctvlp.engine.pipeline import detect

    return detect(volume, checkpoint=checkpoint, segmentation=segmentation, device=device, heatmaps=True,
                  progress=progress, cancel=cancel)


def prepare_segmentation(volume: CTVolume, segmentation: Any, *, checkpoint: str | None, device: str,
                         mask_kind_hint: str | None, progress: ProgressCallback | None) -> Any:
    """The organ segmentation of a run, made before ``detect`` (worker thread).

    The checkpoint is loaded first (cached; a broken one fails before any long work), then a
    backend segments with ``progress`` reporting its own steps, so a cancel (raised from
    ``progress``) stops inside the segmentation stage too. A mask array becomes an
    ``OrganSegmentation`` of its recognised kind. Returns what ``detect(segmentation=...)`` takes.
    """
    from napari_ctvlp.engine.pipeline import load_model, resolve_device

    dev = resolve_device(device)
    if progress is not None:
        progress(1, len(detection_stages()), "model")
    load_model(checkpoint, device=dev)
    if progress is not None:
        progress(2, len(detection_stages()), "segmentation")
    if isinstance(segmentation, np.ndarray):
        return mask_segmentation(segmentation, volume, mask_kind(segmentation, {LABEL_KIND_KEY: mask_kind_hint}))
    from napari_ctvlp.engine.segmentation import BACKENDS, segment

    if isinstance(segmentation, str) and (segmentation == "auto" or segmentation in BACKENDS):
        return segment(volume, backend=segmentation, device=dev, progress=progress)
    return segmentation


def detection_stages() -> tuple[str, ...]:
    """The stage names ``detect`` reports, in order."""
    from napari_ctvlp.engine.pipeline import STAGES

    return tuple(STAGES)


def cancelled(stage: str) -> BaseException:
    """The error a cancelled detection ends with (raised from the progress callback, so the engine
    stops at its next progress report, also inside a long stage)."""
    from napari_ctvlp.engine.pipeline import DetectionCancelled

    return DetectionCancelled(f"detection cancelled during {stage}")


def describe_error(exc: BaseException | None) -> tuple[str, str]:
    """``(level, message)`` of a notification for a failed run."""
    from napari_ctvlp.engine.pipeline import DetectionCancelled

    if isinstance(exc, DetectionCancelled):
        return "info", "Detection cancelled; no layer was added."
    if isinstance(exc, MemoryError) or type(exc).__name__ in ("OutOfMemoryError",):
        return "error", ("Out of memory during detection: choose device 'cpu', close other volumes, "
                         f"or crop the CT ({type(exc).__name__}).")
    try:
        from napari_ctvlp.engine.checkpoint import CheckpointError
    except ImportError:  # pragma: no cover
        CheckpointError = ValueError  # type: ignore[misc,assignment]
    if isinstance(exc, CheckpointError):
        return "error", f"Checkpoint problem: {exc}"
    if isinstance(exc, FileNotFoundError):
        return "error", f"File not found: {exc}"
    if isinstance(exc, (ValueError, RuntimeError, OSError)):
        return "error", f"Detection failed: {exc}"
    logger.error("detection failed", exc_info=exc)
    return "error", f"Detection failed ({type(exc).__name__}): {exc}"


def backend_name(result: Any) -> str:
    """Which segmentation the result used."""
    return str(result.segmentation.backend)


def result_labels(result: Any) -> tuple[np.ndarray, dict[int, str]]:
    """Organ label map and ``{value: name}`` of a detection."""
    seg = result.segmentation
    return np.asarray(seg.labels), dict(seg.names or organ_label_names())


def result_rows(result: Any) -> list[ResultRow]:
    """Table rows (anatomy x abnormality) of a detection, with the call at the checkpoint's
    operating point on each abnormality's own anatomy."""
    info = result.checkpoint
    ops = dict(getattr(info, "operating_points", {}) or {})
    rows = []
    for r in result.rows():
        p = float(r["probability"])
        ok = bool(r["assessable"]) and not math.isnan(p)
        primary = bool(r.get("primary", False))
        abnormality = str(r["abnormality"])
        threshold = ops.get(abnormality) if primary else None
        call = info.call(abnormality, p) if primary and ok and threshold is not None else None
        rows.append(ResultRow(str(r["anatomy"]), abnormality, p if ok else float("nan"),
                              float(r["std"]) if ok else float("nan"), ok, primary,
                              None if threshold is None else float(threshold), call))
    return rows


def input_warning(volume: CTVolume) -> str | None:
    """One line of input-sanity warnings for ``volume`` (None when it looks like a usable CT)."""
    from napari_ctvlp.engine.sanity import check_volume

    report = check_volume(volume)
    return None if report.ok else f"Input check: {report.summary()}"


def is_demo_model(card: str) -> bool:
    """True when a model card says the model was trained on synthetic phantoms (a demo)."""
    import re

    return bool(re.search(r"trained on (?:synthetic )?phantoms?|phantom[- ]trained|synthetic phantoms? only"
                          r"|trained on synthetic", card or "", re.IGNORECASE))


DEMO_MODEL_NOTICE = ("\u26a0 Demo model trained on synthetic phantoms only: its scores on real CT are meaningless. "
                     "Not for clinical use. Pick a checkpoint trained on real CT (Browse...) for meaningful results.")


def model_notice(path: str | Path | None) -> str | None:
    """The persistent warning for a checkpoint folder, or None (a real model)."""
    return DEMO_MODEL_NOTICE if path is not None and is_demo_model(model_card_text(path)) else None


def auto_backend() -> str | None:
    """The backend ``segmentation="auto"`` picks now (None when none is available)."""
    from napari_ctvlp.engine.segmentation import AUTO_ORDER, BACKENDS

    reasons = segmentation_backends()
    for name in AUTO_ORDER:
        if name in BACKENDS and BACKENDS[name].auto and reasons.get(name, "missing") is None:
            return name
    return None


_BACKEND_WORDS = {
    "totalsegmentator": "TotalSegmentator (total)",
    "builtin": "the built-in model (phantom-trained: coarse on real CT)",
    "threshold": ("the HU-threshold fallback (coarse: lungs, airways, bone, aorta, esophagus, "
                  "a heart/mediastinum region, body)"),
    "file": "your label map",
}


def better_segmentation_hint() -> str | None:
    """What to install for TotalSegmentator organs (None when it is available)."""
    from napari_ctvlp.engine.segmentation.totalseg import fetch_command

    reason = segmentation_backends().get("totalsegmentator", "not registered")
    if reason is None:
        return None
    if "not installed" in reason:
        return "For better organ masks install TotalSegmentator (`pip install TotalSegmentator`) and its weights."
    return f"For better organ masks fetch the TotalSegmentator weights once: `{fetch_command(True)}`."


def segmentation_notice(backend: str | None, *, mask_layer: str | None = None, planned: bool = False) -> str:
    """The visible line naming the segmentation (used, or about to be used) and what would be better."""
    if backend is None:
        return "Segmentation: none is available."
    what = _BACKEND_WORDS.get(backend, backend)
    if backend == "file" and mask_layer:
        what = f"your Labels layer '{mask_layer}'"
    text = f"Segmentation {'to be used' if planned else 'used'}: {what}."
    hint = better_segmentation_hint() if backend in ("builtin", "threshold") else None
    return f"{text} {hint}" if hint else text


@dataclass(frozen=True)
class Heatmap:
    """A heatmap ready to show: on the CT grid, masked outside the body, with its display range."""

    name: str
    array: np.ndarray
    limits: tuple[float, float]
    kind: str = "attention"


def masked_heatmap(name: str, array: np.ndarray, labels: np.ndarray | None, *, kind: str = "attention") -> Heatmap:
    """``array`` with every voxel outside the body (organ label 0) set to the lowest value inside,
    so the additive overlay leaves it dark (computed in the worker thread: no GUI stall)."""
    heat = np.array(array, dtype=np.float32, copy=True)
    inside = np.asarray(labels) > 0 if labels is not None and np.shape(labels) == heat.shape else None
    values = heat[inside] if inside is not None and inside.any() else heat.ravel()
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if inside is not None and inside.any():
        heat[~inside] = lo
    heat[~np.isfinite(heat)] = lo
    return Heatmap(name, heat, (lo, hi if hi > lo else lo + 1.0), kind)


def row_heatmap(result: Any, anatomy: str, abnormality: str) -> Heatmap:
    """A results row's map on the CT grid, masked outside the body (worker thread).

    Models with an evidence head: the finding's evidence map in its anatomy (``kind="evidence"``).
    Other models with voxel statistics: the voxel attribution of the finding's template margin in the
    row's anatomy (``kind="attribution"``). Others: the pixel-tag attention map, normalised over the
    row's anatomy (the whole body when the scan lacks it).
    """
    from napari_ctvlp.engine.anatomy import ABNORMALITY_BY_NAME, prompt_pairs
    from napari_ctvlp.engine.attribution import supports_attribution

    features = result.session.features
    scoped = anatomy in features.anatomies and bool(features.present[features.anatomies.index(anatomy)])
    session = result.session
    if scoped and abnormality in ABNORMALITY_BY_NAME and session.supports_evidence:
        heat = session.evidence_heatmap(abnormality)
        return masked_heatmap(abnormality, heat, result.segmentation.labels, kind="evidence")
    if scoped and supports_attribution(features) and abnormality in ABNORMALITY_BY_NAME:
        heat = result.session.attribution_heatmap(prompt_pairs(abnormality), anatomy=anatomy)
        return masked_heatmap(abnormality, heat, result.segmentation.labels, kind="attribution")
    heat = result.session.abnormality_heatmap(abnormality, anatomy=anatomy if scoped else None)
    return masked_heatmap(abnormality, heat, result.segmentation.labels)


def export_source(result: Any, *, extra_heatmaps: dict[str, np.ndarray] | None = None) -> ExportSource:
    """What the export panel writes for a detection (its heatmaps plus those shown since)."""
    from napari_ctvlp.engine import results_io

    labels, names = result_labels(result)
    seg = result.segmentation
    taken: set[str] = set()
    for prompt in result.heatmaps:  # the names write_results gives the detection's prompt heatmaps
        taken.add(results_io.heatmap_filename(prompt, taken))
    files = (results_io.RESULTS_JSON, results_io.RESULTS_CSV, results_io.ORGANS_NIFTI, "organs.json",
             results_io.ORGAN_STATS_CSV, *sorted(taken))
    return ExportSource(
        volume=result.volume, labels=labels, label_names=names,
        heatmaps={k: v for k, v in (extra_heatmaps or {}).items() if k not in result.heatmaps},
        write_results=lambda out, overwrite: results_io.write_results(result, out, overwrite=overwrite),
        results_files=files, volume_ml=dict(seg.volume_ml or {}), mean_hu=dict(seg.mean_hu or {}),
        incomplete=dict(seg.incomplete or {}),
    )


# --------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PromptScore:
    """One anatomy's probability for a typed finding (NaN: not assessable)."""

    anatomy: str
    probability: float


@dataclass(frozen=True)
class RobustnessRow:
    """Mean +- std over wordings for one anatomy; ``flips``: wordings against the majority."""

    anatomy: str
    mean: float
    std: float
    flips: int


@dataclass(frozen=True)
class PromptVariant:
    """One wording's probability in one anatomy; ``flipped``: its answer differs from the majority."""

    prompt: str
    anatomy: str
    probability: float
    flipped: bool


@dataclass(frozen=True)
class Robustness:
    """Robustness view: per-anatomy summary rows and per-wording variants."""

    rows: tuple[RobustnessRow, ...]
    variants: tuple[PromptVariant, ...]


@dataclass(frozen=True)
class PromptCheck:
    """How the text encoder sees a typed prompt; ``notes`` are the sentences to show (empty: fine).

    Attributes:
        tokens: tokens of the prompt (with the encoder's special tokens).
        max_tokens: the encoder reads at most this many; the rest is cut off.
        unknown_words: words neither in the tokenizer's vocabulary as a whole nor among the
            findings and anatomies the model was trained with (split into sub-word pieces).
        words: words of the prompt.
        english: False when the prompt does not look like English.
        notes: the warnings.
    """

    tokens: int
    max_tokens: int
    unknown_words: tuple[str, ...]
    words: int
    english: bool
    notes: tuple[str, ...]

    @property
    def truncated(self) -> bool:
        """True when the encoder cuts the prompt."""
        return self.tokens > self.max_tokens


_ENGLISH = frozenset("""
a an the of in on at to for with without and or not no nor is are was were be been there this that these those
it its as by from into near both either small large big tiny mild moderate severe marked minimal slight left right
bilateral lower upper middle lobe lobes base bases apex apical basal side sided new old possible probable likely
suspected consistent evidence sign signs finding findings seen present absent noted visible increased decreased
enlarged dilated thickened thick thin diffuse focal multiple single several some few lung lungs heart chest wall
fluid air mass nodule nodules area areas region change changes
""".split())


def _model_terms() -> frozenset[str]:
    """Words the model was trained with: finding terms and synonyms, anatomy phrases, template words."""
    import re

    from napari_ctvlp.engine.anatomy import ABNORMALITIES, ANATOMIES, PROMPT_TEMPLATES

    texts = [a.term for a in ABNORMALITIES] + [s for a in ABNORMALITIES for s in a.synonyms]
    texts += [a.phrase for a in ANATOMIES] + [t for pair in PROMPT_TEMPLATES for t in pair]
    return frozenset(w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t))


def check_prompt(tokenizer: Any, max_tokens: int, text: str) -> PromptCheck:
    """Say when a prompt is cut off, mostly outside the vocabulary, or not English."""
    import re

    ids = tokenizer(text, truncation=False)["input_ids"]
    words = re.findall(r"[^\W\d_]+", text)
    vocab = getattr(tokenizer, "vocab", None) or {}
    known = _model_terms()
    unknown = tuple(w for w in words if w.lower() not in vocab and w.lower() not in known)
    letters = [c for c in text if c.isalpha()]
    non_ascii = sum(not c.isascii() for c in letters) / max(len(letters), 1)
    english_words = sum(w.lower() in _ENGLISH or w.lower() in known for w in words)
    english = not (non_ascii > 0.2 or (len(words) >= 2 and english_words * 2 < len(words)
                                       and len(unknown) * 2 >= len(words)))
    notes = []
    if len(ids) > max_tokens:
        notes.append(f"The prompt is cut off: it has {len(ids)} tokens and the text encoder reads only the first "
                     f"{max_tokens}; the rest is ignored. Shorten it.")
    if not english:
        notes.append("The prompt does not look like English; the text encoder was trained on English reports.")
    elif words and len(unknown) * 2 > len(words):
        shown = ", ".join(f"'{w}'" for w in unknown[:4])
        notes.append(f"Most words are outside the model's vocabulary ({shown}): the encoder sees them only as "
                     "sub-word pieces, so the answer may not mean much.")
    return PromptCheck(len(ids), int(max_tokens), unknown, len(words), english, tuple(notes))


class ResultScorer:
    """Scores free text against a detection's cached image features (text encoder only)."""

    def __init__(self, result: Any) -> None:
        self.result = result

    def check_prompt(self, text: str) -> PromptCheck:
        """How the checkpoint's text encoder sees ``text`` (cut off, unknown words, not English)."""
        model = self.result.session.model
        return check_prompt(model.tokenizer, int(model.text.max_length), text)

    def score(self, text: str) -> list[PromptScore]:
        """Probability per anatomy of a finding sentence."""
        score = self.result.session.score_prompt(text)
        return [PromptScore(a, float(p)) for a, p in zip(score.anatomies, score.probability)]

    def robustness(self, text: str, *, paraphrases: tuple[str, ...] = ()) -> Robustness:
        """All templates + paraphrases; flags wordings whose answer differs from the majority."""
        rob = self.result.session.robustness(text, paraphrases=paraphrases)
        probs = np.asarray(rob.probabilities, dtype=float)  # [W, A]
        rows, variants = [], []
        for j, anatomy in enumerate(rob.anatomies):
            col = probs[:, j]
            if np.isnan(col).all():
                rows.append(RobustnessRow(anatomy, float("nan"), float("nan"), 0))
                continue
            positive = col > 0.5
            majority = positive.sum() * 2 >= len(col)
            flipped = positive != majority
            rows.append(RobustnessRow(anatomy, float(rob.mean[j]), float(rob.std[j]), int(flipped.sum())))
            for w, (pos, _neg) in enumerate(rob.wordings):
                phrase = ANATOMY_BY_NAME[anatomy].phrase if anatomy in ANATOMY_BY_NAME else anatomy
                variants.append(PromptVariant(pos.replace("{organ}", phrase), anatomy, float(col[w]),
                                              bool(flipped[w])))
        return Robustness(tuple(rows), tuple(variants))

    def heatmap(self, text: str) -> Heatmap | None:
        """Prompt heatmap on the CT grid, masked outside the body (None: the checkpoint gives none)."""
        array = self.result.session.prompt_heatmap(text)
        if array is None:
            return None
        kind = "prompt_evidence" if self.result.session.features.prompt_cells is not None else "attention"
        return masked_heatmap(f"prompt: {text}", array, self.result.segmentation.labels, kind=kind)
