"""``detect``: the one entry point the widgets and the CLI call.

CT -> organ segmentation -> model grid -> ViT tokens (once) -> anatomy embeddings -> zero-shot
probabilities per anatomy x abnormality -> free-text prompts and heatmaps on the input grid.

The returned :class:`DetectionResult` keeps a :class:`DetectionSession` (model + cached image
features), so a new prompt (:meth:`DetectionResult.rescore`) only runs the text encoder.
Loaded checkpoints are cached per (path, device), so repeated calls do not reload them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_ctvlp.engine.preprocess import PreparedVolume, PreprocessConfig, preprocess
from napari_ctvlp.engine.volume import CTVolume, ProgressCallback, report

if TYPE_CHECKING:
    from napari_ctvlp.engine.checkpoint import LoadedCheckpoint
    from napari_ctvlp.engine.networks.ctvlp import CTVLP
    from napari_ctvlp.engine.segmentation import OrganSegmentation
    from napari_ctvlp.engine.prompt_scoring import PromptScore, RobustnessResult
    from napari_ctvlp.engine.zero_shot import AbnormalityScores, ImageFeatures

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointInfo", "DetectionCancelled", "DetectionResult", "DetectionSession", "clear_model_cache",
    "detect", "load_model", "resolve_device",
]

STAGES = ("read", "model", "segmentation", "preprocess", "image features", "scoring", "prompts")


class DetectionCancelled(RuntimeError):
    """``detect`` stopped because its ``cancel`` event was set."""


# ---------------------------------------------------------------------- model cache
_MODEL_CACHE: OrderedDict[tuple[str, str, float], LoadedCheckpoint] = OrderedDict()
_MODEL_CACHE_SIZE = 2
_MODEL_LOCK = threading.Lock()


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; other names are checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use device='cpu' or 'auto')")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {device!r}")
    return device


def _checkpoint_dir(checkpoint: str | Path | None) -> Path:
    from napari_ctvlp.engine.checkpoint import default_checkpoint_path

    if checkpoint is None:
        found = default_checkpoint_path()
        if found is None:
            raise ValueError(
                "no checkpoint given and no demo model is installed (napari_ctvlp/models/ctvlp_phantom_demo); "
                "pass checkpoint=<folder with config.json + model.safetensors>, e.g. one written by "
                "`python -m training.pretrain`"
            )
        return found
    return Path(checkpoint)


def load_model(checkpoint: str | Path | None = None, *, device: str = "cpu") -> LoadedCheckpoint:
    """:func:`engine.checkpoint.load_checkpoint` with a small cache keyed by path, device and mtime."""
    from napari_ctvlp.engine.checkpoint import load_checkpoint

    path = _checkpoint_dir(checkpoint)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    stamp = max((p.stat().st_mtime for p in (path.iterdir() if path.is_dir() else [path])), default=0.0)
    key = (str(path.resolve()), device, stamp)
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            _MODEL_CACHE.move_to_end(key)
            return _MODEL_CACHE[key]
    loaded = load_checkpoint(path, device=device)  # refuses pickle files, validates everything
    loaded.model.eval()
    with _MODEL_LOCK:
        _MODEL_CACHE[key] = loaded
        while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
            _MODEL_CACHE.popitem(last=False)
    return loaded


def clear_model_cache() -> None:
    """Forget the loaded checkpoints."""
    with _MODEL_LOCK:
        _MODEL_CACHE.clear()


def preprocess_config_for(loaded: LoadedCheckpoint) -> PreprocessConfig:
    """The checkpoint's preprocessing (unknown keys dropped with a warning), or a default grid."""
    stored = dict(loaded.preprocessing or {})
    known = {k: v for k, v in stored.items() if k in PreprocessConfig.__dataclass_fields__}
    if set(stored) - set(known):
        logger.warning("ignoring unknown preprocessing keys %s of %s", sorted(set(stored) - set(known)), loaded.path)
    if "spacing_mm" not in known:
        return PreprocessConfig.for_image_size(loaded.config.image_size, **{k: v for k, v in known.items() if k != "image_size"})
    known.setdefault("image_size", loaded.config.image_size)
    return PreprocessConfig(**known)


