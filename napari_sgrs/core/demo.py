"""Procedural demo cohorts for trying SGRS-Net without real data.

Two kinds, both deterministic given ``seed`` (a numpy ``Generator`` per case, no torch):

- ``"blob"``: MRI-like phantom (arbitrary units, int16, roughly 0..1000). A body ellipsoid of
  mid intensity holds a brighter, randomly deformed blob (the target, label 1, think of a
  left atrium), bright distractor blobs of similar intensity outside it, low-pass texture, a
  smooth multiplicative bias field and Rician noise. The target's intensities overlap its
  surroundings' and the distractors', so no single threshold segments it. With
  ``n_classes=3`` an adjacent smaller blob is label 2.
- ``"vessel"``: CT-like phantom (Hounsfield-like units, int16, about -100..300). Enhanced
  parenchyma (bright) holds a thin tree of 2-4 curved tubes of radius 1.5-3 voxels that
  are *darker* than their surroundings (label 1), plus dark round cysts and bright spots as
  distractors, Gaussian noise and a smooth additive bias.

Arrays are in axis order (D, H, W); spacing and origin are in mm in the same order.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from napari_sgrs.core.errors import ConfigError, InputError, ResourceError, os_reason
from napari_sgrs.core.outputs import WrittenFiles, atomic_write_bytes
from napari_sgrs.core.postprocess import largest_component

__all__ = ["DEMO_KINDS", "DemoCohort", "make_demo_case", "make_demo_cohort", "partial_label"]

DEMO_KINDS: tuple[str, ...] = ("blob", "vessel")
_KIND_CODE = {"blob": 1, "vessel": 2}
_SUFFIX = ".nii.gz"
MAX_DEMO_VOXELS = 256**3  # per volume; 48^3 is the default
MAX_DEMO_CASES = 1000


@dataclass(frozen=True)
class DemoCohort:
    """Where a demo cohort was written and which cases it holds.

    ``labels_tr`` holds labels for ``labeled_names`` only; ``unlabeled_names`` have images
    in ``images_tr`` and no label. Test cases (``test_names``) have both. A case ``name``
    is stored as ``<folder>/<name>.nii.gz`` in each folder.
    """

    root: Path
    kind: str
    n_classes: int
    images_tr: Path
    labels_tr: Path
    images_ts: Path
    labels_ts: Path
    train_names: tuple[str, ...]
    labeled_names: tuple[str, ...]
    unlabeled_names: tuple[str, ...]
    test_names: tuple[str, ...]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    json_path: Path
    seed: int = 0

    def hidden_label(self, name: str) -> np.ndarray:
        """The label of any case, unlabeled ones included: the generator is a pure function of
        (kind, seed, index), so benchmarks can score pseudo labels without the files holding it."""
        names = self.train_names + self.test_names
        if name not in names:
            raise ConfigError(f"{name!r} is not a case of this demo cohort ({self.root})")
        return make_demo_case(self.kind, shape=self.shape, seed=self.seed, index=names.index(name),
                              n_classes=self.n_classes)[1]


def make_demo_case(
    kind: str = "blob",
    *,
    shape: Sequence[int] = (48, 48, 48),
    seed: int = 0,
    index: int = 0,
    n_classes: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one demo case in memory.

    Args:
        kind: ``"blob"`` or ``"vessel"``.
        shape: volume shape (D, H, W), each at least 16.
        seed, index: the case is a pure function of ``(kind, seed, index, shape, n_classes)``.
        n_classes: 2, or 3 for ``kind="blob"`` (label 2 = a structure adjacent to the target).

    Returns:
        ``(image, label)``: int16 intensities and uint8 labels, both shaped (D, H, W).
    """
    shape = _check_settings(kind, shape, n_classes)
    rng = np.random.default_rng([int(seed), _KIND_CODE[kind], int(index)])
    if kind == "blob":
        return _blob_case(rng, shape, n_classes)
    return _vessel_case(rng, shape)


