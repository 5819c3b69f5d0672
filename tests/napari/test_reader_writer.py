"""Reader, writer and sample data keep the source geometry."""

from __future__ import annotations

import numpy as np

from napari_sgrs._napari._reader import napari_get_reader
from napari_sgrs._napari._sample_data import make_demo_data
from napari_sgrs._napari._writer import write_labels
from napari_sgrs.core.io import read_volume


def test_reader_returns_none_for_unknown(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None


def test_reader_image_and_label_with_geometry(cohort):
    image_path = cohort.images_tr / f"{cohort.train_names[0]}.nii.gz"
    (data, kwargs, kind), = napari_get_reader(str(image_path))(str(image_path))
    assert kind == "image" and data.shape == cohort.shape
    assert np.allclose(kwargs["scale"], cohort.spacing) and np.allclose(kwargs["translate"], cohort.origin, atol=1e-3)
    assert kwargs["metadata"]["sgrs"]["geometry"]["spacing"]
    label_path = cohort.labels_tr / f"{cohort.train_names[0]}.nii.gz"
    (_, kwargs, kind), = napari_get_reader(str(label_path))(str(label_path))
    assert kind == "labels" and kwargs["name"].endswith(" label")


def test_reader_bad_file_notifies_instead_of_raising(tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    assert napari_get_reader(str(bad))(str(bad)) == [(None,)]
    assert len(shown) == 1 and "\n" not in shown[0]


def test_writer_restores_source_geometry(cohort, tmp_path):
    label_path = cohort.labels_tr / f"{cohort.train_names[0]}.nii.gz"
    source = read_volume(label_path)
    (data, kwargs, _), = napari_get_reader(str(label_path))(str(label_path))
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        out, = write_labels(str(tmp_path / f"out{suffix}"), data, kwargs)
        back = read_volume(out)
        assert np.array_equal(back.array, source.array)
        assert back.geometry.close_to(source.geometry)
    # a layer made in napari (no metadata): scale and translate become the geometry
    out, = write_labels(str(tmp_path / "plain"), data, {"scale": (2.0, 1.0, 0.5), "translate": (1.0, 2.0, 3.0)})
    assert out.endswith(".nii.gz")
    assert np.allclose(read_volume(out).geometry.spacing, (2.0, 1.0, 0.5))


def test_sample_data_is_demo_cohort():
    layers = make_demo_data(shape=(32, 32, 32), n_cases=3, n_labeled=1)
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image", "image", "image", "labels"]
    assert all(kw["metadata"]["sgrs"]["geometry"] for _, kw, _ in layers)
