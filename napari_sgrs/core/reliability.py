"""How far to trust each voxel of a prediction: the regions, the reliability map and the review queue.

The paper's synergy test compares the student's prediction on a patch with its prediction on the
patch mixed with a labeled partner. At inference that test did not point at the errors: with one
fixed partner the inconsistent set changed almost entirely with the partner, and taken as an
expectation over many partners it caught fewer wrong voxels than plain probability at equal count
(benchmarks/RESULTS.md, "Does the overlay point at the errors?", rule in
benchmarks/out/overlay/RULE.md). What measured best is a test with flipped views: each window is
predicted as it is and flipped along each of its three axes (:data:`REVIEW_FLIPS`, 4 passes).

For the label the user sees (the plain view's argmax) and the views' mean probability p:

- error score s = 1 - p(label) in [0, 1]; the reliability map written beside the regions is 1 - s;
- the paper's three regions keep their names and meanings: inconsistent where the views outvote
  the label (it does not survive the test), disregarded where s reaches the run's threshold (too
  uncertain to judge; a tie between two classes always does), consistent elsewhere;
- the threshold is calibrated on the validation split (:func:`calibrate`): the flagged voxels
  (disregarded + inconsistent) are sized to hold :data:`REVIEW_RECALL` of the validation errors,
  at most :data:`REVIEW_CAP` of a volume;
- an estimated Dice per volume (expected under p, shifted by its error on the validation split,
  with an interval) ranks the review queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .codes import Region

__all__ = ["REVIEW_CAP", "REVIEW_FLIPS", "REVIEW_RECALL", "ReviewCalibration", "calibrate", "error_score",
           "estimated_dice", "outvoted", "review_regions", "review_threshold", "volume_review", "volume_threshold"]

#: The test views besides the plain window: a flip of each spatial axis of (n, C, D, H, W) windows.
REVIEW_FLIPS: tuple[tuple[int, ...], ...] = ((2,), (3,), (4,))

#: The share of the validation volumes' wrong voxels that the flagged voxels are sized to hold ...
REVIEW_RECALL = 0.9
#: ... flagging at most this share of a volume (a reviewer corrects a few percent, not a third).
REVIEW_CAP = 0.05
#: The error score threshold without a validation split: the median of the calibrated thresholds
#: on the selection cohorts of benchmarks/overlay_benchmark.py (benchmarks/RESULTS.md).
DEFAULT_THRESHOLD = 0.15
#: The estimated Dice's half-interval is at least this wide: the 80th percentile of |estimate - true
#: Dice| on the selection cohorts' test volumes (benchmarks/overlay_benchmark.py).
MIN_HALFWIDTH = 0.11
#: Fewer validation volumes than this do not shift the estimate: on the selection cohorts a shift by
#: one volume's error made the median error worse (0.069 against 0.048 unshifted).
MIN_VOLUMES_TO_SHIFT = 3


def error_score(prob, label):
    """1 - prob[label] per voxel: prob (K, ...) and label (...), numpy or torch alike."""
    if isinstance(prob, torch.Tensor):
        return 1.0 - prob.gather(0, label.long()[None])[0]
    return 1.0 - np.take_along_axis(prob, label[None].astype(np.int64), 0)[0]


def estimated_dice(prob: np.ndarray, label: np.ndarray, valid: np.ndarray | None = None) -> float:
    """The Dice of ``label`` expected under the probabilities ``prob`` (K, ...), mean over the
    foreground classes: 2 sum_{label=c} p_c / (|label = c| + sum p_c)."""
    out = []
    for c in range(1, prob.shape[0]):
        pc = prob[c] if valid is None else prob[c][valid]
        lc = (label == c) if valid is None else (label[valid] == c)
        den = float(lc.sum()) + float(pc.sum())
        out.append(2.0 * float(pc[lc].sum()) / den if den > 0 else 1.0)
    return float(np.mean(out)) if out else 1.0


def outvoted(views: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Where the views' mean probability ``views`` (K, ...) prefers another class than ``label``:
    the label does not survive the test views."""
    return views.argmax(0) != label


def review_regions(score: np.ndarray, threshold: float, inconsistent: np.ndarray) -> np.ndarray:
    """uint8 :class:`~.codes.Region` map: ``inconsistent`` where given (:func:`outvoted`), else
    disregarded where the error score is at least ``threshold`` (never above 0.5, so a tie between
    two classes is never called confident), else consistent."""
    t = min(float(threshold), 0.5)
    out = np.full(score.shape, Region.CONSISTENT, np.uint8)
    out[score >= t] = Region.DISREGARDED
    out[inconsistent] = Region.INCONSISTENT
    return out


def review_threshold(score: np.ndarray, wrong: np.ndarray, valid: np.ndarray | None = None,
                     recall: float = REVIEW_RECALL, cap: float = REVIEW_CAP) -> float:
    """The error score at and above which the flagged voxels hold ``recall`` of the ``wrong`` ones,
    flagging at most ``cap`` of the (valid) voxels. ``score``/``wrong`` of one or more volumes,
    flattened alike."""
    score, wrong = np.asarray(score, np.float64).ravel(), np.asarray(wrong, bool).ravel()
    if valid is not None:
        keep = np.asarray(valid, bool).ravel()
        score, wrong = score[keep], wrong[keep]
    if score.size == 0:
        return DEFAULT_THRESHOLD
    order = np.argsort(-score, kind="stable")
    caught = np.cumsum(wrong[order])
    n = int(np.searchsorted(caught, recall * caught[-1])) + 1 if caught[-1] > 0 else 1
    n = max(1, min(n, int(cap * score.size)))
    # a threshold, not a count: every voxel tied with the last one is flagged too
    return float(max(score[order][n - 1], 1e-6))