# ---------------------------------------------------------------------- results
@dataclass(frozen=True)
class CheckpointInfo:
    """What produced a result: checkpoint folder, model card title, architecture, preprocessing."""

    path: str
    name: str
    architecture: dict[str, Any]
    preprocessing: dict[str, Any]
    version: str | None = None
    #: per-finding decision thresholds stored with the checkpoint (chosen on a split other than
    #: any reported one, ``training.evaluate --operating-split``); empty when it has none
    operating_points: dict[str, float] = field(default_factory=dict)

    def call(self, abnormality: str, probability: float) -> str | None:
        """``"positive"``/``"negative"`` at the stored operating point; None without one (or no score)."""
        threshold = self.operating_points.get(abnormality)
        if threshold is None or not np.isfinite(threshold) or not np.isfinite(probability):
            return None
        return "positive" if probability >= threshold else "negative"


def _operating_points(loaded: LoadedCheckpoint) -> dict[str, float]:
    stored = loaded.meta.get("operating_points")
    thresholds = stored.get("thresholds") if isinstance(stored, dict) else None
    if not isinstance(thresholds, dict):
        return {}
    return {str(k): float(v) for k, v in thresholds.items() if isinstance(v, (int, float)) and np.isfinite(v)}


def _card_name(loaded: LoadedCheckpoint) -> str:
    for line in (loaded.model_card or "").splitlines():
        if line.strip().startswith("#"):
            return line.strip().lstrip("#").strip()
    return Path(loaded.path).name


class DetectionSession:
    """A loaded model plus one volume's cached image features: re-prompting runs only the text encoder."""

    def __init__(self, loaded: LoadedCheckpoint, features: ImageFeatures) -> None:
        self.loaded = loaded
        self.features = features
        self._lock = threading.Lock()
        self._evidence: Any = None  # EvidenceMaps, computed on first use

    @property
    def model(self) -> CTVLP:
        """The model (eval mode)."""
        return self.loaded.model

    @property
    def prepared(self) -> PreparedVolume:
        """The volume on the model grid."""
        return self.features.prepared

    def score_prompt(self, prompt: str | tuple[str, str], *, anatomies: Sequence[str] | None = None) -> PromptScore:
        """:func:`engine.prompt_scoring.score_prompt` on the cached features."""
        from napari_ctvlp.engine.prompt_scoring import score_prompt

        with self._lock:
            return score_prompt(self.model, self.features, prompt, anatomies=anatomies)

    def robustness(self, finding: str, *, paraphrases: Sequence[str | tuple[str, str]] = ()) -> RobustnessResult:
        """:func:`engine.prompt_scoring.robustness` on the cached features."""
        from napari_ctvlp.engine.prompt_scoring import robustness

        with self._lock:
            return robustness(self.model, self.features, finding, paraphrases=paraphrases)

    def prompt_heatmap(self, prompt: str | tuple[str, str], *, grid: str = "source",
                       anatomy: str | None = None) -> np.ndarray:
        """Prompt heatmap in ``[0, 1]`` on the input grid (``grid="source"``), over the body or ``anatomy``."""
        from napari_ctvlp.engine.attention import prompt_heatmap

        with self._lock:
            return prompt_heatmap(self.model, self.features, prompt, grid=grid, anatomy=anatomy)  # type: ignore[arg-type]

    def attribution_heatmap(self, prompt: str | tuple[str, str], *, anatomy: str, grid: str = "source") -> np.ndarray:
        """Voxel attribution of ``prompt``'s score in ``anatomy`` (models with voxel statistics;
        :func:`engine.attribution.attribution_heatmap`)."""
        from napari_ctvlp.engine.attribution import attribution_heatmap

        with self._lock:
            return attribution_heatmap(self.model, self.features, prompt, anatomy=anatomy, grid=grid)  # type: ignore[arg-type]

    @property
    def supports_evidence(self) -> bool:
        """True when the model has finding evidence maps (``CTVLPConfig.tag_evidence``)."""
        from napari_ctvlp.engine.evidence_maps import supports_evidence

        return supports_evidence(self.model, self.features)

    def evidence_heatmap(self, abnormality: str, *, grid: str = "source") -> np.ndarray:
        """A finding's evidence map over its anatomy (:func:`engine.evidence_maps.evidence_heatmap`;
        all 18 are computed on the first call and kept)."""
        from napari_ctvlp.engine.evidence_maps import compute_evidence, evidence_heatmap

        with self._lock:
            if self._evidence is None:
                self._evidence = compute_evidence(self.model, self.features)
            return evidence_heatmap(self._evidence, self.features, abnormality, grid=grid)  # type: ignore[arg-type]

    def abnormality_heatmap(self, abnormality: str, *, grid: str = "source", anatomy: str | None = None) -> np.ndarray:
        """Pixel-tag map of an abnormality on the input grid, over the body or ``anatomy``."""
        from napari_ctvlp.engine.attention import abnormality_heatmap

        with self._lock:
            return abnormality_heatmap(self.model, self.features, abnormality, grid=grid,  # type: ignore[arg-type]
                                       anatomy=anatomy)

    def anatomy_heatmaps(self, *, anatomies: Sequence[str] | None = None, kind: str = "tags", grid: str = "source") -> dict[str, np.ndarray]:
        """Per-anatomy tag (or pooling-attention) maps on the input grid."""
        from napari_ctvlp.engine.attention import anatomy_heatmaps

        with self._lock:
            return anatomy_heatmaps(self.model, self.features, anatomies=anatomies, kind=kind, grid=grid)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class DetectionResult:
    """Output of :func:`detect`.

    Attributes:
        volume: the input CT.
        segmentation: the organ segmentation on the input grid (labels, names, statistics).
        probabilities: per anatomy x abnormality mean/std/assessable/primary
            (:class:`engine.zero_shot.AbnormalityScores`).
        prompts: ``{prompt: PromptScore}`` of the requested free-text prompts.
        heatmaps: ``{prompt: float32 array}`` on the input grid (same shape as ``volume.array``).
        timings: seconds per stage and ``"total"``.
        checkpoint: :class:`CheckpointInfo`.
        session: model + cached image features (for :meth:`rescore` and more heatmaps).
        device: where the model ran.
    """

    volume: CTVolume
    segmentation: OrganSegmentation
    probabilities: AbnormalityScores
    prompts: dict[str, PromptScore]
    heatmaps: dict[str, np.ndarray]
    timings: dict[str, float]
    checkpoint: CheckpointInfo
    session: DetectionSession = field(repr=False)
    device: str = "cpu"

    def rescore(self, prompt: str | tuple[str, str]) -> PromptScore:
        """Score a new prompt on the cached image features (text encoder only)."""
        return self.session.score_prompt(prompt)

    def rows(self) -> list[dict[str, Any]]:
        """Results table: one dict per anatomy x abnormality (see ``AbnormalityScores.rows``)."""
        return self.probabilities.rows()


