"""napari writer contribution: save a Labels layer as NIfTI (or DICOM-SEG) on the CT grid.

Thin over :func:`napari_ctvlp.io.write_labels`. The geometry comes from the layer metadata
that the reader and the widgets attach (``metadata["ctvlp_volume"]`` and the display transform
``metadata["ctvlp_display"]``, undone before writing, so the file's voxel order and affine are
kept exactly; else ``metadata["ctvlp"]["affine"]``); a layer without them but in our display
frame (axis labels ``S->I``, ``A->P``, ``R->L``, e.g. napari's "New labels layer" on our CT) gets
the RAS affine of its ``scale``/``translate``; otherwise a diagonal affine is built from the layer
``scale`` (a warning is logged). napari asks before replacing a file, so this overwrites.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_ctvlp import io
from napari_ctvlp._layers import (
    DISPLAY_AXIS_LABELS,
    LABEL_NAMES_KEY,
    VOLUME_KEY,
    layer_geometry,
    volume_affine_from_layer,
)
from napari_ctvlp.engine.volume import CTVolume

logger = logging.getLogger(__name__)


def geometry_from_layer_meta(meta: Mapping[str, Any], shape: tuple[int, ...]) -> CTVolume:
    """A :class:`CTVolume` carrying the grid of a layer's data *in the layer's own axis order*.

    Use :func:`labels_and_grid` to write a layer: it also undoes the display transpose.

    Args:
        meta: napari layer attributes (``metadata``, ``scale``, ``translate``, ``axis_labels``, ...).
        shape: the layer data shape.
    """
    if len(shape) != 3:
        raise ValueError(f"need a 3D labels layer, got shape {tuple(shape)}")
    metadata = meta.get("metadata") or {}
    volume = metadata.get(VOLUME_KEY)
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
    scale = [float(s) for s in (meta.get("scale") if meta.get("scale") is not None else (1.0, 1.0, 1.0))][-3:]
    labels = tuple(str(a) for a in (meta.get("axis_labels") or ()))[-3:]
    if labels == DISPLAY_AXIS_LABELS:
        # a layer in our radiological display frame (e.g. napari's "New labels layer" on a CT we opened)
        translate = meta.get("translate") if meta.get("translate") is not None else (0.0, 0.0, 0.0)
        affine = volume_affine_from_layer(scale, translate)
        return CTVolume(placeholder, tuple(abs(s) for s in scale), affine, io.axcodes(affine),  # type: ignore[arg-type]
                        {"format": "unknown"})
    logger.warning("labels layer has no CT geometry; writing a diagonal affine from scale %s", scale)
    affine = np.diag([*(abs(s) for s in scale[::-1]), 1.0])
    return CTVolume(placeholder, tuple(abs(s) for s in scale), affine, io.axcodes(affine),  # type: ignore[arg-type]
                    {"format": "unknown"})


def labels_and_grid(data: Any, meta: Mapping[str, Any]) -> tuple[np.ndarray, CTVolume]:
    """``(labels on the volume grid, volume)`` of a Labels layer: the display transpose is undone,
    so a layer read from a file is written back in that file's voxel order and affine."""
    labels = np.asarray(data)
    if labels.ndim != 3:
        raise ValueError(f"need a 3D labels layer, got shape {labels.shape}")
    metadata = meta.get("metadata") or {}
    geometry = layer_geometry(metadata)
    volume = metadata.get(VOLUME_KEY)
    if geometry is not None and isinstance(volume, CTVolume):
        if geometry.display_shape(volume.shape) != labels.shape:
            raise ValueError(f"labels shape {labels.shape} does not match the CT volume shape "
                             f"{geometry.display_shape(volume.shape)} (as displayed)")
        return geometry.from_display(labels), volume
    return labels, geometry_from_layer_meta(meta, labels.shape)


def write_labels_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """napari single-layer writer for Labels: ``.nii``/``.nii.gz`` (+ JSON sidecar) or ``.dcm``.

    Label names come from ``meta["metadata"]["ctvlp_label_names"]`` when present, else the
    organ names of ``engine.anatomy``.
    """
    target = Path(path)
    labels, like = labels_and_grid(data, meta)
    if labels.dtype.kind not in "iub":
        raise ValueError(f"{target}: labels layer data must be integers, got {labels.dtype}")
    names = (meta.get("metadata") or {}).get(LABEL_NAMES_KEY)
    names = {int(k): str(v) for k, v in names.items()} if isinstance(names, Mapping) else None
    written = io.write_labels(labels, like=like, path=target, names=names, overwrite=True)
    return [str(p) for p in written]
