"""napari reader contribution: CT volumes (NIfTI, DICOM series, NRRD/MHA/MHD) as Image layers.

Thin over :func:`napari_ctvlp.io.read_ct`. Layers are shown radiologically (axial: anterior up,
the patient's right on the screen's left; coronal and sagittal: head up) in the display frame
of :mod:`napari_ctvlp._layers`: ``scale`` = signed voxel spacing (mm), ``translate`` = the
position of the first voxel, axis labels ``S->I``, ``A->P``, ``R->L``, units mm. Every layer
computed on the same grid (labels, heatmaps) is shown with the same
:class:`~napari_ctvlp._layers.DisplayGeometry` (``metadata["ctvlp_display"]``). The exact
voxel -> RAS geometry travels in ``metadata["ctvlp"]["affine"]`` and in the
:class:`~napari_ctvlp.engine.volume.CTVolume` under ``metadata["ctvlp_volume"]``.

Manifest patterns to register: ``*.nii``, ``*.nii.gz``, ``*.nrrd``, ``*.nhdr``, ``*.mha``,
``*.mhd``, ``*.dcm``, ``*`` (extensionless DICOM files) and folders (``accepts_directories``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_ctvlp import io

if TYPE_CHECKING:
    from napari_ctvlp.engine.volume import CTVolume

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[Any], list[LayerData]]

_MAX_FILES_PROBED = 64


def _handles(path: str | os.PathLike[str]) -> bool:
    """Cheap check (no full read) that ``path`` is something :func:`io.read_ct` reads."""
    p = Path(path)
    if p.is_dir():
        for i, child in enumerate(sorted(p.iterdir())):
            if i >= _MAX_FILES_PROBED:
                break
            if child.is_file() and io.is_dicom_file(child):
                return True
        return False
    if not p.is_file():
        return False
    suffix = io.path_suffix(p)
    if suffix in io.NIFTI_SUFFIXES or suffix in io.ITK_SUFFIXES:
        return True
    return io.is_dicom_file(p)


def napari_get_reader(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> ReaderFunction | None:
    """Return a reader function for ``path`` (or a list of paths), or None if not ours.

    Never raises: anything it cannot handle (unknown type, missing file, a list with one such
    path) gives None so that napari tries other readers.
    """
    try:
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        if not paths or not all(_handles(p) for p in paths):
            return None
    except Exception:  # never raise from the get_reader hook
        logger.debug("napari_get_reader: not handling %r", path, exc_info=True)
        return None
    return read_layers


def layer_data(volume: CTVolume, *, name: str | None = None) -> LayerData:
    """The napari Image layer tuple for a :class:`CTVolume`, shown radiologically.

    The data is ``volume.array`` (transposed, as a view, only for non-axial voxel orders); the
    layer's ``scale``/``translate`` place it in the display frame of :mod:`napari_ctvlp._layers`
    (mm, axis labels ``S->I``, ``A->P``, ``R->L``).
    """
    from napari_ctvlp._layers import image_layer_kwargs

    source = Path(str(volume.meta.get("path", "volume")))
    info = {
        "affine": [[float(v) for v in row] for row in volume.affine],
        "spacing": list(volume.spacing),
        "orientation": list(volume.orientation),
        "source_path": str(source),
        "format": volume.meta.get("format", "unknown"),
        "window_presets": {k: list(v) for k, v in io.WINDOW_PRESETS.items()},
    }
    base = image_layer_kwargs(volume)
    geometry = base["metadata"]["ctvlp_display"]
    kwargs = {
        **base,
        "name": name or io.path_stem(source),
        "colormap": "gray",
        "contrast_limits": io.contrast_limits(io.DEFAULT_WINDOW),
        "metadata": {"ctvlp": info, **base["metadata"]},
    }
    return (geometry.to_display(volume.array), kwargs, "image")


def read_layers(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[LayerData]:
    """Read one path or each of a list of paths into napari Image layer tuples."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [layer_data(io.read_ct(p)) for p in paths]


#: Alias used by the sample-data contribution.
ct_image_layer = layer_data
