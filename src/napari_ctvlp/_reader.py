"""napari reader contribution: CT volumes (NIfTI, DICOM series, NRRD/MHA/MHD) as Image layers,
label maps (TotalSegmentator output, our organs.nii.gz + organs.json, DICOM-SEG) as Labels layers.

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
    from napari_ctvlp.io.labelmaps import LabelMap

logger = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[Any], list[LayerData]]

_MAX_FILES_PROBED = 64


def _has_dicom(folder: Path) -> bool:
    for i, child in enumerate(sorted(folder.iterdir())):
        if i >= _MAX_FILES_PROBED:
            break
        if child.is_file() and io.is_dicom_file(child):
            return True
    return False


def _handles(path: str | os.PathLike[str]) -> bool:
    """Cheap check (no full read) that ``path`` is something we read (a CT or a label map)."""
    from napari_ctvlp.io.labelmaps import is_segmentation_folder

    p = Path(path)
    if p.is_dir():
        return _has_dicom(p) or is_segmentation_folder(p)
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


def label_layer_data(label_map: LabelMap, *, name: str | None = None) -> LayerData:
    """The napari Labels layer tuple of a :class:`~napari_ctvlp.io.labelmaps.LabelMap`
    (names, colours, shown on its own grid in the display frame, like a CT)."""
    from napari_ctvlp._layers import labels_layer, organ_labels_layer

    source = Path(str(label_map.volume.meta.get("path", "labels")))
    layer_name = name or io.path_stem(source)
    info = {"affine": [[float(v) for v in row] for row in label_map.volume.affine], "source_path": str(source),
            "format": label_map.volume.meta.get("format", "unknown"), "label_kind": label_map.kind}
    if label_map.kind == "organ":
        data, kwargs, kind = organ_labels_layer(label_map.labels, label_map.volume, name=layer_name,
                                                names=label_map.names)
    else:
        data, kwargs, kind = labels_layer(label_map.labels, label_map.volume, name=layer_name,
                                          names=label_map.names, kind=label_map.kind)
    kwargs["metadata"] = {"ctvlp": info, **kwargs["metadata"]}
    return data, kwargs, kind


def read_one(path: str | os.PathLike[str]) -> LayerData:
    """One path as an Image layer (a CT) or a Labels layer (a label map: DICOM-SEG, a
    TotalSegmentator ``segmentations/`` folder, an integer volume with values 0..255 or with our
    ``.json`` sidecar)."""
    from napari_ctvlp.io import labelmaps

    p = Path(path).expanduser()
    if p.is_dir() and not _has_dicom(p) and labelmaps.is_segmentation_folder(p):
        return label_layer_data(labelmaps.read_segmentation_folder(p))
    if p.is_file() and labelmaps.is_dicom_seg(p):
        return label_layer_data(labelmaps.read_dicom_seg(p))
    volume = io.read_ct(p)
    if p.is_file() and io.path_suffix(p) in io.NIFTI_SUFFIXES + io.ITK_SUFFIXES:
        names = labelmaps.read_sidecar(p)
        if labelmaps.is_label_volume(volume, sidecar=names is not None):
            return label_layer_data(labelmaps.label_map_from_volume(volume, names=names))
    return layer_data(volume)


def read_layers(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[LayerData]:
    """Read one path or each of a list of paths into napari layer tuples (Image or Labels)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [read_one(p) for p in paths]


#: Alias used by the sample-data contribution.
ct_image_layer = layer_data
