"""A rotated volume in the viewer: napari's world coordinates are the scanner's (issue 22, item 11).

The volume is turned 20 degrees about the axial axis (array axis 0, z) with 0.8 x 0.8 x 2.5 mm
voxels, written as NIfTI and read through the npe2 reader, as a user's own files are.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_sgrs._napari._layers import geometry_of
from napari_sgrs._napari._widget import SGRSTrainWidget
from napari_sgrs._napari._writer import write_labels
from napari_sgrs.core.codes import Region
from napari_sgrs.core.io import Geometry, read_volume, write_volume

SPACING = (2.5, 0.8, 0.8)  # (z, y, x): 0.8 x 0.8 in plane, 2.5 mm slices
ORIGIN = (-40.0, 12.5, -7.25)
INDICES = [(0, 0, 0), (3, 5, 7), (7, 11, 2), (1.5, 0.25, 9.0)]


def _rotated_geometry(degrees: float = 20.0) -> Geometry:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    # about z (array axis 0): the y and x axes turn in the axial plane
    direction = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=float)
    return Geometry(SPACING, ORIGIN, tuple(direction.ravel()))


def _world(geometry: Geometry, index) -> np.ndarray:
    return (geometry.affine() @ np.append(np.asarray(index, dtype=float), 1.0))[:3]


@pytest.fixture
def rotated(tmp_path):
    image = np.arange(8 * 12 * 10, dtype=np.float32).reshape(8, 12, 10)
    label = (image % 3 == 0).astype(np.uint8)
    geometry = _rotated_geometry()
    (tmp_path / "labels").mkdir()
    return (write_volume(tmp_path / "pt01.nii.gz", image, geometry),
            write_volume(tmp_path / "labels" / "pt01.nii.gz", label, geometry))


def test_world_coordinate_of_a_voxel_is_the_scanners(make_napari_viewer, rotated):
    image_path, label_path = rotated
    geometry = read_volume(image_path).geometry
    assert not np.allclose(geometry.direction_matrix(), np.eye(3))  # the file kept its rotation
    viewer = make_napari_viewer()
    image, = viewer.open(str(image_path), plugin="napari-sgrs")
    label, = viewer.open(str(label_path), plugin="napari-sgrs")
    for layer in (image, label):
        assert np.allclose(layer.scale, SPACING) and np.allclose(layer.translate, ORIGIN, atol=1e-4)
        for index in INDICES:
            world = _world(geometry, index)
            assert np.allclose(layer.data_to_world(index), world, atol=1e-4)
            assert np.allclose(layer.world_to_data(world), index, atol=1e-4)
    # the cursor napari reports, put on a voxel's world position, is that voxel's value
    index = (3, 5, 7)
    viewer.cursor.position = tuple(_world(geometry, index))
    assert image.get_value(viewer.cursor.position, world=True) == image.data[index]


def test_unrotated_volume_keeps_scale_and_translate(make_napari_viewer, cohort):
    path = cohort.images_tr / f"{cohort.train_names[0]}.nii.gz"
    geometry = read_volume(path).geometry
    viewer = make_napari_viewer()
    layer, = viewer.open(str(path), plugin="napari-sgrs")
    assert np.allclose(layer.scale, geometry.spacing) and np.allclose(layer.translate, geometry.origin, atol=1e-4)
    assert np.allclose(layer.affine.affine_matrix, np.eye(4))
    assert np.allclose(layer.data_to_world((4, 5, 6)), _world(geometry, (4, 5, 6)), atol=1e-4)


def test_export_of_a_rotated_label_layer_keeps_its_geometry(make_napari_viewer, rotated, tmp_path):
    _, label_path = rotated
    source = read_volume(label_path)
    viewer = make_napari_viewer()
    label, = viewer.open(str(label_path), plugin="napari-sgrs")
    out, = write_labels(str(tmp_path / "pt01-out.nii.gz"), label.data, label._get_state())
    back = read_volume(out)
    assert np.array_equal(back.array, source.array) and back.geometry.close_to(source.geometry)
    # a layer without our metadata (made or copied in napari): its transform is the geometry
    plain = viewer.add_labels(np.asarray(label.data), scale=label.scale, translate=label.translate,
                              affine=label.affine.affine_matrix)
    assert geometry_of(plain).close_to(source.geometry)
    out, = write_labels(str(tmp_path / "plain"), plain.data, plain._get_state())
    assert read_volume(out).geometry.close_to(source.geometry)


def test_focus_on_a_region_of_a_rotated_case_lands_on_its_world_position(make_napari_viewer, rotated):
    image_path, _ = rotated
    geometry = read_volume(image_path).geometry
    viewer = make_napari_viewer()
    widget = SGRSTrainWidget(viewer)
    viewer.open(str(image_path), plugin="napari-sgrs")
    regions = np.full((8, 12, 10), int(Region.CONSISTENT), dtype=np.uint8)
    regions[5, 9, 3] = int(Region.INCONSISTENT)
    widget.regions["pt01"] = regions
    world = widget.focus_on_region("pt01")
    assert np.allclose(world, _world(geometry, (5, 9, 3)), atol=1e-4)
    assert viewer.dims.point[0] == pytest.approx(world[0], abs=1e-3)
    widget.shutdown()
