"""Round trips, geometry conventions, case discovery and label checks of ``core.io``."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from napari_sgrs.core import io as sgrs_io
from napari_sgrs.core.errors import InputError, ResourceError
from napari_sgrs.core.io import (
    Case,
    Geometry,
    Volume,
    check_pair,
    find_cases,
    is_supported,
    read_h5_benchmark,
    read_volume,
    validate_label,
    write_volume,
)

SHAPE = (8, 10, 12)  # (D, H, W)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, cy, cz = np.cos(np.radians([ax, ay, az]))
    sx, sy, sz = np.sin(np.radians([ax, ay, az]))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotated_geometry(flip: bool = True) -> Geometry:
    """Anisotropic spacing, non-zero origin, rotated (and optionally flipped) direction."""
    direction = _rotation(20, -35, 50)
    if flip:  # det = -1: a mirrored axis, which DICOM slices cannot express
        direction = direction @ np.diag([1.0, -1.0, 1.0])
    return Geometry((2.5, 0.8, 1.2), (-10.5, 20.25, 33.0), tuple(direction.ravel()))


def sample_array(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if np.issubdtype(np.dtype(dtype), np.floating):
        return rng.normal(100, 30, size=SHAPE).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 2000), size=SHAPE).astype(dtype)


def write_dicom_series(
    folder: Path,
    array: np.ndarray,
    geometry: Geometry,
    *,
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1.1",
    prefix: str = "slice",
    skip: tuple[int, ...] = (),
) -> Path:
    """Write ``array`` (D, H, W, int16) as one DICOM file per D slice, like ITK's example."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    spacing, origin, direction = geometry._to_itk()
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    for i in range(image.GetDepth()):
        if i in skip:
            continue
        item = image[:, :, i]
        position = image.TransformIndexToPhysicalPoint((0, 0, i))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{i + 1}",
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.10f}" for v in position),
            "0020|0013": str(i + 1),
            "0018|0050": str(spacing[2]),
        }
        for key, value in tags.items():
            item.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{i:03d}.dcm"))
        writer.Execute(item)
    return folder


def assert_same_geometry(got: Geometry, want: Geometry, atol: float) -> None:
    np.testing.assert_allclose(got.spacing, want.spacing, rtol=0, atol=atol)
    np.testing.assert_allclose(got.origin, want.origin, rtol=0, atol=atol)
    np.testing.assert_allclose(got.direction, want.direction, rtol=0, atol=atol)


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------

# NIfTI stores the affine as float32, so its geometry matches to ~1e-6 only.
ROUND_TRIPS = [
    pytest.param("a.nii", "float32", "nifti", 1e-5, id="nii-float32"),
    pytest.param("a.nii.gz", "int16", "nifti", 1e-5, id="nii.gz-int16"),
    pytest.param("a.nii.gz", "int64", "nifti", 1e-5, id="nii.gz-int64"),
    pytest.param("a.nrrd", "float64", "nrrd", 1e-9, id="nrrd-float64"),
    pytest.param("a.nrrd", "uint8", "nrrd", 1e-9, id="nrrd-uint8"),
    pytest.param("a.mha", "float32", "mha", 1e-9, id="mha-float32"),
    pytest.param("a.mha", "int32", "mha", 1e-9, id="mha-int32"),
    pytest.param("a.mhd", "uint16", "mhd", 1e-9, id="mhd-uint16"),
    pytest.param("a.h5", "float32", "h5", 0.0, id="h5-float32"),
    pytest.param("a.hdf5", "uint8", "h5", 0.0, id="hdf5-uint8"),
]


