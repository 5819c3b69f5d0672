"""Reading and writing 3D medical volumes with their geometry.

Conventions (see ``docs/ARCHITECTURE.md``):

* Arrays are ``(D, H, W)`` = ``(z, y, x)``, the numpy order SimpleITK uses.
* Spacing is in millimetres and, like origin and direction, given in that same array axis
  order, so ``napari`` can take ``scale=geometry.spacing`` and ``translate=geometry.origin``.
* World coordinates are ITK/DICOM LPS millimetres, listed in array axis order (z, y, x).
  NIfTI files (RAS world) are converted on read and back on write; the original NIfTI
  affine is kept so that a NIfTI written back carries the same affine bit for bit.

Every public function raises :class:`~napari_sgrs.core.errors.InputError` (or
:class:`~napari_sgrs.core.errors.ResourceError` for unwritable outputs) with a one-line
message naming the file and the fix; no nibabel, SimpleITK, h5py or OS error escapes.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_sgrs.core.errors import InputError, ResourceError, SGRSError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "WRITABLE_SUFFIXES",
    "Case",
    "Geometry",
    "Volume",
    "check_pair",
    "find_cases",
    "is_supported",
    "read_h5_benchmark",
    "read_volume",
    "validate_label",
    "write_volume",
]

#: File endings read by :func:`read_volume` (lower case; a folder is read as a DICOM series).
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".nii.gz",
    ".nii",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".h5",
    ".hdf5",
)
#: File endings written by :func:`write_volume`.
WRITABLE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".h5", ".hdf5")

_FORMAT_OF_SUFFIX = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "mha",
    ".mhd": "mhd",
    ".h5": "h5",
    ".hdf5": "h5",
}

#: Largest volume accepted, in voxels. Larger headers are refused before any allocation.
MAX_VOXELS = 2**31
# zlib/gzip cannot compress better than about 1032:1, so a deflated payload claiming more
# than this many bytes per stored byte is a lying or truncated header.
_MAX_DEFLATE_RATIO = 1100
_DEFLATE_SLACK_BYTES = 1 << 16
_READABLE_HINT = "NIfTI, NRRD, MHA/MHD, DICOM folder or h5"
#: What ``read_volume(..., nan=...)`` accepts.
NAN_POLICIES = ("refuse", "keep")
# A header may spread its voxels over one file per slice; no volume has more slices than this.
_MAX_DATA_FILES = 1 << 16
# sform and qform are float32 (the qform a quaternion): copies of one affine differ by ~1e-6.
_XFORM_ATOL = 1e-3
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------------------
# Geometry and volumes
# --------------------------------------------------------------------------------------


def _float_tuple(values: Any, length: int, what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in np.asarray(values, dtype=np.float64).ravel())
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid geometry: {what} {values!r} is not a list of numbers") from exc
    if len(out) != length or not all(math.isfinite(v) for v in out):
        raise InputError(
            f"invalid geometry: {what} must be {length} finite numbers, got {values!r}"
        )
    return out


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a ``(D, H, W)`` array sit in the world.

    Attributes:
        spacing: voxel size in mm, array axis order (D, H, W) = (z, y, x).
        origin: world position (LPS, mm) of voxel (0, 0, 0), listed in array axis order.
        direction: 3x3 row-major matrix; column ``a`` is the world direction (LPS, listed in
            array axis order) of array axis ``a``.
        affine_ras: the original NIfTI affine (4x4 nested tuples, voxel (i, j, k) -> RAS mm)
            when read from NIfTI, else None. Writing NIfTI reuses it verbatim.
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    affine_ras: tuple | None = None

    def __post_init__(self) -> None:
        # Normalise lists/arrays to float tuples so instances hash, compare and serialise.
        spacing = _float_tuple(self.spacing, 3, "spacing")
        if not all(s > 0 for s in spacing):
            raise InputError(f"invalid geometry: spacing must be positive, got {spacing}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", _float_tuple(self.origin, 3, "origin"))
        object.__setattr__(self, "direction", _float_tuple(self.direction, 9, "direction"))
        # Each array axis needs a unit world direction (a sheared but unit-column direction, as
        # from a gantry-tilted CT, is fine); anything else puts the voxels somewhere the spacing
        # does not say, and writers would place the prediction on another grid.
        matrix = np.asarray(self.direction).reshape(3, 3)
        norms = np.linalg.norm(matrix, axis=0)
        if not np.allclose(norms, 1.0, atol=1e-3) or abs(np.linalg.det(matrix)) < 1e-3:
            raise InputError(
                f"invalid geometry: the direction matrix {tuple(round(v, 4) for v in self.direction)}"
                " is not made of unit axis directions (or is degenerate) - the header's direction /"
                " TransformMatrix is corrupt; fix it to a rotation"
            )
        if self.affine_ras is not None:
            flat = _float_tuple(self.affine_ras, 16, "affine_ras")
            object.__setattr__(
                self, "affine_ras", tuple(tuple(flat[4 * r : 4 * r + 4]) for r in range(4))
            )

    @classmethod
    def identity(cls) -> Geometry:
        """Unit spacing (1 mm), zero origin, identity direction."""
        return cls((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))

    def direction_matrix(self) -> np.ndarray:
        """The 3x3 direction matrix (columns = array axes, rows = world axes in array order)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def affine(self) -> np.ndarray:
        """4x4 matrix mapping an array index ``(d, h, w, 1)`` to world LPS mm in array order."""
        out = np.eye(4)
        out[:3, :3] = self.direction_matrix() @ np.diag(self.spacing)
        out[:3, 3] = self.origin
        return out

    def to_json(self) -> dict:
        """A JSON-serialisable dict; :meth:`from_json` reverses it."""
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "affine_ras": None if self.affine_ras is None else [list(r) for r in self.affine_ras],
        }

    @classmethod
    def from_json(cls, d: dict) -> Geometry:
        """Rebuild a Geometry from :meth:`to_json` output; InputError if fields are missing."""
        try:
            return cls(d["spacing"], d["origin"], d["direction"], d.get("affine_ras"))
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(
                f"invalid geometry {d!r}: expected keys spacing, origin, direction"
            ) from exc

    # ITK lists spacing/origin/direction in (x, y, z) order; ours is the reverse (z, y, x).
    @classmethod
    def _from_itk(cls, spacing: Any, origin: Any, direction: Any) -> Geometry:
        dim = len(spacing)
        dmat = np.asarray(direction, dtype=np.float64).reshape(dim, dim)[:3, :3]
        return cls(
            tuple(spacing[:3])[::-1], tuple(origin[:3])[::-1], tuple(dmat[::-1, ::-1].ravel())
        )

    def _to_itk(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        dmat = self.direction_matrix()[::-1, ::-1]
        return self.spacing[::-1], self.origin[::-1], tuple(dmat.ravel())

    @classmethod
    def _from_nifti_affine(cls, affine: np.ndarray) -> Geometry:
        """Derive LPS geometry from a NIfTI affine (voxel (i, j, k) -> RAS)."""
        affine = np.asarray(affine, dtype=np.float64)
        matrix_lps = _LPS_FROM_RAS @ affine[:3, :3]  # columns = i, j, k
        spacing_ijk = np.linalg.norm(matrix_lps, axis=0)
        if not np.all(np.isfinite(affine)) or np.any(spacing_ijk <= 0):
            raise InputError("the NIfTI affine is degenerate (zero or non-finite voxel size)")
        direction_ijk = matrix_lps / spacing_ijk
        origin_lps = _LPS_FROM_RAS @ affine[:3, 3]
        # Array axes are (k, j, i): reverse the spacing and both axes of the direction.
        return cls(
            tuple(spacing_ijk[::-1]),
            tuple(origin_lps[::-1]),
            tuple(direction_ijk[::-1, ::-1].ravel()),
            tuple(tuple(r) for r in affine),
        )

    def nifti_affine(self) -> np.ndarray:
        """The 4x4 NIfTI affine (voxel (i, j, k) = (w, h, d) -> RAS mm).

        The stored ``affine_ras`` when there is one, else built from spacing/origin/direction.
        """
        if self.affine_ras is not None:
            return np.asarray(self.affine_ras, dtype=np.float64)
        spacing, origin, direction = self._to_itk()
        out = np.eye(4)
        out[:3, :3] = _LPS_FROM_RAS @ np.asarray(direction).reshape(3, 3) @ np.diag(spacing)
        out[:3, 3] = _LPS_FROM_RAS @ np.asarray(origin)
        return out

    def close_to(self, other: Geometry, atol: float = 1e-3) -> bool:
        """True if spacing, origin and direction agree within ``atol`` (mm / unitless)."""
        return (
            np.allclose(self.spacing, other.spacing, rtol=0, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0, atol=atol)
        )


@dataclass
class Volume:
    """A 3D scalar image or label map.

    Attributes:
        array: voxels, shape ``(D, H, W)`` = ``(z, y, x)``.
        geometry: spacing/origin/direction in the same axis order.
        path: the file or DICOM folder it was read from (None if made in memory).
        format: ``"nifti" | "nrrd" | "mha" | "mhd" | "dicom" | "h5"``.
    """

    array: np.ndarray
    geometry: Geometry
    path: Path | None = None
    format: str = ""

    @property
    def name(self) -> str:
        """Printable file name for messages (``"<memory>"`` when there is no path)."""
        return _show(self.path) if self.path is not None else "<memory>"


@dataclass(frozen=True)
class Case:
    """One subject: an image and, when labelled, its label.

    For h5 files the image is dataset ``image`` and the label dataset ``label`` of the file;
    use :meth:`read_image` / :meth:`read_label`, which pick the right dataset.
    """

    name: str
    image: Path
    label: Path | None = None

    def read_image(self) -> Volume:
        return read_volume(self.image, dataset="image")

    def read_label(self) -> Volume | None:
        return None if self.label is None else read_volume(self.label, dataset="label")


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _show(path: os.PathLike | str) -> str:
    """The path as printable text: undecodable bytes of a non-UTF-8 name become \\xNN."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def _suffix_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:  # ".nii.gz" is listed before ".nii" on purpose
        if name.endswith(suffix):
            return suffix
    return None


def _stem_of(path: Path) -> str:
    suffix = _suffix_of(path)
    return path.name[: -len(suffix)] if suffix else path.name


def is_supported(path: os.PathLike | str) -> bool:
    """True for a file name ending in one of :data:`SUPPORTED_SUFFIXES` or an existing folder."""
    path = Path(path)
    return _suffix_of(path) is not None or path.is_dir()


def _sitk_path(path: Path) -> str:
    # SimpleITK takes UTF-8 strings only; name the problem instead of a SWIG TypeError.
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{_show(path)}: the file name is not valid UTF-8, which SimpleITK cannot open"
            " - rename the file"
        ) from exc
    return text


def _sitk() -> Any:
    """SimpleITK, with ITK's own warning printer off: a user sees our one line, not ITK's."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


_stderr_lock = threading.Lock()
_stderr_users = 0
_stderr_saved: int | None = None


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what C++ libraries print to file descriptor 2 while inside the block.

    MetaIO, NrrdIO and GDCM write some complaints straight to ``std::cerr`` (no ITK switch turns
    them off); the failure itself still reaches us as an exception and becomes one line. Nested
    and concurrent blocks share one redirection, restored when the last one leaves.
    """
    global _stderr_users, _stderr_saved
    with _stderr_lock:
        if _stderr_users == 0:
            try:
                sys.stderr.flush()
                _stderr_saved = os.dup(2)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 2)
                os.close(devnull)
            except (OSError, ValueError, AttributeError):  # no fd 2 (embedded): nothing to silence
                _stderr_saved = None
        _stderr_users += 1
    try:
        yield
    finally:
        with _stderr_lock:
            _stderr_users -= 1
            if _stderr_users == 0 and _stderr_saved is not None:
                os.dup2(_stderr_saved, 2)
                os.close(_stderr_saved)
                _stderr_saved = None


def _check_memory(shape: tuple[int, ...], itemsize: int, name: str) -> None:
    """Refuse a volume whose reading would not fit in the memory free now, before reading it.

    Reading holds the file's voxels and one reordered copy (``itemsize`` bytes each); training
    and prediction then make two float32 copies (normalised, padded). ``itemsize`` is that of
    the largest array the reader makes (e.g. float64 for scaled NIfTI).
    """
    from napari_sgrs.core import memory

    voxels = math.prod(shape)
    need = voxels * (2 * itemsize + 2 * 4)
    free = memory.host_available_bytes()
    if free is None or need <= memory.HEADROOM * free:
        return
    raise ResourceError(
        f"{name}: this {'x'.join(map(str, shape))} volume needs about {memory._gib(need)} of memory"
        f" to read and normalise but only {memory._gib(free)} is free - crop or resample it, or"
        " free memory"
    )


def _outside_folder(folder: Path, entry: str) -> str | None:
    """Why ``entry``, a file name from a header in ``folder``, is not a file of that folder.

    None when it is: a relative name without '..' that, links followed, stays in ``folder``
    (a subfolder is inside). Absolute names are refused even when they point inside: the rule
    must not depend on where the folder is mounted.
    """
    if os.path.isabs(entry) or entry.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", entry):
        return "an absolute path"
    if ".." in re.split(r"[\\/]", entry):
        return "a path through '..'"
    target = folder / entry
    if os.path.lexists(target):
        try:
            inside = target.resolve().is_relative_to(folder.resolve())
        except (OSError, RuntimeError):  # a looping link
            inside = False
        if not inside:
            return "a link to a file elsewhere"
    return None


def _check_dtype(dtype: np.dtype, name: str) -> None:
    if dtype == np.bool_:
        return
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise InputError(
            f"{name}: voxel type {dtype} is not a real number type (e.g. RGB or complex)"
            " - convert it to a scalar integer or float image"
        )


def _check_declared(shape: tuple[int, ...], itemsize: int, name: str) -> tuple[int, int, int]:
    """Validate a header's declared shape before allocating; return it as 3 ints.

    ``shape`` is in the file's own axis order; trailing singleton dimensions (a 4th "time"
    axis of length 1) are dropped.
    """
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(
            f"{name}: volume has shape {shape} ({len(shape)}D); a 3D scalar volume is needed"
            " - export a single 3D volume"
        )
    if min(shape) < 1:
        raise InputError(f"{name}: header declares an empty shape {shape} - the file is corrupt")
    voxels = math.prod(shape)
    if voxels > MAX_VOXELS:
        raise InputError(
            f"{name}: header declares {shape} = {voxels} voxels ({voxels * itemsize / 2**30:.1f}"
            f" GiB), more than the {MAX_VOXELS} supported - the header is corrupt or the volume"
            " must be cropped"
        )
    return shape  # type: ignore[return-value]


def _check_stored_bytes(stored: int, needed: int, encoding: str, name: str) -> None:
    """Refuse a header that claims more data than the file could hold (before allocating)."""
    if encoding == "raw":
        enough = stored >= needed
    elif encoding == "deflate":
        enough = stored * _MAX_DEFLATE_RATIO + _DEFLATE_SLACK_BYTES >= needed
    elif encoding == "ascii":
        enough = stored >= needed  # `needed` is the voxel count: at least one char each
    else:  # e.g. bzip2: no useful bound
        enough = True
    if not enough:
        raise InputError(
            f"{name}: header declares {needed} bytes of voxel data but the file holds only"
            f" {stored} - the file is truncated or its header is corrupt"
        )


def _finish_array(
    array: np.ndarray, shape: tuple[int, int, int], name: str, nan: str = "refuse"
) -> np.ndarray:
    """Reshape to 3D, make bool arrays uint8, and refuse non-finite voxels.

    With ``nan="keep"`` NaN voxels stay (they mark "no data", e.g. outside the field of view
    after resampling); Inf, which marks no such thing, and a volume of NaN only are refused.
    """
    _check_dtype(array.dtype, name)
    if array.size != math.prod(shape):
        raise InputError(f"{name}: read {array.shape} but the header says {shape} - file corrupt")
    array = np.ascontiguousarray(array.reshape(shape))
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad and nan == "refuse":
            raise InputError(f"{name}: {bad} voxels are NaN or Inf - fix or mask them before use")
        if bad:
            infinite = bad - int(np.count_nonzero(np.isnan(array)))
            if infinite:
                raise InputError(
                    f"{name}: {infinite} voxels are Inf (an overflow, not a no-data mark)"
                    " - fix them before use"
                )
            if bad == array.size:
                raise InputError(f"{name}: every voxel is NaN - the volume holds no data")
    return array


# --------------------------------------------------------------------------------------
# Readers (each returns a (D, H, W) array and its Geometry)
# --------------------------------------------------------------------------------------


def _nifti_extensions_end(path: Path, name: str, gz: bool, bound: int) -> int:
    """Walk the NIfTI header extensions before nibabel does; return the voxel data offset.

    nibabel reads each extension whole at the size the extension claims, and from a gzip
    stream that is as much as the stream inflates to: a small file could make it decompress
    gigabytes before any check. Here every claimed size must fit before the voxel offset, and
    that offset within what the file can hold (``bound`` bytes).
    """
    import gzip
    import struct

    with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
        head = f.read(544)
        for order in "<>":
            if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] in (348, 540):
                break
        else:
            return 0  # not a NIfTI header: nibabel names the problem
        if struct.unpack(order + "i", head[:4])[0] == 348:
            offset, ext_at = struct.unpack(order + "f", head[108:112])[0], 348
        else:
            offset, ext_at = struct.unpack(order + "q", head[168:176])[0], 540
        if not (math.isfinite(offset) and 0 <= offset <= bound):
            raise InputError(
                f"{name}: header puts the voxel data at byte {offset:.0f}, beyond what the file"
                " holds - the header is corrupt"
            )
        offset = int(offset)
        if len(head) < ext_at + 4 or head[ext_at] == 0:
            return offset
        position = ext_at + 4
        f.seek(position)
        left = offset - position
        while left >= 16:  # nibabel's loop condition
            start = f.read(8)
            if len(start) < 8:
                break  # nibabel reports the short header
            size = struct.unpack(order + "i", start[:4])[0]
            if not 8 <= size <= left:
                raise InputError(
                    f"{name}: a header extension claims {size} bytes where {left} are left"
                    " before the voxel data - the header is corrupt"
                )
            f.seek(size - 8, 1)
            left -= size
    return offset


def _xforms_agree(header: Any) -> bool:
    """False when a NIfTI header's sform and qform are both set and place voxels differently."""
    if int(header["sform_code"]) <= 0 or int(header["qform_code"]) <= 0:
        return True
    return np.allclose(header.get_sform()[:3], header.get_qform()[:3], rtol=0, atol=_XFORM_ATOL)


