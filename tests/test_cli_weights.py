"""``napari-ctvlp weights status|import|download``: what a user without network can do."""

from __future__ import annotations

import stat
import time
import zipfile
from pathlib import Path

import pytest

from napari_ctvlp.cli import main
from napari_ctvlp.engine.segmentation.weights import model_folder, weights_status
from tests._network import refuse_network
from tests.engine._fake_totalseg import write_fake_total_fast


@pytest.fixture(scope="module")
def fake_models(tmp_path_factory) -> Path:
    """A copied-from-another-machine results folder with tiny complete 297 and 298 models."""
    return write_fake_total_fast(tmp_path_factory.mktemp("other_machine") / "results")


@pytest.fixture
def weights(tmp_path, monkeypatch) -> Path:
    """An empty weights folder chosen by TOTALSEG_WEIGHTS_PATH (not created yet)."""
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "weights"))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    return tmp_path / "weights"


@pytest.fixture
def no_network(monkeypatch) -> list[object]:
    attempts = refuse_network(monkeypatch)
    return attempts


def _zip_folder(folder: Path, archive: Path, *, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + str(path.relative_to(folder.parent)))
    return archive


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_status_without_weights_says_where_and_what(weights, capsys) -> None:
    assert main(["weights", "status"]) == 1
    out = capsys.readouterr().out
    assert f"TotalSegmentator weights folder: {weights} (chosen by TOTALSEG_WEIGHTS_PATH" in out
    assert "TOTALSEG_HOME_DIR=" in out
    for tid in (297, 298, 291, 292, 293, 294, 295):
        assert f"  {tid}  missing" in out
    assert "fast (3 mm, the default): not ready (needs 297 + 298)" in out
    assert "napari-ctvlp weights import PATH" in out
    assert not weights.exists()


def test_import_a_release_zip_then_status_is_ready(weights, fake_models, tmp_path, capsys) -> None:
    for tid in (297, 298):
        archive = _zip_folder(model_folder(fake_models, tid).parent, tmp_path / f"{tid}.zip")
        assert main(["weights", "import", str(archive)]) == 0
        assert f"imported model {tid}: {weights}" in capsys.readouterr().out
    assert main(["weights", "status"]) == 0
    out = capsys.readouterr().out
    assert "  297  ready" in out and "  298  ready" in out and "fast (3 mm, the default): ready" in out
    assert main(["weights", "status", "--full"]) == 1
    assert sorted(p.name for p in weights.iterdir()) == [
        "Dataset297_TotalSegmentator_total_3mm_1559subj", "Dataset298_TotalSegmentator_total_6mm_1559subj"]


