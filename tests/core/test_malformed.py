"""Malformed inputs must raise a one-line SGRSError naming the file, never anything else.

Every input is built here, small, in a temporary folder.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_sgrs.core.errors import SGRSError
from napari_sgrs.core.io import (
    Geometry,
    Volume,
    read_h5_benchmark,
    read_volume,
    validate_label,
    write_volume,
)

SHAPE = (8, 10, 12)  # (D, H, W)
GEOMETRY = Geometry((2.0, 0.5, 0.75), (5.0, -3.0, 1.5), tuple(np.eye(3).ravel()))


def _image(dtype: str = "float32") -> np.ndarray:
    return np.random.default_rng(3).normal(50, 10, size=SHAPE).astype(dtype)


def _valid(tmp: Path, name: str, dtype: str = "float32") -> Path:
    return write_volume(tmp / name, _image(dtype), GEOMETRY)


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _nifti(tmp: Path, name: str, data: np.ndarray, **fields: object) -> Path:
    image = nib.Nifti1Image(data, np.eye(4), dtype=data.dtype)
    for key, value in fields.items():
        image.header[key] = value
    path = tmp / name
    nib.save(image, path)
    return path


def _patch_nifti_header(path: Path, **fields: object) -> Path:
    """Overwrite raw header fields of an uncompressed .nii (nibabel would refuse the values)."""
    offsets = {
        "dim": (40, "<8h"),
        "datatype": (70, "<h"),
        "bitpix": (72, "<h"),
        "srow": (280, "<12f"),
        "qform_code": (252, "<h"),
        "sform_code": (254, "<h"),
    }
    data = bytearray(path.read_bytes())
    for key, value in fields.items():
        offset, fmt = offsets[key]
        values = value if isinstance(value, tuple) else (value,)
        struct.pack_into(fmt, data, offset, *values)
    path.write_bytes(bytes(data))
    return path


def _gzip(path: Path) -> Path:
    """Compress a .nii byte for byte into a .nii.gz (keeping any header lie)."""
    target = path.with_name(path.name + ".gz")
    target.write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    return target


def _clobber_start(path: Path) -> Path:
    """Replace the first bytes with a PNG signature: the wrong magic for every format here."""
    data = path.read_bytes()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data[8:])
    return path


def _replace_text(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert old in data, f"{old!r} not in the header of {path.name}"
    path.write_bytes(data.replace(old, new, 1))
    return path


def _itk(tmp: Path, name: str, array: np.ndarray, *, compress: bool, vector: bool = False) -> Path:
    path = tmp / name
    sitk.WriteImage(
        sitk.GetImageFromArray(array, isVector=vector), str(path), useCompression=compress
    )
    return path


def _h5(tmp: Path, name: str, **datasets: np.ndarray) -> Path:
    path = tmp / name
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f[key] = value
    return path


def _dicom_series(folder: Path, uid: str, prefix: str = "s", skip: tuple[int, ...] = ()) -> Path:
    folder.mkdir(exist_ok=True)
    image = sitk.GetImageFromArray(_image("int16")[:5])
    image.SetSpacing((0.5, 0.5, 2.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(image.GetDepth()):
        if i in skip:
            continue
        item = image[:, :, i]
        position = image.TransformIndexToPhysicalPoint((0, 0, i))
        item.SetMetaData("0020|000e", uid)
        item.SetMetaData("0008|0018", f"{uid}.{i + 1}")
        item.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        item.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
        item.SetMetaData("0020|0013", str(i + 1))
        writer.SetFileName(str(folder / f"{prefix}{i:03d}.dcm"))
        writer.Execute(item)
    return folder


def _non_utf8_name(tmp: Path, suffix: str) -> Path:
    name = os.fsdecode(b"scan\xff\xfe" + suffix.encode())
    path = tmp / name
    try:
        write_volume(tmp / f"plain{suffix}", _image(), GEOMETRY).rename(path)
    except (OSError, UnicodeError):
        pytest.skip("this filesystem refuses non-UTF-8 file names")
    return path


def _symlink_loop(tmp: Path) -> Path:
    path = tmp / "loop.nii.gz"
    try:
        os.symlink(path, path)
    except OSError:
        pytest.skip("symlinks are not available here")
    return path


def _folder(path: Path, files: dict[str, str] | None = None) -> Path:
    path.mkdir()
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mhd_with_short_raw(tmp: Path) -> Path:
    path = _valid(tmp, "short.mhd")
    _truncate(tmp / "short.raw")
    return path


def _mhd_without_raw(tmp: Path) -> Path:
    path = _valid(tmp, "lonely.mhd")
    (tmp / "lonely.raw").unlink()
    return path


def _gzip_nrrd_claiming(tmp: Path, sizes: str) -> Path:
    payload = gzip.compress(_image().tobytes())
    header = (
        "NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {sizes}\nencoding: gzip\n\n"
    )
    path = tmp / "claims.nrrd"
    path.write_bytes(header.encode() + payload)
    return path


# Each case: (build(tmp) -> path, action(path) -> anything). The action must raise SGRSError.
def read(path: Path) -> object:
    return read_volume(path)


def read_label_dataset(path: Path) -> object:
    return read_volume(path, dataset="label")


def validate_three_classes(path: Path) -> object:
    return validate_label(read_volume(path), num_classes=3, ignore_index=None)


def benchmark(path: Path) -> object:
    return read_h5_benchmark(path.parent, path)


def _benchmark_case(tmp: Path, **datasets: np.ndarray) -> Path:
    (tmp / "case1").mkdir()
    _h5(tmp / "case1", "mri_norm2.h5", **datasets)
    listing = tmp / "train.list"
    listing.write_text("case1\n")
    return listing


CORPUS: list = [
    # zero-byte files of each format
    *[
        pytest.param(lambda t, s=suffix: _text(t / f"empty{s}", ""), read, id=f"zero-byte{suffix}")
        for suffix in (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".h5")
    ],
    # truncated files of each format
    pytest.param(lambda t: _truncate(_valid(t, "cut.nii")), read, id="truncated.nii"),
    pytest.param(
        lambda t: _truncate(_valid(t, "cut.nii"), keep=0.05), read, id="truncated-header.nii"
    ),
    pytest.param(lambda t: _truncate(_valid(t, "cut.nii.gz")), read, id="truncated.nii.gz"),
    pytest.param(lambda t: _truncate(_valid(t, "cut.nrrd")), read, id="truncated-gzip.nrrd"),
    pytest.param(
        lambda t: _truncate(_itk(t, "cut.nrrd", _image(), compress=False)),
        read,
        id="truncated-raw.nrrd",
    ),
    pytest.param(lambda t: _truncate(_valid(t, "cut.mha")), read, id="truncated-compressed.mha"),
    pytest.param(
        lambda t: _truncate(_itk(t, "cut.mha", _image(), compress=False)),
        read,
        id="truncated-raw.mha",
    ),
    # MetaIO aborts the process on these two unless the header is checked first.
    pytest.param(
        lambda t: _truncate(_valid(t, "cut.mha"), keep=0.05), read, id="truncated-header.mha"
    ),
    pytest.param(
        lambda t: _replace_text(_valid(t, "glued.mha"), b"LOCAL\n", b"LOCAL3"),
        read,
        id="mha-data-file-name-runs-into-data",
    ),
    pytest.param(_mhd_with_short_raw, read, id="mhd-short-raw"),
    pytest.param(_mhd_without_raw, read, id="mhd-missing-raw"),
    pytest.param(lambda t: _truncate(_valid(t, "cut.h5")), read, id="truncated.h5"),
    # wrong magic bytes
    pytest.param(
        lambda t: _replace_text(_valid(t, "magic.nii"), b"n+1\x00", b"xyz\x00"),
        read,
        id="magic.nii",
    ),
    pytest.param(
        lambda t: _replace_text(_valid(t, "magic.nrrd"), b"NRRD000", b"XRRD000"),
        read,
        id="magic.nrrd",
    ),
    # MetaImage has no magic number: a PNG renamed .mha is the closest case.
    pytest.param(
        lambda t: _bytes(t / "magic.mha", b"\x89PNG\r\n\x1a\n" + bytes(range(256))),
        read,
        id="magic.mha",
    ),
    pytest.param(lambda t: _clobber_start(_valid(t, "magic.nii.gz")), read, id="magic.nii.gz"),
    pytest.param(
        lambda t: _replace_text(_valid(t, "magic.h5"), b"\x89HDF", b"\x89XYZ"), read, id="magic.h5"
    ),
    # NIfTI headers that lie
    pytest.param(
        lambda t: _patch_nifti_header(_valid(t, "dims.nii"), dim=(3, 12, 10, 80, 1, 1, 1, 1)),
        read,
        id="nii-lying-dims",
    ),
    pytest.param(
        lambda t: _patch_nifti_header(_valid(t, "type.nii", "uint8"), datatype=64, bitpix=64),
        read,
        id="nii-lying-datatype",
    ),
    pytest.param(
        lambda t: _patch_nifti_header(_valid(t, "code.nii"), datatype=999),
        read,
        id="nii-unknown-datatype",
    ),
    pytest.param(
        lambda t: _patch_nifti_header(_valid(t, "neg.nii"), dim=(3, -12, 10, 8, 1, 1, 1, 1)),
        read,
        id="nii-negative-dim",
    ),
    pytest.param(
        lambda t: _patch_nifti_header(
            _valid(t, "huge.nii"), dim=(3, 30000, 30000, 30000, 1, 1, 1, 1)
        ),
        read,
        id="nii-absurd-size",
    ),
    pytest.param(
        lambda t: _gzip(
            _patch_nifti_header(
                _valid(t, "huge.nii", "uint8"), dim=(3, 1000, 1000, 1000, 1, 1, 1, 1)
            )
        ),
        read,
        id="nii.gz-absurd-size",
    ),
    pytest.param(
        lambda t: _gzip(
            _patch_nifti_header(_valid(t, "flat.nii"), srow=(0.0,) * 12, qform_code=0, sform_code=1)
        ),
        read,
        id="nii-zero-voxel-size",
    ),
    # ITK headers that lie
    pytest.param(
        lambda t: _replace_text(
            _valid(t, "huge.mha"), b"DimSize = 12 10 8", b"DimSize = 100000 100000 100000"
        ),
        read,
        id="mha-absurd-size",
    ),
    pytest.param(
        lambda t: _replace_text(
            _itk(t, "big.mha", _image(), compress=False),
            b"DimSize = 12 10 8",
            b"DimSize = 1000 1000 1000",
        ),
        read,
        id="mha-claims-more-than-stored",
    ),
    pytest.param(
        lambda t: _gzip_nrrd_claiming(t, "100000 100000 100000"), read, id="nrrd-absurd-size"
    ),
    pytest.param(
        lambda t: _gzip_nrrd_claiming(t, "1000 1000 1000"), read, id="nrrd-gzip-claims-more"
    ),
    # bad voxel values
    pytest.param(
        lambda t: _nifti(t, "nan.nii.gz", np.full((4, 5, 6), np.nan, np.float32)),
        read,
        id="nan.nii.gz",
    ),
    pytest.param(
        lambda t: write_volume(
            t / "inf.mha", np.where(_image() > 60, np.inf, 0).astype(np.float32), GEOMETRY
        ),
        read,
        id="inf.mha",
    ),
    pytest.param(lambda t: _h5(t, "nan.h5", image=np.full(SHAPE, np.nan)), read, id="nan.h5"),
    # wrong dimensionality or voxel type
    pytest.param(
        lambda t: _nifti(t, "flat.nii.gz", np.zeros((10, 12), np.float32)), read, id="2d.nii.gz"
    ),
    pytest.param(
        lambda t: _nifti(t, "movie.nii.gz", np.zeros((6, 5, 4, 3), np.float32)),
        read,
        id="4d.nii.gz",
    ),
    pytest.param(
        lambda t: _itk(t, "flat.mha", np.zeros((10, 12), np.float32), compress=True),
        read,
        id="2d.mha",
    ),
    pytest.param(
        lambda t: _itk(t, "movie.nrrd", np.zeros((3, 4, 5, 6), np.int16), compress=True),
        read,
        id="4d.nrrd",
    ),
    pytest.param(
        lambda t: _itk(t, "rgb.mha", np.zeros((4, 5, 6, 3), np.uint8), compress=True, vector=True),
        read,
        id="rgb.mha",
    ),
    pytest.param(
        lambda t: _nifti(t, "complex.nii", np.zeros((4, 5, 6), np.complex64)),
        read,
        id="complex.nii",
    ),
    # h5 datasets
    pytest.param(
        lambda t: _h5(t, "nolabel.h5", label=np.zeros(SHAPE)), read, id="h5-missing-image"
    ),
    pytest.param(
        lambda t: _h5(t, "noimage.h5", image=np.zeros(SHAPE)),
        read_label_dataset,
        id="h5-missing-label",
    ),
    pytest.param(
        lambda t: _benchmark_case(t, image=np.zeros(SHAPE)),
        benchmark,
        id="h5-benchmark-missing-label",
    ),
    pytest.param(
        lambda t: _benchmark_case(t, label=np.zeros(SHAPE)),
        benchmark,
        id="h5-benchmark-missing-image",
    ),
    pytest.param(lambda t: _h5(t, "flat.h5", image=np.zeros((10, 12))), read, id="h5-2d"),
    pytest.param(lambda t: _h5(t, "text.h5", image=np.array([b"a", b"b"])), read, id="h5-strings"),
    # folders
    pytest.param(
        lambda t: _dicom_series(_dicom_series(t / "two", "1.2.3.4.1", "a"), "1.2.3.4.2", "b"),
        read,
        id="dicom-two-series",
    ),
    pytest.param(
        lambda t: _dicom_series(t / "gap", "1.2.3.4.5", skip=(2,)), read, id="dicom-missing-slice"
    ),
    pytest.param(lambda t: _folder(t / "nothing"), read, id="empty-folder"),
    pytest.param(lambda t: _folder(t / "junk", {"a.txt": "hi"}), read, id="folder-without-dicom"),
    pytest.param(_symlink_loop, read, id="symlink-loop"),
    pytest.param(lambda t: _non_utf8_name(t, ".mha"), read, id="non-utf8-name.mha"),
    pytest.param(
        lambda t: _truncate(_non_utf8_name(t, ".nii.gz")), read, id="non-utf8-name-truncated.nii.gz"
    ),
    pytest.param(lambda t: _folder(t / "dir.nii.gz"), read, id="folder-named.nii.gz"),
    pytest.param(lambda t: _text(t / "notes.nii.gz", "hello"), read, id="text-named.nii.gz"),
    pytest.param(lambda t: _text(t / "notes.mha", "hello\n"), read, id="text-named.mha"),
    pytest.param(lambda t: _text(t / "photo.png", "PNG"), read, id="unsupported-suffix"),
    pytest.param(lambda t: t / "absent.nii.gz", read, id="missing-file"),
    # label values
    pytest.param(
        lambda t: write_volume(t / "lab7.nii.gz", np.full(SHAPE, 7, np.uint8), GEOMETRY),
        validate_three_classes,
        id="label-out-of-range",
    ),
    pytest.param(
        lambda t: write_volume(t / "labneg.mha", np.full(SHAPE, -1, np.int16), GEOMETRY),
        validate_three_classes,
        id="label-negative",
    ),
    pytest.param(
        lambda t: write_volume(t / "labfrac.nrrd", np.full(SHAPE, 0.5, np.float32), GEOMETRY),
        validate_three_classes,
        id="label-fractional",
    ),
]


@pytest.mark.parametrize(("build", "action"), CORPUS)
def test_malformed_input_raises_one_line_error_naming_the_file(tmp_path, build, action):
    path = build(tmp_path)
    with pytest.raises(SGRSError) as info:
        action(path)
    message = str(info.value)
    assert "\n" not in message
    # The benchmark names the case's h5 file; undecodable name bytes are shown as \xNN.
    shown = (
        "mri_norm2.h5"
        if action is benchmark
        else os.fsencode(path.name).decode("utf-8", "backslashreplace")
    )
    assert shown in message, message


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 30


# --------------------------------------------------------------------------------------
# Property-based: random byte damage never escapes as a foreign exception
# --------------------------------------------------------------------------------------

SEED_FILES = ("seed.nii", "seed.nii.gz", "seed.mha", "seed.nrrd", "seed.h5")


@pytest.fixture(scope="module")
def seed_bytes(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("seeds")
    raw = _itk(folder, "seed_raw.nrrd", _image("int16"), compress=False)
    seeds = {name: _valid(folder, name).read_bytes() for name in SEED_FILES}
    seeds["seed_raw.nrrd"] = raw.read_bytes()
    return seeds


mutation = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
    # Headers are where lies do harm: damage the first 512 bytes half of the time.
    st.tuples(st.just("flip-header"), st.integers(0, 511), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("digit"), st.integers(0, 511), st.sampled_from(b"0123456789")),
)


def _mutate(data: bytes, kind: str, where: float | int, value: int) -> bytes:
    position = (
        int(where * (len(data) - 1)) if isinstance(where, float) else min(where, len(data) - 1)
    )
    if kind == "truncate":
        return data[:position]
    if kind == "insert":
        return data[:position] + bytes([value]) * 3 + data[position:]
    return data[:position] + bytes([value]) + data[position + 1 :]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.sampled_from((*SEED_FILES, "seed_raw.nrrd")), change=mutation)
def test_mutated_files_read_or_raise_sgrs_error(tmp_path, seed_bytes, seed, change):
    path = tmp_path / seed
    path.write_bytes(_mutate(seed_bytes[seed], *change))
    try:
        volume = read_volume(path)
    except SGRSError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(volume, Volume)
    assert volume.array.ndim == 3
    assert np.all(np.isfinite(volume.array))