def make_demo_cohort(
    out_dir: str | os.PathLike,
    *,
    kind: str = "blob",
    n_cases: int = 8,
    n_labeled: int | None = None,
    n_test: int = 4,
    shape: Sequence[int] = (48, 48, 48),
    spacing: Sequence[float] = (1.5, 0.8, 0.8),
    seed: int = 0,
    n_classes: int = 2,
    overwrite: bool = False,
) -> DemoCohort:
    """Write a semi-supervised demo cohort as NIfTI files.

    Layout::

        out_dir/imagesTr/<name>.nii.gz   all n_cases training images
        out_dir/labelsTr/<name>.nii.gz   labels of the first n_labeled training cases only
        out_dir/imagesTs/<name>.nii.gz   n_test held-out images
        out_dir/labelsTs/<name>.nii.gz   their labels
        out_dir/cohort.json              kind, seed, shape, spacing, origin, names
        out_dir/.sgrs-written.json       the files written, with their sha256 (what --overwrite may remove)

    Case names are ``<kind>_000``, ``<kind>_001``, ...; test cases continue the numbering.
    Every volume has the given anisotropic ``spacing`` (mm, axis order D, H, W), a
    non-zero origin (volume centred near the world origin, shifted) and identity direction.

    Args:
        out_dir: output folder; created if missing.
        kind: ``"blob"`` (MRI-like) or ``"vessel"`` (CT-like, dark tubular target).
        n_cases: training cases (>= 1).
        n_labeled: how many of them get a label (0 .. n_cases); ``None`` labels half of them
            (4 of the default 8), rounded down but at least 1.
        n_test: held-out labelled test cases (>= 0).
        shape: volume shape (D, H, W), each at least 16.
        spacing: voxel size (D, H, W) in mm.
        seed: the same seed gives identical arrays.
        n_classes: 2, or 3 for ``kind="blob"``.
        overwrite: allow writing into a folder that already holds a cohort; its files are
            removed first, and only if sgrs demo-data wrote every one of them (they are listed
            with their sha256 in ``out_dir/.sgrs-written.json``) and none was changed since.

    Raises:
        ConfigError: an invalid setting (kind, counts, shape, spacing, n_classes).
        InputError: ``out_dir`` already holds a cohort or volumes and ``overwrite`` is False,
            or holds files that sgrs did not write, or a damaged ``cohort.json``.
    """
    shape = _check_settings(kind, shape, n_classes)
    spacing_t = tuple(float(s) for s in spacing)
    if len(spacing_t) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing_t):
        raise ConfigError(f"spacing {tuple(spacing)} must be 3 positive numbers (mm, D,H,W)")
    if int(n_cases) < 1:
        raise ConfigError(f"n_cases={n_cases} must be at least 1")
    if n_labeled is None:
        n_labeled = max(1, int(n_cases) // 2)
    if not 0 <= int(n_labeled) <= int(n_cases):
        raise ConfigError(f"n_labeled={n_labeled} must be between 0 and n_cases={n_cases}")
    if int(n_test) < 0:
        raise ConfigError(f"n_test={n_test} must be 0 or more")
    n_cases, n_labeled, n_test = int(n_cases), int(n_labeled), int(n_test)

    if n_cases + n_test > MAX_DEMO_CASES:
        raise ConfigError(f"n_cases + n_test = {n_cases + n_test}: a demo cohort holds at most {MAX_DEMO_CASES} "
                          f"volumes")

    root = Path(out_dir)
    folders = {k: root / k for k in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    written = WrittenFiles(root, by="sgrs demo-data")
    _prepare_output(root, folders.values(), overwrite, written)
    try:
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResourceError(f"cannot create {exc.filename or root}: {os_reason(exc)}; choose a writable folder") \
            from exc

    # Centre the volume near the world origin, then shift, so the origin is never zero.
    shifts = (12.5, -7.25, 3.0)
    origin = tuple(
        round(-0.5 * (n - 1) * s + shift, 4) for n, s, shift in zip(shape, spacing_t, shifts)
    )
    names = [f"{kind}_{i:03d}" for i in range(n_cases + n_test)]
    train_names, test_names = names[:n_cases], names[n_cases:]
    targets = {}
    for index, name in enumerate(names):
        is_test = index >= n_cases
        targets[name] = [folders["imagesTs" if is_test else "imagesTr"] / f"{name}{_SUFFIX}"]
        if is_test or index < n_labeled:
            targets[name].append(folders["labelsTs" if is_test else "labelsTr"] / f"{name}{_SUFFIX}")
    every = [p for paths in targets.values() for p in paths] + [root / "cohort.json"]
    written.check(every, choose="an empty folder")
    written.expect(every)
    for index, name in enumerate(names):
        arrays = make_demo_case(kind, shape=shape, seed=seed, index=index, n_classes=n_classes)
        for path, array in zip(targets[name], arrays):
            _write(path, array, spacing_t, origin)
        written.record(targets[name])

    cohort = DemoCohort(
        root=root,
        kind=kind,
        n_classes=n_classes,
        images_tr=folders["imagesTr"],
        labels_tr=folders["labelsTr"],
        images_ts=folders["imagesTs"],
        labels_ts=folders["labelsTs"],
        train_names=tuple(train_names),
        labeled_names=tuple(train_names[:n_labeled]),
        unlabeled_names=tuple(train_names[n_labeled:]),
        test_names=tuple(test_names),
        shape=shape,
        spacing=spacing_t,  # type: ignore[arg-type]
        origin=origin,  # type: ignore[arg-type]
        json_path=root / "cohort.json",
        seed=int(seed),
    )
    meta = {
        "kind": kind,
        "seed": int(seed),
        "n_classes": n_classes,
        "shape": list(shape),
        "spacing": list(spacing_t),
        "origin": list(origin),
        "axis_order": "D,H,W",
        "train_names": list(cohort.train_names),
        "labeled_names": list(cohort.labeled_names),
        "unlabeled_names": list(cohort.unlabeled_names),
        "test_names": list(cohort.test_names),
    }
    atomic_write_bytes(cohort.json_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    written.record([cohort.json_path])
    return cohort


def partial_label(
    label: np.ndarray,
    keep_every: int = 4,
    axis: int = 0,
    ignore_index: int = 255,
    start: int = 0,
) -> np.ndarray:
    """Keep every ``keep_every``-th slice of a label volume and mark the rest as ignored.

    Slices ``start, start + keep_every, ...`` along ``axis`` keep their labels; every other
    voxel becomes ``ignore_index``. Simulates sparsely annotated volumes.

    Args:
        label: label volume (D, H, W) of non-negative class ids; not modified.
        keep_every: keep one slice in this many (>= 1; 1 keeps everything).
        axis: the slicing axis (0 = D).
        ignore_index: the value for unannotated voxels; must not occur in ``label``.
        start: index of the first kept slice (0 <= start < keep_every).

    Returns:
        A new array, same shape; its dtype is widened only if ``ignore_index`` does not fit.
    """
    label = np.asarray(label)
    if int(keep_every) < 1:
        raise ConfigError(f"keep_every={keep_every} must be at least 1")
    if not 0 <= int(start) < int(keep_every):
        raise ConfigError(f"start={start} must be in 0..{int(keep_every) - 1}")
    if not -label.ndim <= axis < label.ndim:
        raise ConfigError(f"axis={axis} is out of range for a {label.ndim}-D label volume")
    if np.any(label == ignore_index):
        raise InputError(
            f"label already contains ignore_index={ignore_index}; pick another ignore_index"
        )
    dtype = np.result_type(label.dtype, np.min_scalar_type(ignore_index))
    out = np.full(label.shape, ignore_index, dtype=dtype)
    kept = [slice(None)] * label.ndim
    kept[axis] = slice(int(start), None, int(keep_every))
    out[tuple(kept)] = label[tuple(kept)]
    return out


# --- phantoms ------------------------------------------------------------------------


def _blob_case(
    rng: np.random.Generator, shape: tuple[int, int, int], n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """MRI-like blob phantom: image in arbitrary units (int16), labels 0..n_classes-1."""
    coords = _normalized_grid(shape)
    deform = _smooth_noise(rng, shape, coarse=5)

    body = _deformed_ellipsoid(coords, (0, 0, 0), rng.uniform(0.84, 0.95, 3), deform, 0.04)
    target_center = rng.uniform(-0.22, 0.22, 3)
    target_radii = rng.uniform(0.38, 0.5, 3)
    target = _largest_component(
        _deformed_ellipsoid(coords, target_center, target_radii, deform, 0.18) & body
    )

    label = target.astype(np.uint8)
    image = np.full(shape, 0.03)
    image[body] = 0.32
    image[target] = rng.uniform(0.55, 0.62)

    if n_classes == 3:
        direction = _unit(rng.standard_normal(3))
        radii2 = rng.uniform(0.18, 0.26, 3)
        center2 = target_center + direction * (target_radii.mean() + 0.7 * radii2.mean())
        second = _largest_component(
            _deformed_ellipsoid(coords, np.clip(center2, -0.6, 0.6), radii2, deform, 0.1)
            & body
            & ~target
        )
        label[second] = 2
        image[second] = rng.uniform(0.48, 0.52)

    # Distractors as bright as the target, kept two voxels away from the labelled structures.
    guard = ndimage.binary_dilation(label > 0, iterations=2)
    for _ in range(int(rng.integers(3, 6))):
        radii = rng.uniform(0.12, 0.24, 3)
        for _attempt in range(20):
            center = rng.uniform(-0.62, 0.62, 3)
            if np.linalg.norm(center - target_center) > target_radii.max() + radii.max() + 0.05:
                break
        blob = _deformed_ellipsoid(coords, center, radii, deform, 0.15) & body & ~guard
        image[blob] = rng.uniform(0.5, 0.66)

    texture = _normalized(ndimage.gaussian_filter(rng.standard_normal(shape), 1.5))
    image *= np.where(body, 1.0 + 0.12 * texture, 1.0)
    image = ndimage.gaussian_filter(image, 0.8)  # partial volume at the edges
    image *= np.exp(0.2 * _smooth_noise(rng, shape, coarse=3))  # coil bias field
    sigma = 0.075
    image = np.hypot(image + sigma * rng.standard_normal(shape), sigma * rng.standard_normal(shape))
    return np.round(image * 1000.0).astype(np.int16), label


def _vessel_case(
    rng: np.random.Generator, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """CT-like vessel phantom: image in Hounsfield-like units (int16), label 1 = tubes."""
    coords = _normalized_grid(shape)
    deform = _smooth_noise(rng, shape, coarse=4)
    body = _deformed_ellipsoid(coords, (0, 0, 0), rng.uniform(0.86, 0.96, 3), deform, 0.05)

    tubes = _largest_component(_tube_tree(rng, shape) & body)  # clipping may cut branches off
    image = np.full(shape, -100.0)  # surrounding fat
    image[body] = rng.uniform(150.0, 190.0)  # contrast-enhanced parenchyma

    guard = ndimage.binary_dilation(tubes, iterations=2)
    for _ in range(int(rng.integers(2, 5))):
        dark = rng.random() < 0.6
        radii = rng.uniform(0.05, 0.12, 3) if dark else rng.uniform(0.03, 0.06, 3)
        blob = _deformed_ellipsoid(coords, rng.uniform(-0.6, 0.6, 3), radii, deform, 0.1)
        blob &= body & ~guard
        image[blob] = rng.uniform(20.0, 60.0) if dark else rng.uniform(260.0, 300.0)
    image[tubes] = rng.uniform(25.0, 55.0)  # hypodense tubular structures

    texture = _normalized(ndimage.gaussian_filter(rng.standard_normal(shape), 1.2))
    image += np.where(body, 12.0 * texture, 0.0)
    image = ndimage.gaussian_filter(image, 0.7)  # partial volume
    image += 20.0 * _smooth_noise(rng, shape, coarse=3)  # beam-hardening-like offset
    image += 22.0 * rng.standard_normal(shape)
    return np.round(image).astype(np.int16), tubes.astype(np.uint8)


def _tube_tree(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Boolean mask of a tree of 2-4 curved, tapering tubes (radius 1.5-3 voxels)."""
    dims = np.asarray(shape, dtype=float)
    centre = (dims - 1) / 2
    size = float(dims.min())
    tubes = []  # (bezier control points (4, 3), radius at start, radius at end)

    direction = _unit(rng.standard_normal(3))
    length = rng.uniform(0.65, 0.8) * size
    start = centre - direction * length / 2 + rng.uniform(-0.08, 0.08, 3) * dims
    r0 = rng.uniform(2.3, 3.0)
    tubes.append((_bezier_controls(rng, start, direction, length), r0, max(1.5, 0.7 * r0)))

    for _ in range(int(rng.integers(1, 4))):
        controls, p_r0, p_r1 = tubes[int(rng.integers(len(tubes)))]
        t = rng.uniform(0.25, 0.65)
        point, tangent = _bezier(controls, np.array([t]))
        tangent = _unit(tangent[0])
        side = _unit(np.cross(tangent, _unit(rng.standard_normal(3))))
        direction = _unit(0.6 * tangent + side)
        parent_length = float(np.linalg.norm(np.diff(controls, axis=0), axis=1).sum())
        length = rng.uniform(0.45, 0.7) * parent_length
        r_branch = max(1.5, 0.8 * (p_r0 + t * (p_r1 - p_r0)))
        controls = _bezier_controls(rng, point[0], direction, length)
        tubes.append((controls, r_branch, max(1.5, 0.75 * r_branch)))

    radius_map = np.zeros(shape)
    for controls, r_start, r_end in tubes:
        arc = float(np.linalg.norm(np.diff(controls, axis=0), axis=1).sum())
        t = np.linspace(0.0, 1.0, max(2, int(math.ceil(arc / 0.4)) + 1))
        points, _ = _bezier(controls, t)
        idx = np.round(points).astype(int)
        inside = np.all((idx >= 0) & (idx < dims.astype(int)), axis=1)
        radii = r_start + t * (r_end - r_start)
        np.maximum.at(radius_map, tuple(idx[inside].T), radii[inside])
    if not radius_map.any():
        return np.zeros(shape, dtype=bool)
    distance, nearest = ndimage.distance_transform_edt(radius_map == 0, return_indices=True)
    return distance <= radius_map[tuple(nearest)]


def _bezier_controls(
    rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length: float
) -> np.ndarray:
    """Control points of a cubic Bézier from ``start`` along ``direction``, gently curved."""
    controls = [start]
    for fraction in (1 / 3, 2 / 3):
        controls.append(start + direction * length * fraction + rng.normal(0, 0.15 * length, 3))
    controls.append(start + direction * length)
    return np.stack(controls)


def _bezier(controls: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, 3) and tangents (N, 3) of a cubic Bézier at parameters ``t`` (N,)."""
    p0, p1, p2, p3 = controls
    t = t[:, None]
    s = 1 - t
    points = s**3 * p0 + 3 * s**2 * t * p1 + 3 * s * t**2 * p2 + t**3 * p3
    tangents = 3 * s**2 * (p1 - p0) + 6 * s * t * (p2 - p1) + 3 * t**2 * (p3 - p2)
    return points, tangents


def _deformed_ellipsoid(
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    center: Sequence[float],
    radii: Sequence[float],
    deform: np.ndarray,
    amount: float,
) -> np.ndarray:
    """Ellipsoid in normalised coordinates whose boundary is pushed by a smooth field."""
    r2 = sum(((c - c0) / r) ** 2 for c, c0, r in zip(coords, center, radii))
    return np.sqrt(r2) < 1.0 + amount * deform


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean mask (the mask itself if empty)."""
    return largest_component(mask, full_connectivity=False)


def _normalized_grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable coordinates in [-1, 1] along each axis (D, H, W)."""
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    return (
        axes[0][:, None, None],
        axes[1][None, :, None],
        axes[2][None, None, :],
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], coarse: int) -> np.ndarray:
    """Low-frequency noise with zero mean and unit std.

    Random values on a ``coarse``^3 grid spread over the volume with separable Gaussian
    kernels (one small matrix per axis): smooth, and far faster than a spline zoom.
    """
    small = rng.standard_normal((coarse,) * 3)
    grid = np.linspace(-1.0, 1.0, coarse)
    width = 2.0 / (coarse - 1)
    kernels = [
        np.exp(-0.5 * ((np.linspace(-1.0, 1.0, n)[:, None] - grid[None, :]) / width) ** 2)
        for n in shape
    ]
    field = np.einsum("ai,bj,ck,ijk->abc", *kernels, small, optimize=True)
    return _normalized(field)


def _normalized(field: np.ndarray) -> np.ndarray:
    return (field - field.mean()) / (field.std() + 1e-12)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-12)


# --- settings and output -------------------------------------------------------------


def _check_settings(kind: str, shape: Sequence[int], n_classes: int) -> tuple[int, int, int]:
    if kind not in DEMO_KINDS:
        raise ConfigError(f"demo kind {kind!r} is unknown; use one of {', '.join(DEMO_KINDS)}")
    shape_t = tuple(int(n) for n in shape)
    if len(shape_t) != 3 or min(shape_t) < 16:
        raise ConfigError(f"shape {tuple(shape)} must be 3 sizes (D, H, W) of at least 16")
    if math.prod(shape_t) > MAX_DEMO_VOXELS:  # checked before any array exists
        raise ConfigError(f"shape {shape_t} is {math.prod(shape_t):,} voxels; a demo volume holds at most "
                          f"256^3 = {MAX_DEMO_VOXELS:,} (its generation needs about 70 bytes a voxel)")
    allowed = (2, 3) if kind == "blob" else (2,)
    if n_classes not in allowed:
        raise ConfigError(
            f"n_classes={n_classes} is not available for kind {kind!r}; use one of {allowed}"
        )
    return shape_t  # type: ignore[return-value]


def _prepare_output(root: Path, folders, overwrite: bool, written: WrittenFiles) -> None:
    """Refuse to mix a new cohort into an old one unless ``overwrite``; then remove the old one's
    files, which must all be files that sgrs demo-data wrote and nobody changed since."""
    for folder in (root, *folders):
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder} is a file, not a folder; choose a folder for the demo cohort")
    old_json = root / "cohort.json"
    present = [p for f in folders if f.is_dir() for p in sorted(f.glob(f"*{_SUFFIX}"))]
    if not (old_json.exists() or old_json.is_symlink()) and not present:
        return
    if not overwrite:
        raise InputError(
            f"{root} already holds a cohort or volumes; choose an empty folder or pass"
            " overwrite=True (--overwrite)"
        )
    if old_json.exists():
        _cohort_names(old_json, root, folders)  # a damaged or hostile cohort.json is refused
    candidates = ([old_json] if old_json.exists() or old_json.is_symlink() else []) + present
    foreign = [p for p in candidates if not written.owns(p)]
    if foreign:
        raise InputError(
            f"{foreign[0]} was not written by sgrs demo-data or was changed since ({len(foreign)} such"
            f" file(s)); --overwrite removes only files sgrs wrote: move them away or choose an empty"
            f" folder (nothing was removed)"
        )
    written.remove(candidates)


def _cohort_names(path: Path, root: Path, folders) -> list[str]:
    """The case names in a cohort.json, each a plain file name that stays inside its folder."""
    def bad(why: str) -> InputError:
        return InputError(f"{path}: {why}; remove it or choose an empty folder")

    try:
        if path.stat().st_size > 16 << 20:
            raise bad("too large for a cohort file")
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise bad(f"not a readable cohort file ({exc})") from exc
    if not isinstance(meta, dict):
        raise bad(f"not a cohort file (a JSON {type(meta).__name__}, not an object)")
    names = []
    for key in ("train_names", "test_names"):
        value = meta.get(key, [])
        if not isinstance(value, list):
            raise bad(f'"{key}" is not a list of case names')
        names.extend(value)
    real_root = Path(os.path.realpath(root))
    for folder in folders:
        real = Path(os.path.realpath(folder))
        if real != real_root / folder.name:
            raise bad(f"{folder} leads outside the cohort folder")
        for name in names:
            if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
                    or "\0" in name):
                raise bad(f"case name {name!r} is not a plain file name")
            target = Path(os.path.realpath(folder / f"{name}{_SUFFIX}"))
            if target.parent != real:
                raise bad(f"case name {name!r} leads outside the cohort folder (to {target})")
    return names


def _write(
    path: Path, array: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...]
) -> None:
    from napari_sgrs.core.io import Geometry, write_volume

    geometry = Geometry(spacing=spacing, origin=origin, direction=tuple(np.eye(3).ravel()))
    write_volume(path, array, geometry)
