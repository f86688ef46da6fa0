"""Zero-shot abnormality scoring over prompt templates (CA-GCL).

The image side runs once per volume (:func:`encode_volume` -> :class:`ImageFeatures`); every
score afterwards only needs text embeddings, which are cached per model
(:func:`text_embeddings`), so a new prompt costs one text-encoder call. Free-text prompts and
the robustness check over wordings are in :mod:`napari_ctvlp.engine.prompt_scoring`.

Score of a (positive, negative) prompt pair for an anatomy embedding ``v``::

    p = softmax([cos(v, t+), cos(v, t-)] * exp(logit_scale))[0]

averaged (mean and population std) over the prompt templates. A model with a prompt evidence
head (``CTVLPConfig.prompt_evidence``, :mod:`napari_ctvlp.engine.prompt_evidence`) scores each
sentence from the anatomy's cells instead, and ``p = sigmoid(score(t+) - score(t-))``. An anatomy
that is absent from the organ mask is *not assessable*: its probability is NaN, never a silent 0.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_ctvlp.engine.anatomy import (
    ABNORMALITY_BY_NAME,
    ABNORMALITY_NAMES,
    ANATOMY_BY_NAME,
    PROMPT_TEMPLATES,
    anatomy_masks,
)
from napari_ctvlp.engine.preprocess import PreparedVolume
from napari_ctvlp.engine.volume import ProgressCallback, report

if TYPE_CHECKING:
    import torch

    from napari_ctvlp.engine.networks.ctvlp import CTVLP

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = 100.0


# ---------------------------------------------------------------------- text embedding cache
class TextEmbeddingCache:
    """LRU cache ``text -> embedding`` for one model (eval mode); only new texts are encoded."""

    def __init__(self, model: CTVLP, *, maxsize: int = 8192, batch_size: int = 256) -> None:
        self._model = weakref.ref(model)
        self._store: OrderedDict[str, Any] = OrderedDict()
        self.maxsize = int(maxsize)
        self.batch_size = int(batch_size)
        self.encoded = 0  # number of texts that went through the text encoder

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        """Forget every embedding (call after changing the model weights)."""
        self._store.clear()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings ``[T, E]`` (L2-normalised, float32, on the model's device)."""
        import torch

        model = self._model()
        if model is None:
            raise RuntimeError("the model of this text cache no longer exists")
        texts = [str(t) for t in texts]
        if model.training:  # weights may change between calls: never cache
            with torch.inference_mode():
                return model.encode_text(texts).float()
        missing = list(dict.fromkeys(t for t in texts if t not in self._store))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            with torch.inference_mode():
                emb = model.encode_text(chunk).float()
            self.encoded += len(chunk)
            for text, row in zip(chunk, emb):
                self._store[text] = row
        out = []
        for t in texts:
            self._store.move_to_end(t)
            out.append(self._store[t])
        while len(self._store) > self.maxsize:
            self._store.popitem(last=False)
        if not out:
            return torch.zeros((0, model.config.embed_dim), device=model.device)
        return torch.stack(out)


_CACHES: weakref.WeakKeyDictionary[Any, TextEmbeddingCache] = weakref.WeakKeyDictionary()


def text_cache(model: CTVLP) -> TextEmbeddingCache:
    """The :class:`TextEmbeddingCache` attached to ``model`` (created on first use)."""
    cache = _CACHES.get(model)
    if cache is None:
        cache = _CACHES[model] = TextEmbeddingCache(model)
    return cache


def text_embeddings(model: CTVLP, texts: Sequence[str]) -> torch.Tensor:
    """Cached :meth:`CTVLP.encode_text`: ``[T, E]``."""
    return text_cache(model).encode(texts)


