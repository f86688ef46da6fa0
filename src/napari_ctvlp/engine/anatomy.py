"""Anatomy table: organ labels, anatomy groups, abnormality -> anatomy map, prompt templates.

Everything here is data. Adding an anatomy (e.g. pleura) or a template is a change to the
tables below, not to the code that uses them.

Two levels:

* **Organ labels** (:data:`ORGAN_LABELS`) are the exclusive values of the organ label map that
  every segmentation backend and the phantom produce (one value per voxel). Each names the
  TotalSegmentator v2 ``total`` labels it is made of.
* **Anatomy groups** (:data:`ANATOMIES`) are the (overlapping) regions the model pools over:
  unions of organ labels, optionally dilated (lung includes the pleural space). CA-GCL's
  published baseline uses lung, heart, esophagus and aorta; we add trachea, a mediastinum
  region (lymphadenopathy) and the whole body (medical material) so all 18 CT-RATE labels are
  assessable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OrganLabel:
    """One value of the organ label map."""

    value: int
    name: str
    totalseg: tuple[int, ...]
    color: tuple[int, int, int]


@dataclass(frozen=True)
class Anatomy:
    """A region the model pools over: a union of organ labels, optionally dilated."""

    name: str
    phrase: str
    organ_labels: tuple[int, ...]
    dilate_mm: float = 0.0


@dataclass(frozen=True)
class Abnormality:
    """A CT-RATE abnormality, the anatomy it is assessed in, and its wording in prompts."""

    name: str
    anatomy: str
    term: str
    synonyms: tuple[str, ...] = ()


_VERTEBRAE = tuple(range(26, 51)) + (79,)
_OTHER_BONE = (25,) + tuple(range(69, 79)) + (91,) + tuple(range(92, 118))

#: Exclusive organ label values (0 = background/outside the body).
ORGAN_LABELS: tuple[OrganLabel, ...] = (
    OrganLabel(1, "lung_left", (), (70, 130, 180)),
    OrganLabel(2, "lung_right", (), (100, 149, 237)),
    OrganLabel(3, "lung_upper_lobe_left", (10,), (65, 105, 225)),
    OrganLabel(4, "lung_lower_lobe_left", (11,), (30, 144, 255)),
    OrganLabel(5, "lung_upper_lobe_right", (12,), (135, 206, 250)),
    OrganLabel(6, "lung_middle_lobe_right", (13,), (0, 191, 255)),
    OrganLabel(7, "lung_lower_lobe_right", (14,), (95, 158, 160)),
    OrganLabel(8, "trachea", (16,), (255, 255, 0)),
    OrganLabel(9, "esophagus", (15,), (255, 165, 0)),
    OrganLabel(10, "heart", (51, 61), (220, 20, 60)),
    OrganLabel(11, "aorta", (52,), (255, 0, 255)),
    OrganLabel(12, "mediastinum", (53, 54, 55, 56, 57, 58, 59, 60, 62, 17), (255, 192, 203)),
    OrganLabel(13, "spine", _VERTEBRAE, (245, 245, 220)),
    OrganLabel(14, "bone", _OTHER_BONE, (210, 210, 210)),
    OrganLabel(15, "body", (), (160, 120, 90)),
)

ORGAN_BY_NAME: dict[str, OrganLabel] = {o.name: o for o in ORGAN_LABELS}
LUNG_LABELS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
LEFT_LUNG_LABELS: tuple[int, ...] = (1, 3, 4)
RIGHT_LUNG_LABELS: tuple[int, ...] = (2, 5, 6, 7)

#: Anatomy groups, in the order of the model's anatomy queries.
ANATOMIES: tuple[Anatomy, ...] = (
    Anatomy("lung", "lungs", LUNG_LABELS, dilate_mm=8.0),
    Anatomy("heart", "heart", (10,), dilate_mm=4.0),
    Anatomy("esophagus", "esophagus", (9,), dilate_mm=4.0),
    Anatomy("aorta", "aorta", (11,), dilate_mm=2.0),
    Anatomy("trachea", "trachea", (8,)),
    Anatomy("mediastinum", "mediastinum", (8, 9, 10, 11, 12)),
    Anatomy("body", "body", tuple(o.value for o in ORGAN_LABELS)),
)
ANATOMY_NAMES: tuple[str, ...] = tuple(a.name for a in ANATOMIES)
ANATOMY_BY_NAME: dict[str, Anatomy] = {a.name: a for a in ANATOMIES}

#: The 18 CT-RATE abnormalities (column names of ``multi_abnormality_labels``).
ABNORMALITIES: tuple[Abnormality, ...] = (
    Abnormality("Medical material", "body", "medical material", ("a medical device", "implanted material")),
    Abnormality("Arterial wall calcification", "aorta", "arterial wall calcification", ("atherosclerotic calcification of the aorta",)),
    Abnormality("Cardiomegaly", "heart", "cardiomegaly", ("an enlarged heart",)),
    Abnormality("Pericardial effusion", "heart", "pericardial effusion", ("fluid in the pericardium",)),
    Abnormality("Coronary artery wall calcification", "heart", "coronary artery wall calcification", ("coronary calcification",)),
    Abnormality("Hiatal hernia", "esophagus", "hiatal hernia", ("a hiatus hernia",)),
    Abnormality("Lymphadenopathy", "mediastinum", "lymphadenopathy", ("enlarged lymph nodes",)),
    Abnormality("Emphysema", "lung", "emphysema", ("emphysematous changes",)),
    Abnormality("Atelectasis", "lung", "atelectasis", ("atelectatic changes",)),
    Abnormality("Lung nodule", "lung", "lung nodule", ("a pulmonary nodule",)),
    Abnormality("Lung opacity", "lung", "lung opacity", ("ground-glass opacity",)),
    Abnormality("Pulmonary fibrotic sequela", "lung", "pulmonary fibrotic sequela", ("fibrotic changes",)),
    Abnormality("Pleural effusion", "lung", "pleural effusion", ("fluid in the pleural space",)),
    Abnormality("Mosaic attenuation pattern", "lung", "mosaic attenuation pattern", ("mosaic attenuation",)),
    Abnormality("Peribronchial thickening", "lung", "peribronchial thickening", ("bronchial wall thickening",)),
    Abnormality("Consolidation", "lung", "consolidation", ("consolidated lung",)),
    Abnormality("Bronchiectasis", "lung", "bronchiectasis", ("dilated bronchi",)),
    Abnormality("Interlobular septal thickening", "lung", "interlobular septal thickening", ("septal thickening",)),
)
ABNORMALITY_NAMES: tuple[str, ...] = tuple(a.name for a in ABNORMALITIES)
ABNORMALITY_BY_NAME: dict[str, Abnormality] = {a.name: a for a in ABNORMALITIES}

#: (positive, negative) prompt wordings; ``{x}`` is the finding, ``{organ}`` the anatomy phrase.
PROMPT_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{X}.", "No {x}."),
    ("{X} is present.", "{X} is not present."),
    ("There is {x} in the {organ}.", "There is no {x} in the {organ}."),
    ("Findings are consistent with {x}.", "There is no evidence of {x}."),
    ("{X} is seen in the {organ}.", "No {x} is seen in the {organ}."),
    ("{X} is observed.", "{X} is not observed."),
)


def _fill(template: str, term: str, organ: str) -> str:
    return template.format(x=term, X=term[:1].upper() + term[1:], organ=organ)


def prompt_pairs(abnormality: str, *, include_synonyms: bool = False) -> list[tuple[str, str]]:
    """All (positive, negative) prompt pairs for one abnormality, one per template.

    Args:
        abnormality: a CT-RATE label name, e.g. ``"Pleural effusion"``.
        include_synonyms: also fill every template with each synonym (robustness checks).
    """
    if abnormality not in ABNORMALITY_BY_NAME:
        raise ValueError(f"unknown abnormality {abnormality!r}; known: {', '.join(ABNORMALITY_NAMES)}")
    ab = ABNORMALITY_BY_NAME[abnormality]
    organ = ANATOMY_BY_NAME[ab.anatomy].phrase
    terms = (ab.term,) + (ab.synonyms if include_synonyms else ())
    return [(_fill(p, t, organ), _fill(n, t, organ)) for t in terms for p, n in PROMPT_TEMPLATES]


def totalseg_to_organ_lut() -> np.ndarray:
    """Lookup table mapping TotalSegmentator v2 ``total`` label values (0..117) to organ labels.

    TotalSegmentator labels not named in :data:`ORGAN_LABELS` (abdominal organs, muscles, ...)
    map to ``body``.
    """
    lut = np.full(256, ORGAN_BY_NAME["body"].value, dtype=np.uint8)
    lut[0] = 0
    for organ in ORGAN_LABELS:
        for ts in organ.totalseg:
            lut[ts] = organ.value
    return lut


def organ_label_names() -> dict[int, str]:
    """``{value: name}`` for the organ label map (without background)."""
    return {o.value: o.name for o in ORGAN_LABELS}


def anatomy_masks(
    organ_labels: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    anatomies: tuple[Anatomy, ...] = ANATOMIES,
) -> np.ndarray:
    """Boolean masks ``(n_anatomies, *organ_labels.shape)`` of the anatomy groups.

    Args:
        organ_labels: organ label map (values of :data:`ORGAN_LABELS`).
        spacing: voxel size in mm, used for each group's dilation.
        anatomies: which groups, in which order.
    """
    from scipy import ndimage

    if organ_labels.ndim != 3:
        raise ValueError(f"organ label map must be 3D, got shape {organ_labels.shape}")
    out = np.zeros((len(anatomies), *organ_labels.shape), dtype=bool)
    for i, anatomy in enumerate(anatomies):
        mask = np.isin(organ_labels, anatomy.organ_labels)
        if anatomy.dilate_mm > 0 and mask.any():
            radius = [max(0, int(round(anatomy.dilate_mm / s))) for s in spacing]
            if any(radius):
                grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
                ball = sum((g / max(r, 1)) ** 2 for g, r in zip(grid, radius)) <= 1.0
                mask = ndimage.binary_dilation(mask, structure=ball) & (organ_labels > 0)
        out[i] = mask
    return out
