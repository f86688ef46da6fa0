"""detect() end to end with a tiny random-init checkpoint: outputs on the input grid, NaN handling,
re-prompting without the image encoder, cancel, pickle refusal, the batch CLI, real data."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nib = pytest.importorskip("nibabel")

from napari_ctvlp.engine.anatomy import ABNORMALITY_NAMES, ORGAN_BY_NAME  # noqa: E402
from napari_ctvlp.engine.pipeline import (  # noqa: E402
    DetectionCancelled,
    DetectionResult,
    detect,
    load_model,
)
from napari_ctvlp.engine.results_io import write_results  # noqa: E402
from napari_ctvlp.cli_detect import run_detect_cli  # noqa: E402
from napari_ctvlp.engine.volume import CTVolume  # noqa: E402


def _phantom() -> tuple[CTVolume, np.ndarray]:
    """A 64^3 synthetic chest-CT phantom and its organ labels."""
    from napari_ctvlp.phantom import make_phantom

    ph = make_phantom(seed=0, size=(64, 64, 64))
    return ph.volume, np.asarray(ph.organs, dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_dir: Path) -> Path:
    """The session's tiny random-init checkpoint (tests/conftest.py; 400 mm field of view)."""
    return tiny_checkpoint_dir


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """The phantom written to NIfTI (CT + organ mask), as a user would have it on disk."""
    vol, organs = _phantom()
    d = tmp_path_factory.mktemp("case")
    ct_path, mask_path = d / "chest_ct.nii.gz", d / "chest_mask.nii.gz"
    nib.Nifti1Image(np.asarray(vol.array).transpose(2, 1, 0), vol.affine).to_filename(ct_path)
    nib.Nifti1Image(organs.transpose(2, 1, 0), vol.affine).to_filename(mask_path)
    return {"volume": vol, "organs": organs, "ct": ct_path, "mask": mask_path}


@pytest.fixture(scope="module")
def result(case, checkpoint) -> DetectionResult:
    return detect(case["ct"], checkpoint=checkpoint, segmentation=str(case["mask"]),
                  prompts=["pleural effusion", "There is a nodule in the {organ}."], device="cpu")