# ---------------------------------------------------------------------- image features
@dataclass(frozen=True, eq=False)
class ImageFeatures:
    """Everything the scorers need from one volume, computed once by :func:`encode_volume`.

    Attributes:
        tokens: ViT tokens ``[1, N, C]``.
        anatomy_embeddings: ``[A, E]`` L2-normalised (zeros where absent).
        present: ``[A]`` bool, anatomy mask not empty.
        token_embeddings: ``[N, E]`` per-token joint-space embeddings (prompt heatmaps).
        pooling_attention: ``[A, N]`` anatomy-pooling attention weights.
        token_masks: ``[A, N]`` tokens of each anatomy: the share of each token inside it (float),
            or bool for checkpoints with ``token_weighting="any"``.
        tag_maps: ``[T, N]`` MOSMOS pixel-tag attention (softmax over N) of ``tags``.
        tag_logits: ``[T]`` multi-label tag logits.
        anatomies: anatomy names (order of ``A``).
        tags: tag texts (order of ``T``).
        token_grid: ``(gd, gh, gw)``, ``N = gd * gh * gw``.
        prepared: the model-grid volume (geometry for mapping maps back).
        logit_scale: ``exp(logit_scale)`` clamped at 100.
        timings: seconds per step.
        voxel: what attribution maps need from a model with voxel statistics (None otherwise):
            ``masks`` ``[A, D, H, W]`` bool anatomy masks on the model grid, ``stage4`` ``[S, ...]``
            the stride-4 stem features, ``pooled`` ``[A, C]`` the pooling attention outputs.
        prompt_cells: the cell histograms the prompt evidence head scores prompts from
            (:class:`~napari_ctvlp.engine.prompt_evidence.PromptCells`; None for models without one).
            When set, prompts are scored by that head; ``dataclasses.replace(features,
            prompt_cells=None)`` scores them with the anatomy embeddings instead.
    """

    tokens: torch.Tensor
    anatomy_embeddings: torch.Tensor
    present: np.ndarray
    token_embeddings: torch.Tensor
    pooling_attention: torch.Tensor
    token_masks: torch.Tensor
    tag_maps: torch.Tensor
    tag_logits: torch.Tensor
    anatomies: tuple[str, ...]
    tags: tuple[str, ...]
    token_grid: tuple[int, int, int]
    prepared: PreparedVolume
    logit_scale: float
    timings: dict[str, float] = field(default_factory=dict)
    voxel: dict[str, torch.Tensor] | None = None
    prompt_cells: Any = None


def _mask_factors(spacing: tuple[float, ...], patch: tuple[int, ...], max_mm: float) -> tuple[int, int, int]:
    """Per-axis divisor of the patch size so that the mask grid is at most ``max_mm`` coarse."""
    out = []
    for s, p in zip(spacing, patch):
        best = 1
        for d in range(1, p + 1):
            if p % d == 0 and d * s <= max_mm + 1e-6:
                best = d
        out.append(best)
    return tuple(out)  # type: ignore[return-value]


def model_anatomy_masks(model: CTVLP, prepared: PreparedVolume, *, mask_mm: float = 4.0) -> np.ndarray:
    """Anatomy masks ``[A, D, H, W]`` on the model grid in the model's anatomy order.

    The groups (unions + dilations of :func:`engine.anatomy.anatomy_masks`) are computed on a
    grid subsampled by divisors of the patch size (at most ``mask_mm`` mm), then repeated back:
    the token masks (max over each patch) are what the model uses, and this is ~40x faster.
    """
    if prepared.organs is None:
        raise ValueError("prepared volume has no organ labels: pass organs= to preprocess (run a segmentation first)")
    anatomies = tuple(ANATOMY_BY_NAME[n] for n in model.config.anatomies)
    spacing = prepared.config.spacing_mm
    f = _mask_factors(spacing, model.config.feature_patch, mask_mm)
    organs = prepared.organs[:: f[0], :: f[1], :: f[2]]
    small = anatomy_masks(organs, spacing=tuple(s * k for s, k in zip(spacing, f)), anatomies=anatomies)
    for axis, k in enumerate(f):
        if k > 1:
            small = np.repeat(small, k, axis=axis + 1)
    return small