def _check_xforms(header: Any, name: str) -> None:
    """Refuse a NIfTI whose sform and qform are both set and disagree.

    nibabel uses the sform. ITK (SimpleITK 2.5, tests/core/test_io_bounds.py) takes the voxel
    size from pixdim, which belongs to the qform, and the origin from the sform or the qform
    depending on the two codes. No single choice of ours agrees with every ITK-based tool, so
    the file is refused rather than read with a geometry that another tool would not show.
    """
    if _xforms_agree(header):
        return
    sform, qform = header.get_sform(), header.get_qform()

    def described(affine: np.ndarray) -> str:
        size = np.linalg.norm(affine[:3, :3], axis=0)
        return (
            f"voxel size {tuple(float(f'{v:.4g}') for v in size)} mm, origin"
            f" {tuple(float(f'{v:.4g}') for v in affine[:3, 3])}"
        )

    raise InputError(
        f"{name}: its sform ({described(sform)}) and qform ({described(qform)}) disagree, so"
        " tools would place it differently - make them equal, e.g. with nibabel:"
        " img.set_qform(img.get_sform()); img.to_filename(path)"
    )


@contextlib.contextmanager
def _nibabel_quiet() -> Iterator[None]:
    """Keep nibabel's header-fix log lines ("data code 999 not recognized ...") off stderr: our
    error, or the volume, is what the user gets. (nibabel's LoggingOutputSuppressor removes the
    handlers, and Python's last-resort handler then prints the same lines.)"""
    from nibabel.imageglobals import logger

    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _read_nifti(path: Path, name: str, dataset: str, nan: str) -> tuple[np.ndarray, Geometry]:
    import nibabel as nib

    gz = path.name.lower().endswith(".gz")
    stored = path.stat().st_size
    data_at = _nifti_extensions_end(
        path, name, gz, stored * _MAX_DEFLATE_RATIO + _DEFLATE_SLACK_BYTES if gz else stored
    )
    # mmap=False: a memory map would keep the file open (Windows cannot replace it) and
    # make later reads fail lazily, outside our error handling.
    with _nibabel_quiet():
        img = nib.load(os.fspath(path), mmap=False)
    header = img.header
    dtype = header.get_data_dtype()
    _check_dtype(dtype, name)
    shape_ijk = _check_declared(img.shape, dtype.itemsize, name)
    needed = math.prod(shape_ijk) * dtype.itemsize
    if gz:
        _check_stored_bytes(stored, data_at + needed, "deflate", name)
    else:
        offset = max(int(header.get_data_offset()), int(header.sizeof_hdr))
        _check_stored_bytes(stored - offset, needed, "raw", name)
    _check_xforms(header, name)
    geometry = Geometry._from_nifti_affine(img.affine)
    # nibabel applies scl_slope/scl_inter in float64.
    scaled = getattr(img.dataobj, "slope", 1.0) != 1.0 or getattr(img.dataobj, "inter", 0.0) != 0.0
    _check_memory(shape_ijk, 8 if scaled else max(dtype.itemsize, 1), name)
    with _nibabel_quiet():
        data = np.asanyarray(img.dataobj)
    if isinstance(data, np.memmap):  # belt and braces: never hand out a file-backed array
        data = np.array(data)
    data = np.asarray(data).reshape(shape_ijk)
    # nibabel's axes are (i, j, k) = (x, y, z); ours are (z, y, x).
    shape_kji = shape_ijk[::-1]
    return _finish_array(data.transpose(2, 1, 0), shape_kji, name, nan), geometry