def test_detect_outputs_on_the_input_grid(result, case, tmp_path) -> None:
    shape = case["volume"].shape
    assert result.volume.shape == shape
    assert result.segmentation.labels.shape == shape
    np.testing.assert_array_equal(result.segmentation.labels, case["organs"])
    assert set(result.heatmaps) == {"pleural effusion", "There is a nodule in the {organ}."}
    for heat in result.heatmaps.values():
        assert heat.shape == shape and heat.dtype == np.float32 and 0.0 <= heat.min() <= heat.max() <= 1.0
    assert result.probabilities.probability.shape == (18, len(result.probabilities.anatomies))
    assert set(result.prompts) == set(result.heatmaps)
    for key in ("read", "model", "segmentation", "preprocess", "image_features", "scoring", "prompts", "total"):
        assert key in result.timings

    paths = write_results(result, tmp_path / "out")
    names = {p.name for p in paths}
    assert {"results.json", "results.csv", "organs.nii.gz", "organs.json", "organ_stats.csv",
            "heatmap_pleural_effusion.nii.gz", "heatmap_there_is_a_nodule_in_the_organ.nii.gz"} <= names
    ct_affine = nib.load(case["ct"]).affine
    for name in ("organs.nii.gz", "heatmap_pleural_effusion.nii.gz"):
        img = nib.load(tmp_path / "out" / name)
        assert img.shape == shape[::-1]
        np.testing.assert_allclose(img.affine, ct_affine, atol=1e-4)
    organs_back = np.asarray(nib.load(tmp_path / "out" / "organs.nii.gz").dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(organs_back, case["organs"])

    with open(tmp_path / "out" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["anatomy", "abnormality", "probability", "std", "assessable", "primary",
                             "threshold", "call"]
    assert all(r["call"] == "" for r in rows)  # the test checkpoint has no operating points
    primary = [r for r in rows if r["primary"] == "true"]
    assert len(primary) == 18 and sorted(r["abnormality"] for r in primary) == sorted(ABNORMALITY_NAMES)
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["input"]["path"].endswith("chest_ct.nii.gz") and doc["checkpoint"]["path"]
    assert doc["checkpoint"]["model_card"] and "total" in doc["timings"]
    assert set(doc["abnormalities"]) == set(ABNORMALITY_NAMES)
    with pytest.raises(FileExistsError):
        write_results(result, tmp_path / "out")
    assert write_results(result, tmp_path / "out", overwrite=True)


def test_stored_operating_points_give_positive_negative_calls(case, checkpoint, tmp_path) -> None:
    import shutil

    from training.evaluate import store_operating_points

    ckpt = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    thresholds = {n: 0.5 for n in ABNORMALITY_NAMES}
    thresholds["Cardiomegaly"] = 0.0  # always positive
    thresholds["Emphysema"] = 1.01  # never positive
    store_operating_points(ckpt, thresholds, chosen_on={"split": "calib"})
    res = detect(case["volume"], checkpoint=str(ckpt), segmentation=case["organs"], device="cpu", heatmaps=False)
    assert res.checkpoint.operating_points["Cardiomegaly"] == 0.0
    write_results(res, tmp_path / "out")
    with open(tmp_path / "out" / "results.csv") as fh:
        rows = {r["abnormality"]: r for r in csv.DictReader(fh) if r["primary"] == "true"}
    assert rows["Cardiomegaly"]["call"] == "positive" and rows["Emphysema"]["call"] == "negative"
    for name, r in rows.items():
        assert r["call"] == ("positive" if float(r["probability"]) >= float(r["threshold"]) else "negative"), name
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["abnormalities"]["Cardiomegaly"]["call"] == "positive"
    assert doc["abnormalities"]["Emphysema"]["threshold"] == 1.01


def test_missing_anatomy_is_nan_and_null(case, checkpoint, tmp_path) -> None:
    organs = case["organs"].copy()
    organs[organs == ORGAN_BY_NAME["esophagus"].value] = ORGAN_BY_NAME["body"].value
    res = detect(case["volume"], checkpoint=checkpoint, segmentation=organs, device="cpu", heatmaps=False)
    scores = res.probabilities
    assert np.isnan(scores.primary_probability("Hiatal hernia"))
    assert np.isfinite(scores.primary_probability("Cardiomegaly"))
    write_results(res, tmp_path)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["abnormalities"]["Hiatal hernia"]["probability"] is None
    assert doc["abnormalities"]["Hiatal hernia"]["assessable"] is False
    with open(tmp_path / "results.csv") as fh:
        row = next(r for r in csv.DictReader(fh) if r["abnormality"] == "Hiatal hernia" and r["primary"] == "true")
    assert row["probability"] == "" and row["assessable"] == "false" and row["anatomy"] == "esophagus"


def test_reprompt_runs_only_the_text_encoder(result) -> None:
    calls = {"image": 0, "text": 0}
    model = result.session.model
    h1 = model.vit.register_forward_hook(lambda *a: calls.__setitem__("image", calls["image"] + 1))
    h2 = model.text.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    try:
        score = result.rescore("Bronchial wall thickening.")
        again = result.rescore("Bronchial wall thickening.")
    finally:
        h1.remove()
        h2.remove()
    assert calls["image"] == 0
    assert calls["text"] >= 1  # new text went through the text encoder once (then cached)
    np.testing.assert_array_equal(score.probability, again.probability)
    assert score.negative == "No bronchial wall thickening."
    assert result.session.prompt_heatmap("Bronchial wall thickening.").shape == result.volume.shape


def test_loaded_checkpoints_are_cached(checkpoint) -> None:
    assert load_model(checkpoint, device="cpu") is load_model(checkpoint, device="cpu")


def test_cancel_between_stages(case, checkpoint) -> None:
    event = threading.Event()
    event.set()
    with pytest.raises(DetectionCancelled):
        detect(case["volume"], checkpoint=checkpoint, segmentation=case["organs"], cancel=event)
    late = threading.Event()
    seen: list[str] = []

    def progress(done: int, total: int, message: str) -> None:
        seen.append(message)
        if message == "preprocess":
            late.set()

    # set when preprocessing starts: it stops inside preprocessing, before the resampling
    with pytest.raises(DetectionCancelled, match="antialias|resample"):
        detect(case["volume"], checkpoint=checkpoint, segmentation=case["organs"], cancel=late, progress=progress)
    assert seen == ["read", "model", "segmentation", "preprocess"]
    # a cancel during the image stage stops inside it, before the image encoder runs
    inside = threading.Event()

    def progress_inside(done: int, total: int, message: str) -> None:
        if message == "image features":
            inside.set()

    with pytest.raises(DetectionCancelled, match="image encoder|anatomy masks"):
        detect(case["volume"], checkpoint=checkpoint, segmentation=case["organs"], cancel=inside,
               progress=progress_inside)


def test_pickle_checkpoint_is_refused(case, tmp_path) -> None:
    bad = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="pickle"):
        detect(case["volume"], checkpoint=bad, segmentation=case["organs"], device="cpu")


def test_bad_arguments(case, checkpoint) -> None:
    with pytest.raises(ValueError, match="neither a backend"):
        detect(case["volume"], checkpoint=checkpoint, segmentation="no_such_backend_or_file")
    with pytest.raises(ValueError, match="does not match"):
        detect(case["volume"], checkpoint=checkpoint, segmentation=np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="device"):
        detect(case["volume"], checkpoint=checkpoint, segmentation=case["organs"], device="tpu")
    with pytest.raises(ValueError, match="does not exist"):
        detect(case["volume"], checkpoint=Path("/nonexistent/ckpt"), segmentation=case["organs"])


def test_no_checkpoint_message(case, monkeypatch) -> None:
    import napari_ctvlp.engine.checkpoint as ck

    monkeypatch.setattr(ck, "default_checkpoint_path", lambda: None)
    with pytest.raises(ValueError, match="no checkpoint given"):
        detect(case["volume"], segmentation=case["organs"])


def test_run_detect_cli_bad_input_is_one_line(case, checkpoint, tmp_path, capsys) -> None:
    missing = tmp_path / "missing_scan.nii.gz"
    code = run_detect_cli([str(missing), str(case["ct"])], out=str(tmp_path / "runs"), prompts=["pleural effusion"],
                          checkpoint=str(checkpoint), segmentation=str(case["mask"]), device="cpu")
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("napari-ctvlp detect:")]
    assert len(lines) == 1 and "missing_scan" in lines[0]
    good = tmp_path / "runs" / "chest_ct"
    assert (good / "results.csv").is_file() and (good / "heatmap_pleural_effusion.nii.gz").is_file()
    assert not (tmp_path / "runs" / "missing_scan").exists()
    assert run_detect_cli([str(case["ct"])], out=str(tmp_path / "x"), checkpoint=str(tmp_path / "nope.pt"),
                          segmentation=str(case["mask"]), device="cpu") == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.realdata