def encode_volume(
    model: CTVLP,
    prepared: PreparedVolume,
    *,
    device: str | None = None,
    progress: ProgressCallback | None = None,
) -> ImageFeatures:
    """Run the image side of ``model`` once on a prepared volume (``torch.inference_mode``).

    Args:
        model: a :class:`CTVLP` (put in eval mode by the caller; a checkpoint loads it so).
        prepared: output of :func:`engine.preprocess.preprocess` with ``organs``.
        device: where to run (default: the model's device).
        progress: ``progress(done, total, message)``.
    """
    import torch

    size = tuple(model.config.image_size)
    if tuple(prepared.image.shape) != size:
        raise ValueError(f"prepared image shape {prepared.image.shape} does not match the model input grid {size}")
    dev = torch.device(device) if device is not None else model.device
    if dev != model.device:
        raise ValueError(f"device {dev} differs from the model's device {model.device}; move the model first")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    report(progress, 0, 3, "anatomy masks")
    masks = model_anatomy_masks(model, prepared)
    timings["masks"] = time.perf_counter() - t0
    with torch.inference_mode():
        t1 = time.perf_counter()
        report(progress, 1, 3, "image encoder")
        image = torch.from_numpy(np.ascontiguousarray(prepared.image))[None, None].to(dev)
        voxel_masks = torch.from_numpy(masks)[None].to(dev)
        token_masks = model.masks_to_tokens(voxel_masks)
        embedded = model.embed_image(image, voxel_masks, token_masks=token_masks, return_attention=True)
        tokens, pooled = embedded.tokens, embedded.anatomies
        timings["image_encoder"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        report(progress, 2, 3, "token embeddings and tags")
        tok_emb = model.token_embeddings(tokens, cells=embedded.cells, token_masks=token_masks)[0].float()
        tags = model.decode_tags(tokens)
        scale = float(model.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))
        timings["pooling_tags"] = time.perf_counter() - t2
        cells = None
        if model.prompt_evidence is not None:
            from napari_ctvlp.engine.prompt_evidence import prompt_cells

            t3 = time.perf_counter()
            cells = prompt_cells(model, image, voxel_masks)
            timings["prompt_cells"] = time.perf_counter() - t3
    report(progress, 3, 3, "image features ready")
    attention = pooled.attention[0] if pooled.attention is not None else torch.zeros_like(token_masks[0], dtype=torch.float32)
    voxel = None
    if embedded.stage4 is not None and pooled.pooled is not None:
        voxel = {"masks": voxel_masks[0], "stage4": embedded.stage4[0].float(), "pooled": pooled.pooled[0].float()}
    return ImageFeatures(
        voxel=voxel, prompt_cells=cells,
        tokens=tokens, anatomy_embeddings=pooled.embeddings[0].float(),
        present=pooled.present[0].cpu().numpy().astype(bool), token_embeddings=tok_emb,
        pooling_attention=attention.float(), token_masks=token_masks[0], tag_maps=tags.maps[0].float(),
        tag_logits=tags.logits[0].float(), anatomies=tuple(model.config.anatomies), tags=tuple(model.config.tags),
        token_grid=tuple(model.config.token_grid), prepared=prepared, logit_scale=scale, timings=timings,
    )


