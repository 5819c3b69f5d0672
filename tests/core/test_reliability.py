"""The review overlay follows the model: regions, reliability, calibration and the estimated Dice
(napari_sgrs/core/reliability.py), on hand-built probabilities and networks whose mistakes are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_sgrs.core.codes import Region
from napari_sgrs.core.infer import Predictor
from napari_sgrs.core.reliability import (DEFAULT_THRESHOLD, MIN_HALFWIDTH, REVIEW_CAP, ReviewCalibration, calibrate,
                                          error_score, estimated_dice, outvoted, review_regions,
                                          review_threshold)


def _regions(prob, label=None, threshold=DEFAULT_THRESHOLD):
    prob = np.asarray(prob, np.float32)[..., None]  # (K, voxels, 1): the views' mean
    label = prob.argmax(0) if label is None else np.asarray(label)[:, None]
    return review_regions(error_score(prob, label), threshold, outvoted(prob, label))[:, 0]


def test_a_tie_between_two_foreground_classes_is_never_confident():
    # (0, 0.5, 0.5) has normalised entropy 0.19 < tau: the paper's rule calls it confident
    probs = np.array([[0.0, 0.1, 0.98, 0.95],
                      [0.5, 0.45, 0.01, 0.025],
                      [0.5, 0.45, 0.01, 0.025]])
    assert _regions(probs).tolist() == [Region.DISREGARDED, Region.DISREGARDED, Region.CONSISTENT,
                                        Region.CONSISTENT]


def test_inconsistent_where_the_views_outvote_the_shown_label():
    views = np.array([[0.3, 0.8, 0.55, 0.3], [0.7, 0.2, 0.45, 0.1], [0.0, 0.0, 0.0, 0.6]])
    shown = [0, 0, 0, 1]  # what the plain view said
    assert _regions(views, shown, 0.1).tolist() == [Region.INCONSISTENT, Region.DISREGARDED, Region.DISREGARDED,
                                                    Region.INCONSISTENT]


def test_threshold_holds_the_asked_share_of_the_errors_within_the_cap():
    rng = np.random.default_rng(0)
    score = rng.random(10_000)
    wrong = rng.random(10_000) < score * 0.2  # errors where the score is high, but not only there
    t = review_threshold(score, wrong, recall=0.5, cap=0.9)
    flagged = score >= t
    assert 0.5 <= (flagged & wrong).sum() / wrong.sum() < 0.51
    t_cap = review_threshold(score, wrong, recall=0.99, cap=REVIEW_CAP)
    assert (score >= t_cap).mean() == pytest.approx(REVIEW_CAP, abs=1e-3)
    # a score that says nothing catches errors only in proportion
    assert review_threshold(np.zeros(100), np.ones(100, bool)) > 0


def test_estimated_dice_is_the_dice_when_the_model_is_certain_and_right():
    label = np.zeros((8, 8, 8), np.int64)
    label[2:6, 2:6, 2:6] = 1
    prob = np.stack([label == 0, label == 1]).astype(np.float32)
    assert estimated_dice(prob, label) == pytest.approx(1.0)
    soft = prob * 0.8 + 0.1  # 0.9 / 0.1 everywhere: every background voxel may be foreground too
    expected_tp, expected_fg = 0.9 * 64, 0.9 * 64 + 0.1 * (512 - 64)
    assert estimated_dice(soft, label) == pytest.approx(2 * expected_tp / (64 + expected_fg), rel=1e-5)


def test_calibration_shifts_the_estimate_by_its_validation_error():
    label = np.zeros((6, 6, 6), np.int64)
    label[1:5, 1:5, 1:5] = 1
    truth = label.copy()
    truth[1, 1:5, 1:5] = 0  # the first slice of the object is wrong
    reliability = np.full(label.shape, 0.97, np.float32)
    reliability[1] = 0.6  # the wrong slice is the unsure one
    raw = 0.95
    true_dice = 2 * 48 / (64 + 48)
    one = (reliability, raw, label, truth, np.ones(label.shape, bool), true_dice)
    cal = calibrate([one])
    # one volume does not shift the estimate; its error widens the interval to reach its true Dice
    assert cal.volumes == 1 and cal.dice_bias == 0.0
    est, low, high = cal.dice(raw)
    assert est == raw and low <= true_dice <= high
    assert cal.dice_halfwidth == pytest.approx(max(MIN_HALFWIDTH, abs(true_dice - raw)))
    # three volumes that all overestimate by the same amount shift it onto the truth
    three = calibrate([one, one, one])
    assert three.dice_bias == pytest.approx(true_dice - raw) and three.dice(raw)[0] == pytest.approx(true_dice)
    assert three.dice_halfwidth == MIN_HALFWIDTH
    assert cal.threshold == pytest.approx(0.4, abs=1e-6) and cal.val_recall == 1.0
    again = ReviewCalibration.from_meta({"review": cal.as_meta()})
    assert again == cal
    assert ReviewCalibration.from_meta({}).dice(0.7) == (0.7, None, None)  # no validation split: no interval
    for damaged in ({"threshold": "0.3"}, {"threshold": float("nan")}, {"threshold": -1}, {"volumes": True}, []):
        assert ReviewCalibration.from_meta({"review": damaged}) == ReviewCalibration()


class _Known(nn.Module):
    """logits (0, a * x): foreground where the (unnormalised) image is positive, as sure as |x|
    is large. A 1x1x1 convolution, so every flipped view agrees with the plain one."""

    def __init__(self, a: float = 4.0):
        super().__init__()
        self.a = a

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), self.a * x], 1)


def _known_predictor(net=None):
    meta = {"config": {"patch_size": [8, 8, 8], "normalization": "none"}, "num_classes": 2}
    return Predictor(net or _Known(), meta, torch.device("cpu"))


def test_a_network_whose_mistakes_are_known_gets_them_flagged():
    image = np.full((16, 16, 16), -2.0, np.float32)
    image[4:12, 4:12, 4:12] = 2.0       # object: sure and right
    truth = (image > 0).astype(np.int64)
    image[0:3, 0:3, 0:3] = 0.05         # background the model calls foreground, barely: wrong, unsure
    pred = _known_predictor().predict(image, regions=True)
    wrong = pred.label != truth
    assert wrong.sum() == 27
    flagged = np.isin(pred.regions, (Region.DISREGARDED, Region.INCONSISTENT))
    assert flagged[wrong].all()
    assert not flagged[~wrong].any()  # everything else is sure
    np.testing.assert_allclose(pred.reliability[wrong], 1 / (1 + np.exp(-4 * 0.05)), rtol=1e-5)
    assert pred.review["flagged_share"] == pytest.approx(27 / 16 ** 3)


def test_an_uncertain_model_never_flags_more_than_the_cap():
    """Unsure everywhere (p = 0.6 under every view) and no validation split: only REVIEW_CAP of
    the volume is flagged, where the model is least sure, not the whole image."""
    image = np.random.default_rng(0).uniform(0.05, 0.15, (16, 16, 16)).astype(np.float32)
    pred = _known_predictor().predict(image, regions=True)
    flagged = np.isin(pred.regions, (Region.DISREGARDED, Region.INCONSISTENT))
    assert flagged.mean() == pytest.approx(REVIEW_CAP, abs=2 / 16 ** 3)
    assert pred.reliability[flagged].max() <= pred.reliability[~flagged].min()  # the least sure ones


class _Shifted(nn.Module):
    """Foreground one voxel to the right of where the image is positive: a network that is not
    flip-equivariant, so its flipped views disagree with the plain one at the shifted edge."""

    def forward(self, x):
        s = torch.roll(x, 1, dims=4)
        return torch.cat([torch.zeros_like(x), 6 * s], 1)


def test_the_views_flag_what_the_plain_view_is_sure_of_but_the_flips_are_not():
    image = np.full((8, 8, 8), -1.0, np.float32)
    image[:, :, 2:5] = 1.0
    pred = _known_predictor(_Shifted()).predict(image, regions=True)
    assert (pred.label.any(axis=(0, 1)) == [0, 0, 0, 1, 1, 1, 0, 0]).all()  # plain: columns 3-5, sure
    # the flipped-W view shifts the other way (columns 1-3): one vote of four against columns 1, 2,
    # 4 and 5; the D and H flips agree with the plain view, and column 3 has every vote
    doubted = pred.reliability.mean(axis=(0, 1)) < 0.9
    assert doubted.tolist() == [False, True, True, False, True, True, False, False]
    flagged = pred.regions != Region.CONSISTENT  # (at most REVIEW_CAP of the volume)
    assert flagged.any() and doubted[np.nonzero(flagged)[2]].all()


def test_regions_do_not_depend_on_any_random_state():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(20, 20, 20)).astype(np.float32)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1)).eval()
    p = Predictor(net, {"config": {"patch_size": [16, 16, 16]}, "num_classes": 2}, torch.device("cpu"))
    torch.manual_seed(1)
    a = p.predict(image, regions=True)
    torch.manual_seed(2)
    b = p.predict(image, regions=True)
    inc_a, inc_b = a.regions == Region.INCONSISTENT, b.regions == Region.INCONSISTENT
    union = (inc_a | inc_b).sum()
    assert union == 0 or (inc_a & inc_b).sum() / union == 1.0
    np.testing.assert_array_equal(a.regions, b.regions)


def test_a_tiny_run_calibrates_on_its_validation_volume_and_predict_writes_the_queue(tiny_cohort, tmp_path):
    """The trainer's calibration reaches the checkpoint and every prediction: the interval of the
    validation volume's own estimate holds its true Dice."""
    import json

    from napari_sgrs.core.checkpoint import load_checkpoint
    from napari_sgrs.core.io import find_cases, read_volume
    from napari_sgrs.core.predict import predict_folder
    from napari_sgrs.core.runfolder import RunFolder
    from napari_sgrs.core.train import train
    from tests.tiny import tiny_config

    run = tmp_path / "run"
    train(tiny_config(iterations=2, val_fraction=0.34), find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr),
          run)
    meta = load_checkpoint(RunFolder(run).checkpoint("last")).meta
    cal = ReviewCalibration.from_meta(meta)
    assert cal.volumes == 1 and 0 < cal.threshold <= 1 and cal.dice_halfwidth >= MIN_HALFWIDTH
    (val_name,) = meta["val_cases"]
    image = read_volume(tiny_cohort.images_tr / f"{val_name}.nii.gz").array
    truth = read_volume(tiny_cohort.labels_tr / f"{val_name}.nii.gz").array
    pred = Predictor.from_run(run, device="cpu").predict(image, regions=True)
    inter, total = ((pred.label == 1) & (truth == 1)).sum(), (pred.label == 1).sum() + (truth == 1).sum()
    true_dice = 2 * inter / total if total else 1.0
    assert pred.review["dice_low"] - 1e-6 <= true_dice <= pred.review["dice_high"] + 1e-6
    assert pred.review["dice_high"] - pred.review["dice_low"] <= 2 * max(MIN_HALFWIDTH, abs(true_dice - pred.review["estimated_dice"])) + 1e-6

    out = tmp_path / "pred"
    predict_folder(run, out, images=tiny_cohort.images_tr, labels=tiny_cohort.labels_tr, regions=True,
                   device="cpu")
    queue = json.loads((out / "review.json").read_text())
    names = [v["name"] for v in queue["volumes"]]
    assert sorted(names) == sorted(tiny_cohort.unlabeled_names)  # the labeled ones need no review
    dices = [v["estimated_dice"] for v in queue["volumes"]]
    assert dices == sorted(dices)  # worst first
    for line in queue["volumes"]:
        assert line["dice_low"] <= line["estimated_dice"] <= line["dice_high"]
        reliability = read_volume(out / "reliability" / line["file"]).array
        regions = read_volume(out / "regions" / line["file"]).array
        assert reliability.dtype == np.float32 and 0 <= reliability.min() and reliability.max() <= 1
        flagged = np.isin(regions, (Region.DISREGARDED, Region.INCONSISTENT))
        assert line["flagged_share"] == pytest.approx(flagged.mean())
        assert line["threshold"] >= cal.threshold and line["flagged_share"] <= REVIEW_CAP + 0.01
        assert (flagged == (1 - reliability >= min(line["threshold"], 0.5))).all()
    assert queue["calibration"]["threshold"] == cal.threshold