def test_import_a_copied_results_folder_and_overwrite(weights, fake_models, capsys) -> None:
    assert main(["weights", "import", str(fake_models)]) == 0
    assert weights_status(fast=True).ready
    capsys.readouterr()
    assert main(["weights", "import", str(fake_models)]) == 2
    line = _one_error_line(capsys)
    assert "already exists; use --overwrite" in line
    marker = model_folder(weights, 297) / "old_file"
    marker.write_text("x")
    assert main(["weights", "import", str(fake_models), "--overwrite"]) == 0
    assert "(replaced)" in capsys.readouterr().out
    assert not marker.exists() and weights_status(fast=True).ready
    assert [p.name for p in weights.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_import_refuses_path_traversal(weights, fake_models, tmp_path, capsys) -> None:
    archive = _zip_folder(model_folder(fake_models, 297).parent, tmp_path / "evil.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("../../escaped.txt", "gotcha")
    assert main(["weights", "import", str(archive)]) == 2
    line = _one_error_line(capsys)
    assert "path traversal" in line and "../../escaped.txt" in line
    assert not (tmp_path / "escaped.txt").exists() and not (weights.parent / "escaped.txt").exists()
    assert list(weights.iterdir()) == []  # nothing imported, no staging left
    absolute = tmp_path / "abs.zip"
    with zipfile.ZipFile(absolute, "w") as zf:
        zf.writestr("/tmp/abs_escape.txt", "gotcha")
    assert main(["weights", "import", str(absolute)]) == 2
    assert "path traversal" in _one_error_line(capsys)


def test_import_refuses_links_and_junk(weights, fake_models, tmp_path, capsys) -> None:
    archive = _zip_folder(model_folder(fake_models, 297).parent, tmp_path / "link.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("Dataset297_TotalSegmentator_total_3mm_1559subj/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    assert main(["weights", "import", str(archive)]) == 2
    assert "symbolic link" in _one_error_line(capsys)
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip at all")
    assert main(["weights", "import", str(junk)]) == 2
    assert "is not a zip file" in _one_error_line(capsys)
    incomplete = _zip_folder(model_folder(fake_models, 298).parent, tmp_path / "inc.zip")
    with zipfile.ZipFile(incomplete) as zf, zipfile.ZipFile(tmp_path / "inc2.zip", "w") as out:
        for item in zf.infolist():
            if not item.filename.endswith("plans.json"):
                out.writestr(item, zf.read(item))
    assert main(["weights", "import", str(tmp_path / "inc2.zip")]) == 2
    assert "is incomplete" in (line := _one_error_line(capsys)) and "plans.json is missing" in line
    assert main(["weights", "import", str(tmp_path / "missing.zip")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    assert list(weights.iterdir()) == []


def test_download_fails_fast_offline(weights, no_network, capsys) -> None:
    t0 = time.perf_counter()
    assert main(["weights", "download"]) == 2
    assert time.perf_counter() - t0 < 5.0
    line = _one_error_line(capsys)
    assert "cannot reach github.com:443" in line and "offline" in line
    assert "napari-ctvlp weights import PATH" in line
    assert no_network  # it did try, and was refused
    assert not weights.exists()  # nothing created


def test_download_with_everything_present_needs_no_network(weights, fake_models, no_network, capsys) -> None:
    assert main(["weights", "import", str(fake_models)]) == 0
    capsys.readouterr()
    assert main(["weights", "download"]) == 0
    assert "TotalSegmentator weights ready in" in capsys.readouterr().out
    assert no_network == []


def test_download_refuses_an_incomplete_folder_in_the_way(weights, no_network, capsys) -> None:
    (weights / "Dataset297_TotalSegmentator_total_3mm_1559subj").mkdir(parents=True)
    assert main(["weights", "download"]) == 2
    assert "exists but is incomplete" in _one_error_line(capsys)
    assert no_network == []  # refused before any connection


@pytest.mark.slow
@pytest.mark.realdata
def test_imported_weights_run_segment_end_to_end(weights, fake_models, realdata, no_network, tmp_path, capsys) -> None:
    """Import from a zip, then `napari-ctvlp segment --backend totalsegmentator` runs on the real CT."""
    import numpy as np

    from napari_ctvlp.io import read_ct

    archive = tmp_path / "all.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(fake_models.rglob("*")):
            if path.is_file():
                zf.write(path, "results/" + str(path.relative_to(fake_models)))
    assert main(["weights", "import", str(archive)]) == 0
    out = tmp_path / "organs.nii.gz"
    code = main(["segment", str(realdata / "example_ct.nii.gz"), "--out", str(out), "--backend", "totalsegmentator"])
    assert code == 0, capsys.readouterr().err
    import nibabel as nib

    ct = read_ct(realdata / "example_ct.nii.gz")
    img = nib.load(str(out))
    assert img.shape == ct.shape[::-1] and np.allclose(img.affine, ct.affine)
    # on the CT grid, only our organ labels (the fake models' classes mapped, and body)
    assert set(np.unique(np.asarray(img.dataobj)).tolist()) <= {0, 3, 5, 10, 11, 13, 15}
    assert no_network == []