# ---------------------------------------------------------------------- scoring core
def _pair_probabilities(
    model: CTVLP, features: ImageFeatures, pos: list[str], neg: list[str], anatomy_idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``p, s+, s-`` for each (pos[i], neg[i]) against anatomy ``anatomy_idx[i]`` (NaN if absent).

    ``s`` is the cosine with the anatomy embedding, or with a prompt evidence head (when
    ``features.prompt_cells`` is set) the sentence's evidence score, and ``p = sigmoid(s+ - s-)``.
    """
    import torch

    if features.prompt_cells is not None and model.prompt_evidence is not None:
        from napari_ctvlp.engine.prompt_evidence import prompt_scores

        both = prompt_scores(model, features.prompt_cells, list(pos) + list(neg),
                             np.concatenate([anatomy_idx, anatomy_idx]))
        sp, sn = both[: len(pos)], both[len(pos):]
        with np.errstate(invalid="ignore", over="ignore"):
            p = 1.0 / (1.0 + np.exp(-(sp - sn)))
        absent = ~features.present[anatomy_idx]
        for arr in (p, sp, sn):
            arr[absent] = np.nan
        return p, sp, sn

    texts = list(dict.fromkeys(pos + neg))
    emb = text_embeddings(model, texts)
    row = {t: i for i, t in enumerate(texts)}
    v = features.anatomy_embeddings[torch.as_tensor(anatomy_idx, dtype=torch.long, device=emb.device)]
    tp = emb[[row[t] for t in pos]]
    tn = emb[[row[t] for t in neg]]
    v = torch.nn.functional.normalize(v, dim=-1)
    cos_p = (v * tp).sum(-1)
    cos_n = (v * tn).sum(-1)
    logits = torch.stack([cos_p, cos_n], dim=-1) * features.logit_scale
    p = torch.softmax(logits, dim=-1)[:, 0].cpu().numpy().astype(np.float64)
    cp, cn = cos_p.cpu().numpy().astype(np.float64), cos_n.cpu().numpy().astype(np.float64)
    absent = ~features.present[anatomy_idx]
    p[absent] = np.nan
    cp[absent] = np.nan
    cn[absent] = np.nan
    return p, cp, cn


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def fill_template(template: str, finding: str, anatomy: str) -> str:
    """Fill a :data:`PROMPT_TEMPLATES` wording with a finding and an anatomy's phrase."""
    phrase = ANATOMY_BY_NAME[anatomy].phrase if anatomy in ANATOMY_BY_NAME else anatomy
    return template.format(x=finding, X=_capitalize(finding), organ=phrase)


def _nanstats(p: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std; an anatomy that is absent is NaN in every wording, so stays NaN."""
    return p.mean(axis=axis), p.std(axis=axis)


# ---------------------------------------------------------------------- abnormalities
@dataclass(frozen=True)
class AbnormalityScores:
    """Per anatomy x abnormality zero-shot probabilities.

    Attributes:
        abnormalities: ``K`` abnormality names.
        anatomies: ``A`` anatomy names.
        probability: ``[K, A]`` mean over templates (NaN where the anatomy is absent).
        std: ``[K, A]`` population std over templates.
        per_template: ``[K, A, P]``.
        assessable: ``[K, A]`` anatomy present.
        primary: ``K`` names of each abnormality's own anatomy (``engine.anatomy``).
        templates: the ``P`` (positive, negative) wordings.
    """

    abnormalities: tuple[str, ...]
    anatomies: tuple[str, ...]
    probability: np.ndarray
    std: np.ndarray
    per_template: np.ndarray
    assessable: np.ndarray
    primary: tuple[str, ...]
    templates: tuple[tuple[str, str], ...]

    def primary_index(self, abnormality: str) -> int | None:
        """Column of the abnormality's own anatomy (None if the model does not pool it)."""
        anatomy = self.primary[self.abnormalities.index(abnormality)]
        return self.anatomies.index(anatomy) if anatomy in self.anatomies else None

    def primary_probability(self, abnormality: str) -> float:
        """Probability in the abnormality's own anatomy (NaN if not assessable)."""
        j = self.primary_index(abnormality)
        return float("nan") if j is None else float(self.probability[self.abnormalities.index(abnormality), j])

    def rows(self) -> list[dict[str, Any]]:
        """One dict per anatomy x abnormality: anatomy, abnormality, probability, std, assessable, primary."""
        out = []
        for k, ab in enumerate(self.abnormalities):
            for j, an in enumerate(self.anatomies):
                out.append({
                    "anatomy": an, "abnormality": ab, "probability": float(self.probability[k, j]),
                    "std": float(self.std[k, j]), "assessable": bool(self.assessable[k, j]),
                    "primary": an == self.primary[k],
                })
            if self.primary[k] not in self.anatomies:  # keep one primary row per abnormality
                out.append({"anatomy": self.primary[k], "abnormality": ab, "probability": float("nan"),
                            "std": float("nan"), "assessable": False, "primary": True})
        return out


def score_abnormalities(
    model: CTVLP,
    features: ImageFeatures,
    *,
    templates: Sequence[tuple[str, str]] = PROMPT_TEMPLATES,
    abnormalities: Sequence[str] = ABNORMALITY_NAMES,
) -> AbnormalityScores:
    """Score every abnormality against every anatomy with every template.

    For anatomy ``j``, ``{organ}`` in a template is that anatomy's phrase; the column of the
    abnormality's own anatomy (``primary``) is the detection result, the rest is context.
    """
    if not templates:
        raise ValueError("templates must contain at least one (positive, negative) pair")
    unknown = [a for a in abnormalities if a not in ABNORMALITY_BY_NAME]
    if unknown:
        raise ValueError(f"unknown abnormalities {unknown}; known: {', '.join(ABNORMALITY_NAMES)}")
    anatomies = features.anatomies
    K, A, P = len(abnormalities), len(anatomies), len(templates)
    pos, neg, idx = [], [], []
    for ab in abnormalities:
        term = ABNORMALITY_BY_NAME[ab].term
        for j, an in enumerate(anatomies):
            for tp, tn in templates:
                pos.append(fill_template(tp, term, an))
                neg.append(fill_template(tn, term, an))
                idx.append(j)
    p, _, _ = _pair_probabilities(model, features, pos, neg, np.asarray(idx))
    per_template = p.reshape(K, A, P)
    mean, std = _nanstats(per_template, axis=2)
    assessable = np.broadcast_to(features.present[None, :], (K, A)).copy()
    return AbnormalityScores(
        abnormalities=tuple(abnormalities), anatomies=anatomies, probability=mean, std=std,
        per_template=per_template, assessable=assessable,
        primary=tuple(ABNORMALITY_BY_NAME[a].anatomy for a in abnormalities),
        templates=tuple((str(a), str(b)) for a, b in templates),
    )
