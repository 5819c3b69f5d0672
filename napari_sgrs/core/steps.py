"""One training step's loss for each method, chosen by name (``STEPS[config.method]``), as
nnU-Net chooses its trainer classes: supervised, mean-teacher, and sgrs_step for both SGRS methods.
SGRS-Net as published (``sgrs``) and our recipe (``sgrs-plus``) differ only in the settings of
that one step (region weighting, pseudo views, Dice forms, teacher mode:
settings.METHOD_DEFAULTS), so each part can be switched on its own.

Every step function has one signature, ``step(student, teacher, x, y, u, step, config, rng, gen,
rampup_len, num_classes) -> StepOutput``, computes the loss and does no backward:
x (b, 1, D, H, W) labeled patches, y (b, D, H, W) their labels, u (bu, 1, D, H, W) unlabeled
patches or None. The trainer owns the optimiser and the EMA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import sgrs as S


@dataclass
class StepOutput:
    loss: torch.Tensor
    loss_sup: float
    loss_unsup: float
    weight: float
    regions: dict[str, float] = field(default_factory=dict)


def supervised_step(student, teacher, x, y, u, step: int, config, rng: np.random.Generator,
                    gen: torch.Generator | None, rampup_len: float, num_classes: int) -> StepOutput:
    """The labeled patches alone: cross-entropy + Dice (teacher, u and the rest are unused)."""
    ls = S.supervised_loss(student(x), y, config.ignore_index, config.dice_form)
    return StepOutput(ls, float(ls.detach()), 0.0, 0.0)


def mean_teacher_step(student, teacher, x, y, u, step: int, config, rng: np.random.Generator,
                      gen: torch.Generator | None, rampup_len: float, num_classes: int) -> StepOutput:
    """The textbook Mean Teacher baseline: the MSE between the student's and the teacher's (noisy
    input) softmax on the unlabeled patches, ramped up; no gate, mix or regions."""
    if u is None:
        return supervised_step(student, teacher, x, y, u, step, config, rng, gen, rampup_len, num_classes)
    b = x.shape[0]
    weight = _unsup_weight(config, step, rampup_len)
    u_noisy = S.add_noise(u, generator=gen)
    with torch.no_grad():
        teacher_logits = teacher(u_noisy)
    logits = student(torch.cat([x, u], 0))
    ls = S.supervised_loss(logits[:b], y, config.ignore_index, config.dice_form)
    lu = F.mse_loss(torch.softmax(logits[b:], 1), torch.softmax(teacher_logits.float(), 1))
    return StepOutput(ls + weight * lu, float(ls.detach()), float(lu.detach()), weight)


def sgrs_step(student, teacher, x, y, u, step: int, config, rng: np.random.Generator,
              gen: torch.Generator | None, rampup_len: float, num_classes: int) -> StepOutput:
    """SGRS-Net (method sgrs) and SGRS+ (sgrs-plus): the teacher's hard labels teach
    the student's views U and U_mix, weighted by synergy region. Settings: use_mix, use_regions,
    region_weighting, pseudo_views, tau, dice_form, teacher_mode, rampup_stair."""
    if u is None:
        return supervised_step(student, teacher, x, y, u, step, config, rng, gen, rampup_len, num_classes)
    b, bu = x.shape[0], u.shape[0]
    weight = _unsup_weight(config, step, rampup_len)
    u_noisy = S.add_noise(u, generator=gen)
    # the noisy labeled patches feed the mix only: no noise drawn without it
    x_noisy = S.add_noise(x, generator=gen) if config.use_mix else None
    # teacher_mode train: the authors' teacher, never put in eval mode (dropout on, batch statistics)
    teacher.train(config.teacher_mode == "train")
    with torch.no_grad():
        teacher_logits = teacher(u_noisy)
    pseudo = S.hard_label(teacher_logits)
    u_mix = _mixed_view(u_noisy, x_noisy, b, config, rng)
    logits = student(torch.cat([x, u, u_mix], 0))  # one forward over the three streams
    ls = S.supervised_loss(logits[:b], y, config.ignore_index, config.dice_form)
    lu_logits, mix_logits = logits[b:b + bu], logits[b + bu:]
    with torch.no_grad():
        regions = S.synergy_regions(torch.softmax(lu_logits.float(), 1), torch.softmax(mix_logits.float(), 1),
                                    config.tau)
    if config.pseudo_views == "mix":
        lu_logits = lu_logits.detach()  # the pseudo label only teaches the view that did not make it
    lu = S.regional_loss(lu_logits.float(), mix_logits.float(), pseudo, regions,
                         use_regions=config.use_regions, reference_compat=config.reference_compat,
                         weighting=config.region_weighting, dice_form=config.dice_form)
    return StepOutput(ls + weight * lu, float(ls.detach()), float(lu.detach()), weight, regions.fractions())


def _unsup_weight(config, step: int, rampup_len: float) -> float:
    """The unlabeled loss's weight at ``step``: the sigmoid ramp-up, read at the start of the
    step's stair (``rampup_stair`` 150: the authors' iter // 150; 1: continuous)."""
    return config.unsup_weight * S.sigmoid_rampup(step - step % config.rampup_stair, rampup_len)


def _mixed_view(u_noisy, x_noisy, b: int, config, rng: np.random.Generator):
    """U_mix = lam U' + (1 - lam) X' with a random labeled partner per unlabeled patch (Mix
    Augmentation); without mix (the ablation) the second view is the noisy unlabeled patch alone."""
    if not config.use_mix:
        return u_noisy
    bu = u_noisy.shape[0]
    lam = S.sample_mix_lambda(bu, config.mix_alpha, rng)
    partner = torch.from_numpy(rng.integers(0, b, bu))
    return S.mix_augment(u_noisy, x_noisy, lam, partner)


StepFunction = Callable[..., StepOutput]

#: The step of each method (TrainConfig.method), looked up when a trainer is set up.
STEPS: dict[str, StepFunction] = {"supervised": supervised_step, "mean-teacher": mean_teacher_step,
                                  "sgrs": sgrs_step, "sgrs-plus": sgrs_step}
