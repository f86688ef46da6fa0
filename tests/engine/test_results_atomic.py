"""write_results writes a result set whole or not at all, and one run at a time (issue 14, items 5 and 9)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from napari_ctvlp.engine import results_io
from napari_ctvlp.engine.pipeline import DetectionResult, detect
from napari_ctvlp.engine.results_io import write_results

FULL_SET = {"results.json", "results.csv", "organs.nii.gz", "organs.json", "organ_stats.csv",
            "heatmap_pleural_effusion.nii.gz"}


@pytest.fixture(scope="module")
def result(tiny_checkpoint_dir: Path) -> DetectionResult:
    from napari_ctvlp.phantom import make_phantom

    ph = make_phantom(seed=1, size=(40, 48, 48))
    return detect(ph.volume, checkpoint=tiny_checkpoint_dir, segmentation=np.asarray(ph.organs, np.uint8),
                  prompts=["pleural effusion"], device="cpu")


def _disk_full(monkeypatch: pytest.MonkeyPatch, error: BaseException | None = None) -> None:
    """The heatmap (the last file of the set) hits a full disk (or ``error``)."""
    import napari_ctvlp.io as io

    def full(*args: object, **kwargs: object) -> None:
        raise error if error is not None else OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "write_volume", full)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@contextmanager
def _held_by_another_process(out: Path) -> Iterator[None]:
    """Hold the folder's lock as another run would (a separate open file description)."""
    lock = out.parent / f".{out.name}.lock"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        lock.unlink(missing_ok=True)


def test_full_disk_leaves_nothing_and_the_rerun_succeeds(result: DetectionResult, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "runs" / "scan"
    with monkeypatch.context() as m:
        _disk_full(m)
        with pytest.raises(OSError) as info:
            write_results(result, out)
    assert info.value.errno == errno.ENOSPC
    assert not out.exists()  # used to hold results.json and results.csv
    assert _leftovers(out.parent) == []  # no partial folder, no lock file
    written = write_results(result, out)  # used to refuse: "results.json already exists"
    assert {p.name for p in written} == FULL_SET == {p.name for p in out.iterdir()}
    assert _leftovers(out.parent) == []


def test_an_interrupt_while_writing_leaves_nothing(result: DetectionResult, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "scan"
    with monkeypatch.context() as m:
        _disk_full(m, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            write_results(result, out)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_previous_set(result: DetectionResult, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "scan"
    write_results(result, out)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with monkeypatch.context() as m:
        _disk_full(m)
        with pytest.raises(OSError):
            write_results(result, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []
    write_results(result, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # files that are not results are never touched
    assert json.loads((out / "results.json").read_text())["abnormalities"]


def test_existing_results_are_refused_before_anything_is_written(result: DetectionResult, tmp_path: Path) -> None:
    out = tmp_path / "scan"
    write_results(result, out)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="already exists"):
        write_results(result, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    assert _leftovers(tmp_path) == []


def test_a_folder_being_written_by_another_run_is_refused(result: DetectionResult, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "scan"
    with _held_by_another_process(out):
        with pytest.raises(FileExistsError, match="being written by another napari-ctvlp run"):
            write_results(result, out, overwrite=True)
        assert not out.exists()
    write_results(result, out)
    assert {p.name for p in out.iterdir()} == FULL_SET


def test_a_set_published_meanwhile_is_not_mixed_with_ours(result: DetectionResult, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Another run (no lock, e.g. another machine on a network share) finishes while we write."""
    out = tmp_path / "scan"
    real = results_io._write_set

    def racing(res: DetectionResult, folder: Path, heat_names: dict[str, str]) -> None:
        real(res, folder, heat_names)
        out.mkdir()
        (out / "results.json").write_text('{"other": true}')

    monkeypatch.setattr(results_io, "_write_set", racing)
    with pytest.raises(FileExistsError):
        write_results(result, out)
    assert [p.name for p in out.iterdir()] == ["results.json"]
    assert json.loads((out / "results.json").read_text()) == {"other": True}
    assert _leftovers(tmp_path) == []