@pytest.mark.parametrize(("name", "dtype", "fmt", "atol"), ROUND_TRIPS)
def test_round_trip_keeps_voxels_and_geometry(tmp_path, name, dtype, fmt, atol):
    array, geometry = sample_array(dtype), rotated_geometry(flip=True)
    written = write_volume(tmp_path / name, array, geometry)
    volume = read_volume(written)
    assert volume.format == fmt
    assert volume.path == tmp_path / name
    assert volume.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(volume.array, array)
    assert_same_geometry(volume.geometry, geometry, atol)
    # Only the target (and an .mhd's .raw companion) remain: no staging leftovers.
    expected = {name, "a.raw"} if name.endswith(".mhd") else {name}
    assert set(os.listdir(tmp_path)) == expected


def test_dicom_series_round_trip(tmp_path):
    # DICOM derives the slice axis from row x column, so only proper rotations survive.
    array, geometry = sample_array("int16"), rotated_geometry(flip=False)
    folder = write_dicom_series(tmp_path / "series", array, geometry)
    volume = read_volume(folder)
    assert volume.format == "dicom"
    np.testing.assert_array_equal(volume.array, array)
    assert_same_geometry(volume.geometry, geometry, 1e-6)


def test_nifti_geometry_matches_simpleitk(tmp_path):
    """Our RAS->LPS conversion agrees with ITK's own NIfTI reader."""
    path = write_volume(tmp_path / "a.nii.gz", sample_array("float32"), rotated_geometry())
    ours = read_volume(path).geometry
    image = sitk.ReadImage(str(path))
    itk = Geometry._from_itk(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    assert_same_geometry(ours, itk, 1e-5)


def test_affine_maps_index_to_world_like_itk():
    geometry = rotated_geometry()
    image = sitk.Image([SHAPE[2], SHAPE[1], SHAPE[0]], sitk.sitkUInt8)
    spacing, origin, direction = geometry._to_itk()
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    index_dhw = (3, 5, 7)
    world_xyz = image.TransformIndexToPhysicalPoint(index_dhw[::-1])
    world_zyx = geometry.affine() @ np.array([*index_dhw, 1.0])
    np.testing.assert_allclose(world_zyx[:3], world_xyz[::-1], atol=1e-9)


def test_nifti_affine_preserved_bit_for_bit(tmp_path):
    # A sheared, float32-exact affine as in real scanner exports (sform).
    affine = np.array(
        [
            [-0.75, 0.125, 0.0, 90.5],
            [0.0625, 0.8125, -0.25, -126.0],
            [0.0, 0.5, 3.0, -72.25],
            [0, 0, 0, 1],
        ]
    )
    source = tmp_path / "scanner.nii.gz"
    nib.save(nib.Nifti1Image(sample_array("int16").transpose(2, 1, 0), affine), source)
    first = read_volume(source)
    assert first.geometry.affine_ras is not None
    copy = write_volume(tmp_path / "copy.nii", first.array, first.geometry)
    again = read_volume(copy)
    np.testing.assert_array_equal(np.array(again.geometry.affine_ras), nib.load(source).affine)
    np.testing.assert_array_equal(again.array, first.array)


def test_nifti_qform_only_affine_preserved_bit_for_bit(tmp_path):
    header = nib.Nifti1Header()
    affine = np.eye(4)
    affine[:3, :3] = _rotation(10, 0, 30) @ np.diag([0.7, 0.9, 2.0])
    affine[:3, 3] = (12.3, -45.6, 78.9)
    header.set_qform(affine, code=1)
    header.set_sform(None, code=0)
    source = tmp_path / "qform.nii"
    nib.save(nib.Nifti1Image(sample_array("uint8").transpose(2, 1, 0), None, header), source)
    first = read_volume(source)
    again = read_volume(write_volume(tmp_path / "copy.nii.gz", first.array, first.geometry))
    np.testing.assert_array_equal(np.array(again.geometry.affine_ras), nib.load(source).affine)


def test_cross_format_nifti_mha_nifti_keeps_geometry(tmp_path):
    array, geometry = sample_array("float32"), rotated_geometry()
    nii = read_volume(write_volume(tmp_path / "a.nii.gz", array, geometry))
    mha = read_volume(write_volume(tmp_path / "b.mha", nii.array, nii.geometry))
    assert mha.geometry.affine_ras is None
    back = read_volume(write_volume(tmp_path / "c.nii.gz", mha.array, mha.geometry))
    np.testing.assert_array_equal(back.array, array)
    assert_same_geometry(mha.geometry, nii.geometry, 1e-9)
    assert_same_geometry(back.geometry, nii.geometry, 1e-5)
    np.testing.assert_allclose(
        np.array(back.geometry.affine_ras), np.array(nii.geometry.affine_ras), atol=1e-5
    )


def test_like_reuses_the_reference_nifti_affine(tmp_path):
    image = read_volume(
        write_volume(tmp_path / "img.nii.gz", sample_array("float32"), rotated_geometry())
    )
    plain = Geometry(image.geometry.spacing, image.geometry.origin, image.geometry.direction)
    prediction = (image.array > 100).astype(np.uint8)
    out = read_volume(write_volume(tmp_path / "pred.nii.gz", prediction, plain, like=image))
    assert out.geometry.affine_ras == image.geometry.affine_ras
    assert out.array.dtype == np.uint8
    with pytest.raises(InputError, match="differs from its reference"):
        write_volume(tmp_path / "bad.nii.gz", prediction[:4], plain, like=image)


def test_bool_is_written_as_uint8(tmp_path):
    mask = sample_array("float32") > 100
    volume = read_volume(write_volume(tmp_path / "m.mha", mask, Geometry.identity()))
    assert volume.array.dtype == np.uint8
    np.testing.assert_array_equal(volume.array, mask)


def test_trailing_singleton_dimension_is_squeezed(tmp_path):
    path = tmp_path / "t.nii.gz"
    nib.save(
        nib.Nifti1Image(sample_array("float32").transpose(2, 1, 0)[..., None], np.eye(4)), path
    )
    assert read_volume(path).array.shape == SHAPE


def test_h5_without_geometry_attributes_has_identity_geometry(tmp_path):
    path = tmp_path / "bench.h5"
    with h5py.File(path, "w") as f:
        f["image"] = sample_array("float32")
        f["label"] = np.zeros(SHAPE, np.uint8)
    assert read_volume(path).geometry == Geometry.identity()
    assert read_volume(path, dataset="label").array.dtype == np.uint8


# --------------------------------------------------------------------------------------
# Geometry and writing errors
# --------------------------------------------------------------------------------------


def test_geometry_json_round_trip_and_identity():
    geometry = read_geometry = rotated_geometry()
    assert Geometry.from_json(geometry.to_json()) == read_geometry
    with_affine = Geometry._from_nifti_affine(np.diag([1.0, 2.0, 3.0, 1.0]))
    assert Geometry.from_json(with_affine.to_json()) == with_affine
    identity = Geometry.identity()
    np.testing.assert_array_equal(identity.affine(), np.eye(4))
    with pytest.raises(InputError, match="spacing"):
        Geometry((1.0, 0.0, 1.0), (0, 0, 0), tuple(np.eye(3).ravel()))
    with pytest.raises(InputError):
        Geometry.from_json({"spacing": [1, 1, 1]})


@pytest.mark.parametrize(
    ("name", "array", "error", "match"),
    [
        pytest.param("out.nii.gz", np.zeros((4, 4)), InputError, "3D", id="2d-array"),
        pytest.param(
            "out.nii.gz", np.zeros(SHAPE, complex), InputError, "real number", id="complex"
        ),
        pytest.param("out.png", np.zeros(SHAPE), InputError, r"\.nii\.gz", id="unsupported-suffix"),
        pytest.param("dicomdir", np.zeros(SHAPE), InputError, "DICOM", id="folder-target"),
        pytest.param(
            "missing/out.mha", np.zeros(SHAPE), ResourceError, "does not exist", id="no-parent"
        ),
    ],
)
def test_write_refuses_bad_requests(tmp_path, name, array, error, match):
    with pytest.raises(error, match=match):
        write_volume(tmp_path / name, array, Geometry.identity())
    assert not (tmp_path / name).exists()


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"previous content")

    def broken_writer(staged, array, geometry, dataset):
        staged.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(sgrs_io._WRITERS, "nifti", broken_writer)
    with pytest.raises(ResourceError, match=r"out\.nii\.gz"):
        write_volume(target, np.zeros(SHAPE), Geometry.identity())
    assert target.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["out.nii.gz"]


