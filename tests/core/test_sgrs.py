"""Unit tests of the SGRS-Net pieces with hand-built inputs (no training)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_sgrs.core import sgrs as S
from napari_sgrs.core.codes import Region
from napari_sgrs.core.errors import ConfigError
from napari_sgrs.core.vnet import VNet, count_trainable


def test_vnet_parity_with_published_parameter_count():
    assert count_trainable(VNet(1, 2, 16)) == 9_448_866


@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 20), (1, 1, 8, 16, 16)])
def test_vnet_refuses_sizes_not_divisible_by_16(shape):
    with pytest.raises(ConfigError, match="divisible by 16"):
        VNet(1, 2, 2)(torch.zeros(shape))


def test_vnet_output_shape_and_dropout_only_in_train_mode():
    net = VNet(1, 3, 2)
    x = torch.randn(2, 1, 16, 32, 16)
    assert net(x).shape == (2, 3, 16, 32, 16)
    net.eval()
    assert torch.equal(net(x), net(x))  # no dropout in eval mode


def _probs(fg: list[float]) -> torch.Tensor:
    """(1, 2, 1, 1, N) binary probabilities from foreground values."""
    p = torch.tensor(fg, dtype=torch.float64)
    return torch.stack([1 - p, p]).view(1, 2, 1, 1, -1)


def test_tau_0296_is_the_foreground_band_0425_0575():
    p = np.linspace(0.001, 0.999, 1999)
    probs = _probs(list(p))
    disregarded = (S.normalised_entropy(probs) > S.PAPER_TAU).view(-1).numpy()
    band = (p > 0.425) & (p < 0.575)
    # identical away from the band's edges (the entropy at 0.425 is 0.29614..., tau 0.296)
    near_edge = (np.abs(p - 0.425) < 0.002) | (np.abs(p - 0.575) < 0.002)
    assert np.array_equal(disregarded[~near_edge], band[~near_edge])
    assert disregarded[np.argmin(np.abs(p - 0.5))]
    assert not disregarded[np.argmin(np.abs(p - 0.42))]


def test_regions_binary_hand_built():
    # voxel: (p(U), p(U_mix)) ->  expected region
    cases = [((0.9, 0.8), Region.CONSISTENT), ((0.1, 0.2), Region.CONSISTENT),
             ((0.9, 0.2), Region.INCONSISTENT), ((0.5, 0.9), Region.DISREGARDED),
             ((0.9, 0.45), Region.DISREGARDED), ((0.3, 0.7), Region.INCONSISTENT)]
    p = _probs([c[0][0] for c in cases]).float()
    pm = _probs([c[0][1] for c in cases]).float()
    reg = S.synergy_regions(p, pm)
    assert reg.as_map().view(-1).tolist() == [c[1] for c in cases]
    # the three regions partition the voxels
    total = reg.consistent.int() + reg.inconsistent.int() + reg.disregarded.int()
    assert torch.all(total == 1)


def test_regions_three_classes_use_normalised_entropy():
    k = 3
    # confident class 2 / class 2 -> consistent; class 0 / class 1 -> inconsistent;
    # uniform -> disregarded; a distribution whose raw log10 entropy is above tau but whose
    # normalised entropy is not -> NOT disregarded (the normalisation matters).
    p_u = torch.tensor([[0.05, 0.05, 0.9], [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3], [0.7, 0.15, 0.15]])
    p_m = torch.tensor([[0.1, 0.1, 0.8], [0.05, 0.9, 0.05], [0.9, 0.05, 0.05], [0.7, 0.15, 0.15]])
    raw = S.entropy_log10(p_u[3].view(1, 3))
    assert raw.item() > S.PAPER_TAU  # 0.356: the raw entropy alone would disregard it
    to5d = lambda t: t.T.reshape(1, k, 1, 1, -1)
    reg = S.synergy_regions(to5d(p_u), to5d(p_m))
    assert reg.as_map().view(-1).tolist() == [Region.CONSISTENT, Region.INCONSISTENT,
                                              Region.DISREGARDED, Region.CONSISTENT]
    norm = S.normalised_entropy(to5d(p_u)).view(-1)
    assert math.isclose(norm[2].item(), math.log10(2), rel_tol=1e-5)  # uniform K -> log10(2)


def test_region_masks_do_not_leak_across_samples():
    torch.manual_seed(0)
    b, shape = 2, (4, 4, 4)
    logits = torch.randn(b, 2, *shape, requires_grad=True)
    logits_mix = torch.randn(b, 2, *shape, requires_grad=True)
    pseudo = torch.randint(0, 2, (b, *shape))
    # sample 0: every voxel disregarded; sample 1: every voxel consistent
    dis = torch.zeros(b, *shape, dtype=torch.bool)
    dis[0] = True
    regions = S.SynergyRegions(consistent=~dis, inconsistent=torch.zeros_like(dis), disregarded=dis,
                               agree=~dis)
    loss = S.regional_loss(logits, logits_mix, pseudo, regions)
    loss.backward()
    assert logits.grad[0].abs().max() == 0 and logits_mix.grad[0].abs().max() == 0
    assert logits.grad[1].abs().max() > 0
    # a (B, 1, D, H, W) mask would broadcast to B x B: refused instead of silently mixing samples
    with pytest.raises(ValueError, match="mask shape"):
        S.masked_cross_entropy(logits, pseudo, (~dis)[:, None])


def test_regional_loss_weights_regions_differently():
    torch.manual_seed(1)
    shape = (1, 2, 4, 4, 4)
    logits, logits_mix = torch.randn(shape), torch.randn(shape)
    pseudo = torch.randint(0, 2, (1, 4, 4, 4))
    none = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    all_c = S.SynergyRegions(~none, none, none, ~none)
    all_i = S.SynergyRegions(none, ~none, none, ~none)
    all_d = S.SynergyRegions(none, none, ~none, none)
    lc = S.regional_loss(logits, logits_mix, pseudo, all_c)
    li = S.regional_loss(logits, logits_mix, pseudo, all_i)
    assert not torch.isclose(lc, li)
    # Disregarded voxels give no loss (smooth-only Dice terms cancel to 0, CE to 0)
    assert S.regional_loss(logits, logits_mix, pseudo, all_d).item() == pytest.approx(0.0, abs=1e-6)


def test_mix_lambda_at_least_half_and_beta_shaped():
    rng = np.random.default_rng(0)
    lam = S.sample_mix_lambda(20000, 0.75, rng)
    assert lam.min() >= 0.5 and lam.max() <= 1.0
    # E[max(l, 1-l)] for l ~ Beta(0.75, 0.75) is about 0.77; Beta(2, 2) would give ~0.69
    assert 0.75 < lam.mean().item() < 0.79
    lam2 = S.sample_mix_lambda(20000, 2.0, np.random.default_rng(0))
    assert 0.67 < lam2.mean().item() < 0.71


def test_mix_augment_uses_chosen_partner():
    u = torch.ones(2, 1, 2, 2, 2)
    x = torch.stack([torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), 4.0)])
    out = S.mix_augment(u, x, torch.tensor([0.5, 0.75]), torch.tensor([1, 0]))
    assert torch.allclose(out[0], torch.full_like(out[0], 0.5 * 1 + 0.5 * 4))
    assert torch.allclose(out[1], torch.full_like(out[1], 0.75))


@pytest.mark.parametrize("step,expected", [(0, 0.0), (1, 0.5), (9, 0.9), (99, 0.99), (5000, 0.99)])
def test_ema_alpha(step, expected):
    assert S.ema_alpha(step) == pytest.approx(expected)


def test_ema_update_parameters_and_bn_buffers():
    student, teacher = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        student.weight.fill_(2.0)
        teacher.weight.fill_(0.0)
        student.running_mean.fill_(1.0)
        student.num_batches_tracked.fill_(7)
    S.ema_update(teacher, student, 0.75)
    assert torch.allclose(teacher.weight, torch.full((3,), 0.5))
    assert torch.allclose(teacher.running_mean, torch.full((3,), 0.25))
    assert teacher.num_batches_tracked.item() == 7


def test_ema_update_matches_the_per_tensor_formula_on_a_vnet():
    """The multi-tensor EMA equals alpha * teacher + (1 - alpha) * student for every parameter and
    float buffer of a real network, copies the integer buffers, and leaves the student alone."""
    from napari_sgrs.core.vnet import VNet

    torch.manual_seed(0)
    student, teacher = VNet(1, 2, 4), VNet(1, 2, 4)
    with torch.no_grad():
        for t in list(student.parameters()) + list(student.buffers()):
            t.copy_(torch.randint(1, 9, t.shape) if not t.dtype.is_floating_point else torch.randn(t.shape))
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    S.ema_update(teacher, student, 0.9)
    after = teacher.state_dict()
    assert any(not v.dtype.is_floating_point for v in after.values())
    for k, v in after.items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.9 * before_t[k] + 0.1 * before_s[k])
        else:
            assert torch.equal(v, before_s[k]), k
    for k, v in student.state_dict().items():
        assert torch.equal(v, before_s[k]), k
    S.ema_update(teacher, student, 0.0)  # step 0: the teacher becomes the student exactly
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, student.state_dict()[k]), k


def test_rampup_values_and_scaling_with_budget():
    assert S.sigmoid_rampup(0, 6000) == pytest.approx(math.exp(-5))
    assert S.sigmoid_rampup(6000, 6000) == 1.0 and S.sigmoid_rampup(9000, 6000) == 1.0
    # paper's own formula: exp(-5 (1 - min(t/150, 40)/40)^2) over 15,000 steps
    paper = lambda t: math.exp(-5 * (1 - min(t / 150, 40) / 40) ** 2)
    for t in (0, 100, 1500, 3000, 5999, 12000):
        assert S.sigmoid_rampup(t, 0.4 * 15000) == pytest.approx(paper(t))
    # a 600-step run follows the same curve compressed 25x: ramp length 240
    for t in (0, 60, 120, 239, 400):
        assert S.sigmoid_rampup(t, 0.4 * 600) == pytest.approx(paper(t * 25))


def test_supervised_loss_ignores_unannotated_voxels():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 4, 4)
    target = torch.randint(0, 2, (1, 4, 4, 4))
    target[:, 2:] = 255
    base = S.supervised_loss(logits, target, 255)
    changed = logits.clone()
    changed[:, :, 2:] = torch.randn_like(changed[:, :, 2:]) * 10
    assert torch.isclose(S.supervised_loss(changed, target, 255), base)
    changed[:, 1, :2] += 1.0  # shifts the softmax on annotated voxels
    assert not torch.isclose(S.supervised_loss(changed, target, 255), base)


def test_hard_label_matches_argmax():
    torch.manual_seed(0)
    for k in (2, 3):
        p = torch.softmax(torch.randn(2, k, 3, 4, 5), 1).to(memory_format=torch.channels_last_3d)
        assert torch.equal(S.hard_label(p), p.argmax(1))


def test_pseudo_label_dice_skips_classes_absent_from_the_target():
    prob = torch.full((1, 2, 4, 4, 4), 0.5, requires_grad=True)
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)  # the teacher saw no target here
    mask = torch.ones_like(target, dtype=torch.bool)
    plain = S.masked_soft_dice(prob, target, mask)
    assert plain.item() > 0.9  # 1 - 1 / (32 + 1): every foreground guess is punished
    skipped = S.masked_soft_dice(prob, target, mask, skip_empty=True)
    assert skipped.item() == 0.0
    skipped.backward()
    assert prob.grad.abs().max() == 0
    target[0, 0, 0, 0] = 1  # once the class is present it is scored again
    assert S.masked_soft_dice(prob, target, mask, skip_empty=True).item() > 0


def _one_inconsistent_voxel():
    torch.manual_seed(0)
    shape = (1, 2, 4, 4, 4)
    logits, logits_mix = torch.randn(shape), torch.randn(shape)
    pseudo = torch.randint(0, 2, (1, 4, 4, 4))
    pseudo[0, 0, 0, 0] = 1
    i = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    i[0, 0, 0, 0] = True
    return logits, logits_mix, pseudo, S.SynergyRegions(~i, i, torch.zeros_like(i), ~i), i


def _gradient_share_of_inconsistent_voxel(weighting: str) -> float:
    logits, logits_mix, pseudo, regions, i = _one_inconsistent_voxel()
    lg = logits.clone().requires_grad_(True)
    S.regional_loss(lg, logits_mix, pseudo, regions, weighting=weighting).backward()
    per_voxel = lg.grad.abs().sum(1)[0]
    return float(per_voxel[i[0]].sum() / per_voxel.sum())


def test_voxel_weighting_gives_a_lone_inconsistent_voxel_its_share_only():
    # 1 inconsistent voxel among 63 consistent ones. The paper's mean of region terms gives it as much
    # weight as all the consistent voxels together; voxel weighting gives it about 1/64 of the loss.
    assert _gradient_share_of_inconsistent_voxel("terms") > 0.2
    assert _gradient_share_of_inconsistent_voxel("voxels") < 0.05
    with pytest.raises(ValueError, match="weighting"):
        logits, logits_mix, pseudo, regions, _ = _one_inconsistent_voxel()
        S.regional_loss(logits, logits_mix, pseudo, regions, weighting="area")


def test_voxel_weighting_with_consistent_voxels_only_is_plain_ce_plus_dice():
    logits, logits_mix, pseudo, _, _ = _one_inconsistent_voxel()
    none = torch.zeros_like(pseudo, dtype=torch.bool)
    regions = S.SynergyRegions(~none, none, none, ~none)
    got = S.regional_loss(logits, logits_mix, pseudo, regions, weighting="voxels")
    both = torch.cat([logits, logits_mix])
    ce = torch.nn.functional.cross_entropy(both, torch.cat([pseudo, pseudo]))
    dice = [S.masked_soft_dice(torch.softmax(x, 1), pseudo, ~none) for x in (logits, logits_mix)]
    assert got.item() == pytest.approx((0.5 * (0.5 * (dice[0] + dice[1]) + ce)).item(), rel=1e-5)


def test_voxel_weighting_with_nothing_scored_is_zero_with_a_graph():
    logits, logits_mix, pseudo, _, _ = _one_inconsistent_voxel()
    lg = logits.clone().requires_grad_(True)
    none = torch.zeros_like(pseudo, dtype=torch.bool)
    loss = S.regional_loss(lg, logits_mix, pseudo, S.SynergyRegions(none, none, ~none, none), weighting="voxels")
    assert loss.item() == 0.0 and loss.requires_grad