@dataclass(frozen=True)
class ReviewCalibration:
    """What the validation split says about the review overlay (checkpoint metadata "review").

    threshold: flag a voxel whose error score is at least this. dice_bias: the shift of the estimated
    Dice (the mean of true - estimated over the validation volumes, from
    :data:`MIN_VOLUMES_TO_SHIFT` of them; else 0); dice_halfwidth: the estimate's half-interval, at
    least :data:`MIN_HALFWIDTH` and the largest validation error left after the shift. Without a
    validation split (``volumes`` 0) the threshold is :data:`DEFAULT_THRESHOLD` and the Dice has no
    interval.
    """

    threshold: float = DEFAULT_THRESHOLD
    dice_bias: float = 0.0
    dice_halfwidth: float | None = None
    volumes: int = 0
    val_recall: float | None = None    # share of the validation errors flagged
    val_flagged: float | None = None   # share of the validation voxels flagged

    def as_meta(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_meta(cls, meta: dict | None) -> "ReviewCalibration":
        d = (meta or {}).get("review")
        if not isinstance(d, dict):
            return cls()

        def number(key, low, high, default):
            v = d.get(key, default)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high
            return v if ok or (v is None and default is None) else default

        # a hand-edited or damaged checkpoint falls back to the uncalibrated overlay, never fails
        return cls(threshold=float(number("threshold", 1e-9, 1.0, DEFAULT_THRESHOLD)),
                   dice_bias=float(number("dice_bias", -1.0, 1.0, 0.0)),
                   dice_halfwidth=number("dice_halfwidth", 0.0, 1.0, None),
                   volumes=int(number("volumes", 0, 10**9, 0)),
                   val_recall=number("val_recall", 0.0, 1.0, None),
                   val_flagged=number("val_flagged", 0.0, 1.0, None))

    def dice(self, estimate: float) -> tuple[float, float | None, float | None]:
        """(calibrated estimate, low, high); low/high None without a validation split."""
        est = float(np.clip(estimate + self.dice_bias, 0.0, 1.0))
        if self.dice_halfwidth is None:
            return est, None, None
        return est, max(0.0, est - self.dice_halfwidth), min(1.0, est + self.dice_halfwidth)


def calibrate(volumes: Sequence[tuple]) -> ReviewCalibration:
    """Calibration from validation volumes, each (reliability map, raw estimated Dice, shown label,
    true label, valid mask, the shown label's true Dice)."""
    if not volumes:
        return ReviewCalibration()
    scores, wrongs, valids, resid = [], [], [], []
    for reliability, raw, label, truth, valid, true_dice in volumes:
        wrong = (label != truth) & valid
        scores.append(1.0 - np.asarray(reliability).ravel())
        wrongs.append(wrong.ravel())
        valids.append(np.asarray(valid).ravel())
        resid.append(true_dice - raw)
    score, wrong, valid = np.concatenate(scores), np.concatenate(wrongs), np.concatenate(valids)
    t = review_threshold(score, wrong, valid)
    flagged = (score >= min(t, 0.5)) & valid  # outvoted voxels have p(label) < 0.5: among these
    bias = float(np.mean(resid)) if len(resid) >= MIN_VOLUMES_TO_SHIFT else 0.0
    spread = max(abs(r - bias) for r in resid)
    return ReviewCalibration(threshold=t, dice_bias=bias, dice_halfwidth=max(MIN_HALFWIDTH, float(spread)),
                             volumes=len(volumes), val_recall=float((flagged & wrong).sum() / max(wrong.sum(), 1)),
                             val_flagged=float(flagged.sum() / max(valid.sum(), 1)))


def volume_threshold(score: np.ndarray, calibration: ReviewCalibration, valid: np.ndarray | None = None) -> float:
    """The run's threshold, raised where it would flag more than :data:`REVIEW_CAP` of this volume
    (an uncertain model, or no validation split): a reviewer is never sent to the whole volume."""
    scores = score if valid is None else score[valid]
    if scores.size == 0:
        return calibration.threshold
    return max(calibration.threshold, float(np.quantile(scores, 1.0 - REVIEW_CAP)))


def volume_review(prob: np.ndarray, label: np.ndarray, regions: np.ndarray, calibration: ReviewCalibration,
                  threshold: float, valid: np.ndarray | None = None) -> dict:
    """One volume's line in the review queue: estimated Dice with its interval, the flagged share
    (of ``regions``) and the threshold this volume was flagged at."""
    raw = estimated_dice(prob, label, valid)
    est, low, high = calibration.dice(raw)
    flagged = np.isin(regions, Region.flagged())
    if valid is not None:
        flagged &= valid
    n = regions.size if valid is None else int(valid.sum())
    return {"estimated_dice": est, "dice_low": low, "dice_high": high, "estimated_raw": raw,
            "flagged_share": float(flagged.sum() / max(n, 1)), "threshold": threshold,
            "calibrated": calibration.volumes > 0, "validation_volumes": calibration.volumes}
