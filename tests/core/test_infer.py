"""Whole-volume inference: window placement, Gaussian weights, padding, regions, MONAI parity."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sgrs.core.codes import Region
from napari_sgrs.core.infer import Predictor, gaussian_importance, sliding_window, window_starts
from napari_sgrs.core.vnet import VNet

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import tiny_config  # noqa: E402


@pytest.mark.parametrize("size,patch,overlap", [
    (16, 16, 0.5), (17, 16, 0.5), (40, 16, 0.5), (41, 16, 0.5), (100, 32, 0.25), (100, 32, 0.9), (33, 32, 0.0),
])
def test_windows_cover_every_voxel_and_the_last_ends_at_the_border(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s:s + patch] = True
    assert covered.all()
    assert starts[0] == 0 and starts[-1] + patch == size
    assert starts == sorted(set(starts))
    if len(starts) > 1:  # neighbours overlap by at least the asked share
        assert max(b - a for a, b in zip(starts, starts[1:])) <= max(1, int(patch * (1 - overlap)))


def test_gaussian_weights_are_positive_and_peak_in_the_centre():
    w = gaussian_importance((16, 32, 32))
    assert w.shape == (16, 32, 32) and (w > 0).all()
    assert float(w.max()) == pytest.approx(1.0)
    assert float(w[0, 0, 0]) < float(w[8, 16, 16])


def _net(filters=2, seed=0):
    torch.manual_seed(seed)
    return VNet(1, 2, filters, dropout=0.0).eval()


def test_volume_of_exactly_one_patch_equals_one_forward():
    net = _net()
    vol = torch.randn(1, 16, 32, 16)
    with torch.no_grad():
        want = torch.softmax(net(vol[None]), 1)[0]
    (got,) = sliding_window(vol, lambda w: (torch.softmax(net(w), 1),), (16, 32, 16), 1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _predictor(patch=(16, 16, 16), filters=2):
    meta = {"config": {"patch_size": list(patch), "normalization": "zscore"}, "num_classes": 2}
    return Predictor(_net(filters), meta, torch.device("cpu"))


@pytest.mark.parametrize("shape", [(5, 9, 13), (16, 7, 20), (21, 33, 17)])
def test_odd_shapes_are_padded_and_cropped_back(shape):
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    pred = _predictor().predict(image, regions=True, keep_probabilities=True)
    assert pred.label.shape == pred.probability.shape == pred.regions.shape == shape
    assert pred.probabilities.shape == (2,) + shape
    assert pred.label.dtype == np.uint8 and pred.probability.dtype == np.float32
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(pred.label, pred.probabilities.argmax(0))


def test_region_map_uses_the_region_codes():
    pred = _predictor().predict(np.random.default_rng(1).normal(size=(20, 20, 20)).astype(np.float32),
                                regions=True)
    codes = set(np.unique(pred.regions).tolist())
    assert codes <= {Region.DISREGARDED, Region.CONSISTENT, Region.INCONSISTENT}
    assert Region.NONE not in codes  # the three regions partition the volume
    # the regions follow the reliability map: below 0.5 inconsistent (binary), from the volume's
    # threshold (the default, raised to flag at most REVIEW_CAP of a volume) disregarded
    t = pred.review["threshold"]
    score = 1.0 - pred.reliability
    assert (pred.regions[score > 0.5] == Region.INCONSISTENT).all()
    assert (pred.regions[(score >= t) & (score <= 0.5)] == Region.DISREGARDED).all()
    assert (pred.regions[score < t] == Region.CONSISTENT).all()
    assert pred.reliability.dtype == np.float32 and 0.0 <= pred.reliability.min() <= pred.reliability.max() <= 1.0


def test_predictor_from_a_tiny_trained_run(tiny_cohort, tmp_path):
    from napari_sgrs.core.io import find_cases, read_volume
    from napari_sgrs.core.train import train

    train(tiny_config(iterations=2, val_every=100), find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr),
          tmp_path / "run")
    predictor = Predictor.from_run(tmp_path / "run", device="cpu")
    assert predictor.patch == (16, 16, 16) and predictor.num_classes == 2
    assert predictor.channels_last  # the training default, kept for inference speed
    image = read_volume(next(iter(sorted(tiny_cohort.images_ts.iterdir())))).array
    pred = predictor.predict(image, regions=True)
    assert pred.label.shape == image.shape and pred.regions.shape == image.shape
    # channels_last is a layout, not a different network: same output as the contiguous model
    predictor.model.to(memory_format=torch.contiguous_format)
    plain = Predictor(predictor.model, predictor.meta, predictor.device)
    assert not plain.channels_last
    np.testing.assert_allclose(plain.predict(image).probability, pred.probability, atol=1e-4)


# ----------------------------------------------------------------------------- MONAI parity

monai_inferers = pytest.importorskip("monai.inferers")


def test_matches_monai_exactly_where_windows_and_weights_match():
    """48 = 2 windows of 32 at overlap 0.5 in both implementations (starts 0 and 16), so with
    MONAI's own importance map as our weights the two must agree to float precision."""
    from monai.data.utils import compute_importance_map

    net = _net(seed=1)
    vol = torch.randn(1, 48, 48, 32)
    patch = (32, 32, 32)
    assert window_starts(48, 32, 0.5) == [0, 16] and window_starts(32, 32, 0.5) == [0]
    fwd = lambda w: torch.softmax(net(w), 1)  # noqa: E731
    with torch.no_grad():
        weight = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125)
        (ours,) = sliding_window(vol, lambda w: (fwd(w),), patch, 1, 2, overlap=0.5, weight=weight)
        theirs = monai_inferers.sliding_window_inference(vol[None], patch, 4, fwd, overlap=0.5, mode="gaussian",
                                                         sigma_scale=0.125)[0]
        # with our own Gaussian (MONAI floors weights at 1e-3, ours at the smallest Gaussian value)
        # only voxels near window corners, where the floor dominates, differ noticeably
        (ours_default,) = sliding_window(vol, lambda w: (fwd(w),), patch, 1, 2, overlap=0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    diff = (ours_default - theirs).abs()
    assert float(diff.mean()) < 0.005 and float(diff.max()) < 0.1


def test_close_to_monai_where_window_placement_differs():
    """56 with patch 32, overlap 0.5: we spread 3 windows evenly (0, 12, 24), MONAI steps by 16
    and clamps the last (0, 16, 24). Both cover everything; on a smooth network (the output
    varies slowly with position) the weighted averages differ little."""
    assert window_starts(56, 32, 0.5) == [0, 12, 24]
    torch.manual_seed(0)
    smooth = torch.nn.Sequential(torch.nn.AvgPool3d(9, 1, 4), torch.nn.Conv3d(1, 2, 1))
    vol = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 56, 56, 56), 9, 1, 4)[0] * 5
    patch = (32, 32, 32)
    fwd = lambda w: torch.softmax(smooth(w), 1)  # noqa: E731
    with torch.no_grad():
        (ours,) = sliding_window(vol, lambda w: (fwd(w),), patch, 1, 2, overlap=0.5)
        theirs = monai_inferers.sliding_window_inference(vol[None], patch, 4, fwd, overlap=0.5, mode="gaussian",
                                                         sigma_scale=0.125)[0]
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all()
    assert float((ours - theirs).abs().mean()) < 0.01
    assert float((ours.argmax(0) == theirs.argmax(0)).float().mean()) > 0.99