# --------------------------------------------------------------------------------------
# Case discovery
# --------------------------------------------------------------------------------------


def _touch_volume(path: Path) -> Path:
    return write_volume(path, np.zeros((2, 3, 4), np.uint8), Geometry.identity())


def test_find_cases_pairs_by_name(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for name in ("case01.nii.gz", "case02.nrrd", "case03.mha", ".hidden.nii.gz"):
        _touch_volume(images / name)
    (images / "notes.txt").write_text("not a volume")
    write_dicom_series(
        images / "case04", np.zeros((3, 4, 5), np.int16), rotated_geometry(flip=False)
    )
    for name in ("case01.nii.gz", "case02.nii.gz", "case04.nrrd"):
        _touch_volume(labels / name)

    cases = find_cases(images, labels)

    assert cases == [
        Case("case01", images / "case01.nii.gz", labels / "case01.nii.gz"),
        Case("case02", images / "case02.nrrd", labels / "case02.nii.gz"),
        Case("case03", images / "case03.mha", None),
        Case("case04", images / "case04", labels / "case04.nrrd"),
    ]
    assert [c.name for c in find_cases(images)] == ["case01", "case02", "case03", "case04"]
    assert cases[3].read_image().format == "dicom"


def test_find_cases_errors(tmp_path):
    images, labels, empty = tmp_path / "images", tmp_path / "labels", tmp_path / "empty"
    for folder in (images, labels, empty):
        folder.mkdir()
    _touch_volume(images / "a.nii.gz")
    _touch_volume(labels / "b.nii.gz")
    with pytest.raises(InputError, match=r"b\.nii\.gz.*no image"):
        find_cases(images, labels)
    with pytest.raises(InputError, match="no volumes found"):
        find_cases(empty)
    with pytest.raises(InputError, match="no such folder"):
        find_cases(tmp_path / "absent")
    _touch_volume(images / "a.mha")
    with pytest.raises(InputError, match="two volumes for case 'a'"):
        find_cases(images)


def test_is_supported(tmp_path):
    assert is_supported("x.NII.GZ") and is_supported("x.nhdr") and is_supported(tmp_path)
    assert not is_supported("x.png") and not is_supported("x.gz")


# --------------------------------------------------------------------------------------
# h5 benchmark layout (UA-MT / SSL4MIS)
# --------------------------------------------------------------------------------------


def _h5_case(path: Path, *, label: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"] = sample_array("float32")
        if label:
            f["label"] = (sample_array("float32") > 100).astype(np.uint8)


def test_read_h5_benchmark_layouts(tmp_path):
    _h5_case(tmp_path / "LA001" / "mri_norm2.h5")
    _h5_case(tmp_path / "panc002.h5")
    _h5_case(tmp_path / "brats003" / "anything.h5")
    (tmp_path / "train.list").write_text("LA001\n\npanc002\nbrats003\n")

    cases = read_h5_benchmark(tmp_path, "train.list")

    assert [c.name for c in cases] == ["LA001", "panc002", "brats003"]
    assert cases[0].image == cases[0].label == tmp_path / "LA001" / "mri_norm2.h5"
    label = cases[0].read_label()
    assert label is not None and label.array.dtype == np.uint8
    assert cases[0].read_image().array.dtype == np.float32
    check_pair(cases[0].read_image(), label)


def test_read_h5_benchmark_errors(tmp_path):
    _h5_case(tmp_path / "LA001" / "mri_norm2.h5", label=False)
    (tmp_path / "missing.list").write_text("nope\n")
    (tmp_path / "nolabel.list").write_text("LA001\n")
    with pytest.raises(InputError, match="'nope'"):
        read_h5_benchmark(tmp_path, tmp_path / "missing.list")
    with pytest.raises(InputError, match=r"LA001.*'label'"):
        read_h5_benchmark(tmp_path, "nolabel.list")


# --------------------------------------------------------------------------------------
# Pair and label checks
# --------------------------------------------------------------------------------------


def _volume(array: np.ndarray, geometry: Geometry | None = None, name: str = "x.nii.gz") -> Volume:
    return Volume(array, geometry or Geometry.identity(), Path(name), "nifti")


def test_check_pair_accepts_matching_grids():
    geometry = rotated_geometry()
    check_pair(
        _volume(np.zeros(SHAPE), geometry, "img.nii.gz"),
        _volume(np.zeros(SHAPE), geometry, "lab.nii.gz"),
    )


@pytest.mark.parametrize(
    ("label_shape", "label_geometry", "match"),
    [
        pytest.param(
            (8, 10, 11), Geometry.identity(), r"shape \(8, 10, 11\).*\(8, 10, 12\)", id="shape"
        ),
        pytest.param(
            SHAPE,
            Geometry((1, 1, 1.5), (0, 0, 0), tuple(np.eye(3).ravel())),
            "spacing",
            id="spacing",
        ),
        pytest.param(
            SHAPE, Geometry((1, 1, 1), (0, 0, 5), tuple(np.eye(3).ravel())), "origin", id="origin"
        ),
        pytest.param(
            SHAPE,
            Geometry((1, 1, 1), (0, 0, 0), tuple(np.diag([1, -1, 1]).ravel())),
            "direction",
            id="direction",
        ),
    ],
)
def test_check_pair_errors(label_shape, label_geometry, match):
    image = _volume(np.zeros(SHAPE), Geometry.identity(), "img.nii.gz")
    label = _volume(np.zeros(label_shape), label_geometry, "lab.nii.gz")
    with pytest.raises(InputError, match=match) as info:
        check_pair(image, label)
    assert "img.nii.gz" in str(info.value) and "lab.nii.gz" in str(info.value)


def test_validate_label_accepts_and_converts():
    values = np.zeros(SHAPE, np.float32)
    values[0, 0, :3] = (1, 2, 255)
    out = validate_label(_volume(values), num_classes=3, ignore_index=255)
    assert out.dtype == np.int64 and out.max() == 255
    assert validate_label(_volume(np.ones(SHAPE, np.uint8)), None, None).dtype == np.int64


@pytest.mark.parametrize(
    ("values", "num_classes", "ignore_index", "match"),
    [
        pytest.param((0, 1, 3, 7), 3, None, r"\[3, 7\].*0\.\.2", id="too-large"),
        pytest.param((0, -1, 1), 3, None, r"\[-1\]", id="negative"),
        pytest.param((0, 1, 255), 2, 254, r"\[255\].*ignore index 254", id="not-the-ignore-index"),
        pytest.param((0, 0.5, 1), None, None, "whole numbers", id="fractional"),
        pytest.param((0, np.nan), 2, None, "NaN", id="nan"),
        pytest.param((0, 1e30), 2, None, "far outside", id="huge-float"),
    ],
)
def test_validate_label_errors(values, num_classes, ignore_index, match):
    array = np.zeros(SHAPE, np.float32 if any(isinstance(v, float) for v in values) else np.int16)
    array.flat[: len(values)] = values
    with pytest.raises(InputError, match=match) as info:
        validate_label(_volume(array, name="lab.nii.gz"), num_classes, ignore_index)
    assert "lab.nii.gz" in str(info.value)
