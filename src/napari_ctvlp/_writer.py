"""napari writer contribution: save a Labels layer as NIfTI (or DICOM-SEG) on the CT grid.

Thin over :func:`napari_ctvlp.io.write_labels`. The geometry comes from the layer metadata
that the reader and the widgets attach (``metadata["ctvlp_volume"]``, else
``metadata["ctvlp"]["affine"]``); without it a diagonal affine is built from the layer
``scale`` (a warning is logged). napari asks before replacing a file, so this overwrites.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_ctvlp import io
from napari_ctvlp.engine.volume import CTVolume

logger = logging.getLogger(__name__)


def geometry_from_layer_meta(meta: Mapping[str, Any], shape: tuple[int, ...]) -> CTVolume:
    """A :class:`CTVolume` carrying the grid of a layer (array is a zero-cost placeholder).

    Args:
        meta: napari layer attributes (``metadata``, ``scale``, ...).
        shape: the layer data shape, display order.
    """
    if len(shape) != 3:
        raise ValueError(f"need a 3D labels layer, got shape {tuple(shape)}")
    metadata = meta.get("metadata") or {}
    volume = metadata.get("ctvlp_volume")
    if isinstance(volume, CTVolume):
        if volume.shape != tuple(shape):
            raise ValueError(f"labels shape {tuple(shape)} does not match the CT volume shape {volume.shape}")
        return volume
    placeholder = np.broadcast_to(np.uint8(0), tuple(shape))
    info = metadata.get("ctvlp") or {}
    if info.get("affine") is not None:
        affine = np.asarray(info["affine"], dtype=float)
        meta_out = {"format": info.get("format", "unknown"), "path": info.get("source_path", "")}
        orientation = tuple(info.get("orientation") or io.axcodes(affine))
        return CTVolume(placeholder, io.spacing_from_affine(affine), affine, orientation, meta_out)  # type: ignore[arg-type]
    scale = [float(s) for s in (meta.get("scale") or (1.0, 1.0, 1.0))][-3:]
    logger.warning("labels layer has no CT geometry; writing a diagonal affine from scale %s", scale)
    affine = np.diag([*scale[::-1], 1.0])
    return CTVolume(placeholder, tuple(scale), affine, io.axcodes(affine), {"format": "unknown"})  # type: ignore[arg-type]


def write_labels_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """napari single-layer writer for Labels: ``.nii``/``.nii.gz`` (+ JSON sidecar) or ``.dcm``.

    Label names come from ``meta["metadata"]["ctvlp_label_names"]`` when present, else the
    organ names of ``engine.anatomy``.
    """
    target = Path(path)
    labels = np.asarray(data)
    like = geometry_from_layer_meta(meta, labels.shape)
    if labels.dtype.kind not in "iub":
        raise ValueError(f"{target}: labels layer data must be integers, got {labels.dtype}")
    names = (meta.get("metadata") or {}).get("ctvlp_label_names")
    names = {int(k): str(v) for k, v in names.items()} if isinstance(names, Mapping) else None
    written = io.write_labels(labels, like=like, path=target, names=names, overwrite=True)
    return [str(p) for p in written]
