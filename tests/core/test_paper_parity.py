"""``--method sgrs`` (and so ``--preset paper``) against the authors' training step, restated here in plain torch from the
description in ../shared/SGRS.md ("Details of the authors' code"), not from our modules.

On fixed tensors, a tiny V-Net (16^3, F=2) and the same random streams (noise and dropout drawn in
the same order on both sides) the loss, the gradients, one SGD update and the teacher's EMA update
of our step under the preset must equal the restatement's to 1e-5: once with the defects SGRS.md
lists fixed (the preset), once with them reproduced (``reference_compat``).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_sgrs.core import sgrs as S
from napari_sgrs.core.data import PatchSampler, Sample, TwoStreamBatches
from napari_sgrs.core.network import build_model, make_optimizer
from napari_sgrs.core.settings import PRESETS, TrainConfig
from napari_sgrs.core.steps import sgrs_step

STEP = 1000          # 1000 // 150 = 6 stairs: the staircase and the continuous ramp differ here
RAMPUP = 6000        # 0.4 x 15000, as the trainer passes it
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the two steps then sum in the same order. With 2 threads a bias gradient
    that batch norm cancels (about 5e-6) differs by 2e-5 between two correct implementations, which
    is the threads' order, not the method. (float64 would also do, but their WeightEMA averages
    float32 entries only, so the restatement must run in float32.)"""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------- the restatement

def _noise(t, gen):
    return t + torch.clamp(torch.randn(t.shape, generator=gen) * 0.1, -0.2, 0.2)


def _smoothed_ce(logits, target, eps=0.2):
    """Label-smoothed CE written out: (1 - eps) NLL + eps x mean over classes of -log p."""
    logp = torch.log_softmax(logits, 1)
    nll = -logp.gather(1, target.unsqueeze(1)).squeeze(1)
    return (1 - eps) * nll - eps * logp.mean(1)


def _their_sup_dice(prob, y):
    """Both classes, 1 - sum(p t) / (sum p^2 + sum t^2) over the batch, averaged."""
    out = 0.0
    for k in range(prob.shape[1]):
        p, t = prob[:, k], (y == k).float()
        out = out + 1 - (p * t).sum() / ((p * p).sum() + (t * t).sum())
    return out / prob.shape[1]


def _their_region_dice(prob, target, mask, smooth):
    """nnU-Net SoftDice, batch_dice off, background on, with a loss mask (B, 1, D, H, W)."""
    onehot = torch.zeros_like(prob).scatter_(1, target.unsqueeze(1), 1.0)
    m = mask.unsqueeze(1).float()
    axes = (2, 3, 4)
    tp = (prob * onehot * m).sum(axes)
    fp = (prob * (1 - onehot) * m).sum(axes)
    fn = ((1 - prob) * onehot * m).sum(axes)
    return 1 - ((2 * tp + smooth) / (2 * tp + fp + fn + smooth)).mean()


