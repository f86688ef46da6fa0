"""Layer-data tuples shared by the reader, the sample data, the demo and the widgets.

napari types appear only as strings: this module imports neither napari nor Qt.

Radiological display
--------------------
Every layer of a CT (the image, its organ labels, heatmaps) is shown in one *display frame*,
world coordinates in mm whose axes point

* axis 0 (the axial slider): towards the patient's **inferior** side,
* axis 1: towards **posterior**,
* axis 2: towards the patient's **left**.

napari draws the second-to-last world axis downwards and the last to the right, so an axial
slice shows anterior at the top and the patient's right on the screen's left, and coronal
(axes 0, 2) and sagittal (axes 0, 1) slices show the head at the top; this is the radiological
convention. The frame is a proper rotation of RAS+ (``display = RAS_TO_DISPLAY @ ras``).

The layer data is the volume's array as read, only *transposed* (a view, no copy) when its axes
are not already in that order (sagittal or coronal acquisitions): napari can slice a layer only
when each data axis runs along one world axis. Axes that run against the display axes get a
negative ``scale``. :class:`DisplayGeometry` records this, so labels and heatmaps computed on
the volume grid are shown with the same transform, and writers map layer data back to the file's
own voxel order (exports keep the file's affine exactly).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_ctvlp.engine.anatomy import ORGAN_LABELS
from napari_ctvlp.engine.volume import CTVolume

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]

#: ``display_world = RAS_TO_DISPLAY @ ras`` (symmetric and its own inverse, determinant +1)
RAS_TO_DISPLAY = np.array([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
#: napari axis labels of the display frame: the direction in which each world axis increases
DISPLAY_AXIS_LABELS: tuple[str, str, str] = ("S\u2192I", "A\u2192P", "R\u2192L")
#: physical unit of the display frame
DISPLAY_UNITS: tuple[str, str, str] = ("mm", "mm", "mm")
#: layer metadata keys
VOLUME_KEY = "ctvlp_volume"
DISPLAY_KEY = "ctvlp_display"
LABEL_NAMES_KEY = "ctvlp_label_names"
LABEL_KIND_KEY = "ctvlp_label_kind"

#: value kinds of a label map: our organ labels or TotalSegmentator v2 ``total`` ids
ORGAN_KIND = "organ"
TOTALSEG_KIND = "totalseg"


@dataclass(frozen=True)
class DisplayGeometry:
    """How a volume's array is shown in the radiological display frame (see the module doc).

    Attributes:
        axes: layer data axis ``d`` is axis ``axes[d]`` of ``volume.array``.
        scale: signed voxel size in mm along each layer data axis (negative: the axis runs
            against the display axis it is shown along).
        translate: display-frame position (mm) of the centre of layer voxel ``(0, 0, 0)``.
        oblique: the voxel axes are rotated against the patient axes (e.g. a tilted gantry);
            they are shown along the nearest patient axes, so displayed positions are then
            approximate (the exact affine is still used for every export).
    """

    axes: tuple[int, int, int] = (0, 1, 2)
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    translate: tuple[float, float, float] = (0.0, 0.0, 0.0)
    oblique: bool = False

    @property
    def inverse_axes(self) -> tuple[int, int, int]:
        """Permutation taking layer data back to the volume's axis order."""
        return tuple(int(a) for a in np.argsort(self.axes))  # type: ignore[return-value]

    def to_display(self, array: np.ndarray) -> np.ndarray:
        """A volume-grid array as layer data (a transposed view; the array itself when no transpose)."""
        array = np.asarray(array)
        return array if self.axes == (0, 1, 2) else array.transpose(self.axes)

    def from_display(self, array: np.ndarray) -> np.ndarray:
        """Layer data back on the volume grid (axis order of ``volume.array``; a view)."""
        array = np.asarray(array)
        return array if self.axes == (0, 1, 2) else array.transpose(self.inverse_axes)

    def display_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Layer data shape of a volume of ``shape``."""
        return tuple(int(shape[a]) for a in self.axes)  # type: ignore[return-value]

    def index_to_display(self, index: Any) -> np.ndarray:
        """A volume array index ``(a0, a1, a2)`` as a layer data index."""
        return np.asarray(index, dtype=float)[list(self.axes)]

    def data_to_world(self) -> np.ndarray:
        """4x4 matrix: layer data index -> display-frame world (what napari applies)."""
        out = np.eye(4)
        out[:3, :3] = np.diag(self.scale)
        out[:3, 3] = self.translate
        return out

    def layer_kwargs(self) -> dict[str, Any]:
        """``scale``, ``translate``, ``units`` and ``axis_labels`` of the layer."""
        return {"scale": tuple(self.scale), "translate": tuple(self.translate), "units": DISPLAY_UNITS,
                "axis_labels": DISPLAY_AXIS_LABELS}


def display_geometry_from_affine(array_affine: np.ndarray) -> DisplayGeometry:
    """The display geometry of an array whose indices map to RAS+ mm by ``array_affine`` (4x4).

    ``array_affine`` is :attr:`CTVolume.display_affine` for a volume (array index order).
    """
    from nibabel.orientations import io_orientation

    aff = np.asarray(array_affine, dtype=float)
    world = np.eye(4)
    world[:3, :3] = RAS_TO_DISPLAY @ aff[:3, :3]
    world[:3, 3] = RAS_TO_DISPLAY @ aff[:3, 3]
    ornt = io_orientation(world)  # per array axis: (display axis it runs along, +1/-1)
    axes = [0, 0, 0]
    signs = [1.0, 1.0, 1.0]
    for array_axis, (display_axis, sign) in enumerate(ornt):
        axes[int(display_axis)] = array_axis
        signs[int(display_axis)] = float(sign)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    scale = tuple(float(signs[d] * spacing[axes[d]]) for d in range(3))
    aligned = np.zeros((3, 3))
    for d in range(3):
        aligned[d, axes[d]] = scale[d]
    oblique = not np.allclose(world[:3, :3], aligned, atol=1e-4 * float(spacing.max()))
    return DisplayGeometry(tuple(axes), scale, tuple(float(t) for t in world[:3, 3]), oblique)  # type: ignore[arg-type]


def display_geometry(volume: CTVolume) -> DisplayGeometry:
    """The radiological display geometry of a volume (see the module doc)."""
    return display_geometry_from_affine(volume.display_affine)


def layer_geometry(metadata: Mapping[str, Any] | None) -> DisplayGeometry | None:
    """The :class:`DisplayGeometry` a layer was made with (its ``metadata``), or None."""
    geometry = (metadata or {}).get(DISPLAY_KEY)
    return geometry if isinstance(geometry, DisplayGeometry) else None


def volume_affine_from_layer(scale: Any, translate: Any) -> np.ndarray:
    """Voxel ``(i, j, k)`` -> RAS+ affine of a layer in the display frame, data in its own order.

    For a Labels layer that napari made on a CT layer ("New labels layer": same scale,
    translate and axis labels, but none of our metadata): the layer's data ``(d0, d1, d2)``
    read as voxel axes ``(i, j, k) = (d2, d1, d0)``.
    """
    scale = np.asarray(scale, dtype=float)[-3:]
    translate = np.asarray(translate, dtype=float)[-3:]
    data_to_ras = np.eye(4)
    data_to_ras[:3, :3] = RAS_TO_DISPLAY @ np.diag(scale)
    data_to_ras[:3, 3] = RAS_TO_DISPLAY @ translate
    out = np.eye(4)
    out[:3, :3] = data_to_ras[:3, :3][:, ::-1]
    out[:3, 3] = data_to_ras[:3, 3]
    return out


# ------------------------------------------------------------------------------- colours
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


def _hashed_color(value: int) -> tuple[float, float, float, float]:
    """A bright, stable colour per label value (golden-ratio hue steps)."""
    import colorsys

    hue = (value * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return (r, g, b, 1.0)


def totalseg_names() -> dict[int, str]:
    """``{value: structure}`` of TotalSegmentator v2 ``total`` (``totalseg_<id>`` without the package)."""
    from napari_ctvlp.io.labelmaps import totalseg_class_names

    return totalseg_class_names()


def totalseg_colormap(values: Any) -> dict[int | None, tuple[float, float, float, float]]:
    """Colours of TotalSegmentator ids: each id takes the colour of the organ label it maps to
    (lungs blue, heart red, ...), structures outside the organ table a distinct hashed colour."""
    from napari_ctvlp.engine.anatomy import totalseg_to_organ_lut

    lut = totalseg_to_organ_lut()
    organ = organ_colormap()
    body = next(o.value for o in ORGAN_LABELS if o.name == "body")
    colors: dict[int | None, tuple[float, float, float, float]] = {0: (0.0, 0.0, 0.0, 0.0),
                                                                   None: (0.5, 0.5, 0.5, 1.0)}
    for v in (int(x) for x in values):
        if v == 0:
            continue
        mapped = int(lut[v]) if v < lut.size else body
        colors[v] = organ[mapped] if mapped != body else _hashed_color(v)
    return colors


# -------------------------------------------------------------------------------- layers
def image_layer_kwargs(volume: CTVolume) -> dict[str, Any]:
    """Geometry keyword arguments (and the metadata keys) every layer of ``volume`` shares."""
    geometry = display_geometry(volume)
    if geometry.oblique:
        logger.info("volume axes are oblique to the patient axes: shown along the nearest axes")
    return {**geometry.layer_kwargs(), "metadata": {VOLUME_KEY: volume, DISPLAY_KEY: geometry}}


def labels_layer(
    labels: np.ndarray,
    volume: CTVolume,
    *,
    name: str,
    names: Mapping[int, str],
    kind: str = ORGAN_KIND,
    colormap: dict[int | None, tuple[float, float, float, float]] | None = None,
    opacity: float = 0.45,
    metadata: Mapping[str, Any] | None = None,
) -> LayerData:
    """A Labels layer tuple of a label map on ``volume``'s grid, shown like the CT.

    Args:
        labels: label map in ``volume.array``'s shape and axis order.
        volume: the CT the labels belong to (its geometry goes into the metadata for export).
        name: layer name.
        names: ``{value: name}`` (features ``index``/``name`` and the exported sidecar).
        kind: :data:`ORGAN_KIND` or :data:`TOTALSEG_KIND` (what the values mean).
        colormap: ``{value: RGBA}``; default by ``kind``.
        opacity: layer opacity.
        metadata: extra metadata.
    """
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise ValueError(f"labels shape {labels.shape} does not match the CT shape {volume.shape}")
    if colormap is None:
        colormap = organ_colormap() if kind == ORGAN_KIND else totalseg_colormap(names)
    base = image_layer_kwargs(volume)
    geometry: DisplayGeometry = base["metadata"][DISPLAY_KEY]
    values = [0, *sorted(int(v) for v in names)]
    kwargs: dict[str, Any] = {
        **base,
        "name": name,
        "colormap": colormap,
        "opacity": opacity,
        "features": {"index": values, "name": ["background", *(str(names[v]) for v in values[1:])]},
        "metadata": {**base["metadata"], LABEL_NAMES_KEY: {int(k): str(v) for k, v in names.items()},
                     LABEL_KIND_KEY: kind, **dict(metadata or {})},
    }
    if kind == ORGAN_KIND:
        kwargs["features"]["organ"] = kwargs["features"]["name"]
    return geometry.to_display(labels), kwargs, "labels"


def organ_labels_layer(
    labels: np.ndarray,
    volume: CTVolume,
    *,
    name: str = "organs",
    names: dict[int, str] | None = None,
    visible_body: bool = False,
) -> LayerData:
    """A Labels layer tuple aligned with ``volume``, with organ names and colours.

    Args:
        labels: organ label map on the volume grid (``volume.array``'s shape and axis order).
        volume: the CT the labels belong to (geometry is copied into the metadata for export).
        name: layer name.
        names: ``{value: name}``; default the organ table of :mod:`napari_ctvlp.engine.anatomy`.
        visible_body: show the catch-all ``body`` label (hidden by default, it covers everything).
    """
    names = names or {o.value: o.name for o in ORGAN_LABELS}
    colormap = organ_colormap()
    if not visible_body:
        body = next(o.value for o in ORGAN_LABELS if o.name == "body")
        colormap[body] = (0.0, 0.0, 0.0, 0.0)
    return labels_layer(labels, volume, name=name, names=names, kind=ORGAN_KIND, colormap=colormap)

