"""napari reader/writer contributions, called directly (no viewer)."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_ctvlp._reader import napari_get_reader
from napari_ctvlp._writer import write_labels_layer
from napari_ctvlp.io import WINDOW_PRESETS, CTVolume, contrast_limits, read_ct, read_labels


@pytest.mark.parametrize("name", ["a.txt", "a.png", "a.csv", "missing.nii.gz", "noext"])
def test_reader_returns_none_for_unhandled(tmp_path: Path, name: str) -> None:
    if name != "missing.nii.gz":
        (tmp_path / name).write_text("x")
    assert napari_get_reader(str(tmp_path / name)) is None


def test_reader_returns_none_for_non_dicom_folder_and_bad_lists(tmp_path: Path, tiny_nifti: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    assert napari_get_reader(str(folder)) is None
    assert napari_get_reader([str(tiny_nifti), str(folder / "a.txt")]) is None
    assert napari_get_reader([]) is None
    assert napari_get_reader(12345) is None  # type: ignore[arg-type]


def test_reader_layer_for_nifti(tiny_nifti: Path) -> None:
    reader = napari_get_reader(str(tiny_nifti))
    assert callable(reader)
    (layer,) = reader(str(tiny_nifti))
    data, kwargs, kind = layer
    vol = read_ct(tiny_nifti)
    assert kind == "image"
    assert np.array_equal(data, vol.array)
    assert kwargs["name"] == "tiny"
    # radiological display frame (inferior, posterior, patient's left): the LPS file's slice axis is flipped
    assert kwargs["scale"] == pytest.approx((-2.5, 0.6, 0.8))
    assert kwargs["translate"] == pytest.approx((-30.0, 7.25, -12.5))
    assert kwargs["axis_labels"] == ("S\u2192I", "A\u2192P", "R\u2192L") and kwargs["units"] == ("mm",) * 3
    assert kwargs["colormap"] == "gray"
    assert kwargs["contrast_limits"] == contrast_limits("mediastinum")
    info = kwargs["metadata"]["ctvlp"]
    assert np.array_equal(np.asarray(info["affine"]), nib.load(tiny_nifti).affine)
    assert info["orientation"] == ["L", "P", "S"] and info["format"] == "nifti"
    assert info["source_path"] == str(tiny_nifti)
    assert info["window_presets"]["lung"] == list(WINDOW_PRESETS["lung"])
    assert isinstance(kwargs["metadata"]["ctvlp_volume"], CTVolume)


def test_reader_dicom_folder_file_and_list(tiny_series: Path, tiny_nifti: Path) -> None:
    (layer,) = napari_get_reader(str(tiny_series))(str(tiny_series))
    assert layer[1]["name"] == "series" and np.abs(layer[1]["scale"]) == pytest.approx((2.0, 0.5, 0.75))
    one = sorted(tiny_series.iterdir())[0]
    assert napari_get_reader(str(one)) is not None
    paths = [str(tiny_series), str(tiny_nifti)]
    layers = napari_get_reader(paths)(paths)
    assert [lyr[1]["name"] for lyr in layers] == ["series", "tiny"]


def test_writer_uses_volume_geometry(tmp_path: Path, tiny_nifti: Path) -> None:
    (layer,) = napari_get_reader(str(tiny_nifti))(str(tiny_nifti))
    vol = layer[1]["metadata"]["ctvlp_volume"]
    labels = np.zeros(vol.shape, np.int32)
    labels[1, 2, 3] = 10
    meta = {"name": "organs", "scale": layer[1]["scale"], "metadata": layer[1]["metadata"]}
    written = write_labels_layer(str(tmp_path / "organs.nii.gz"), labels, meta)
    assert written == [str(tmp_path / "organs.nii.gz"), str(tmp_path / "organs.json")]
    assert np.array_equal(nib.load(written[0]).affine, vol.affine)
    assert np.array_equal(read_labels(written[0], like=vol), labels)
    # napari confirmed the overwrite already: a second save replaces the file
    write_labels_layer(str(tmp_path / "organs.nii.gz"), labels * 0, meta)
    assert read_labels(written[0]).max() == 0


def test_writer_affine_only_and_scale_fallback(tmp_path: Path, tiny_nifti: Path, caplog: pytest.LogCaptureFixture) -> None:
    vol = read_ct(tiny_nifti)
    labels = np.ones(vol.shape, np.uint8)
    meta = {"metadata": {"ctvlp": {"affine": vol.affine.tolist()}, "ctvlp_label_names": {"1": "blob"}}}
    written = write_labels_layer(str(tmp_path / "a.nii"), labels, meta)
    assert np.allclose(nib.load(written[0]).affine, vol.affine)
    assert '"1": "blob"' in Path(written[1]).read_text()
    with caplog.at_level(logging.WARNING, logger="napari_ctvlp._writer"):
        written = write_labels_layer(str(tmp_path / "b.nii.gz"), labels, {"scale": (2.0, 3.0, 4.0), "metadata": {}})
    assert "no CT geometry" in caplog.text
    assert np.allclose(nib.load(written[0]).affine, np.diag([4.0, 3.0, 2.0, 1.0]))
    assert np.array_equal(read_labels(written[0]), labels)
    with pytest.raises(ValueError, match="does not match the CT volume shape"):
        write_labels_layer(str(tmp_path / "c.nii.gz"), labels[:1], {"metadata": {"ctvlp_volume": vol}})


def test_writer_places_a_plain_layer_in_the_display_frame(tmp_path: Path, tiny_nifti: Path) -> None:
    """napari's "New labels layer" on our CT copies its scale, translate and axis labels, not our metadata."""
    (layer,) = napari_get_reader(str(tiny_nifti))(str(tiny_nifti))
    vol = layer[1]["metadata"]["ctvlp_volume"]
    labels = np.zeros(layer[0].shape, np.uint8)
    labels[0, 1, 2] = 3
    meta = {"scale": layer[1]["scale"], "translate": layer[1]["translate"], "axis_labels": layer[1]["axis_labels"],
            "metadata": {}}
    (path, _) = write_labels_layer(str(tmp_path / "painted.nii.gz"), labels, meta)
    np.testing.assert_allclose(nib.load(path).affine, vol.affine, atol=1e-6)  # the CT's own grid
    assert np.array_equal(read_labels(path, like=vol), labels)
