"""TotalSegmentator weights: status per model, import validation, readiness, nnU-Net's results path."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest

from napari_ctvlp.engine.segmentation import backend_readiness
from napari_ctvlp.engine.segmentation.weights import (
    WeightsError,
    import_weights,
    is_torch_zip,
    model_folder,
    model_folder_problems,
    weights_dir,
    weights_status,
)
from tests.engine._fake_totalseg import write_fake_task, write_fake_total_fast


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    """A weights folder with tiny, complete 297 and 298 models."""
    return write_fake_total_fast(tmp_path_factory.mktemp("fake_ts") / "results")


@pytest.fixture
def empty_env(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    return tmp_path / "home" / "nnunet" / "results"


def test_weights_dir_follows_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "h"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    assert weights_dir() == (tmp_path / "h" / "nnunet" / "results", "TOTALSEG_HOME_DIR")
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "w"))
    assert weights_dir() == (tmp_path / "w", "TOTALSEG_WEIGHTS_PATH")
    from totalsegmentator.config import get_weights_dir

    assert Path(get_weights_dir()) == weights_dir()[0]  # the same folder TotalSegmentator uses


def test_status_names_each_needed_model(empty_env) -> None:
    status = weights_status(fast=True)
    assert status.weights_dir == empty_env and status.source == "TOTALSEG_HOME_DIR"
    assert [m.task_id for m in status.models] == [297, 298]
    assert not status.ready and len(status.missing) == 2
    assert status.models[0].folder == (empty_env / "Dataset297_TotalSegmentator_total_3mm_1559subj"
                                       / "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres")
    assert "is missing" in status.models[0].problems[0]
    assert [m.task_id for m in weights_status(fast=False).models] == [291, 292, 293, 294, 295, 298]
    assert [m.task_id for m in weights_status(fast=True, roi_subset=False).models] == [297]
    assert not empty_env.exists()  # a status check creates nothing


def test_status_is_ready_with_complete_models(fake_root, monkeypatch) -> None:
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(fake_root))
    assert weights_status(fast=True).ready
    assert not weights_status(fast=False).ready
    ready = backend_readiness(fast=True)
    assert list(ready)[:3] == ["totalsegmentator", "builtin", "threshold"]
    assert ready["totalsegmentator"].ready and ready["totalsegmentator"].missing == ()
    full = backend_readiness(fast=False)["totalsegmentator"]
    assert not full.ready and len(full.missing) == 5 and full.missing[0].startswith("model 291")
    assert "napari-ctvlp weights import" in full.reason


def test_readiness_lists_the_missing_models(empty_env) -> None:
    ts = backend_readiness(fast=True)["totalsegmentator"]
    assert not ts.ready
    assert [line.split()[1] for line in ts.missing] == ["297", "298"]
    assert "napari-ctvlp weights download" in ts.reason and "totalseg_download_weights -t total_fast" in ts.reason
    assert backend_readiness()["threshold"].ready


def _copy_model(src_root: Path, dst_root: Path, task_id: int) -> Path:
    import shutil

    src = model_folder(src_root, task_id).parent
    shutil.copytree(src, dst_root / src.name)
    return model_folder(dst_root, task_id)


class _Sentinel:
    """Unpickling this creates a folder: proof that a file was (not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (str(self.path),))


def test_checkpoint_is_checked_without_unpickling(fake_root, tmp_path) -> None:
    folder = _copy_model(fake_root, tmp_path / "w", 297)
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    assert is_torch_zip(ckpt) and model_folder_problems(folder) == ()
    sentinel = tmp_path / "unpickled"
    with zipfile.ZipFile(ckpt, "w") as zf:  # a torch-layout archive whose pickle would run code
        zf.writestr("archive/data.pkl", pickle.dumps(_Sentinel(sentinel)))
        zf.writestr("archive/version", "3\n")
    assert model_folder_problems(folder) == ()
    result = import_weights(folder.parent, dest=tmp_path / "dest")
    assert result.task_ids == (297,)
    assert not sentinel.exists()  # status and import never unpickled it
    ckpt.write_bytes(pickle.dumps({"network_weights": {}}))  # a bare pickle is not a torch archive
    problems = model_folder_problems(folder)
    assert len(problems) == 1 and "not a torch checkpoint archive" in problems[0]
    ckpt.write_bytes(b"")
    assert "not a torch checkpoint archive" in model_folder_problems(folder)[0]
    (folder / "plans.json").write_text("{not json")
    (folder / "dataset.json").write_text('{"labels": 3}')
    problems = model_folder_problems(folder)
    assert any("plans.json is not valid JSON" in p for p in problems)
    assert any("dataset.json: no 'labels' table" in p for p in problems)


def test_import_refuses_incomplete_and_unknown_folders(fake_root, tmp_path) -> None:
    dest = tmp_path / "dest"
    folder = _copy_model(fake_root, tmp_path / "src", 298)
    (folder / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(WeightsError, match="Dataset298_TotalSegmentator_total_6mm_1559subj is incomplete: .*checkpoint_final.pth is missing"):
        import_weights(tmp_path / "src", dest=dest)
    unknown = tmp_path / "other" / "Dataset999_mine"
    unknown.mkdir(parents=True)
    with pytest.raises(WeightsError, match="Dataset999_mine is not a TotalSegmentator model folder"):
        import_weights(unknown, dest=dest)
    with pytest.raises(WeightsError, match="holds no Dataset"):
        import_weights(_empty(tmp_path / "empty"), dest=dest)
    with pytest.raises(WeightsError, match="does not exist"):
        import_weights(tmp_path / "nope.zip", dest=dest)
    assert sorted(p.name for p in dest.iterdir()) == []  # nothing left behind, no staging folder


def _empty(path: Path) -> Path:
    path.mkdir()
    return path


def test_point_nnunet_at_replaces_the_results_folder_read_at_import(fake_root, monkeypatch) -> None:
    import nnunetv2.paths
    import nnunetv2.utilities.dataset_name_id_conversion as conv
    import nnunetv2.utilities.file_path_utilities as fpu

    from napari_ctvlp.engine.segmentation.totalseg import _point_nnunet_at

    for module in (nnunetv2.paths, conv, fpu):  # as if imported earlier with another folder
        monkeypatch.setattr(module, "nnUNet_results", "/nonexistent/results", raising=False)
    monkeypatch.setattr(conv, "nnUNet_raw", None)
    monkeypatch.setattr(conv, "nnUNet_preprocessed", None)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, "/nonexistent/results")
    with pytest.raises(RuntimeError, match="Could not find a dataset with the ID 297"):
        fpu.get_output_folder(297, "nnUNetTrainer_4000epochs_NoMirroring", "nnUNetPlans", "3d_fullres")
    _point_nnunet_at(fake_root)
    got = fpu.get_output_folder(297, "nnUNetTrainer_4000epochs_NoMirroring", "nnUNetPlans", "3d_fullres")
    assert Path(got) == model_folder(fake_root, 297)


def test_fake_models_are_what_the_success_test_expects(tmp_path) -> None:
    folder = write_fake_task(tmp_path, 297, spacing=3.0, patch=64, with_edges=True, bands=True)
    assert folder == model_folder(tmp_path, 297) and model_folder_problems(folder) == ()
