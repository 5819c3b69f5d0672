"""Tests of napari_sgrs.core.metrics: hand-computed cases, conventions, brute force, folders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from napari_sgrs.core.errors import InputError
from napari_sgrs.core.metrics import (
    case_metrics,
    evaluate_folders,
    summarize,
    surface_distances,
)


def _box(shape, lo, hi, value=1, dtype=np.uint8):
    out = np.zeros(shape, dtype=dtype)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return out


def _sphere(shape, center, radius):
    zz, yy, xx = np.indices(shape)
    r2 = (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2
    return (r2 <= radius**2).astype(np.uint8)


# --- overlap -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "pred_box, ref_box, dice, jaccard",
    [
        # 4x4x4 cubes sharing 2x4x4 voxels: 2*32/128 and 32/96.
        (((2, 2, 2), (6, 6, 6)), ((4, 2, 2), (8, 6, 6)), 0.5, 1 / 3),
        # identical cubes
        (((1, 1, 1), (5, 5, 5)), ((1, 1, 1), (5, 5, 5)), 1.0, 1.0),
        # 2x2x2 cube inside a 4x4x4 cube: 2*8/72 and 8/64.
        (((3, 3, 3), (5, 5, 5)), ((2, 2, 2), (6, 6, 6)), 16 / 72, 8 / 64),
        # disjoint
        (((0, 0, 0), (3, 3, 3)), ((6, 6, 6), (9, 9, 9)), 0.0, 0.0),
    ],
)
def test_dice_jaccard_of_boxes(pred_box, ref_box, dice, jaccard):
    shape = (10, 10, 10)
    (rec,) = case_metrics(_box(shape, *pred_box), _box(shape, *ref_box))
    assert rec.label == 1
    assert rec.dice == pytest.approx(dice)
    assert rec.jaccard == pytest.approx(jaccard)
    assert rec.pred_voxels == int(np.prod(np.subtract(pred_box[1], pred_box[0])))


def test_identical_masks_have_zero_distances():
    ball = _sphere((20, 20, 20), (10, 10, 10), 5)
    (rec,) = case_metrics(ball, ball, spacing=(2.0, 1.0, 0.5))
    assert (rec.hd95_vox, rec.asd_vox, rec.hd95_mm, rec.asd_mm) == (0.0, 0.0, 0.0, 0.0)


# --- distances -----------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_of_sphere_offset_by_k_is_about_k(k, axis):
    shape = (32, 32, 32)
    center = [16, 16, 16]
    ref = _sphere(shape, center, 8)
    center[axis] += k
    pred = _sphere(shape, center, 8)
    (rec,) = case_metrics(pred, ref)
    # Directed distances spread from 0 (equator) to k (poles); their 95th percentile is
    # about 0.95 k, up to a voxel of discretisation.
    assert k - 1.0 <= rec.hd95_vox <= k + 0.5
    assert 0 < rec.asd_vox < rec.hd95_vox
    assert rec.hd95_mm == pytest.approx(rec.hd95_vox)  # unit spacing by default


@pytest.mark.parametrize(
    "offset_axis, spacing, factor",
    [
        (0, (2.0, 1.0, 1.0), 2.0),  # offset along D with 2 mm slices: mm = 2 x voxels
        (2, (2.0, 1.0, 1.0), 1.0),  # offset along W, 1 mm there: mm = voxels
        (1, (1.0, 0.5, 3.0), 0.5),
    ],
)
def test_anisotropic_spacing_scales_distances_along_the_offset_axis(offset_axis, spacing, factor):
    # Slabs two voxels thick along the offset axis, 4x4 across: every voxel is surface and
    # the nearest surface voxel of the other slab is in the same column, so every distance
    # lies along the offset axis and scales exactly by that axis' spacing.
    shape = (16, 16, 16)
    lo, hi = [6, 6, 6], [10, 10, 10]
    lo[offset_axis], hi[offset_axis] = 2, 4
    ref = _box(shape, lo, hi)
    lo[offset_axis], hi[offset_axis] = 7, 9  # 5 voxels further
    pred = _box(shape, lo, hi)
    (rec,) = case_metrics(pred, ref, spacing=spacing)
    # Directed distances are 4 and 5 voxels, half each: mean 4.5, 95th percentile 5.
    assert rec.hd95_vox == pytest.approx(5.0)
    assert rec.asd_vox == pytest.approx(4.5)
    assert rec.hd95_mm == pytest.approx(factor * rec.hd95_vox)
    assert rec.asd_mm == pytest.approx(factor * rec.asd_vox)


def test_hd95_is_max_of_directed_percentiles_not_pooled():
    # pred = ref plus a far 3x3x3 island (26 of 472 surface voxels, 5.5%): the directed
    # pred->ref 95th percentile reaches the island, the pooled one (island 2.9%) is 0.
    shape = (40, 40, 40)
    ref = _sphere(shape, (20, 20, 12), 7)
    pred = ref | _box(shape, (19, 19, 32), (22, 22, 35))
    d_pr, d_rp = surface_distances(pred.astype(bool), ref.astype(bool))
    assert np.percentile(np.concatenate([d_pr, d_rp]), 95) == 0.0
    (rec,) = case_metrics(pred, ref)
    assert rec.hd95_vox == pytest.approx(np.percentile(d_pr, 95))
    assert rec.hd95_vox >= 32 - (12 + 7)  # island to the nearest ref surface voxel


# --- empty conventions ---------------------------------------------------------------

EMPTY = np.zeros((8, 8, 8), dtype=np.uint8)
CUBE = _box((8, 8, 8), (2, 2, 2), (5, 5, 5))


@pytest.mark.parametrize(
    "pred, ref, dice, distance",
    [
        (EMPTY, EMPTY, 1.0, math.nan),  # both empty: perfect overlap, distances undefined
        (EMPTY, CUBE, 0.0, math.inf),  # missed structure
        (CUBE, EMPTY, 0.0, math.inf),  # false positive structure
    ],
)
def test_empty_mask_conventions(pred, ref, dice, distance):
    (rec,) = case_metrics(pred, ref, num_classes=2)
    assert rec.dice == dice and rec.jaccard == dice
    for value in (rec.hd95_vox, rec.asd_vox, rec.hd95_mm, rec.asd_mm):
        if math.isnan(distance):
            assert math.isnan(value)
        else:
            assert value == math.inf


# --- multi-class ---------------------------------------------------------------------

def test_multi_class_gives_one_record_per_foreground_class():
    shape = (12, 12, 12)
    ref = _box(shape, (2, 2, 2), (6, 6, 6))
    ref[7:10, 7:10, 7:10] = 2
    pred = ref.copy()
    pred[2:4] = np.where(pred[2:4] == 1, 0, pred[2:4])  # lose half of class 1
    records = case_metrics(pred, ref, num_classes=4, name="c1")
    assert [r.label for r in records] == [1, 2, 3]
    assert all(r.name == "c1" for r in records)
    assert records[0].dice == pytest.approx(2 * 32 / (32 + 64))
    assert records[1].dice == 1.0 and records[1].hd95_vox == 0.0
    assert records[2].dice == 1.0 and math.isnan(records[2].hd95_vox)  # absent in both


def test_num_classes_is_inferred_and_checked():
    ref = np.zeros((6, 6, 6), dtype=np.uint8)
    ref[1:3, 1:3, 1:3] = 2
    assert [r.label for r in case_metrics(ref, ref)] == [1, 2]
    with pytest.raises(InputError, match="num_classes=2"):
        case_metrics(ref, ref, num_classes=2)


@pytest.mark.parametrize(
    "pred, ref, spacing, match",
    [
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1), "shape"),
        (np.full((4, 4, 4), 0.5), np.zeros((4, 4, 4)), (1, 1, 1), "non-integer"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1), "spacing"),
        (np.zeros((4, 4)), np.zeros((4, 4)), (1, 1), "3-D"),
        (-np.ones((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1, 1), "negative"),
    ],
)
def test_bad_inputs_raise_input_error(pred, ref, spacing, match):
    with pytest.raises(InputError, match=match):
        case_metrics(pred, ref, spacing=spacing)


# --- independent brute force ---------------------------------------------------------

def _brute_force_surface(mask):
    """Foreground voxels with a background 6-neighbour, with zero padding, by shifting."""
    padded = np.pad(mask, 1)
    core = (slice(1, -1),) * 3
    has_bg = np.zeros(mask.shape, dtype=bool)
    for axis in range(3):
        for step in (-1, 1):
            has_bg |= ~np.roll(padded, step, axis=axis)[core]
    return np.argwhere(mask & has_bg)


def _brute_force(pred, ref, spacing):
    sp = np.asarray(spacing, dtype=float)
    a, b = _brute_force_surface(pred) * sp, _brute_force_surface(ref) * sp
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    d_ab, d_ba = pairwise.min(axis=1), pairwise.min(axis=0)
    hd95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    asd = (d_ab.mean() + d_ba.mean()) / 2
    inter = (pred & ref).sum()
    return 2 * inter / (pred.sum() + ref.sum()), inter / (pred | ref).sum(), hd95, asd


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    shape = (14, 12, 13)
    spacing = (1.7, 0.9, 1.2)

    def random_mask():
        return ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.1

    pred, ref = random_mask(), random_mask()
    (rec,) = case_metrics(pred.astype(np.uint8), ref.astype(np.uint8), spacing=spacing)
    dice, jaccard, hd95_mm, asd_mm = _brute_force(pred, ref, spacing)
    _, _, hd95_vox, asd_vox = _brute_force(pred, ref, (1, 1, 1))
    assert rec.dice == pytest.approx(dice)
    assert rec.jaccard == pytest.approx(jaccard)
    assert rec.hd95_mm == pytest.approx(hd95_mm)
    assert rec.asd_mm == pytest.approx(asd_mm)
    assert rec.hd95_vox == pytest.approx(hd95_vox)
    assert rec.asd_vox == pytest.approx(asd_vox)


# --- summaries and folders -----------------------------------------------------------

def test_summary_counts_undefined_and_infinite_cases():
    ball = _sphere((16, 16, 16), (8, 8, 8), 4)
    empty = np.zeros_like(ball)
    recs = (
        case_metrics(ball, ball, name="same")
        + case_metrics(empty, ball, name="missed", num_classes=2)
        + case_metrics(empty, empty, name="none", num_classes=2)
    )
    (s,) = summarize(recs).values()
    assert s.n_cases == 3
    assert s.mean["dice"] == pytest.approx(2 / 3)  # dice is always defined
    assert s.mean["hd95_vox"] == 0.0  # only the finite case
    assert s.n_infinite["hd95_vox"] == 1 and s.n_undefined["hd95_vox"] == 1
    assert s.n_infinite["dice"] == 0 and s.n_undefined["dice"] == 0


def _geometry(spacing):
    from napari_sgrs.core.io import Geometry

    return Geometry(spacing=spacing, origin=(10.0, -5.0, 2.5), direction=tuple(np.eye(3).ravel()))


def _write(path, array, spacing=(2.0, 0.8, 0.8)):
    from napari_sgrs.core.io import write_volume

    path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(path, array, _geometry(spacing))


@pytest.fixture
def folders(tmp_path):
    shape = (16, 20, 20)
    ref_a = _sphere(shape, (8, 10, 10), 5)
    ref_b = _box(shape, (4, 4, 4), (10, 12, 12))
    _write(tmp_path / "labels" / "case_a.nii.gz", ref_a)
    _write(tmp_path / "labels" / "case_b.nii.gz", ref_b)
    _write(tmp_path / "pred" / "case_a.nii.gz", ref_a)
    _write(tmp_path / "pred" / "case_b.nii.gz", np.zeros(shape, np.uint8))
    return tmp_path


def test_evaluate_folders_end_to_end(folders):
    json_path = folders / "report.json"
    report = evaluate_folders(folders / "pred", folders / "labels", json_path=json_path)
    assert [(c.name, c.label) for c in report.cases] == [("case_a", 1), ("case_b", 1)]
    a, b = report.cases
    assert a.dice == 1.0 and a.hd95_mm == 0.0
    assert b.dice == 0.0 and b.hd95_mm == math.inf
    s = report.summary[1]
    assert s.mean["dice"] == pytest.approx(0.5)
    assert s.n_infinite["hd95_mm"] == 1 and s.mean["hd95_mm"] == 0.0

    data = json.loads(json_path.read_text())  # strict JSON: no NaN/Infinity tokens
    assert "Infinity" not in json_path.read_text()
    assert data["cases"][1]["hd95_mm"] == "inf"
    assert data["summary"]["1"]["n_infinite"]["hd95_mm"] == 1
    assert json.loads(report.to_json()) == data

    table = report.format_table()
    assert "case_a" in table and "case_b" in table and "1 n/a" in table


def test_evaluate_folders_distances_use_the_reference_spacing(tmp_path):
    shape = (16, 16, 16)
    ref = _box(shape, (2, 6, 6), (4, 10, 10))
    pred = _box(shape, (7, 6, 6), (9, 10, 10))
    _write(tmp_path / "labels" / "c.nii.gz", ref, spacing=(3.0, 1.0, 1.0))
    _write(tmp_path / "pred" / "c.nii.gz", pred, spacing=(3.0, 1.0, 1.0))
    (rec,) = evaluate_folders(tmp_path / "pred", tmp_path / "labels").cases
    assert rec.hd95_vox == pytest.approx(5.0) and rec.hd95_mm == pytest.approx(15.0)


def test_evaluate_folders_prediction_without_reference(folders):
    _write(folders / "pred" / "case_c.nii.gz", np.zeros((16, 20, 20), np.uint8))
    with pytest.raises(InputError, match="case_c.nii.gz has no reference"):
        evaluate_folders(folders / "pred", folders / "labels")


def test_evaluate_folders_reference_without_prediction(folders):
    (folders / "pred" / "case_b.nii.gz").unlink()
    with pytest.raises(InputError, match="case_b.nii.gz has no prediction"):
        evaluate_folders(folders / "pred", folders / "labels")


def test_evaluate_folders_shape_mismatch(folders):
    _write(folders / "pred" / "case_b.nii.gz", np.zeros((16, 20, 21), np.uint8))
    with pytest.raises(InputError, match="case_b.nii.gz has shape"):
        evaluate_folders(folders / "pred", folders / "labels")


def test_evaluate_folders_spacing_mismatch(folders):
    _write(folders / "pred" / "case_b.nii.gz", np.zeros((16, 20, 20), np.uint8), spacing=(1, 1, 1))
    with pytest.raises(InputError, match="spacing"):
        evaluate_folders(folders / "pred", folders / "labels")


def test_evaluate_folders_missing_or_empty_folder(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(InputError, match="pred: no volumes found"):
        evaluate_folders(tmp_path / "pred", tmp_path / "labels")
    with pytest.raises(InputError, match="nope: no such folder"):
        evaluate_folders(tmp_path / "nope", tmp_path / "labels")


def test_evaluate_folders_ignores_subfolders_and_pairs_across_formats(folders):
    (folders / "pred" / "case_a.nii.gz").unlink()
    _write(folders / "pred" / "case_a.nrrd", _sphere((16, 20, 20), (8, 10, 10), 5))
    _write(folders / "pred" / "probability" / "case_a.nii.gz", np.zeros((16, 20, 20), np.float32))
    report = evaluate_folders(folders / "pred", folders / "labels")
    assert [c.name for c in report.cases] == ["case_a", "case_b"]
    assert report.cases[0].dice == 1.0
