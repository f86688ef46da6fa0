"""The npe2 contributions (reader, writer, sample data) driven through a real napari viewer."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.mark.realdata
def test_open_nifti_through_plugin_reader(make_napari_viewer, realdata: Path) -> None:
    viewer = make_napari_viewer()
    layers = viewer.open(str(realdata / "example_ct.nii.gz"), plugin="napari-ctvlp")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.data.shape == (112, 101, 122)  # display order: (k, j, i)
    np.testing.assert_allclose(layer.scale, (-3.0, -3.0, -3.0))  # RAS file, shown radiologically (I, P, L)
    presets = layer.metadata["ctvlp"]["window_presets"]
    assert {"lung", "mediastinum", "bone"} <= set(presets)
    level, width = presets["mediastinum"]
    np.testing.assert_allclose(layer.contrast_limits, (level - width / 2, level + width / 2))


@pytest.mark.realdata
def test_open_dicom_series_folder(make_napari_viewer, realdata: Path) -> None:
    viewer = make_napari_viewer()
    layers = viewer.open(str(realdata / "example_ct_dicom"), plugin="napari-ctvlp", stack=False)
    assert len(layers) == 1
    assert layers[0].data.shape == (20, 512, 512)
    np.testing.assert_allclose(layers[0].scale, (-2.0, 0.977, 0.977), atol=1e-3)  # LPS: slice axis flipped


def test_unreadable_file_gives_error_and_keeps_layers(make_napari_viewer, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 5, 6)), name="mine")
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("not a volume")
    with pytest.raises(Exception):  # napari reports "no reader" / the read error to the user
        viewer.open(str(bad), plugin="napari-ctvlp")
    assert [layer.name for layer in viewer.layers] == ["mine"]


def test_sample_phantom_and_label_writer_round_trip(make_napari_viewer, tmp_path: Path) -> None:
    from napari_ctvlp.engine.anatomy import ORGAN_BY_NAME

    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-ctvlp", "chest_ct_phantom")
    image, organs = layers
    assert image.data.ndim == 3 and organs.data.shape == image.data.shape
    np.testing.assert_allclose(organs.scale, image.scale)
    lung = np.isin(organs.data, [v for v in range(1, 8)])
    heart = organs.data == ORGAN_BY_NAME["heart"].value
    assert image.data[lung].mean() < -600 and 0 < image.data[heart].mean() < 300

    out = tmp_path / "organs.nii.gz"
    viewer.layers.selection = {organs}
    written = viewer.layers.save(str(out), selected=True, plugin="napari-ctvlp")
    assert Path(written[0]) == out
    img = nib.load(out)
    volume = image.metadata["ctvlp_volume"]
    np.testing.assert_array_equal(img.affine, volume.affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), organs.data)
    names = json.loads(out.with_name("organs.json").read_text())
    assert "heart" in json.dumps(names)
