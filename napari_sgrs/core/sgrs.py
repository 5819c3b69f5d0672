"""The pieces of SGRS-Net: noise, Mix Augmentation, synergy regions, regional losses, EMA, ramp-up.

All functions are pure tensor code so that each can be tested with hand-built inputs.
Layouts: probabilities ``(B, K, D, H, W)``; hard labels and masks ``(B, D, H, W)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .codes import Region
from .settings import PAPER_TAU  # the paper's threshold on the entropy (log10 units) of a binary prediction

LOG10_2 = math.log10(2.0)


def add_noise(x: torch.Tensor, std: float = 0.1, clip: float = 0.2,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """x + clip(N(0, std^2), -clip, clip), the Mean Teacher input perturbation."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + (noise * std).clamp_(-clip, clip)


def sample_mix_lambda(n: int, alpha: float, rng: np.random.Generator) -> torch.Tensor:
    """lambda ~ Beta(alpha, alpha), folded to lambda = max(lambda, 1 - lambda) >= 0.5. Shape (n,).

    Drawn from the run's numpy Generator so a run is a function of its seed (and resumable:
    the generator's state is saved in the checkpoint)."""
    if alpha <= 0:
        raise ValueError(f"mix alpha must be > 0, got {alpha}")
    lam = rng.beta(alpha, alpha, size=n)
    return torch.from_numpy(np.maximum(lam, 1.0 - lam)).float()


def mix_augment(unlabeled: torch.Tensor, labeled: torch.Tensor, lam: torch.Tensor,
                partner: torch.Tensor) -> torch.Tensor:
    """U_mix[i] = lam[i] * U[i] + (1 - lam[i]) * X[partner[i]].

    unlabeled: (Bu, C, D, H, W); labeled: (Bl, C, D, H, W); lam: (Bu,) in [0.5, 1];
    partner: (Bu,) long indices into the labeled batch.
    """
    lam = lam.to(unlabeled.device, unlabeled.dtype).view(-1, *([1] * (unlabeled.dim() - 1)))
    return lam * unlabeled + (1.0 - lam) * labeled[partner.to(labeled.device)]


def hard_label(prob_or_logits: torch.Tensor) -> torch.Tensor:
    """argmax over classes (dim 1) -> (B, ...) long. For two classes a comparison, which on CPU is
    ~50x faster than argmax over a channels-last tensor; ties go to class 0 as with argmax."""
    if prob_or_logits.shape[1] == 2:
        return (prob_or_logits[:, 1] > prob_or_logits[:, 0]).long()
    return prob_or_logits.contiguous().argmax(1)