# Bytes per voxel of the MetaImage / NRRD type names (a lower bound where the platform decides).
_META_ITEMSIZE = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
    "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip
_NRRD_ITEMSIZE = {
    **dict.fromkeys(
        ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1
    ),
    **dict.fromkeys(
        ("short", "short int", "signed short", "signed short int", "int16", "int16_t",
         "ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2
    ),
    **dict.fromkeys(
        ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32",
         "uint32_t", "float"), 4
    ),
    **dict.fromkeys(
        ("longlong", "long long", "long long int", "signed long long", "signed long long int",
         "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int",
         "uint64", "uint64_t", "double"), 8
    ),
}  # fmt: skip
_NRRD_ENCODING = {
    "raw": "raw", "gzip": "deflate", "gz": "deflate", "ascii": "ascii", "text": "ascii",
    "txt": "ascii", "hex": "ascii", "bzip2": "other", "bz2": "other",
}  # fmt: skip
_HEADER_LIMIT = 1 << 20  # text headers are a few kB; more means this is not a header


@dataclass(frozen=True)
class _TextHeader:
    """What a MetaImage/NRRD text header declares, parsed without ITK."""

    shape: tuple[int, ...]  # file axis order (x, y, z, ...)
    itemsize: int
    channels: int
    encoding: str  # "raw" | "deflate" | "ascii" | "other"
    stored: int  # bytes available for voxel data, summed over its data files


