"""The napari reader opens a volume with NaN outside its field of view (as resampling leaves it)."""

from __future__ import annotations

import numpy as np

from napari_sgrs._napari._reader import napari_get_reader
from napari_sgrs.core.io import Geometry, write_volume


def test_reader_opens_nan_outside_the_field_of_view(tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    array = np.linspace(-50.0, 250.0, 16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16)
    array[:, :4] = np.nan  # rows outside the resampled field of view
    path = write_volume(tmp_path / "resampled_anat_moved.nii.gz", array, Geometry.identity())
    (data, kwargs, kind), = napari_get_reader(str(path))(str(path))
    assert not shown
    assert kind == "image" and np.array_equal(np.isnan(data), np.isnan(array))
    low, high = kwargs["contrast_limits"]
    assert (low, high) == (float(np.nanmin(array)), float(np.nanmax(array)))


def test_viewer_shows_it(tmp_path, make_napari_viewer):
    array = np.ones((16, 16, 16), np.float32)
    array[:4] = np.nan
    path = write_volume(tmp_path / "moved.nii.gz", array, Geometry.identity())
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-sgrs")
    assert layer.name == "moved" and np.isnan(np.asarray(layer.data)).sum() == 4 * 16 * 16
    assert np.all(np.isfinite(layer.contrast_limits))
