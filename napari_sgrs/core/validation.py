"""Validation during training: the student segments the held-out labeled volumes through the same
:class:`~.infer.Predictor` that ``sgrs predict`` uses, and the trainer hears the mean Dice, how
accurate each region is, and (``tau_auto``) a recalibrated tau. The review overlay is calibrated
here too (:func:`review_calibration`): the checkpoint's metadata "review" sizes the flagged voxels
and the estimated Dice of every later prediction.

This module is the one place where training meets inference, so :mod:`.train` imports it and
:mod:`.infer` imports neither.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import sgrs as S
from .codes import Region
from .events import EventKind, EventWriter
from .infer import Predictor
from .metrics import case_metrics
from .reliability import ReviewCalibration, calibrate, review_regions, volume_threshold

#: The regions of Prediction.regions that validation scores, with their names in events.
SCORED_REGIONS = tuple((int(region), region.key) for region in Region.shown())


def validate(student: torch.nn.Module, val: list, meta: dict, device: torch.device,
             writer: EventWriter, step: int, config: Any) -> float:
    """Mean foreground Dice of the student on the validation volumes (``val``: LoadedCase list; eval
    mode, back to train mode after), plus the per-region accuracy of its prediction: the evidence
    that regions separate good from bad. The review calibration goes into ``meta["review"]``; with
    ``config.tau_auto`` tau is recalibrated here and written into ``config`` and ``meta``."""
    predictor = Predictor(student, meta, device)
    try:
        dices, accuracy = [], {name: [0, 0] for _, name in SCORED_REGIONS}
        probs, labels, valids, preds = [], [], [], []
        for case in val:
            pred = predictor.predict(case.image, regions=True, keep_probabilities=config.tau_auto)
            valid = case.label != meta["config"]["ignore_index"]
            if config.tau_auto:
                probs.append(torch.from_numpy(pred.probabilities).flatten(1))
                labels.append(torch.from_numpy(case.label).flatten())
                valids.append(torch.from_numpy(valid).flatten())
            dices.append(_case_dice(pred.label, case, valid, meta["num_classes"]))
            preds.append((pred, case.label, valid, dices[-1]))
        calibration = review_calibration(preds)
        meta["review"] = calibration.as_meta()
        for pred, label, valid, _ in preds:  # the regions under the calibration just made
            score = 1.0 - pred.reliability
            pred.regions = review_regions(score, volume_threshold(score, calibration),
                                          pred.regions == Region.INCONSISTENT)
            _count_region_accuracy(accuracy, pred, label, valid)
        dice = float(np.mean(dices))
        if config.tau_auto:
            _recalibrate_tau(torch.cat(probs, 1), torch.cat(labels), torch.cat(valids), meta, writer, step, config)
        writer.emit(EventKind.VALIDATION, step, dice=dice, per_case=dict(zip([c.name for c in val], dices)))
        writer.emit(EventKind.REGIONS, step, scope="calibration", **calibration.as_meta())
        total = sum(v[1] for v in accuracy.values()) or 1
        writer.emit(EventKind.REGIONS, step, scope="validation",
                    **{k: v[1] / total for k, v in accuracy.items()},
                    **{f"accuracy_{k}": (v[0] / v[1] if v[1] else None) for k, v in accuracy.items()})
        return dice
    finally:
        student.train()


def review_calibration(predictions: list) -> ReviewCalibration:
    """Calibrate the review overlay on validation predictions: (Prediction made with regions=True,
    true label, valid mask, its Dice as validation scores it) for each volume."""
    return calibrate([(pred.reliability, pred.review["estimated_raw"], pred.label, label, valid, true_dice)
                      for pred, label, valid, true_dice in predictions])


def _case_dice(label: np.ndarray, case, valid: np.ndarray, num_classes: int) -> float:
    """Mean foreground Dice of one volume over its annotated voxels."""
    rows = case_metrics(np.where(valid, label, 0), np.where(valid, case.label, 0), spacing=case.spacing,
                        num_classes=num_classes, name=case.name)
    return float(np.mean([r.dice for r in rows]))


def _count_region_accuracy(accuracy: dict[str, list[int]], pred, label: np.ndarray, valid: np.ndarray) -> None:
    """Add (correct voxels, voxels) of each scored region of one volume to ``accuracy``."""
    correct = (pred.label == label) & valid
    for code, name in SCORED_REGIONS:
        m = (pred.regions == code) & valid
        accuracy[name][0] += int((correct & m).sum())
        accuracy[name][1] += int(m.sum())


def _recalibrate_tau(probs: torch.Tensor, labels: torch.Tensor, valids: torch.Tensor, meta: dict,
                     writer: EventWriter, step: int, config: Any) -> None:
    """tau from the validation probabilities (sgrs.calibrate_tau), into the config and the record."""
    tau = S.calibrate_tau(probs, labels, valids, error_rate=config.tau_error_rate, default=config.tau)
    config.tau = tau
    meta["tau"] = tau
    meta["config"]["tau"] = tau
    writer.emit(EventKind.REGIONS, step, scope="tau", tau=tau, error_rate=config.tau_error_rate)
