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


# --------------------------------------------------------------------------------------
# Headers whose data files lie elsewhere, files that declare more than they hold, hostile
# checkpoints. Each would be read (or built) without its guard: the escaping headers point at
# readable bytes, so only the containment rule refuses them.
# --------------------------------------------------------------------------------------

OUTSIDE = Path(__file__)  # a file outside every test folder, only ever read
TEXT_SHAPE = "4 3 2"  # 4 x 3 x 2 uint8 = 24 bytes, in slices of 12


def _slices(tmp: Path) -> None:
    (tmp / "d.raw").write_bytes(bytes(range(24)))
    (tmp / "s0.raw").write_bytes(bytes(range(12)))
    (tmp / "s1.raw").write_bytes(bytes(range(12, 24)))


def _up(tmp: Path, name: str) -> str:
    """A name leaving ``tmp`` through '..' and coming back: the data is there, the path escapes."""
    return f"../{tmp.name}/{name}"


def _nhdr(tmp: Path, data_file: str, *following: str) -> Path:
    _slices(tmp)
    path = tmp / "detached.nhdr"
    path.write_text(
        f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: {TEXT_SHAPE}\nencoding: raw\n"
        f"data file: {data_file}\n" + "".join(line + "\n" for line in following)
    )
    return path


def _mhd(tmp: Path, data_file: str, *following: str, suffix: str = ".mhd") -> Path:
    _slices(tmp)
    path = tmp / f"detached{suffix}"
    path.write_text(
        f"ObjectType = Image\nNDims = 3\nDimSize = {TEXT_SHAPE}\nElementType = MET_UCHAR\n"
        f"ElementDataFile = {data_file}\n" + "".join(line + "\n" for line in following)
    )
    return path


def _link_out(tmp: Path) -> str:
    link = tmp / "link.raw"
    try:
        os.symlink(OUTSIDE, link)
    except OSError:
        pytest.skip("symlinks are not available here")
    return link.name


def _h5_declaring(tmp: Path, name: str, **options: object) -> Path:
    """An h5 whose dataset declares 64 MiB and stores nothing (HDF5 would hand out fill values)."""
    path = tmp / name
    with h5py.File(path, "w") as f:
        f.create_dataset("image", shape=(256, 256, 256), dtype="f4", **options)
    return path


def _h5_external_raw(tmp: Path) -> Path:
    _slices(tmp)
    path = tmp / "external.h5"
    with h5py.File(path, "w") as f:
        external = [(str(tmp / "d.raw"), 0, 24)]
        f.create_dataset("image", shape=(2, 3, 4), dtype="u1", external=external)
    return path


def _h5_elsewhere(tmp: Path, kind: str) -> Path:
    source = tmp / ".source.h5"  # hidden: not a case of an --images folder
    with h5py.File(source, "w") as f:
        f["image"] = _image()
    path = tmp / f"{kind}.h5"
    with h5py.File(path, "w") as f:
        if kind == "external-link":
            f["image"] = h5py.ExternalLink(source.name, "image")
        else:
            layout = h5py.VirtualLayout(shape=SHAPE, dtype="f4")
            layout[:] = h5py.VirtualSource(source.name, "image", shape=SHAPE)
            f.create_virtual_dataset("image", layout)
    return path


def _xforms(tmp: Path, name: str, qform_shift: tuple[float, ...], qform_zoom: float) -> Path:
    """A NIfTI whose sform (1 mm voxels) and qform (both code 1) place the voxels differently."""
    sform = np.diag([1.0, 1.0, 1.0, 1.0])
    qform = np.diag([qform_zoom, qform_zoom, qform_zoom, 1.0])
    qform[:3, 3] = qform_shift
    image = nib.Nifti1Image(_image(), sform)
    image.set_sform(sform, code=1)
    image.set_qform(qform, code=1)
    nib.save(image, tmp / name)
    return tmp / name


def _nifti_extension_claiming(tmp: Path) -> Path:
    """A .nii.gz with a 16-byte extension slot whose extension claims the rest of the file:
    nibabel would inflate the whole stream (gigabytes, in a bigger file) as header."""
    image = nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4))
    image.header.extensions.append(nib.nifti1.Nifti1Extension(0, b"x" * 8))
    raw = tmp / "ext.nii"
    nib.save(image, raw)
    data = bytearray(raw.read_bytes())
    assert struct.unpack_from("<f", data, 108)[0] == 368.0  # 352 + one 16-byte extension
    struct.pack_into("<i", data, 352, len(data) - 352)
    raw.write_bytes(bytes(data))
    return _gzip(raw)


def _checkpoint(tmp: Path, change=None, *, meta: dict | None = None) -> Path:
    """A checkpoint of a 1-filter V-Net (190 kB); ``change(tensors)`` tampers with its weights."""
    import torch

    from napari_sgrs.core.checkpoint import save_checkpoint
    from napari_sgrs.core.vnet import VNet

    torch.manual_seed(0)
    net = VNet(1, 2, 1)
    tensors = {f"student.{k}": v for k, v in net.state_dict().items()}
    tensors["partner.image"] = torch.zeros(16, 16, 16)
    if change is not None:
        change(tensors)
    settings = {"config": {"base_filters": 1, "patch_size": [16, 16, 16]}, "num_classes": 2}
    for key, value in (meta or {}).items():
        (settings["config"] if key in ("base_filters", "patch_size") else settings)[key] = value
    path = tmp / "hostile.safetensors"
    save_checkpoint(path, tensors, settings)
    return path


def _head(filters: int):
    """Only the head agrees with the metadata's filters: it passed the old check."""
    import torch

    def change(tensors):
        tensors["student.head.weight"] = torch.zeros(2, filters, 1, 1, 1)

    return change


