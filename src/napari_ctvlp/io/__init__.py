"""Read CT volumes (NIfTI, DICOM series, NRRD/MHA/MHD) and write label maps and heatmaps.

Everything returns or takes a :class:`~napari_ctvlp.engine.volume.CTVolume` (array in display
order ``(k, j, i)``, exact voxel -> RAS+ affine). Errors in the input raise :class:`CTReadError`
(a :class:`ValueError`) with a one-line message naming the file and the problem.

Supported inputs of :func:`read_ct`:

* ``.nii`` / ``.nii.gz`` (nibabel): the file's affine is kept as is (``img.affine``: sform if
  set, else qform); a 4D file whose 4th axis has length 1 is squeezed.
* a DICOM series folder (pydicom; JPEG2000/JPEG-LS via pylibjpeg/gdcm): slices sorted along the
  slice normal, RescaleSlope/Intercept applied, affine built from the DICOM geometry (LPS -> RAS).
  A folder holding several series is rejected (the message lists them). Series are told apart
  by more than the SeriesInstanceUID (often blank in anonymised exports): study / frame-of-
  reference UIDs, series number and description, orientation, grid and pixel spacing; slices
  that still look merged (repeated SOPInstanceUIDs or InstanceNumbers, acquisitions whose
  positions interleave, positions on two interleaved lattices) are refused too. A *single DICOM
  file* is read as the whole series it belongs to: the files of its folder that share its
  series attributes (other series in that folder are ignored).
* Sizes are checked before voxels are allocated: the file must be able to hold what the header
  claims (for ``.nii.gz`` through the DEFLATE ratio bound) and the read must fit the available
  memory (``$NAPARI_CTVLP_READ_BUDGET_BYTES`` overrides it). Values that are not finite after
  the intensity scaling, and a zero voxel size in a NIfTI header without sform, are refused.
* ``.nrrd`` / ``.nhdr`` / ``.mha`` / ``.mhd`` (SimpleITK).

Heavy libraries are imported inside the functions so that napari starts fast.
"""


from napari_ctvlp.engine.volume import CTVolume
from napari_ctvlp.io._common import (
    DEFAULT_WINDOW,
    DICOM_SUFFIXES,
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    WINDOW_PRESETS,
    CTReadError,
    axcodes,
    contrast_limits,
    is_dicom_file,
    path_stem,
    path_suffix,
    spacing_from_affine,
)
from napari_ctvlp.io.read import read_ct, read_labels
from napari_ctvlp.io.write import atomic_write, write_labels, write_volume

__all__ = [
    "CTReadError",
    "CTVolume",
    "DEFAULT_WINDOW",
    "DICOM_SUFFIXES",
    "ITK_SUFFIXES",
    "NIFTI_SUFFIXES",
    "WINDOW_PRESETS",
    "atomic_write",
    "axcodes",
    "contrast_limits",
    "is_dicom_file",
    "path_stem",
    "path_suffix",
    "read_ct",
    "read_labels",
    "spacing_from_affine",
    "write_labels",
    "write_volume",
]
