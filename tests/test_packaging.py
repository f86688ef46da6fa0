"""The npe2 manifest ships inside the built wheel and validates, editable and from the wheel."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NPE2 = Path(sys.executable).with_name("npe2")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build sdist then wheel from the sdist, as a release would."""
    out = tmp_path_factory.mktemp("dist")
    proc = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheels = list(out.glob("napari_ctvlp-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


@pytest.mark.slow
def test_wheel_contains_manifest_and_entry_point(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "napari_ctvlp/napari.yaml" in names
        assert zf.read("napari_ctvlp/napari.yaml") == (REPO / "napari.yaml").read_bytes()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        text = zf.read(entry_points).decode()
    assert "[napari.manifest]" in text and "napari_ctvlp:napari.yaml" in text
    assert "napari-ctvlp = napari_ctvlp.cli:main" in text
    # training/ and tests/ are not part of the wheel
    assert not any(n.startswith(("training/", "tests/")) for n in names)
    demo = REPO / "src" / "napari_ctvlp" / "models"
    for f in demo.rglob("*") if demo.is_dir() else []:
        if f.is_file() and "__pycache__" not in f.parts:
            assert f"napari_ctvlp/models/{f.relative_to(demo).as_posix()}" in names, f


@pytest.mark.slow
def test_npe2_validate_from_built_wheel(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    proc = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = target / "napari_ctvlp" / "napari.yaml"
    assert manifest.is_file() and not manifest.is_symlink()
    assert filecmp.cmp(manifest, REPO / "napari.yaml", shallow=False)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = _run([sys.executable, "-c", "import napari_ctvlp; print(napari_ctvlp.__file__)"], env=env, cwd=tmp_path)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    proc = _run([str(NPE2), "validate", str(manifest), "--imports"], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in (proc.stdout + proc.stderr).lower()


def test_npe2_validate_installed_plugin() -> None:
    proc = _run([str(NPE2), "validate", "napari-ctvlp", "--imports"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
