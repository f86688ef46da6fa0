"""Tests of the synthetic chest-CT phantom package (napari_ctvlp/phantom/)."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest

from napari_ctvlp.engine.anatomy import (
    ABNORMALITIES,
    ABNORMALITY_NAMES,
    ANATOMY_BY_NAME,
    ORGAN_LABELS,
    anatomy_masks,
)
from napari_ctvlp.phantom import (
    PREVALENCE,
    make_phantom,
    sample_abnormalities,
    write_phantom_dataset,
)
from napari_ctvlp.phantom.report import NEGATION_CUES, REPORT_KEYWORDS

SIZE = (80, 96, 96)
SEED = 3
NONE = {n: False for n in ABNORMALITY_NAMES}


def only(name: str) -> dict[str, bool]:
    return {n: n == name for n in ABNORMALITY_NAMES}


@pytest.fixture(scope="module")
def normal():
    return make_phantom(seed=SEED, size=SIZE, abnormalities=NONE)


def test_deterministic_and_seed_dependent():
    a = make_phantom(seed=11, size=(48, 64, 64))
    b = make_phantom(seed=11, size=(48, 64, 64))
    c = make_phantom(seed=12, size=(48, 64, 64))
    assert a.volume.array.dtype == np.int16 and a.organs.dtype == np.uint8 and a.lesions.dtype == np.uint8
    assert a.volume.array.tobytes() == b.volume.array.tobytes()
    assert a.organs.tobytes() == b.organs.tobytes() and a.lesions.tobytes() == b.lesions.tobytes()
    assert (a.findings, a.impression, a.labels) == (b.findings, b.impression, b.labels)
    assert a.volume.array.tobytes() != c.volume.array.tobytes()


def test_hu_ranges_and_labels(normal):
    hu, org = normal.volume.array.astype(float), normal.organs
    values = set(np.unique(org).tolist())
    assert {0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} <= values
    assert values <= {0} | {o.value for o in ORGAN_LABELS}
    assert hu[(org >= 3) & (org <= 7)].mean() < -700
    assert 20 <= hu[org == 10].mean() <= 250
    assert hu[org == 13].mean() > 200 and hu[org == 14].mean() > 200
    assert hu[org == 8].mean() < -300  # air in the trachea
    assert np.median(hu[org == 12]) < 0  # mediastinal fat
    body = hu[org == 15]
    assert ((body > -130) & (body < -70)).mean() > 0.05  # subcutaneous fat
    assert hu[org == 0].mean() < -950
    assert normal.lesions.max() == 0 and sum(normal.labels.values()) == 0


def test_orientation(normal):
    vol, org = normal.volume, normal.organs
    assert vol.orientation == ("L", "P", "S")
    import nibabel as nib

    assert nib.aff2axcodes(vol.affine) == ("L", "P", "S")
    assert np.allclose(np.abs(np.diag(vol.affine)[:3]), vol.spacing[::-1])
    cols = {v: np.nonzero(org == v)[2].mean() for v in (3, 4, 5, 6, 7)}
    assert min(cols[3], cols[4]) > max(cols[5], cols[6], cols[7])  # patient left = image right
    rows = {v: np.nonzero(org == v)[1].mean() for v in (10, 13)}
    assert rows[13] > rows[10]  # spine posterior (lower rows) to the heart
    slices = {v: np.nonzero(org == v)[0].mean() for v in (8, 10)}
    assert slices[8] > slices[10]  # trachea superior to the heart
    # the right middle lobe sits anterior-inferior to the right upper lobe
    assert np.nonzero(org == 6)[0].mean() < np.nonzero(org == 5)[0].mean()


def _lung(p):
    return (p.organs >= 3) & (p.organs <= 7)


def _count(p, mask, lo, hi):
    hu = p.volume.array
    return int(((hu > lo) & (hu < hi) & mask).sum())


SIGNATURES = {
    "Medical material": lambda on, off: (on.volume.array > 2000).sum() > 10 and off.volume.array.max() < 2000,
    "Arterial wall calcification": lambda on, off: _count(on, on.organs == 11, 500, 3000) > _count(off, off.organs == 11, 500, 3000) + 10,
    "Cardiomegaly": lambda on, off: (on.organs == 10).sum() > 1.3 * (off.organs == 10).sum(),
    "Pericardial effusion": lambda on, off: -10 < on.volume.array[on.lesions == 4].mean() < 30 and (on.organs == 10).sum() > (off.organs == 10).sum(),
    "Coronary artery wall calcification": lambda on, off: _count(on, on.organs == 10, 400, 3000) > _count(off, off.organs == 10, 400, 3000) + 5,
    "Hiatal hernia": lambda on, off: _count(on, on.organs == 9, -1100, -900) > _count(off, off.organs == 9, -1100, -900) + 30,
    "Lymphadenopathy": lambda on, off: 20 < on.volume.array[on.lesions == 7].mean() < 100 and (on.organs[on.lesions == 7] == 12).all(),
    "Emphysema": lambda on, off: _count(on, _lung(on), -1100, -950) > _count(off, _lung(off), -1100, -950) + 50,
    "Atelectasis": lambda on, off: _count(on, _lung(on), -100, 100) > _count(off, _lung(off), -100, 100) + 50,
    "Lung nodule": lambda on, off: _count(on, _lung(on), -300, 200) > _count(off, _lung(off), -300, 200) + 10,
    "Lung opacity": lambda on, off: _count(on, _lung(on), -550, -300) > _count(off, _lung(off), -550, -300) + 100,
    "Pulmonary fibrotic sequela": lambda on, off: _count(on, _lung(on), -300, 200) > _count(off, _lung(off), -300, 200) + 20,
    "Pleural effusion": lambda on, off: -5 < on.volume.array[on.lesions == 13].mean() < 30
    and np.nonzero(on.lesions == 13)[1].mean() > np.nonzero(_lung(on))[1].mean(),  # dependent = posterior
    "Mosaic attenuation pattern": lambda on, off: on.volume.array[on.lesions == 14].std()
    > off.volume.array[on.lesions == 14].std() + 30,  # patchwork of lower/higher density
    "Peribronchial thickening": lambda on, off: _count(on, _lung(on), -300, 200) > _count(off, _lung(off), -300, 200) + 50,
    "Consolidation": lambda on, off: (on.volume.array[on.lesions == 16] > -100).mean() > 0.6
    and (on.volume.array[on.lesions == 16] < -700).sum() > 0,  # air bronchograms
    "Bronchiectasis": lambda on, off: _count(on, _lung(on), -1100, -950) > _count(off, _lung(off), -1100, -950) + 30,
    "Interlobular septal thickening": lambda on, off: _count(on, _lung(on), -300, 200) > _count(off, _lung(off), -300, 200) + 20,
}


@pytest.mark.parametrize("name", ABNORMALITY_NAMES)
def test_each_abnormality_is_located_and_visible(name, normal):
    on = make_phantom(seed=SEED, size=SIZE, abnormalities=only(name))
    idx = ABNORMALITY_NAMES.index(name) + 1
    assert on.labels == {n: int(n == name) for n in ABNORMALITY_NAMES}
    lesion = on.lesions == idx
    assert lesion.sum() >= 15, f"{name}: only {lesion.sum()} lesion voxels"
    assert set(np.unique(on.lesions).tolist()) <= {0, idx}
    # the finding lies in its anatomy group (assessed on the phantom's own organ map)
    anatomy = ANATOMY_BY_NAME[ABNORMALITIES[idx - 1].anatomy]
    region = anatomy_masks(on.organs, spacing=on.volume.spacing, anatomies=(anatomy,))[0]
    assert region[lesion].mean() > 0.9, f"{name}: {region[lesion].mean():.2f} of the lesion in {anatomy.name}"
    # forcing it on changes the image where the lesion is; elsewhere the phantom is the same
    changed = on.volume.array != normal.volume.array
    assert changed[lesion].mean() > 0.5
    if name not in ("Cardiomegaly", "Pericardial effusion", "Lymphadenopathy", "Hiatal hernia"):
        assert changed[~lesion].mean() < 0.01, f"{name} changed {changed[~lesion].sum()} voxels outside its lesion"
    assert SIGNATURES[name](on, normal), f"{name}: signature not found"


def _sentences(text: str) -> list[str]:
    return [s.lower() for s in re.split(r"(?<=\.)\s+", text) if s]


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_report_mentions_present_and_negates_absent(seed):
    ph = make_phantom(seed=seed, size=(48, 64, 64))
    sents = _sentences(ph.findings)
    for name in ABNORMALITY_NAMES:
        about = [s for s in sents if any(k in s for k in REPORT_KEYWORDS[name])]
        negated = [any(c in s for c in NEGATION_CUES) for s in about]
        assert about, f"{name} not mentioned in: {ph.findings}"
        if ph.labels[name]:
            assert not all(negated), f"present {name} only negated: {about}"
        else:
            assert all(negated), f"absent {name} not negated: {about}"
    assert ph.impression


def test_report_locates_lung_findings():
    ph = make_phantom(seed=4, size=(48, 64, 64), abnormalities={**NONE, "Lung nodule": True, "Pleural effusion": True})
    nodule = [s for s in _sentences(ph.findings) if "nodule" in s and not any(c in s for c in NEGATION_CUES)]
    assert nodule and re.search(r"(left|right) (upper|middle|lower) lobe", nodule[0])
    side, lobe = ph.details["Lung nodule"]["locations"][0]
    assert f"{side} {lobe}" in nodule[0]
    assert "pleural" in ph.impression.lower()


def test_prevalence_and_cooccurrence():
    rng = np.random.default_rng(0)
    draws = [sample_abnormalities(rng, age=float(rng.uniform(25, 85))) for _ in range(3000)]
    for name in ABNORMALITY_NAMES:
        freq = np.mean([d[name] for d in draws])
        assert abs(freq - PREVALENCE[name]) < 0.05, (name, freq)

    def cond(effect, cause, value):
        sel = [d[effect] for d in draws if d[cause] == value]
        return np.mean(sel)

    assert cond("Coronary artery wall calcification", "Arterial wall calcification", True) > 3 * cond(
        "Coronary artery wall calcification", "Arterial wall calcification", False)
    assert cond("Atelectasis", "Pleural effusion", True) > 2 * cond("Atelectasis", "Pleural effusion", False)
    assert cond("Lung opacity", "Consolidation", True) > 2 * cond("Lung opacity", "Consolidation", False)
    old = np.mean([sample_abnormalities(rng, age=80)["Emphysema"] for _ in range(1000)])
    young = np.mean([sample_abnormalities(rng, age=30)["Emphysema"] for _ in range(1000)])
    assert old > 2 * young
    forced = sample_abnormalities(rng, age=50, forced={"Cardiomegaly": True, "Emphysema": False})
    assert forced["Cardiomegaly"] and not forced["Emphysema"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown"):
        make_phantom(seed=0, size=(32, 32, 32), abnormalities={"Broken heart": True})
    with pytest.raises(ValueError, match="size"):
        make_phantom(seed=0, size=(8, 32, 32))
    with pytest.raises(ValueError, match="field of view"):
        make_phantom(seed=0, size=(32, 32, 32), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="split"):
        write_phantom_dataset("unused", n=1, seed=0, split="test")


def test_write_phantom_dataset_layout(tmp_path):
    import nibabel as nib

    calls = []
    info = write_phantom_dataset(tmp_path / "ds", n=2, seed=7, size=(32, 48, 48), split="valid",
                                 progress=lambda d, t, m: calls.append((d, t)))
    assert calls[-1] == (2, 2)
    root = tmp_path / "ds"
    assert info.volume_names == ("valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz")
    for p, name in enumerate(info.volume_names, start=1):
        vol = root / "valid" / f"valid_{p}" / f"valid_{p}_a" / name
        assert vol.is_file() and (root / "masks" / name).is_file() and (root / "lesions" / name).is_file()
    ph = make_phantom(seed=7 * 100003 + 1, size=(32, 48, 48))
    img = nib.load(info.volumes[0])
    assert np.asarray(img.dataobj).dtype == np.int16
    assert np.array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), ph.volume.array)
    assert np.allclose(img.affine, ph.volume.affine)
    mask = nib.load(info.masks[0])
    assert np.array_equal(np.asarray(mask.dataobj).transpose(2, 1, 0), ph.organs)
    assert np.allclose(mask.affine, img.affine)

    def read(path):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    reports = read(root / "radiology_text_reports" / "valid_reports.csv")
    assert list(reports[0]) == ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
    assert reports[0]["Findings_EN"] == ph.findings
    meta = read(root / "metadata" / "valid_metadata.csv")
    assert list(meta[0]) == ["VolumeName", "Manufacturer", "SeriesDescription", "PatientSex", "PatientAge", "XYSpacing",
                             "ZSpacing", "RescaleSlope", "RescaleIntercept", "Rows", "Columns", "NumberofSlices"]
    sx, sy = (float(v) for v in meta[0]["XYSpacing"].strip("[]").split(","))
    assert np.allclose([float(meta[0]["ZSpacing"]), sy, sx], ph.volume.spacing, rtol=1e-5)
    assert (meta[0]["RescaleSlope"], meta[0]["RescaleIntercept"]) == ("1", "0")
    assert (int(meta[0]["Rows"]), int(meta[0]["Columns"]), int(meta[0]["NumberofSlices"])) == (48, 48, 32)
    labels = read(root / "multi_abnormality_labels" / "valid_predicted_labels.csv")
    assert list(labels[0]) == ["VolumeName", *ABNORMALITY_NAMES]
    assert {n: int(labels[0][n]) for n in ABNORMALITY_NAMES} == ph.labels
    assert info.labels_csv == root / "multi_abnormality_labels" / "valid_predicted_labels.csv"
