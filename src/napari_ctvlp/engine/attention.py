"""Heatmaps: MOSMOS pixel-tag attention and prompt-token similarity, mapped to the input CT grid.

A heatmap lives on the token grid (``N = gd * gh * gw`` values). It is upsampled trilinearly to
the model grid (``torch.nn.functional.interpolate``, ``align_corners=False``) and mapped back
onto the input CT grid with :func:`engine.preprocess.to_source_grid`, so it has exactly the
shape of ``CTVolume.array`` and the CT's affine applies. When the grids are axis-aligned both
steps are linear and separable and are done as three small matrix products
(:func:`token_map_to_source`), ~0.3 s for a 512x512x300 CT instead of several seconds.

Values are normalised to ``[0, 1]`` per map (min-max over the tokens inside the body).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from napari_ctvlp.engine.anatomy import ABNORMALITY_BY_NAME, ANATOMY_BY_NAME
from napari_ctvlp.engine.preprocess import PreparedVolume, apply_separable, source_axis_matrices, to_source_grid
from napari_ctvlp.engine.zero_shot import ImageFeatures, text_embeddings

if TYPE_CHECKING:
    import torch

    from napari_ctvlp.engine.networks.ctvlp import CTVLP

logger = logging.getLogger(__name__)

Grid = Literal["source", "model", "tokens"]


def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of 1-D linear upsampling as ``F.interpolate(align_corners=False)``."""
    out = np.zeros((n_out, n_in), dtype=np.float32)
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (src - i0).astype(np.float32)
    rows = np.arange(n_out)
    out[rows, i0] += 1.0 - w
    out[rows, i1] += w
    return out


def _as_grid(maps: np.ndarray, token_grid: tuple[int, int, int]) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float32)
    n = int(np.prod(token_grid))
    if maps.shape[-1] == n and maps.ndim in (1, 2):
        return maps.reshape(*maps.shape[:-1], *token_grid)
    if tuple(maps.shape[-3:]) == tuple(token_grid):
        return maps
    raise ValueError(f"maps of shape {maps.shape} do not fit the token grid {token_grid} (N={n})")


def token_map_to_model(maps: np.ndarray, *, token_grid: tuple[int, int, int], image_size: tuple[int, int, int]) -> np.ndarray:
    """Token-grid maps (``[..., N]`` or ``[..., gd, gh, gw]``) -> model grid, trilinear, float32."""
    import torch

    grid = _as_grid(maps, token_grid)
    lead = grid.shape[:-3]
    t = torch.from_numpy(np.ascontiguousarray(grid.reshape(-1, 1, *token_grid)))
    with torch.inference_mode():
        up = torch.nn.functional.interpolate(t, size=tuple(image_size), mode="trilinear", align_corners=False)
    return up.reshape(*lead, *image_size).numpy()


def token_map_to_source(maps: np.ndarray, prepared: PreparedVolume, *, token_grid: tuple[int, int, int]) -> np.ndarray:
    """Token-grid maps -> input CT grid (``prepared.source_shape``), float32.

    Equals ``to_source_grid(token_map_to_model(maps))``; uses composed per-axis matrices when
    the model and CT grids are axis-aligned.
    """
    grid = _as_grid(maps, token_grid)
    lead = grid.shape[:-3]
    flat = grid.reshape(-1, *token_grid)
    sep = source_axis_matrices(prepared)
    out = np.empty((flat.shape[0], *prepared.source_shape), dtype=np.float32)
    if sep is not None:
        perm, mats = sep
        size = prepared.config.image_size
        composed = [mats[a] @ interp_matrix(size[perm[a]], token_grid[perm[a]]) for a in range(3)]
        for i, m in enumerate(flat):
            out[i] = apply_separable(m, perm, composed)
    else:
        for i, m in enumerate(flat):
            model_map = token_map_to_model(m, token_grid=token_grid, image_size=prepared.config.image_size)
            out[i] = to_source_grid(model_map, prepared, order=1)
    return out.reshape(*lead, *prepared.source_shape)


def _body_tokens(features: ImageFeatures) -> np.ndarray | None:
    if "body" in features.anatomies:
        j = features.anatomies.index("body")
        if features.present[j]:
            return features.token_masks[j].cpu().numpy().astype(bool)
    return None