def _header_lines(path: Path) -> tuple[list[tuple[str, int]], bytes, str | None]:
    """The text header at the start of ``path``: its lines, each with the byte offset after it;
    the bytes read; and the unterminated last line when the whole file was read (else None)."""
    with open(path, "rb") as f:
        head = f.read(_HEADER_LIMIT + 1)
    whole = len(head) <= _HEADER_LIMIT
    head = head[:_HEADER_LIMIT]
    lines, pos = [], 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        if end < 0:
            break  # an unterminated last line: the header is cut short, or a list ends there
        lines.append((head[pos:end].decode("latin-1").strip(), end + 1))
        pos = end + 1
    return lines, head, head[pos:].decode("latin-1").strip() if whole else None


def _ints(text: str, what: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split())
    except ValueError as exc:
        raise InputError(
            f"{name}: header field {what} = '{text[:40]}' is not whole numbers"
        ) from exc


def _file_pattern(words: list[str], name: str) -> list[str] | None:
    """The names of a ``<format> <first> <last> <step> [<subdim>]`` data-file pattern (one file
    per slice, ``format % i``), or None when ``words`` is not one."""
    if len(words) not in (4, 5) or "%" not in words[0]:
        return None
    try:
        first, last, step = (int(w) for w in words[1:4])
    except ValueError:
        return None
    if step == 0:
        raise InputError(
            f"{name}: the header's data file pattern has step 0 - the header is corrupt"
        )
    numbers = range(first, last + (1 if step > 0 else -1), step)
    if len(numbers) > _MAX_DATA_FILES:
        raise InputError(
            f"{name}: the header's data file pattern names {len(numbers)} files - the header is"
            " corrupt"
        )
    try:
        return [words[0] % i for i in numbers]
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{name}: the header's data file pattern '{words[0]}' is not a printf number"
            " format - the header is corrupt"
        ) from exc


def _data_files(path: Path, value: str, following: list[str] | None) -> list[Path] | None:
    """The files that a header's data-file field names, each checked to lie in the header's
    folder before anything opens it; None when the voxels follow the header in its own file.

    ``value`` is NRRD's ``data file`` or MetaImage's ``ElementDataFile``; ``following`` the
    header lines after it, which name the files of a ``LIST`` (None: the header was too long to
    read whole). The value is checked every way ITK might read it: as one name, word by word,
    and as a ``<format> <first> <last> <step>`` pattern of names.
    """
    name = _show(path)

    def check(entry: str) -> None:
        # MetaIO overruns a buffer on a long or binary data-file name (a damaged header line):
        # only plain, printable names of sane length reach ITK.
        if len(entry) > 255 or not entry.isprintable():
            raise InputError(
                f"{name}: the header's data file name is not text - the header is corrupt"
            )
        why = _outside_folder(path.parent, entry)
        if why:
            raise InputError(
                f"{name}: its data file '{entry}' is {why}; no file outside the header's folder is"
                " read - put the data file in that folder and name it relative to the header"
            )

    check(value)
    words = value.split()
    if value.upper() in ("LOCAL", ""):
        return None
    if words[0].upper() == "LIST":
        if following is None:
            raise InputError(
                f"{name}: the header's list of data files is too long - the header is corrupt"
            )
        files = [line for line in following if line]
        if len(files) > _MAX_DATA_FILES:
            raise InputError(
                f"{name}: the header lists {len(files)} data files - the header is corrupt"
            )
    else:
        files = _file_pattern(words, name) or [value]
    for entry in (*words, *files):
        check(entry)
    for entry in files:
        for word in entry.split():
            check(word)
    return [path.parent / entry for entry in files]


def _stored_bytes(path: Path, files: list[Path] | None, header_end: int, skip: int) -> int:
    """Bytes available for voxel data: after the header, or in the (already checked) data files."""
    if files is None:
        return path.stat().st_size - header_end
    total = 0
    for file in files:
        if not file.is_file():
            raise InputError(
                f"{_show(path)}: its data file {_show(file.relative_to(path.parent))} is missing"
                " - copy it next to the header"
            )
        total += file.stat().st_size - max(skip, 0)
    return total


def _meta_header(path: Path, name: str) -> _TextHeader:
    """Parse and sanity-check a MetaImage (.mha/.mhd) header."""
    lines, _, tail = _header_lines(path)
    fields: dict[str, str] = {}
    header_end = None
    for index, (line, end) in enumerate(lines):
        key, _, value = line.partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":  # always the last field
            header_end = end
            following = None if tail is None else [text for text, _ in lines[index + 1 :]] + [tail]
            break
    if header_end is None:
        raise InputError(
            f"{name}: MetaImage header is incomplete (no ElementDataFile line) - the file is"
            " truncated or not a MetaImage"
        )
    ndims = _ints(fields.get("NDims", ""), "NDims", name)
    shape = _ints(fields.get("DimSize", ""), "DimSize", name)
    if len(ndims) != 1 or len(shape) != ndims[0]:
        raise InputError(f"{name}: MetaImage NDims and DimSize disagree - the header is corrupt")
    element = fields.get("ElementType", "")
    if element not in _META_ITEMSIZE:
        raise InputError(
            f"{name}: MetaImage ElementType '{element[:30]}' is not a scalar number type"
            " - export a scalar volume"
        )
    channels = _ints(fields.get("ElementNumberOfChannels", "1"), "ElementNumberOfChannels", name)
    skip = _ints(fields.get("HeaderSize", "0"), "HeaderSize", name)
    compressed = fields.get("CompressedData", "False").lower() in ("true", "1")
    files = _data_files(path, fields["ElementDataFile"], following)
    return _TextHeader(
        shape=shape,
        itemsize=_META_ITEMSIZE[element],
        channels=channels[0] if channels else 1,
        encoding="deflate" if compressed else "raw",
        stored=_stored_bytes(path, files, header_end, skip[0] if skip else 0),
    )