def _set(name: str, *shape: int):
    """Replace (or add) tensor ``name`` by zeros of ``shape``."""
    import torch

    def change(tensors):
        tensors[name] = torch.zeros(*shape)

    return change


def _drop(name: str):
    def change(tensors):
        del tensors[name]

    return change


def _list_cases(listing: Path, *cases: str) -> Path:
    listing.write_text("".join(case + "\n" for case in cases))
    return listing


def load_ckpt(path: Path) -> object:
    from napari_sgrs.core.checkpoint import load_checkpoint

    return load_checkpoint(path)


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
    # data files outside the header's folder: absolute, through '..', a link out, a LIST, a pattern
    pytest.param(lambda t: _nhdr(t, str(t / "d.raw")), read, id="nhdr-data-file-absolute"),
    pytest.param(lambda t: _nhdr(t, _up(t, "d.raw")), read, id="nhdr-data-file-dotdot"),
    pytest.param(lambda t: _nhdr(t, _link_out(t)), read, id="nhdr-data-file-link-out"),
    pytest.param(
        lambda t: _nhdr(t, "LIST", "s0.raw", _up(t, "s1.raw")), read, id="nhdr-list-dotdot"
    ),
    pytest.param(lambda t: _nhdr(t, "LIST", "s0.raw", str(OUTSIDE)), read, id="nhdr-list-absolute"),
    pytest.param(lambda t: _nhdr(t, _up(t, "s%d.raw") + " 0 1 1"), read, id="nhdr-pattern-dotdot"),
    pytest.param(lambda t: _mhd(t, str(t / "d.raw")), read, id="mhd-data-file-absolute"),
    pytest.param(lambda t: _mhd(t, _up(t, "d.raw")), read, id="mhd-data-file-dotdot"),
    pytest.param(lambda t: _mhd(t, _link_out(t)), read, id="mhd-data-file-link-out"),
    pytest.param(lambda t: _mhd(t, "LIST", "s0.raw", _up(t, "s1.raw")), read, id="mhd-list-dotdot"),
    pytest.param(lambda t: _mhd(t, _up(t, "s%d.raw") + " 0 1 1"), read, id="mhd-pattern-dotdot"),
    pytest.param(
        lambda t: _mhd(t, str(t / "d.raw"), suffix=".mha"), read, id="mha-data-file-absolute"
    ),
    # h5 voxels from elsewhere, or declared and never stored
    pytest.param(_h5_external_raw, read, id="h5-external-raw-storage"),
    pytest.param(lambda t: _h5_elsewhere(t, "external-link"), read, id="h5-external-link"),
    pytest.param(lambda t: _h5_elsewhere(t, "virtual"), read, id="h5-virtual-dataset"),
    pytest.param(
        lambda t: _h5_declaring(t, "chunked.h5", chunks=(64, 64, 64), compression="gzip"),
        read,
        id="h5-chunked-declares-64MiB-stores-none",
    ),
    pytest.param(
        lambda t: _h5_declaring(t, "contiguous.h5"), read, id="h5-contiguous-declares-64MiB"
    ),
    # NIfTI geometry that tools read differently; an extension bigger than its slot
    pytest.param(
        lambda t: _xforms(t, "moved.nii", (5.0, -6.0, 7.0), 1.0), read, id="nii-qform-moved"
    ),
    pytest.param(
        lambda t: _xforms(t, "zoomed.nii.gz", (0.0, 0.0, 0.0), 2.0), read, id="nii.gz-qform-zoomed"
    ),
    pytest.param(_nifti_extension_claiming, read, id="nii.gz-extension-claims-more"),
    # checkpoints whose metadata or weights lie
    pytest.param(
        lambda t: _checkpoint(t, _head(1024), meta={"base_filters": 1024}),
        load_ckpt,
        id="ckpt-1024-filters",
    ),
    pytest.param(
        lambda t: _checkpoint(t, _head(200), meta={"base_filters": 200}),
        load_ckpt,
        id="ckpt-200-filters-small-weights",
    ),
    pytest.param(
        lambda t: _checkpoint(t, _set("student.enc1.0.weight", 9, 1, 3, 3, 3)),
        load_ckpt,
        id="ckpt-weight-shape",
    ),
    pytest.param(
        lambda t: _checkpoint(t, _set("student.extra", 3)),
        load_ckpt,
        id="ckpt-unknown-weight",
    ),
    pytest.param(
        lambda t: _checkpoint(t, _drop("student.enc1.0.bias")), load_ckpt, id="ckpt-missing-weight"
    ),
    pytest.param(
        lambda t: _checkpoint(t, _set("optim.momentum.0", 1000)),
        load_ckpt,
        id="ckpt-momentum-shape",
    ),
    pytest.param(
        lambda t: _checkpoint(t, _set("partner.image", 16, 16)),
        load_ckpt,
        id="ckpt-partner-shape",
    ),
    pytest.param(
        lambda t: _checkpoint(t, _set("rng.torch", 4, 4)),
        load_ckpt,
        id="ckpt-rng-state",
    ),
    pytest.param(lambda t: _checkpoint(t, meta={"tau": "high"}), load_ckpt, id="ckpt-text-tau"),
    # a benchmark case list naming files outside its root
    pytest.param(
        lambda t: _list_cases(_benchmark_case(t, image=_image(), label=_image()), _up(t, "case1")),
        benchmark,
        id="h5-benchmark-case-dotdot",
    ),
    pytest.param(
        lambda t: _list_cases(_benchmark_case(t, image=_image(), label=_image()), str(t / "case1")),
        benchmark,
        id="h5-benchmark-case-absolute",
    ),
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