def entropy_log10(prob: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-voxel entropy in log10 units of (B, K, ...) probabilities -> (B, ...)."""
    return -(prob * torch.log10(prob.clamp_min(eps))).sum(dim=1)


def normalised_entropy(prob: torch.Tensor) -> torch.Tensor:
    """Entropy scaled so that the binary case is unchanged: H / log10(K) * log10(2).

    Comparing this against tau is the same as comparing H / log10(K) against tau / log10(2)
    (../shared/SGRS.md): a K-class prediction is judged by the fraction of its maximum entropy.
    """
    k = prob.shape[1]
    return entropy_log10(prob) * (LOG10_2 / math.log10(k))


@dataclass
class SynergyRegions:
    """Boolean masks (B, D, H, W). consistent/inconsistent already exclude disregarded voxels."""

    consistent: torch.Tensor
    inconsistent: torch.Tensor
    disregarded: torch.Tensor
    agree: torch.Tensor  # argmax agreement before disregarded voxels are removed (C of the paper)

    def as_map(self) -> torch.Tensor:
        """uint8 map of :class:`~.codes.Region` codes."""
        out = torch.full(self.disregarded.shape, Region.NONE, dtype=torch.uint8,
                         device=self.disregarded.device)
        out[self.consistent] = Region.CONSISTENT
        out[self.inconsistent] = Region.INCONSISTENT
        out[self.disregarded] = Region.DISREGARDED
        return out

    def fractions(self) -> dict[str, float]:
        n = max(self.disregarded.numel(), 1)
        return {"disregarded": float(self.disregarded.sum()) / n,
                "consistent": float(self.consistent.sum()) / n,
                "inconsistent": float(self.inconsistent.sum()) / n}


def synergy_regions(prob: torch.Tensor, prob_mix: torch.Tensor, tau: float = PAPER_TAU) -> SynergyRegions:
    """Synergy evaluation of the student's predictions on U and on U_mix.

    consistent: argmax agree; inconsistent: argmax differ; disregarded: either prediction's
    (normalised, log10) entropy exceeds tau. The disregarded voxels are removed from the other
    two, so the three masks partition the volume.
    """
    if prob.shape != prob_mix.shape:
        raise ValueError(f"prob and prob_mix shapes differ: {tuple(prob.shape)} vs {tuple(prob_mix.shape)}")
    agree = hard_label(prob) == hard_label(prob_mix)
    disregarded = (normalised_entropy(prob) > tau) | (normalised_entropy(prob_mix) > tau)
    keep = ~disregarded
    return SynergyRegions(consistent=agree & keep, inconsistent=~agree & keep, disregarded=disregarded,
                          agree=agree)


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean CE over voxels where mask is True. mask has the target's shape (B, D, H, W):
    each sample's mask weighs only that sample's voxels (no broadcasting across the batch)."""
    if mask.shape != target.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal target shape {tuple(target.shape)}")
    ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    m = mask.to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def masked_soft_dice(prob: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     smooth: float = 1.0, skip_empty: bool = False) -> torch.Tensor:
    """1 - mean over foreground classes of soft Dice, counted only where mask is True.

    prob (B, K, ...), target (B, ...) long, mask (B, ...) bool. Background is left out, as in the
    V-Net/UA-MT code for small targets: its Dice is near 1 and would drown the target's.

    ``skip_empty``: classes absent from the (masked) target are left out. Used for pseudo
    labels: when the teacher marks no target in a patch, 1 - (0 + s) / (sum p + s) punishes every
    foreground voxel the student dares to predict, which drives a young student to predict
    background everywhere (we saw whole runs collapse to Dice 0); the CE terms still apply.
    """
    k = prob.shape[1]
    m = mask.unsqueeze(1).to(prob.dtype)
    fg = prob[:, 1:] * m  # background is not scored: skip its products entirely
    classes = torch.arange(1, k, device=target.device).view(1, k - 1, *([1] * (target.dim() - 1)))
    onehot = (target.unsqueeze(1) == classes).to(prob.dtype) * m
    dims = (0,) + tuple(range(2, prob.dim()))
    inter = (fg * onehot).sum(dims)
    denom = fg.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    if skip_empty:
        present = onehot.sum(dims) > 0
        if not bool(present.any()):
            return fg.sum() * 0.0  # keeps the graph; no Dice signal from this region
        return 1.0 - dice[present].mean()
    return 1.0 - dice.mean()


def paper_supervised_dice(prob: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The authors' supervised Dice (``dice_form="paper"``): the mean over every class, background
    included, of 1 - sum(p t) / (sum p^2 + sum t^2) over the whole batch, where mask is True.
    Squared denominators and no factor 2, so a perfect prediction scores 0.5, as in their code."""
    k = prob.shape[1]
    m = mask.unsqueeze(1).to(prob.dtype)
    p = prob * m
    onehot = F.one_hot(target, k).movedim(-1, 1).to(prob.dtype) * m
    dims = (0,) + tuple(range(2, prob.dim()))
    return (1.0 - (p * onehot).sum(dims) / ((p * p).sum(dims) + (onehot * onehot).sum(dims))).mean()


def per_sample_soft_dice(prob: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                         smooth: float = 1.0) -> torch.Tensor:
    """nnU-Net-style soft Dice loss, the authors' region Dice (``dice_form="paper"``): 1 - the mean
    over samples and classes (background included) of (2 tp + smooth) / (2 tp + fp + fn + smooth),
    tp, fp and fn counted where mask (B, ...) is True."""
    k = prob.shape[1]
    m = mask.unsqueeze(1).to(prob.dtype)
    onehot = F.one_hot(target, k).movedim(-1, 1).to(prob.dtype)
    dims = tuple(range(2, prob.dim()))
    tp = (prob * onehot * m).sum(dims)
    fp = (prob * (1.0 - onehot) * m).sum(dims)
    fn = ((1.0 - prob) * onehot * m).sum(dims)
    return 1.0 - ((2.0 * tp + smooth) / (2.0 * tp + fp + fn + smooth)).mean()


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None,
                    dice_form: str = "foreground") -> torch.Tensor:
    """0.5 * (CE + Dice) on labeled voxels; voxels equal to ignore_index count in neither.
    ``dice_form``: foreground (:func:`masked_soft_dice`) or paper (:func:`paper_supervised_dice`)."""
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    ce = masked_cross_entropy(logits, safe, valid)
    prob = torch.softmax(logits, 1)
    dice = paper_supervised_dice(prob, safe, valid) if dice_form == "paper" else masked_soft_dice(prob, safe, valid)
    return 0.5 * (ce + dice)


def _all_voxel_ce(logits: torch.Tensor, pseudo: torch.Tensor, hard: torch.Tensor, soft: torch.Tensor,
                  smoothing: float, broadcast: bool) -> torch.Tensor:
    """One view's region CE as the authors' code: mean over all its voxels of CE x [hard] + smoothed
    CE x [soft]. ``broadcast`` (reference_compat) reproduces their (B, 1, D, H, W) mask times a
    (B, D, H, W) loss, which pairs every sample's mask with every sample's loss."""
    ce = F.cross_entropy(logits, pseudo, reduction="none")
    sce = F.cross_entropy(logits, pseudo, reduction="none", label_smoothing=smoothing)
    if broadcast:
        return (ce * hard.unsqueeze(1).to(ce.dtype)).mean() + (sce * soft.unsqueeze(1).to(ce.dtype)).mean()
    return (ce * hard.to(ce.dtype)).mean() + (sce * soft.to(ce.dtype)).mean()


def regional_loss(logits: torch.Tensor, logits_mix: torch.Tensor, pseudo: torch.Tensor,
                  regions: SynergyRegions, use_regions: bool = True,
                  reference_compat: bool = False, smoothing: float = 0.2,
                  inconsistent_smooth: float = 20.0, weighting: str = "terms",
                  dice_form: str = "foreground") -> torch.Tensor:
    """L_u of SGRS-Net on the student's logits for U and U_mix against the teacher's pseudo label.

    Consistent voxels: hard CE + soft Dice (smooth 1). Inconsistent voxels: CE with label
    smoothing + soft Dice with a large smooth (a relaxed target). Disregarded voxels: no loss.
    ``use_regions=False`` (ablation) treats every voxel as consistent.
    ``reference_compat`` reproduces the published code's hard CE over C instead of C' (and, with
    ``weighting="all-voxels"``, its mask broadcast across the batch).
    ``weighting``: terms, voxels or all-voxels (settings.TrainConfig.region_weighting).
    ``dice_form``: foreground (:func:`masked_soft_dice`) or paper (:func:`per_sample_soft_dice`).
    """
    logits2 = torch.cat([logits, logits_mix], 0)
    prob2 = torch.softmax(logits2, 1)
    pseudo2 = torch.cat([pseudo, pseudo], 0)
    if not use_regions:
        everywhere = torch.ones_like(pseudo2, dtype=torch.bool)
        dice = masked_soft_dice(prob2, pseudo2, everywhere, skip_empty=not reference_compat)
        ce = masked_cross_entropy(logits2, pseudo2, everywhere)
        return 0.5 * (dice + ce)
    c = torch.cat([regions.consistent] * 2, 0)
    i = torch.cat([regions.inconsistent] * 2, 0)
    c_ce = torch.cat([regions.agree] * 2, 0) if reference_compat else c
    b = logits.shape[0]
    if dice_form == "paper":
        dice_terms = [per_sample_soft_dice(prob2[:b], pseudo, regions.consistent),
                      per_sample_soft_dice(prob2[b:], pseudo, regions.consistent),
                      per_sample_soft_dice(prob2[:b], pseudo, regions.inconsistent, smooth=inconsistent_smooth),
                      per_sample_soft_dice(prob2[b:], pseudo, regions.inconsistent, smooth=inconsistent_smooth)]
    else:
        dice_terms = _foreground_dice_terms(prob2, pseudo, regions, b, inconsistent_smooth,
                                            skip=not reference_compat)
    if weighting == "all-voxels":
        hard = regions.agree if reference_compat else regions.consistent
        ce_terms = [_all_voxel_ce(view, pseudo, hard, regions.inconsistent, smoothing, reference_compat)
                    for view in (logits, logits_mix)]
        return 0.5 * (torch.stack(dice_terms).mean() + torch.stack(ce_terms).mean())
    ce_terms = [
        masked_cross_entropy(logits2, pseudo2, c_ce),
        masked_cross_entropy(logits2, pseudo2, i, label_smoothing=smoothing),
    ]
    if weighting == "terms":
        return 0.5 * (torch.stack(dice_terms).mean() + torch.stack(ce_terms).mean())
    if weighting != "voxels":
        raise ValueError(f"region weighting must be 'terms', 'voxels' or 'all-voxels', got {weighting!r}")
    # every scored voxel weighs the same: a region's terms count in proportion to its voxels
    # (shares stay tensors: no host sync on the hot path; with no scored voxel both are 0)
    nc = regions.consistent.sum().to(logits2.dtype)
    ni = regions.inconsistent.sum().to(logits2.dtype)
    total = (nc + ni).clamp_min(1.0)
    sc, si = nc / total, ni / total
    dice = 0.5 * (sc * (dice_terms[0] + dice_terms[1]) + si * (dice_terms[2] + dice_terms[3]))
    ce = sc * ce_terms[0] + si * ce_terms[1]
    return 0.5 * (dice + ce)


def _foreground_dice_terms(prob2, pseudo, regions, b: int, inconsistent_smooth: float, skip: bool) -> list:
    """The four region Dice terms (C' and I' on each view) in the foreground form."""
    return [
        masked_soft_dice(prob2[:b], pseudo, regions.consistent, skip_empty=skip),
        masked_soft_dice(prob2[b:], pseudo, regions.consistent, skip_empty=skip),
        masked_soft_dice(prob2[:b], pseudo, regions.inconsistent, smooth=inconsistent_smooth, skip_empty=skip),
        masked_soft_dice(prob2[b:], pseudo, regions.inconsistent, smooth=inconsistent_smooth, skip_empty=skip),
    ]


def sigmoid_rampup(step: int, length: float) -> float:
    """exp(-5 (1 - clip(step / length, 0, 1))^2), the Mean Teacher ramp-up (1.0 when length <= 0)."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def ema_alpha(step: int, decay: float = 0.99) -> float:
    """alpha = min(1 - 1/(step+1), decay): the teacher copies the student at step 0."""
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """teacher = alpha * teacher + (1 - alpha) * student, for parameters and float buffers
    (BatchNorm running statistics too, so the teacher can run in eval mode); integer buffers
    (BatchNorm's batch counter) are copied. A few multi-tensor kernels per step instead of
    two small kernels per tensor: on a GPU the per-tensor loop cost more than the arithmetic."""
    t_float, s_float, t_int, s_int = [], [], [], []
    for t, s in zip(list(teacher.parameters()) + list(teacher.buffers()),
                    list(student.parameters()) + list(student.buffers())):
        if t.dtype.is_floating_point:
            t_float.append(t)
            s_float.append(s.detach())
        else:
            t_int.append(t)
            s_int.append(s)
    if t_float:
        torch._foreach_lerp_(t_float, s_float, 1.0 - alpha)
    if t_int:
        torch._foreach_copy_(t_int, s_int)


@torch.no_grad()
def teacher_update(teacher: nn.Module, student: nn.Module, step: int, config) -> None:
    """The teacher's update after the student's SGD step ``step`` (0-based).

    Default: one :func:`ema_update` with alpha = :func:`ema_alpha` (step). ``reference_compat``:
    the authors' two updates (../shared/SGRS.md): their WeightEMA (alpha fixed at ``ema_decay`` on
    every float entry of the state dict, buffers included, then the student's float entries decayed
    by 2e-4), then ``update_ema_variables`` on the parameters only, with alpha from step + 1.
    """
    if not config.reference_compat:
        ema_update(teacher, student, ema_alpha(step, config.ema_decay))
        return
    t_state, s_state = teacher.state_dict(), student.state_dict()
    floats = [k for k, v in t_state.items() if v.dtype.is_floating_point]
    torch._foreach_lerp_([t_state[k] for k in floats], [s_state[k] for k in floats], 1.0 - config.ema_decay)
    torch._foreach_mul_([s_state[k] for k in floats], 1.0 - REFERENCE_STUDENT_DECAY)
    alpha = ema_alpha(step + 1, config.ema_decay)
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1.0 - alpha)


#: The authors' WeightEMA decays the student by 0.02 x lr (2e-4 at lr 0.01) after each average.
REFERENCE_STUDENT_DECAY = 2e-4


def calibrate_tau(prob: torch.Tensor, label: torch.Tensor, valid: torch.Tensor | None = None,
                  error_rate: float = 0.45, default: float = PAPER_TAU) -> float:
    """``--tau auto``: the entropy above which the model's voxels are wrong too often.

    prob (K, ...) probabilities of a model on labeled validation volumes, label (...) the truth.
    Returns the smallest normalised entropy t such that, among voxels with entropy >= t, the
    prediction is wrong at least ``error_rate`` of the time (scanning from the most uncertain
    voxels down). With no such t (a model that is right even where it hesitates) it returns the
    maximum entropy log10(2), i.e. nothing is disregarded; with too few voxels, ``default``.

    The default rate 0.45 ("close to a coin flip") gives back the paper's 0.296 for a calibrated
    binary model (its voxels with p in (0.425, 0.575) err ~46 % of the time); an overconfident
    model, whose uncertain voxels are wrong more often, gets a lower tau and disregards more.
    """
    h = normalised_entropy(prob[None].float())[0]
    wrong = hard_label(prob[None])[0] != label
    if valid is not None:
        h, wrong = h[valid], wrong[valid]
    h, wrong = h.reshape(-1), wrong.reshape(-1)
    if h.numel() < 100:
        return default
    order = torch.argsort(h, descending=True)
    h_sorted, wrong_sorted = h[order], wrong[order].double()
    # error rate of the n most uncertain voxels, for every n
    rate = torch.cumsum(wrong_sorted, 0) / torch.arange(1, len(h_sorted) + 1, dtype=torch.float64)
    ok = torch.nonzero(rate >= error_rate).view(-1)
    # ignore the first few voxels: a rate over a handful of voxels is noise
    ok = ok[ok >= 20]
    if ok.numel() == 0:
        return LOG10_2
    return float(h_sorted[ok.max()])