def _nrrd_header(path: Path, name: str) -> _TextHeader:
    """Parse and sanity-check a NRRD (.nrrd/.nhdr) header."""
    lines, head, tail = _header_lines(path)
    if not head.startswith(b"NRRD000"):
        raise InputError(f"{name}: does not start with the NRRD magic 'NRRD000x' - not a NRRD file")
    fields: dict[str, str] = {}
    header_end = None
    following: list[str] | None = []
    for index, (line, end) in enumerate(lines[1:], start=1):
        if not line:
            header_end = end
            break
        if line.startswith("#") or ":=" in line:  # comments and key/value pairs
            continue
        key, _, value = line.partition(":")
        key = key.strip().lower().replace(" ", "")
        fields[key] = value.strip()
        if key == "datafile" and value.split()[:1] in (["LIST"], ["list"]):
            # The lines after "data file: LIST" name the files, one per line, to the end.
            following = None if tail is None else [text for text, _ in lines[index + 1 :]] + [tail]
            header_end = len(head)
            break
    data_file = fields.get("datafile", "")
    if header_end is None:
        if not data_file:  # attached data must follow a blank line
            raise InputError(f"{name}: NRRD header is incomplete - the file is truncated")
        header_end = len(head)
    dimension = _ints(fields.get("dimension", ""), "dimension", name)
    shape = _ints(fields.get("sizes", ""), "sizes", name)
    if len(dimension) != 1 or len(shape) != dimension[0]:
        raise InputError(f"{name}: NRRD dimension and sizes disagree - the header is corrupt")
    kind = fields.get("type", "").lower()
    if kind not in _NRRD_ITEMSIZE:
        raise InputError(
            f"{name}: NRRD type '{kind[:30]}' is not a scalar number type - export a scalar volume"
        )
    encoding = fields.get("encoding", "").lower()
    if encoding not in _NRRD_ENCODING:
        raise InputError(f"{name}: NRRD encoding '{encoding[:30]}' is not supported")
    skip = _ints(fields.get("byteskip", "0"), "byte skip", name)
    files = _data_files(path, data_file, following) if data_file else None
    return _TextHeader(
        shape=shape,
        itemsize=_NRRD_ITEMSIZE[kind],
        channels=1,
        encoding=_NRRD_ENCODING[encoding],
        stored=_stored_bytes(path, files, header_end, skip[0] if skip else 0),
    )


def _sitk_itemsize(sitk: Any, pixel_id: int) -> int:
    """Bytes per voxel of the array ITK will make (8 where unsure: estimates err high)."""
    sizes = {
        sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2,
        sitk.sitkUInt32: 4, sitk.sitkInt32: 4, sitk.sitkFloat32: 4,
    }  # fmt: skip
    return sizes.get(pixel_id, 8)