def _scope(features: ImageFeatures, anatomy: str | None) -> np.ndarray | None:
    """Tokens a map is normalised over: the body's, or (``anatomy`` given) the tokens touching that
    anatomy's mask (``ValueError`` for an anatomy the model does not pool or the scan lacks)."""
    if anatomy is None:
        return _body_tokens(features)
    if anatomy not in features.anatomies:
        raise ValueError(f"anatomy {anatomy!r} is not pooled by this model ({', '.join(features.anatomies)})")
    j = features.anatomies.index(anatomy)
    if not features.present[j]:
        raise ValueError(f"the {anatomy} is not in this scan's organ mask")
    return (features.token_masks[j] > 0).cpu().numpy()


def normalize_map(values: np.ndarray, *, within: np.ndarray | None = None) -> np.ndarray:
    """Min-max normalise token values to ``[0, 1]`` over ``within`` (bool ``[N]``); 0 outside."""
    v = np.asarray(values, dtype=np.float32).copy()
    sel = within if within is not None and within.any() else np.ones(v.shape, bool)
    lo, hi = float(v[sel].min()), float(v[sel].max())
    out = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    out[~sel] = 0.0
    return np.clip(out, 0.0, 1.0)


def _finish(values: np.ndarray, features: ImageFeatures, grid: Grid) -> np.ndarray:
    if grid == "tokens":
        return values.reshape(features.token_grid)
    if grid == "model":
        return token_map_to_model(values, token_grid=features.token_grid, image_size=features.prepared.config.image_size)
    if grid == "source":
        return token_map_to_source(values, features.prepared, token_grid=features.token_grid)
    raise ValueError(f"grid must be 'source', 'model' or 'tokens', got {grid!r}")


def _tag_map(model: CTVLP, features: ImageFeatures, text: str) -> np.ndarray:
    """Pixel-tag attention ``[N]`` of one tag text (a config tag, or decoded on the fly)."""
    import torch

    if text in features.tags:
        return features.tag_maps[features.tags.index(text)].cpu().numpy()
    with torch.inference_mode():
        out = model.decode_tags(features.tokens, model.encode_tags([text]))
    return out.maps[0, 0].float().cpu().numpy()


def anatomy_heatmaps(
    model: CTVLP,
    features: ImageFeatures,
    *,
    anatomies: Sequence[str] | None = None,
    kind: Literal["tags", "pooling"] = "tags",
    grid: Grid = "source",
) -> dict[str, np.ndarray]:
    """One heatmap per anatomy: its tag's pixel-tag map (``"tags"``) or its pooling attention.

    Args:
        anatomies: which (default all the model pools).
        kind: ``"tags"`` (MOSMOS tag decoder) or ``"pooling"`` (CA-GCL anatomy query attention).
        grid: ``"source"`` (input CT grid), ``"model"`` or ``"tokens"``.
    """
    names = list(anatomies) if anatomies is not None else list(features.anatomies)
    bad = [n for n in names if n not in features.anatomies]
    if bad:
        raise ValueError(f"anatomies {bad} are not pooled by this model ({', '.join(features.anatomies)})")
    if kind not in ("tags", "pooling"):
        raise ValueError(f"kind must be 'tags' or 'pooling', got {kind!r}")
    body = _body_tokens(features)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if kind == "tags":
            values = _tag_map(model, features, ANATOMY_BY_NAME[name].phrase if name in ANATOMY_BY_NAME else name)
        else:
            values = features.pooling_attention[features.anatomies.index(name)].cpu().numpy()
        out[name] = _finish(normalize_map(values, within=body), features, grid)
    return out


def abnormality_heatmap(model: CTVLP, features: ImageFeatures, abnormality: str, *, grid: Grid = "source",
                        anatomy: str | None = None) -> np.ndarray:
    """Pixel-tag map of an abnormality's tag (its term, e.g. "pleural effusion"), in ``[0, 1]``
    over the body, or over ``anatomy``'s tokens (0 elsewhere) when given."""
    if abnormality in ABNORMALITY_BY_NAME:
        text = ABNORMALITY_BY_NAME[abnormality].term
    elif str(abnormality).strip():
        text = str(abnormality).strip()
    else:
        raise ValueError("abnormality must not be empty")
    return _finish(normalize_map(_tag_map(model, features, text), within=_scope(features, anatomy)), features, grid)


