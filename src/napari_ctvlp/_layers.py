"""Layer-data tuples shared by the reader, the sample data, the demo and the widgets.

napari types appear only as strings: this module imports neither napari nor Qt.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_ctvlp.engine.anatomy import ORGAN_LABELS
from napari_ctvlp.engine.volume import CTVolume


def organ_colormap() -> dict[int | None, tuple[float, float, float, float]]:
    """``{label value: RGBA}`` for napari's direct label colormap (background transparent)."""
    colors: dict[int | None, tuple[float, float, float, float]] = {
        0: (0.0, 0.0, 0.0, 0.0),
        None: (0.5, 0.5, 0.5, 1.0),
    }
    for organ in ORGAN_LABELS:
        r, g, b = organ.color
        colors[organ.value] = (r / 255, g / 255, b / 255, 1.0)
    return colors


def organ_labels_layer(
    labels: np.ndarray,
    volume: CTVolume,
    *,
    name: str = "organs",
    names: dict[int, str] | None = None,
    visible_body: bool = False,
) -> tuple[np.ndarray, dict[str, Any], str]:
    """A Labels layer tuple aligned with ``volume`` (same scale), with organ names and colours.

    Args:
        labels: organ label map on the volume grid.
        volume: the CT the labels belong to (geometry is copied into the metadata for export).
        name: layer name.
        names: ``{value: name}``; default the organ table of :mod:`napari_ctvlp.engine.anatomy`.
        visible_body: show the catch-all ``body`` label (hidden by default, it covers everything).
    """
    if labels.shape != volume.shape:
        raise ValueError(f"labels shape {labels.shape} does not match the CT shape {volume.shape}")
    names = names or {o.value: o.name for o in ORGAN_LABELS}
    colormap = organ_colormap()
    if not visible_body:
        body = next(o.value for o in ORGAN_LABELS if o.name == "body")
        colormap[body] = (0.0, 0.0, 0.0, 0.0)
    values = [0, *sorted(names)]
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": tuple(volume.spacing),
        "colormap": colormap,
        "opacity": 0.45,
        "features": {"index": values, "organ": ["background", *(names[v] for v in values[1:])]},
        "metadata": {"ctvlp_volume": volume, "ctvlp_label_names": dict(names)},
    }
    return labels, kwargs, "labels"