# ---------------------------------------------------------------------- detect
def _check_cancel(cancel: threading.Event | None, stage: str) -> None:
    if cancel is not None and cancel.is_set():
        raise DetectionCancelled(f"detection cancelled before {stage}")


def _label_file(path: Path, volume: CTVolume, kind: str) -> OrganSegmentation:
    from napari_ctvlp.engine.segmentation import from_label_file

    if kind != "auto":
        return from_label_file(path, like=volume, kind=kind)  # type: ignore[arg-type]
    try:
        return from_label_file(path, like=volume, kind="organ")
    except ValueError as exc:
        if "not organ labels" not in str(exc):
            raise
        logger.info("%s holds values outside the organ labels: reading it as TotalSegmentator labels", path)
        return from_label_file(path, like=volume, kind="totalseg")


def _segmentation(
    segmentation: Any, volume: CTVolume, *, device: str, kind: str, progress: ProgressCallback | None
) -> OrganSegmentation:
    from napari_ctvlp.engine.segmentation import BACKENDS, OrganSegmentation, from_label_file, segment

    if isinstance(segmentation, OrganSegmentation):
        if segmentation.labels.shape != volume.shape:
            raise ValueError(f"segmentation labels shape {segmentation.labels.shape} does not match the CT shape {volume.shape}")
        return segmentation
    if isinstance(segmentation, np.ndarray):
        return from_label_file(segmentation, like=volume, kind="organ" if kind == "auto" else kind)  # type: ignore[arg-type]
    if isinstance(segmentation, (str, Path)):
        name = str(segmentation)
        if name == "auto" or name in BACKENDS:
            return segment(volume, backend=name, device=device, progress=progress)
        path = Path(name).expanduser()
        if path.is_file():
            return _label_file(path, volume, kind)
        raise ValueError(
            f"segmentation {name!r} is neither a backend ('auto', {', '.join(map(repr, sorted(BACKENDS)))}) "
            "nor an existing label file"
        )
    raise ValueError(
        "segmentation must be 'auto', a backend name, a label file path, an OrganSegmentation or an organ "
        f"label array, got {type(segmentation).__name__}"
    )