def _read_itk_file(path: Path, name: str, fmt: str, nan: str) -> tuple[np.ndarray, Geometry]:
    sitk = _sitk()
    sitk_path = _sitk_path(path)
    # Check the text header in Python before ITK sees it: MetaIO aborts the whole process
    # (heap corruption) on some truncated headers, ITK allocates whatever a header claims, and
    # ITK follows any data-file path, /etc/passwd included.
    header = _meta_header(path, name) if fmt in ("mha", "mhd") else _nrrd_header(path, name)
    if header.channels != 1:
        raise InputError(
            f"{name}: {header.channels} values per voxel; a scalar volume is needed"
            " - export one channel"
        )
    shape = _check_declared(header.shape, header.itemsize, name)
    voxels = math.prod(shape)
    needed = voxels if header.encoding == "ascii" else voxels * header.itemsize
    _check_stored_bytes(header.stored, needed, header.encoding, name)

    with _quiet_native_stderr():
        reader = sitk.ImageFileReader()
        reader.SetFileName(sitk_path)
        reader.ReadImageInformation()
        if reader.GetNumberOfComponents() != 1:
            raise InputError(
                f"{name}: {reader.GetNumberOfComponents()} values per voxel; a scalar volume is"
                " needed - export one channel"
            )
        if _check_declared(reader.GetSize(), header.itemsize, name) != shape:
            raise InputError(
                f"{name}: ITK reads size {reader.GetSize()}, header says {header.shape}"
            )
        _check_memory(shape, max(header.itemsize, _sitk_itemsize(sitk, reader.GetPixelID())), name)
        image = reader.Execute()
    geometry = Geometry._from_itk(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return _finish_array(sitk.GetArrayFromImage(image), shape[::-1], name, nan), geometry


def _check_slice_positions(files: list[str], name: str) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced (e.g. a missing slice)."""
    sitk = _sitk()
    if len(files) < 3:
        return
    positions = []
    for file in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(file)
        reader.ReadImageInformation()
        direction = np.asarray(reader.GetDirection()).reshape(3, 3)
        positions.append(float(np.dot(reader.GetOrigin(), direction[:, 2])))
    gaps = np.diff(np.sort(positions))
    step = float(np.median(gaps))
    if step <= 1e-6:
        raise InputError(
            f"{name}: several DICOM slices share one position - the folder mixes series or"
            " holds duplicates; keep one series per folder"
        )
    worst = int(np.argmax(np.abs(gaps - step)))
    if abs(gaps[worst] - step) > max(0.01 * step, 1e-3):
        raise InputError(
            f"{name}: DICOM slices are not evenly spaced (gap of {gaps[worst]:.4g} mm after slice"
            f" {worst + 1}, expected {step:.4g} mm) - a slice is probably missing;"
            " re-export the complete series"
        )


def _read_dicom(path: Path, name: str, dataset: str, nan: str) -> tuple[np.ndarray, Geometry]:
    sitk = _sitk()
    folder = _sitk_path(path)
    if not any(not p.name.startswith(".") for p in path.iterdir()):
        raise InputError(f"{name}: the folder is empty - point at a DICOM series folder or a file")
    with _quiet_native_stderr():  # GDCM prints to std::cerr on files that are not DICOM
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(folder)
        if len(series) != 1:
            raise InputError(
                f"{name}: folder holds {len(series)} DICOM series; exactly one is needed"
                " - put each series in its own folder"
            )
        files = list(reader.GetGDCMSeriesFileNames(folder, series[0]))
        _check_slice_positions(files, name)
        info = sitk.ImageFileReader()
        info.SetFileName(files[0])
        info.ReadImageInformation()
        if info.GetNumberOfComponents() != 1:
            raise InputError(f"{name}: DICOM slices are colour images; a scalar volume is needed")
        size = info.GetSize()
        # A multi-frame file already holds the whole volume; otherwise one file per slice.
        declared = tuple(size) if len(files) == 1 else (size[0], size[1], len(files))
        _check_memory(
            _check_declared(declared, 8, name), _sitk_itemsize(sitk, info.GetPixelID()), name
        )
        reader.SetFileNames(files)
        image = reader.Execute()
    geometry = Geometry._from_itk(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    shape_xyz = _check_declared(image.GetSize(), 8, name)
    return _finish_array(sitk.GetArrayFromImage(image), shape_xyz[::-1], name, nan), geometry


def _h5_dataset(f: Any, dataset: str, name: str) -> Any:
    """The dataset, refused when its voxels would come from outside the file.

    HDF5 follows external links, external raw storage and virtual-dataset sources to any path
    (relative ones from the working folder): a 1 kB file could read /etc/passwd as an image.
    """
    import h5py

    link = f.get(dataset, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise InputError(
            f"{name}: dataset '{dataset}' links to another file ({link.filename}), which is not"
            " read - copy the data into this file"
        )
    if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
        raise InputError(
            f"{name}: no dataset '{dataset}' (found: {', '.join(sorted(f.keys())) or 'none'})"
            f" - store the volume as dataset '{dataset}'"
        )
    ds = f[dataset]
    if ds.external or ds.is_virtual:
        raise InputError(
            f"{name}: dataset '{dataset}' keeps its voxels in other files, which are not read"
            " - copy the data into this file (e.g. h5repack)"
        )
    return ds


def _read_h5(path: Path, name: str, dataset: str, nan: str) -> tuple[np.ndarray, Geometry]:
    import h5py

    with h5py.File(path, "r") as f:
        ds = _h5_dataset(f, dataset, name)
        _check_dtype(ds.dtype, name)
        shape = _check_declared(ds.shape, ds.dtype.itemsize, name)
        # HDF5 hands out fill values for storage never written, and a deflated chunk can
        # inflate ~1000-fold: compare what is stored with what is declared before reading.
        needed = math.prod(shape) * ds.dtype.itemsize
        layout = "deflate" if ds.chunks is not None else "raw"
        _check_stored_bytes(ds.id.get_storage_size(), needed, layout, name)
        _check_memory(shape, ds.dtype.itemsize, name)
        data = ds[()]
        # Geometry attributes are written by write_volume; benchmark files have none.
        attrs = ds.attrs
        benchmark = "spacing" not in attrs
        if not benchmark:
            affine = attrs.get("affine_ras")
            geometry = Geometry(attrs["spacing"], attrs["origin"], attrs["direction"], affine)
        else:
            geometry = Geometry.identity()
    array = _finish_array(np.asarray(data), shape, name, nan)
    if benchmark:
        # The LA / Pancreas-CT / BraTS2019 files of UA-MT and SSL4MIS store (x, y, z), z the slice
        # axis, and the authors' patches (112 x 112 x 80 on LA), rotation and flips are given in
        # that order. Reversed into our (D, H, W) = (z, y, x), the same patch is (80, 112, 112) and
        # the sampler's H-W plane is their x-y plane (tests/core/test_h5_axes.py).
        array = np.ascontiguousarray(array.transpose(2, 1, 0))
    return array, geometry


_READERS: dict[str, Callable[[Path, str, str, str], tuple[np.ndarray, Geometry]]] = {
    "nifti": _read_nifti,
    "nrrd": lambda p, n, d, nan: _read_itk_file(p, n, "nrrd", nan),
    "mha": lambda p, n, d, nan: _read_itk_file(p, n, "mha", nan),
    "mhd": lambda p, n, d, nan: _read_itk_file(p, n, "mhd", nan),
    "dicom": _read_dicom,
    "h5": _read_h5,
}


def _format_of(path: Path, name: str) -> str:
    if not path.exists():
        if os.path.lexists(path):
            raise InputError(f"{name}: is a broken or looping link - point at the real file")
        raise InputError(f"{name}: no such file or folder - check the path")
    if path.is_dir():
        suffix = _suffix_of(path)
        if suffix is not None:
            raise InputError(f"{name}: is a folder, not a {suffix} file - point at the file itself")
        return "dicom"
    suffix = _suffix_of(path)
    if suffix is None:
        raise InputError(
            f"{name}: unsupported file type - use one of {', '.join(SUPPORTED_SUFFIXES)}"
            " or a DICOM series folder"
        )
    return _FORMAT_OF_SUFFIX[suffix]


def read_volume(
    path: os.PathLike | str, *, dataset: str = "image", nan: str = "refuse"
) -> Volume:
    """Read a 3D scalar volume and its geometry.

    Nothing outside the file is read: a NRRD/MetaImage data file must lie in the header's
    folder (no absolute path, no '..', no link out), an h5 dataset must hold its own voxels.
    Every size a header declares is checked against the file and the free memory first.

    Args:
        path: a ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd``, ``.h5``/``.hdf5``
            file, or a folder holding exactly one DICOM series.
        dataset: the h5 dataset to read (``"image"`` or ``"label"``); ignored otherwise.
        nan: ``"refuse"`` any NaN or Inf voxel, or ``"keep"`` NaN voxels, which mark voxels
            without data (e.g. outside the field of view after resampling). Inf, and a volume
            that is NaN everywhere, are refused either way.

    Returns:
        A :class:`Volume` whose array is ``(D, H, W)`` = ``(z, y, x)`` in the file's dtype
        (bool becomes uint8) and whose geometry is in mm, LPS, array axis order.

    Raises:
        InputError: unreadable, truncated or lying file; a data file outside the header's
            folder; not 3D; non-numeric voxels; NaN/Inf; disagreeing NIfTI sform and qform.
        ResourceError: not enough memory to hold the volume (checked before reading).
    """
    path = Path(path)
    name = _show(path)
    if nan not in NAN_POLICIES:
        raise ValueError(f"nan must be one of {NAN_POLICIES}, got {nan!r}")  # a programming error
    try:
        fmt = _format_of(path, name)
        array, geometry = _READERS[fmt](path, name, dataset, nan)
    except SGRSError as exc:
        if name in str(exc):
            raise
        # Geometry validation does not know the file; add it.
        raise type(exc)(f"{name}: {exc}") from exc
    except MemoryError as exc:
        raise ResourceError(f"{name}: not enough memory to read this volume") from exc
    except Exception as exc:  # noqa: BLE001
        # nibabel, SimpleITK, h5py, gzip, zlib and struct all raise their own types on
        # corrupt input; the caller gets one typed, one-line error instead.
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise InputError(
            f"{name}: not a readable image ({_READABLE_HINT}; {reason}) - check the file is"
            " complete and of the type its name says"
        ) from exc
    return Volume(array=array, geometry=geometry, path=path, format=fmt)


# --------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------


def _write_nifti(target: Path, array: np.ndarray, geometry: Geometry, dataset: str) -> None:
    import nibabel as nib

    affine = geometry.nifti_affine()
    # Explicit dtype: nibabel refuses int64 otherwise, and we promise the input's dtype.
    image = nib.Nifti1Image(array.transpose(2, 1, 0), affine, dtype=array.dtype)
    header = image.header
    header.set_xyzt_units("mm")
    # The sform is stored as float32: when the affine is float32-exact it round-trips bit for
    # bit. Otherwise (an affine that came from a qform) store it as the qform only, which
    # reproduces a qform-derived affine exactly.
    header.set_sform(affine, code="scanner")
    header.set_qform(affine, code="scanner")
    if not np.array_equal(header.get_best_affine(), affine):
        header.set_sform(None, code="unknown")
        if not np.array_equal(header.get_best_affine(), affine):
            header.set_sform(affine, code="scanner")  # closest we can store
    if not _xforms_agree(header):
        # A sheared affine has no quaternion: a qform beside it would disagree with the sform
        # (and read_volume refuses such files), so the sform alone carries it.
        header.set_qform(None, code="unknown")
    nib.save(image, os.fspath(target))


def _write_itk(target: Path, array: np.ndarray, geometry: Geometry, dataset: str) -> None:
    sitk = _sitk()
    image = sitk.GetImageFromArray(array)
    spacing, origin, direction = geometry._to_itk()
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    # .mhd keeps an uncompressed .raw companion so other tools can memory-map it.
    compress = not target.name.lower().endswith(".mhd")
    with _quiet_native_stderr():
        sitk.WriteImage(image, os.fspath(target), useCompression=compress)


def _write_h5(target: Path, array: np.ndarray, geometry: Geometry, dataset: str) -> None:
    import h5py

    with h5py.File(target, "w") as f:
        ds = f.create_dataset(dataset, data=array, compression="gzip", compression_opts=4)
        ds.attrs["spacing"] = np.asarray(geometry.spacing)
        ds.attrs["origin"] = np.asarray(geometry.origin)
        ds.attrs["direction"] = np.asarray(geometry.direction)
        if geometry.affine_ras is not None:
            ds.attrs["affine_ras"] = np.asarray(geometry.affine_ras)


_WRITERS: dict[str, Callable[[Path, np.ndarray, Geometry, str], None]] = {
    "nifti": _write_nifti,
    "nrrd": _write_itk,
    "mha": _write_itk,
    "mhd": _write_itk,
    "h5": _write_h5,
}


def _writable_array(array: Any, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputError(
            f"{name}: cannot write an array of shape {array.shape}; a 3D (D, H, W) array is needed"
        )
    _check_dtype(array.dtype, name)
    if array.dtype == np.bool_:
        return np.ascontiguousarray(array, dtype=np.uint8)
    if array.dtype == np.float16:  # neither NIfTI-1 nor ITK stores half floats
        return np.ascontiguousarray(array, dtype=np.float32)
    return np.ascontiguousarray(array)


def write_volume(
    path: os.PathLike | str,
    array: np.ndarray,
    geometry: Geometry,
    *,
    like: Volume | None = None,
    dataset: str = "image",
) -> Path:
    """Write a ``(D, H, W)`` array with its geometry; the format follows the file name.

    The file appears atomically: everything is written in a hidden temporary folder beside
    the target and then moved into place (for ``.mhd`` the ``.raw`` companion first), so an
    error leaves no partial file. The dtype is kept (bool -> uint8, float16 -> float32).

    Args:
        path: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``, ``.mhd`` or ``.h5``/``.hdf5``.
        array: voxels, shape ``(D, H, W)`` = ``(z, y, x)``.
        geometry: spacing (mm), origin and direction in array axis order. A NIfTI target
            reuses ``geometry.affine_ras`` verbatim when set.
        like: the volume this array derives from (e.g. the image a prediction was made on).
            When ``geometry`` has no NIfTI affine but matches ``like.geometry``, the NIfTI
            affine of ``like`` is reused so the output overlays the input exactly.
        dataset: h5 dataset name (``"image"`` or ``"label"``); ignored for other formats.

    Returns:
        The written path.

    Raises:
        InputError: bad array, unsupported name (e.g. a folder: DICOM is not written).
        ResourceError: the output folder is missing or not writable, or the write failed.
    """
    path = Path(path)
    name = _show(path)
    suffix = _suffix_of(path)
    if suffix not in WRITABLE_SUFFIXES or path.is_dir():
        raise InputError(
            f"{name}: cannot write this kind of file (DICOM series are not written) - choose a"
            " name ending in .nii.gz, .nrrd or .mha"
        )
    array = _writable_array(array, name)
    if not isinstance(geometry, Geometry):
        raise InputError(f"{name}: geometry must be a Geometry, got {type(geometry).__name__}")
    if like is not None:
        if like.array.shape != array.shape:
            raise InputError(
                f"{name}: array shape {array.shape} differs from its reference {like.name}"
                f" {like.array.shape} - write it with its own geometry and like=None"
            )
        if (
            geometry.affine_ras is None
            and like.geometry.affine_ras is not None
            and geometry.close_to(like.geometry, atol=1e-6)
        ):
            geometry = like.geometry
    parent = path.parent
    if not parent.is_dir():
        raise ResourceError(f"{name}: the output folder {_show(parent)} does not exist - create it")
    if not os.access(parent, os.W_OK):
        raise ResourceError(f"{name}: the output folder {_show(parent)} is not writable")

    try:
        staging = Path(tempfile.mkdtemp(prefix=".sgrs-write-", dir=parent))
    except OSError as exc:
        raise ResourceError(
            f"{name}: cannot write in {_show(parent)} ({exc.strerror}) - check permissions"
        ) from exc
    try:
        staged = staging / path.name
        _WRITERS[_FORMAT_OF_SUFFIX[suffix]](staged, array, geometry, dataset)
        # Companions (.raw/.zraw) go first so the header never points at a missing file.
        produced = sorted(staging.iterdir(), key=lambda p: p.name == path.name)
        for file in produced:
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(file, parent / file.name)
    except SGRSError:
        raise
    except MemoryError as exc:
        raise ResourceError(f"{name}: not enough memory to write this volume") from exc
    except Exception as exc:  # noqa: BLE001 - writers raise many types; report one
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            reason = "disk full"
        raise ResourceError(
            f"{name}: writing failed ({reason}) - check free disk space and permissions"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# --------------------------------------------------------------------------------------
# Folders of cases
# --------------------------------------------------------------------------------------


def _list_volumes(folder: Path, *, with_series: bool, skip: Path | None = None) -> dict[str, Path]:
    """Map case name -> volume path for the visible volumes in ``folder``.

    A name that ends like a volume (``case01.nii.gz``) but is a folder, a broken link or
    another non-file is refused, not skipped: skipped, its case would silently lose its
    label (or its image) and train as something it is not.
    """
    name = _show(folder)
    if not folder.is_dir():
        raise InputError(f"{name}: no such folder - check the path")
    found: dict[str, Path] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise InputError(
            f"{name}: cannot list the folder ({exc.strerror}) - check its permissions"
        ) from exc
    # realpath, not resolve(): a looping link must not raise here
    skip_real = os.path.realpath(skip) if skip is not None else None
    for entry in entries:
        if entry.name.startswith(".") or (skip_real and os.path.realpath(entry) == skip_real):
            continue
        suffix = _suffix_of(entry)
        if suffix is not None and not entry.is_file():
            what = "a folder" if entry.is_dir() else "not a readable file (broken or looping link)"
            raise InputError(
                f"{_show(entry)}: named like a volume file but is {what} - rename or remove it"
            )
        if entry.is_dir():
            if not with_series:
                continue  # subfolders of a labels folder are not labels
            case = entry.name  # a DICOM series
        elif suffix is not None:
            case = _stem_of(entry)
        else:
            continue  # companions (.raw), notes, links to nowhere without a volume name
        if case in found:
            raise InputError(
                f"{name}: two volumes for case '{case}' ({found[case].name} and {entry.name})"
                " - keep one"
            )
        found[case] = entry
    if not found:
        raise InputError(
            f"{name}: no volumes found ({', '.join(SUPPORTED_SUFFIXES)}"
            + (", or one DICOM series per subfolder" if with_series else "")
            + ")"
        )
    return found


def find_cases(
    images_dir: os.PathLike | str, labels_dir: os.PathLike | str | None = None
) -> list[Case]:
    """Pair the images of a folder with the labels of another, by case name.

    A case name is the file name without its volume suffix (``case01.nii.gz`` -> ``case01``)
    or a DICOM series subfolder's name, so ``case01.nii.gz`` pairs with ``case01.nii.gz`` or
    ``case01.nrrd``. Hidden files are ignored. An image with no label is unlabeled.

    Returns:
        Cases sorted by name.

    Raises:
        InputError: a missing or empty folder, two volumes with one case name, a label
        whose image is missing, the labels folder being the images folder, or a folder (or
        broken link) named like a volume.
    """
    images_dir = Path(images_dir)
    labels_path = Path(labels_dir) if labels_dir is not None else None
    if labels_path is not None and os.path.realpath(images_dir) == os.path.realpath(labels_path):
        # Every image would pair with itself as its label: an intensity "label" map.
        raise InputError(
            f"--labels {_show(labels_path)} is the --images folder - give the folder that holds"
            " the label maps (same file names as the images)"
        )
    images = _list_volumes(images_dir, with_series=True, skip=labels_path)
    labels = _list_volumes(labels_path, with_series=False) if labels_path is not None else {}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        first = labels[orphans[0]]
        raise InputError(
            f"{_show(first)}: label has no image named '{orphans[0]}' in {_show(images_dir)}"
            f" ({len(orphans)} such labels) - rename or remove it"
        )
    return [Case(name, images[name], labels.get(name)) for name in sorted(images)]


def _benchmark_file(root: Path, case: str) -> Path | None:
    for candidate in (root / case / "mri_norm2.h5", root / f"{case}.h5", root / case):
        if candidate.is_file() and _suffix_of(candidate) in (".h5", ".hdf5"):
            return candidate
    folder = root / case
    if folder.is_dir():
        inside = sorted(p for p in folder.glob("*.h5") if not p.name.startswith("."))
        if len(inside) > 1:
            raise InputError(
                f"{_show(folder)}: case '{case}' has {len(inside)} .h5 files - keep one"
            )
        if inside:
            return inside[0]
    return None


def read_h5_benchmark(root: os.PathLike | str, list_file: os.PathLike | str) -> list[Case]:
    """Cases of the LA / Pancreas-CT / BraTS2019 h5 layout used by UA-MT and SSL4MIS.

    ``list_file`` (e.g. ``train.list``; absolute, or relative to ``root``) names one case
    per line. Each case is ``root/<name>/mri_norm2.h5`` (LA), ``root/<name>.h5`` or the only
    ``root/<name>/*.h5``, holding datasets ``image`` and ``label``. The h5 arrays are stored
    (x, y, z); they are read as (z, y, x), our (D, H, W), with identity geometry (:func:`_read_h5`).

    Returns:
        Cases in list order whose ``image`` and ``label`` are the same h5 path;
        :meth:`Case.read_label` reads dataset ``label``.

    Raises:
        InputError: missing list, missing case file, or a file without ``image``/``label``.
    """
    import h5py

    root = Path(root)
    list_path = Path(list_file)
    if not list_path.is_file() and (root / list_path).is_file():
        list_path = root / list_path
    if not root.is_dir():
        raise InputError(f"{_show(root)}: no such benchmark folder - check the path")
    try:
        lines = list_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise InputError(
            f"{_show(list_path)}: cannot read the case list ({exc.strerror}) - check the path"
        ) from exc
    names = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not names:
        raise InputError(f"{_show(list_path)}: the case list is empty - one case name per line")
    cases = []
    for case in names:
        # A case names a file under root: '../x' or '/x' in a downloaded list must not reach out.
        file = _benchmark_file(root, case)
        why = _outside_folder(root, case) or (
            file is not None and _outside_folder(root, os.path.relpath(file, root))
        )
        if why:
            raise InputError(
                f"{_show(list_path)}: case '{case}' is {why}; only files inside {_show(root)} are"
                f" read (as {case}/mri_norm2.h5, {case}.h5 or {case}/*.h5) - fix the case list"
            )
        if file is None:
            raise InputError(
                f"{_show(list_path)}: case '{case}' has no h5 file (looked for"
                f" {case}/mri_norm2.h5, {case}.h5, {case}/*.h5 in {_show(root)})"
            )
        try:
            with h5py.File(file, "r") as f:
                missing = [d for d in ("image", "label") if not isinstance(f.get(d), h5py.Dataset)]
        except Exception as exc:  # noqa: BLE001 - h5py raises OSError/KeyError/... on bad files
            raise InputError(
                f"{_show(file)}: case '{case}' is not a readable h5 file - check it is complete"
            ) from exc
        if missing:
            raise InputError(
                f"{_show(file)}: case '{case}' has no dataset '{missing[0]}'"
                " - benchmark files need datasets 'image' and 'label'"
            )
        cases.append(Case(case, file, file))
    return cases


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def check_pair(image: Volume, label: Volume, *, atol: float = 1e-3) -> None:
    """Refuse a label that does not lie on its image's voxel grid.

    Args:
        atol: tolerance on spacing/origin (mm) and direction cosines.

    Raises:
        InputError: shapes differ, or spacing/origin/direction differ beyond ``atol``.
    """
    if image.array.shape != label.array.shape:
        raise InputError(
            f"label {label.name} has shape {label.array.shape} but image {image.name} has"
            f" {image.array.shape} (spacing {label.geometry.spacing} vs"
            f" {image.geometry.spacing}) - check the pairing or resample the label onto the image"
        )
    gi, gl = image.geometry, label.geometry
    for field in ("spacing", "origin", "direction"):
        a, b = getattr(gi, field), getattr(gl, field)
        if not np.allclose(a, b, rtol=0, atol=atol):
            raise InputError(
                f"label {label.name} and image {image.name} differ in {field}"
                f" ({tuple(round(v, 6) for v in b)} vs {tuple(round(v, 6) for v in a)});"
                f" spacing {gl.spacing} vs {gi.spacing} - resample the label onto the image"
                " grid or fix its header"
            )


def validate_label(label: Volume, num_classes: int | None, ignore_index: int | None) -> np.ndarray:
    """Check a label map and return it as an int64 ``(D, H, W)`` array.

    Values must be whole numbers in ``0 .. num_classes - 1`` (any non-negative whole number
    when ``num_classes`` is None); ``ignore_index`` is allowed in addition, but not everywhere.

    Raises:
        InputError: fractional, non-finite, negative or too-large values (first few listed),
        or every voxel is ``ignore_index`` (nothing annotated).
    """
    array = np.asarray(label.array)
    name = label.name
    _check_dtype(array.dtype, name)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            raise InputError(f"{name}: {int((~finite).sum())} label voxels are NaN or Inf")
        fractional = array != np.floor(array)
        if fractional.any():
            bad = np.unique(array[fractional])[:5]
            raise InputError(
                f"{name}: label values must be whole numbers, found {bad.tolist()} - this looks"
                " like an image or a probability map; give the integer label map"
            )
        # Beyond 2**31 the int64 cast below would wrap; no label map has such classes.
        huge = np.abs(array) > 2**31
        if huge.any():
            bad = np.unique(array[huge])[:5]
            raise InputError(
                f"{name}: label values {bad.tolist()} are far outside any class range"
                " - give the integer label map"
            )
    values = array.astype(np.int64)
    allowed_max = None if num_classes is None else int(num_classes) - 1
    low = int(values.min()) if values.size else 0
    high = int(values.max()) if values.size else 0
    if ignore_index is not None and values.size and low == high == ignore_index:
        # An annotation layer saved before anything was painted: it teaches nothing.
        raise InputError(
            f"{name}: every voxel is the ignore index {ignore_index}, so nothing is annotated"
            " - label at least one slice, or remove the file to train the case as unlabeled"
        )
    if low >= 0 and (allowed_max is None or high <= allowed_max):
        return values  # fast path: no unique() over the whole volume
    bad_mask = values < 0
    if allowed_max is not None:
        bad_mask |= values > allowed_max
    if ignore_index is not None:
        bad_mask &= values != ignore_index
    if bad_mask.any():
        bad = np.unique(values[bad_mask])[:5].tolist()
        allowed = "0.." + ("" if allowed_max is None else str(allowed_max))
        if ignore_index is not None:
            allowed += f" (and ignore index {ignore_index})"
        raise InputError(
            f"{name}: label values {bad} are outside the allowed range {allowed}"
            " - fix the label or set the number of classes"
        )
    return values