def test_detect_on_real_ct_with_totalsegmentator_labels(realdata: Path, tmp_path, tiny_checkpoint_dir: Path) -> None:
    from napari_ctvlp.engine.segmentation import from_label_file
    from napari_ctvlp.io import read_ct

    checkpoint = tiny_checkpoint_dir  # 400 mm field of view: the whole 336 mm abdomen-pelvis scan

    ct = realdata / "example_ct.nii.gz"
    seg_path = realdata / "example_seg_fast_force_split.nii.gz"
    volume = read_ct(ct)
    seg = from_label_file(seg_path, like=volume, kind="totalseg")
    res = detect(volume, checkpoint=checkpoint, segmentation=seg, prompts=["pleural effusion"], device="cpu")
    assert res.heatmaps["pleural effusion"].shape == volume.shape
    lung = res.probabilities.anatomies.index("lung")
    assert res.probabilities.assessable[0, lung]  # the scan has lung bases
    paths = write_results(res, tmp_path / "out")
    ref = nib.load(ct)
    for p in paths:
        if p.name.endswith(".nii.gz"):
            img = nib.load(p)
            assert img.shape == ref.shape
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
    # a TotalSegmentator file given by path is recognised as such
    auto = detect(volume, checkpoint=checkpoint, segmentation=str(seg_path), device="cpu", heatmaps=False)
    np.testing.assert_array_equal(auto.segmentation.labels, seg.labels)


@pytest.mark.gpu
def test_detect_on_cuda_matches_cpu(case, checkpoint) -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    kw = dict(checkpoint=checkpoint, segmentation=case["organs"], prompts=["pleural effusion"])
    gpu = detect(case["volume"], device="cuda", **kw)
    cpu = detect(case["volume"], device="cpu", **kw)
    assert gpu.device == "cuda"
    np.testing.assert_allclose(gpu.probabilities.probability, cpu.probabilities.probability, atol=2e-3)
    np.testing.assert_allclose(gpu.heatmaps["pleural effusion"], cpu.heatmaps["pleural effusion"], atol=2e-2)
    assert np.isfinite(gpu.rescore("Cardiomegaly.").probability).all()