def detect(
    volume_or_path: CTVolume | str | Path,
    *,
    checkpoint: str | Path | None = None,
    segmentation: Any = "auto",
    prompts: Sequence[str] = (),
    device: str = "auto",
    heatmaps: bool = True,
    segmentation_kind: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> DetectionResult:
    """Zero-shot detection of the 18 CT-RATE abnormalities (+ free-text prompts) in one CT.

    Args:
        volume_or_path: a :class:`CTVolume` or a path :func:`napari_ctvlp.io.read_ct` reads.
        checkpoint: checkpoint folder (default: the shipped demo model).
        segmentation: ``"auto"`` or a backend name (``"totalsegmentator"``, ``"builtin"``,
            ``"threshold"``), a label NIfTI path, an ``OrganSegmentation`` or an organ label array.
        prompts: free-text findings to score; each gets a heatmap when ``heatmaps``.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        heatmaps: compute the prompt heatmaps on the input grid (abnormality and anatomy maps
            are computed on demand by ``result.session``, each is a full-size float32 volume).
        segmentation_kind: label files/arrays hold ``"organ"`` labels, ``"totalseg"`` labels, or
            ``"auto"`` (files: TotalSegmentator if any value is not an organ label).
        progress: ``progress(done, total, message)`` per stage.
        cancel: set it from another thread to stop between stages (:class:`DetectionCancelled`).

    Raises:
        ValueError: bad input, segmentation, checkpoint (pickle files are refused) or device.
        DetectionCancelled: ``cancel`` was set.
    """
    from napari_ctvlp.engine.prompt_scoring import score_prompt
    from napari_ctvlp.engine.zero_shot import encode_volume, score_abnormalities

    if segmentation_kind not in ("auto", "organ", "totalseg"):
        raise ValueError(f"segmentation_kind must be 'auto', 'organ' or 'totalseg', got {segmentation_kind!r}")
    prompts = [str(p).strip() for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("prompts must not be empty strings")
    dev = resolve_device(device)
    total = len(STAGES)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    def stage(i: int, name: str) -> float:
        _check_cancel(cancel, name)
        report(progress, i, total, name)
        return time.perf_counter()

    t = stage(0, "read")
    if isinstance(volume_or_path, CTVolume):
        volume = volume_or_path
    elif isinstance(volume_or_path, (str, Path)):
        from napari_ctvlp.io import read_ct

        volume = read_ct(volume_or_path)
    else:
        raise ValueError(f"volume_or_path must be a CTVolume or a path, got {type(volume_or_path).__name__}")
    timings["read"] = time.perf_counter() - t

    t = stage(1, "model")
    loaded = load_model(checkpoint, device=dev)
    model = loaded.model
    timings["model"] = time.perf_counter() - t

    t = stage(2, "segmentation")
    seg = _segmentation(segmentation, volume, device=dev, kind=segmentation_kind, progress=None)
    timings["segmentation"] = time.perf_counter() - t

    t = stage(3, "preprocess")
    # preprocessing reports its steps (antialias, resample, organ labels): a cancel stops between them
    prepared = preprocess(volume, config=preprocess_config_for(loaded), organs=seg.labels,
                          progress=lambda done, n, message: _check_cancel(cancel, message))
    timings["preprocess"] = time.perf_counter() - t

    t = stage(4, "image features")
    # the image side reports its own steps (masks, encoder, pooling): a cancel stops between them
    features = encode_volume(model, prepared, progress=lambda done, n, message: _check_cancel(cancel, message))
    timings["image_features"] = time.perf_counter() - t
    timings.update({f"image_features.{k}": v for k, v in features.timings.items()})

    t = stage(5, "scoring")
    scores = score_abnormalities(model, features)
    timings["scoring"] = time.perf_counter() - t

    t = stage(6, "prompts")
    session = DetectionSession(loaded, features)
    prompt_scores = {p: score_prompt(model, features, p) for p in prompts}
    maps: dict[str, np.ndarray] = {}
    if heatmaps:
        for p in prompts:
            _check_cancel(cancel, f"heatmap {p!r}")
            maps[p] = session.prompt_heatmap(p)
    timings["prompts"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    report(progress, total, total, "done")

    info = CheckpointInfo(
        path=str(loaded.path), name=_card_name(loaded), architecture=loaded.config.to_dict(),
        preprocessing=prepared.config.to_dict(), version=str(loaded.meta.get("version")) if loaded.meta.get("version") else None,
        operating_points=_operating_points(loaded),
    )
    return DetectionResult(volume, seg, scores, prompt_scores, maps, timings, info, session, dev)