def prompt_heatmap(
    model: CTVLP,
    features: ImageFeatures,
    prompt: str | tuple[str, str],
    *,
    normalize: Literal["minmax", "softmax"] = "minmax",
    grid: Grid = "source",
    anatomy: str | None = None,
) -> np.ndarray:
    """Where a sentence matches: cosine of its embedding with every token embedding or, for a
    model with a prompt evidence head (``features.prompt_cells`` set, ``grid`` not ``"tokens"``),
    the sentence's cell scores over one anatomy (:func:`prompt_evidence_heatmap`).

    Args:
        prompt: a sentence (or a (positive, negative) pair: the positive one is mapped).
        normalize: ``"minmax"`` over the body tokens, or ``"softmax"`` over the tokens (at the
            model's temperature) divided by its maximum.
        grid: ``"source"`` (input CT grid), ``"model"`` or ``"tokens"``.
        anatomy: normalise over this anatomy's tokens (0 elsewhere) instead of the body's, e.g.
            the lungs for "a nodule in the right lower lobe".
    """
    text = prompt[0] if isinstance(prompt, (tuple, list)) else prompt
    text = str(text).strip()
    if not text:
        raise ValueError("prompt must not be empty")
    if features.prompt_cells is not None and model.prompt_evidence is not None and grid != "tokens":
        return prompt_evidence_heatmap(model, features, prompt, grid=grid, anatomy=anatomy)
    emb = text_embeddings(model, [text])[0]
    cos = (features.token_embeddings @ emb).float().cpu().numpy()
    body = _scope(features, anatomy)
    if normalize == "minmax":
        values = normalize_map(cos, within=body)
    elif normalize == "softmax":
        z = cos * features.logit_scale
        if body is not None and body.any():
            z = np.where(body, z, -np.inf)
        e = np.exp(z - z.max())
        values = (e / e.max()).astype(np.float32)
    else:
        raise ValueError(f"normalize must be 'minmax' or 'softmax', got {normalize!r}")
    return _finish(values, features, grid)


def prompt_evidence_heatmap(
    model: CTVLP,
    features: ImageFeatures,
    prompt: str | tuple[str, str],
    *,
    grid: Literal["source", "model"] = "source",
    anatomy: str | None = None,
) -> np.ndarray:
    """The prompt evidence head's map of a sentence: its cell scores over ``anatomy``, min-max
    normalised there, 0 elsewhere. Default anatomy: the one the prompt's words name
    (:func:`~napari_ctvlp.engine.prompt_evidence.prompt_anatomy`; a map of zeros, logged, when the
    scan lacks it), else the one where its probability is highest.

    Raises:
        ValueError: no prompt evidence head, an empty prompt, an anatomy the model does not pool or
            the scan lacks, or a bad ``grid``.
    """
    from napari_ctvlp.engine.prompt_evidence import prompt_anatomy, prompt_map
    from napari_ctvlp.engine.prompt_scoring import score_prompt

    if features.prompt_cells is None or model.prompt_evidence is None:
        raise ValueError("this model has no prompt evidence head (config.prompt_evidence)")
    if grid not in ("source", "model"):
        raise ValueError(f"grid must be 'source' or 'model', got {grid!r}")
    if anatomy is None:
        words = str(prompt[0] if isinstance(prompt, (tuple, list)) else prompt).replace("{organ}", "")
        anatomy = prompt_anatomy(model, words, features.anatomies)
        if anatomy is not None and not features.present[features.anatomies.index(anatomy)]:
            logger.warning("the prompt %r is about the %s, which is not in this scan's organ mask: empty map",
                           words, anatomy)
            shape = features.prepared.image.shape[-3:] if grid == "model" else features.prepared.source_shape
            return np.zeros(tuple(int(n) for n in shape), np.float32)
        anatomy = anatomy or score_prompt(model, features, prompt).best_anatomy
        if anatomy is None:
            raise ValueError("no anatomy of the model is in this scan's organ mask")
    _scope(features, anatomy)  # checks the anatomy
    j = features.anatomies.index(anatomy)
    text = str(prompt[0] if isinstance(prompt, (tuple, list)) else prompt).strip()
    phrase = ANATOMY_BY_NAME[anatomy].phrase if anatomy in ANATOMY_BY_NAME else anatomy
    values = prompt_map(model, features.prompt_cells, text.replace("{organ}", phrase), j)
    inside = np.isfinite(values)
    if features.voxel is not None:  # the voxels of the anatomy, not the whole of its cells
        inside &= features.voxel["masks"][j].cpu().numpy().astype(bool)
    lo, hi = float(values[inside].min()), float(values[inside].max())
    heat = np.where(inside, (values - lo) / (hi - lo if hi > lo else 1.0), 0.0).astype(np.float32)
    if grid == "model":
        return heat
    return np.clip(to_source_grid(heat, features.prepared, order=1), 0.0, 1.0)


def heatmap_slug(text: str) -> str:
    """File-name-safe short name of a prompt ("Pleural effusion." -> "pleural_effusion")."""
    import re

    slug = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")
    return slug[:60] or "prompt"
