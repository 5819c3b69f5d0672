"""One training step's loss for each method, chosen by name (``STEPS[config.method]``), as
nnU-Net chooses its trainer classes: supervised, mean-teacher, and sgrs_step for both SGRS methods.
SGRS-Net as published (``sgrs``) and our recipe (``anchored-sgrs``) differ only in the settings of
that one step (region weighting, pseudo views, Dice forms, teacher mode, the label anchor:
settings.METHOD_DEFAULTS), so each part can be switched on its own.

Every step function has one signature, ``step(student, teacher, x, y, u, step, config, rng, gen,
rampup_len, num_classes, anchor=None) -> StepOutput``, computes the loss and does no backward:
x (b, 1, D, H, W) labeled patches, y (b, D, H, W) their labels, u (bu, 1, D, H, W) unlabeled
patches or None. The trainer owns the optimiser, the EMA and the anchor's own update.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import sgrs as S
from .device import amp_dtype
from .distributed import ddp
from .errors import CheckpointError
from .network import build_model, load_momentum, make_optimizer, optimizer_tensors, set_learning_rate


@dataclass
class StepOutput:
    loss: torch.Tensor
    loss_sup: float
    loss_unsup: float
    weight: float
    regions: dict[str, float] = field(default_factory=dict)


def supervised_step(student, teacher, x, y, u, step: int, config, rng: np.random.Generator,
                    gen: torch.Generator | None, rampup_len: float, num_classes: int, anchor=None) -> StepOutput:
    """The labeled patches alone: cross-entropy + Dice (teacher, u and the rest are unused)."""
    ls = S.supervised_loss(student(x), y, config.ignore_index, config.dice_form)
    return StepOutput(ls, float(ls.detach()), 0.0, 0.0)


def mean_teacher_step(student, teacher, x, y, u, step: int, config, rng: np.random.Generator,
                      gen: torch.Generator | None, rampup_len: float, num_classes: int, anchor=None) -> StepOutput:
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
              gen: torch.Generator | None, rampup_len: float, num_classes: int, anchor=None) -> StepOutput:
    """SGRS-Net (method sgrs) and Anchored SGRS (anchored-sgrs): pseudo labels of the teacher
    (averaged with ``anchor``'s, a network such as LabelAnchor.ema, when given) teach the student's
    views U and U_mix, weighted by synergy region. Settings: use_mix, use_regions,
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
    pseudo = _pseudo_label(teacher_logits, anchor, u_noisy)
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


def _pseudo_label(teacher_logits, anchor, u_noisy):
    """The teacher's hard label, or with an anchor the argmax of the mean of both probabilities."""
    if anchor is None:
        return S.hard_label(teacher_logits)
    with torch.no_grad():
        mean_probs = 0.5 * (torch.softmax(teacher_logits.float(), 1) + torch.softmax(anchor(u_noisy).float(), 1))
    return S.hard_label(mean_probs)


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
                                  "sgrs": sgrs_step, "anchored-sgrs": sgrs_step}


class LabelAnchor:
    """``--pseudo-anchor labels``: a second V-Net trained on the labeled patches alone.

    It has its own initialisation, optimizer and EMA (``ema``, in eval mode, as the teacher). The
    EMA's probabilities on the unlabeled patch are averaged with the teacher's to make the pseudo
    label (:func:`sgrs_step`). Pseudo labels never teach it, so a mistake of the student that the
    teacher confirms must also convince a network that has only seen labels: the loop that
    confirms the teacher's false positives loses half its gain (co-training, in a one-sided form).
    """

    SEED_OFFSET = 104729  # the anchor's initialisation stream, apart from the student's

    def __init__(self, config: Any, num_classes: int, device: torch.device, distributed: bool):
        with torch.random.fork_rng(devices=[]):  # the student's draws stay what they were without it
            torch.manual_seed(config.seed + self.SEED_OFFSET)
            net = build_model(config, num_classes)
        self.net = net.to(device, memory_format=torch.channels_last_3d).train()
        self.ema = copy.deepcopy(net).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.optimizer = make_optimizer(net, config)
        self.forward = ddp(net, device) if distributed else net
        self.config = config
        amp = amp_dtype(config.amp, device)
        self.autocast = dict(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """One supervised SGD step on the labeled patches, then its EMA update. Returns the loss,
        detached and left on the device: the loop reads it only when it logs, so a GPU step does
        not wait for it."""
        with torch.autocast(**self.autocast):
            loss = S.supervised_loss(self.forward(x), y, self.config.ignore_index, self.config.dice_form)
        set_learning_rate(self.optimizer, self.config, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        S.ema_update(self.ema, self.net, S.ema_alpha(step, self.config.ema_decay))
        return loss.detach()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"anchor.{k}": v for k, v in self.net.state_dict().items()},
                **{f"anchor_ema.{k}": v for k, v in self.ema.state_dict().items()},
                **optimizer_tensors(self.optimizer, "anchor_optim.momentum")}

    def load(self, ckpt) -> None:
        """Restore from a checkpoint of an anchored run (CheckpointError if it has no anchor)."""
        state, ema = ckpt.state_dict("anchor"), ckpt.state_dict("anchor_ema")
        if not state or not ema:
            raise CheckpointError("cannot resume with --pseudo-anchor labels: the run was trained without the "
                                  "anchor; pass --pseudo-anchor off")
        self.net.load_state_dict(state)
        self.ema.load_state_dict(ema)
        load_momentum(self.optimizer, ckpt.tensors, "anchor_optim.momentum")