def authors_step(student, teacher, x, y, u, it, gen, rng, compat):
    """Their loss of one step (returns the loss; the caller does backward, SGD and EMA)."""
    b = x.shape[0]
    teacher.train()  # never put in eval mode: dropout on, the batch's BN statistics
    u_noisy = _noise(u, gen)
    x_noisy = _noise(x, gen)
    with torch.no_grad():
        pseudo = torch.argmax(torch.softmax(teacher(u_noisy), 1), 1)
    lam = rng.beta(0.75, 0.75, size=u.shape[0])
    lam = torch.from_numpy(np.maximum(lam, 1 - lam)).float().view(-1, 1, 1, 1, 1)
    partner = torch.from_numpy(rng.integers(0, b, u.shape[0]))
    u_mix = lam * u_noisy + (1 - lam) * x_noisy[partner]
    out = student(torch.cat([x, u, u_mix], 0))
    sup = 0.5 * (F.cross_entropy(out[:b], y) + _their_sup_dice(torch.softmax(out[:b], 1), y))
    view, view_mix = out[b:b + u.shape[0]], out[b + u.shape[0]:]
    p, pm = torch.softmax(view, 1), torch.softmax(view_mix, 1)
    with torch.no_grad():
        consistent = p.argmax(1) == pm.argmax(1)
        unsure = ((p[:, 1] > 0.425) & (p[:, 1] < 0.575)) | ((pm[:, 1] > 0.425) & (pm[:, 1] < 0.575))
        c_kept, i_kept = consistent & ~unsure, ~consistent & ~unsure
        c_hard = consistent if compat else c_kept      # their hard CE takes C, not C'
    ces, dices = [], []
    for logits, prob in ((view, p), (view_mix, pm)):
        ce = F.cross_entropy(logits, pseudo, reduction="none")
        sce = _smoothed_ce(logits, pseudo)
        if compat:  # their (B, 1, D, H, W) mask times a (B, D, H, W) loss: broadcast to (B, B, D, H, W)
            ces.append((ce * c_hard.unsqueeze(1).float()).mean() + (sce * i_kept.unsqueeze(1).float()).mean())
        else:
            ces.append((ce * c_hard.float()).mean() + (sce * i_kept.float()).mean())
        dices.append(_their_region_dice(prob, pseudo, c_kept, 1.0))
        dices.append(_their_region_dice(prob, pseudo, i_kept, 20.0))
    unsup = 0.5 * (sum(dices) / 4 + sum(ces) / 2)
    w = math.exp(-5 * (1 - min(it // 150, 40) / 40) ** 2)
    return sup + w * unsup


@torch.no_grad()
def authors_ema(teacher, student, it, compat):
    if compat:
        # WeightEMA: alpha 0.99 on every float entry of the state dict, then the student's decay
        for ema, s in zip(teacher.state_dict().values(), student.state_dict().values()):
            if ema.dtype == torch.float32:
                ema.mul_(0.99).add_(s * 0.01)
                s.mul_(1 - 2e-4)
        alpha = min(1 - 1 / (it + 2), 0.99)  # update_ema_variables, after iter_num += 1
    else:
        alpha = min(1 - 1 / (it + 1), 0.99)  # one EMA update per step (../shared/SGRS.md, Mean Teacher)
    for ema, s in zip(teacher.parameters(), student.parameters()):
        ema.mul_(alpha).add_(s, alpha=1 - alpha)


# ----------------------------------------------------------------------------- the comparison

def _paper_config(**extra):
    return TrainConfig.from_preset("paper", **{"patch_size": (16, 16, 16), "base_filters": 2, "device": "cpu",
                                               **extra}).validate()


def _networks(config):
    torch.manual_seed(0)
    student = build_model(config, 2).train()
    with torch.no_grad():  # spread the outputs so every region holds voxels
        student.head.weight.mul_(40)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 16, 16, 16, generator=g)
    y = (torch.randn(2, 16, 16, 16, generator=g) > 0.7).long()
    u = torch.randn(2, 1, 16, 16, 16, generator=g)
    return x, y, u


def _their_sgd(student, config):
    return torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def _run(step_fn, config, compat, it=STEP, optimizer=make_optimizer):
    student, teacher = _networks(config)
    x, y, u = _batch()
    gen, rng = torch.Generator().manual_seed(5), np.random.default_rng(5)
    torch.manual_seed(11)  # dropout of the teacher, then of the student
    loss = step_fn(student, teacher, x, y, u, it, gen, rng)
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    optimizer(student, config).step()
    return student, teacher, loss, grads


def _ours(config):
    def step(student, teacher, x, y, u, it, gen, rng):
        return sgrs_step(student, teacher, x, y, u, it, config, rng, gen, RAMPUP, 2).loss
    return step


def _theirs(compat):
    def step(student, teacher, x, y, u, it, gen, rng):
        return authors_step(student, teacher, x, y, u, it, gen, rng, compat)
    return step


def _close(a, b):
    return torch.allclose(a, b, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("compat", [False, True], ids=["paper", "reference-compat"])
def test_step_matches_the_authors(compat):
    config = _paper_config(reference_compat=compat)
    s1, t1, loss1, g1 = _run(_ours(config), config, compat)
    s2, t2, loss2, g2 = _run(_theirs(compat), config, compat, optimizer=_their_sgd)
    assert abs(float(loss1.detach()) - float(loss2.detach())) < ATOL, (float(loss1.detach()), float(loss2.detach()))
    assert all(_close(a, b) for a, b in zip(g1, g2))
    assert all(_close(a, b) for a, b in zip(s1.parameters(), s2.parameters()))  # one SGD update
    for it in (0, 3, STEP):  # alpha: its first steps and its plateau
        t1c, s1c, t2c, s2c = (copy.deepcopy(n) for n in (t1, s1, t2, s2))
        S.teacher_update(t1c, s1c, it, config)
        authors_ema(t2c, s2c, it, compat)
        assert all(_close(a, b) for a, b in zip(t1c.parameters(), t2c.parameters())), it
        assert all(_close(a, b) for a, b in zip(s1c.parameters(), s2c.parameters())), it  # the student's decay
        if compat:  # their WeightEMA averages the BN buffers too
            assert all(_close(a, b) for a, b in zip(t1c.buffers(), t2c.buffers()) if a.dtype.is_floating_point)


def test_method_sgrs_alone_is_the_authors_step():
    """`sgrs train --method sgrs` and nothing else about the loss (no preset) makes their step: the
    method's defaults are the paper's. Our default method, sgrs-plus, does not."""
    from napari_sgrs.cli import _config_from_args, build_parser

    def cli(*argv):
        return _config_from_args(build_parser().parse_args(
            ["train", "--images", "I", "--out", "R", "--patch-size", "16", "16", "16", "--base-filters", "2",
             "--device", "cpu", *argv]))

    config = cli("--method", "sgrs")
    s1, _, loss1, g1 = _run(_ours(config), config, False)
    s2, _, loss2, g2 = _run(_theirs(False), config, False, optimizer=_their_sgd)
    assert abs(float(loss1.detach()) - float(loss2.detach())) < ATOL
    assert all(_close(a, b) for a, b in zip(g1, g2))
    assert all(_close(a, b) for a, b in zip(s1.parameters(), s2.parameters()))
    ours = cli()
    assert ours.method == "sgrs-plus"
    assert abs(float(_run(_ours(ours), ours, False)[2].detach()) - float(loss2.detach())) > 1e-4


def test_the_restatement_tells_the_forms_apart():
    """The parity above would pass trivially if our step and the restatement ignored the details:
    the default recipe's loss, and the preset with one detail put back, differ from theirs."""
    theirs = float(_run(_theirs(False), _paper_config(), False)[2].detach())
    for change in (dict(dice_form="foreground"), dict(region_weighting="terms"), dict(teacher_mode="eval"),
                   dict(rampup_stair=1), dict(reference_compat=True)):
        config = _paper_config(**change)
        ours = float(_run(_ours(config), config, False)[2].detach())
        assert abs(ours - theirs) > 1e-4, change


def test_disregarded_band_is_the_codes_0425_0575():
    """Their code disregards a foreground probability in (0.425, 0.575); the paper's tau 0.296 is a
    hair narrower than that band's entropy (0.29613), so the preset's tau is the band's own."""
    tau = _paper_config().tau
    for p1, inside in ((0.4249, False), (0.4251, True), (0.5749, True), (0.5751, False)):
        prob = torch.tensor([1 - p1, p1]).view(1, 2, 1, 1, 1)
        assert bool(S.synergy_regions(prob, prob, tau).disregarded.all()) == inside, p1
    assert bool(S.synergy_regions(torch.tensor([0.5751, 0.4249]).view(1, 2, 1, 1, 1),
                                  torch.tensor([0.5751, 0.4249]).view(1, 2, 1, 1, 1), 0.296).disregarded.all())


def test_the_regions_are_populated():
    """The fixed tensors exercise every region, so the region terms are compared, not zeros."""
    config = _paper_config()
    student, _ = _networks(config)
    x, _, u = _batch()
    with torch.no_grad():
        p = torch.softmax(student(u), 1)
        pm = torch.softmax(student(0.7 * u + 0.3 * x), 1)
    regions = S.synergy_regions(p, pm, config.tau)
    assert regions.consistent.any() and regions.inconsistent.any() and regions.disregarded.any()


# ----------------------------------------------------------------------------- sampling (f) and the split (e)

def test_preset_trains_every_label_with_uniform_crops():
    paper = TrainConfig(**PRESETS["paper"]).validate()
    assert paper.val_fraction == 0.0 and paper.foreground_fraction == 0.0
    assert paper.flips == "one-in-plane" and paper.volume_draw == "permutation"


def test_one_in_plane_flip_and_rotation_leave_the_slice_axis():
    """RandomRotFlip: a 90-degree turn and exactly one flip, both in the H-W (y-x) plane: the
    slices along D keep their order and each slice's voxels stay in that slice."""
    d = 4
    image = np.repeat(np.arange(d, dtype=np.float32)[:, None, None], 16, 1).repeat(16, 2)
    image += np.random.default_rng(0).random((d, 16, 16)).astype(np.float32) * 0.5
    sample = Sample("a", image, None)
    sampler = PatchSampler((d, 16, 16), np.random.default_rng(0), flips="one-in-plane")
    flipped = 0
    for _ in range(20):
        patch, _ = sampler.draw(sample, labeled=False)
        assert [int(v) for v in patch.reshape(d, -1).mean(1)] == list(range(d))  # D untouched
        same_set = [np.allclose(np.sort(patch[z].ravel()), np.sort(image[z].ravel())) for z in range(d)]
        assert all(same_set)
        flipped += not any(np.array_equal(patch, np.rot90(image, k, axes=(1, 2))) for k in range(4))
    assert flipped == 20  # a flip every time: a flip after a turn is never a plain turn


def test_permutation_draw_visits_every_volume_once_per_epoch():
    samples = [Sample(str(i), np.full((16, 16, 16), float(i), np.float32), np.zeros((16, 16, 16), np.int64))
               for i in range(6)]
    sampler = PatchSampler((16, 16, 16), np.random.default_rng(0), augment=False, foreground_fraction=0.0)
    batches = TwoStreamBatches(samples, samples[:3], 2, 1, sampler, draw="permutation")
    seen = [int(v) for _ in range(3) for v in next(batches)[0][:, 0, 0, 0, 0]]
    assert sorted(seen) == list(range(6))


def test_a_teacher_in_train_mode_needs_two_values_per_channel():
    from napari_sgrs.core.errors import ConfigError

    with pytest.raises(ConfigError, match="teacher_mode train with 1 unlabeled patch"):
        _paper_config(batch_size=3)
    _paper_config(batch_size=3, patch_size=(16, 16, 32))


def test_paper_preset_resumes_as_if_never_stopped(tiny_cohort, tmp_path):
    """The permutation each stream walks is saved with the checkpoint: a resumed run draws the
    volumes, and so trains the weights, of the uninterrupted one."""
    from napari_sgrs.core.checkpoint import load_checkpoint
    from napari_sgrs.core.events import EventKind
    from napari_sgrs.core.io import find_cases
    from napari_sgrs.core.runfolder import RunFolder
    from napari_sgrs.core.train import train

    paper = {k: v for k, v in PRESETS["paper"].items() if k not in ("iterations", "patch_size", "base_filters")}
    # 1 of the 3 labeled volumes per step: the stop at step 2 falls inside a permutation
    config = dict(paper, iterations=6, patch_size=(16, 16, 16), base_filters=2, device="cpu", seed=0,
                  checkpoint_every=1, log_every=1, labeled_batch_size=1, batch_size=3)
    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    train(TrainConfig(**config), cases, tmp_path / "full")
    half = tmp_path / "half"

    def stop_at_2(event):
        if event.kind is EventKind.PROGRESS and event.step == 2:
            (half / "STOP").touch()

    assert train(TrainConfig(**config), cases, half, listeners=[stop_at_2]).step == 2
    assert train(TrainConfig(**config), cases, half, resume=True).step == 6
    full, resumed = (load_checkpoint(RunFolder(p).last).tensors for p in (tmp_path / "full", half))
    for k in full:
        if k.startswith(("student.", "teacher.")):
            assert torch.equal(full[k], resumed[k]), k

