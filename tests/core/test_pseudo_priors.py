"""Priors on the pseudo labels during training, from the teacher's whole-volume sweep.

`--pseudo-islands background`: the teacher's islands (voxels of a one-piece class outside its
largest component) are found by sweep_unlabeled, travel with the unlabeled patches under the same
crop, flips and rotation, and turn the pseudo label there into background in sgrs_step.
`--pseudo-cap labels`: the sweep's per-class probability histograms give floors that cap each
class's share of the pseudo labels at its share of the labeled voxels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sgrs.cli import main
from napari_sgrs.core.data import PatchSampler, TwoStreamBatches, make_sample
from napari_sgrs.core.errors import ConfigError
from napari_sgrs.core.postprocess import island_mask, keep_largest_component
from napari_sgrs.core.train import TrainConfig, sgrs_step, sweep_unlabeled

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import TINY_ARGS, split_label_cohort, threshold_net, tiny_config  # noqa: E402


def test_island_mask_is_what_the_post_processing_removes():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[1:5, 1:5, 1:5] = 1
    lab[8:10, 8:10, 8:10] = 1       # class-1 island
    lab[1:3, 8:11, 1:3] = 2
    lab[9, 1, 9] = 2                # class-2 island
    m1 = island_mask(lab, [1])
    assert m1.sum() == 8 and m1[8:10, 8:10, 8:10].all()
    m12 = island_mask(lab, [1, 2])
    assert m12.sum() == 9 and m12[9, 1, 9]
    np.testing.assert_array_equal(keep_largest_component(lab, [1, 2]), np.where(m12, 0, lab))


def test_island_masks_follow_the_unlabeled_patch_through_crop_flips_and_rotation():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(24, 20, 20)).astype(np.float32)
    unlabeled = make_sample("u", image, None, (16, 16, 16), 255)
    unlabeled.islands = unlabeled.image > 0.8        # a mask we can recompute from any patch
    labeled = make_sample("l", image, (image > 0).astype(np.int64), (16, 16, 16), 255)
    batches = TwoStreamBatches([labeled], [unlabeled], 2, 3, PatchSampler((16, 16, 16), rng))
    for _ in range(20):
        x, y, u, masks = next(batches)
        assert masks.dtype == torch.bool and masks.shape == u[:, 0].shape
        assert torch.equal(masks, u[:, 0] > 0.8)
    unlabeled.islands = None                          # no mask: the stream says so
    assert next(batches)[3] is None


def test_the_same_draws_with_and_without_masks():
    """Adding masks must not change which patches a seed draws (runs stay comparable)."""
    image = np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32)

    def stream(with_mask: bool):
        u = make_sample("u", image, None, (16, 16, 16), 255)
        u.islands = np.zeros(u.image.shape, bool) if with_mask else None
        lab = make_sample("l", image, (image > 0).astype(np.int64), (16, 16, 16), 255)
        return TwoStreamBatches([lab], [u], 2, 2, PatchSampler((16, 16, 16), np.random.default_rng(7)))

    a, b = stream(False), stream(True)
    for _ in range(5):
        ba, bb = next(a), next(b)
        for ta, tb in zip(ba[:3], bb[:3]):
            assert torch.equal(ta, tb)


def test_refresh_marks_the_teachers_smaller_pieces():
    image = -np.ones((24, 20, 28), np.float32)
    image[2:10, 2:10, 2:10] = 1.0     # the target: 512 voxels
    image[15:19, 12:16, 20:24] = 1.0  # a look-alike: 64 voxels
    one = make_sample("one", image, None, (16, 16, 16), 255)
    clean = make_sample("clean", np.where(image[:12] > 0, image[:12], -1.0), None, (16, 16, 16), 255)
    teacher = threshold_net().train()
    share = sweep_unlabeled(teacher, [one, clean], [1], (16, 16, 16), 2, torch.device("cpu")).islands
    expected = np.zeros(image.shape, bool)
    expected[15:19, 12:16, 20:24] = True
    np.testing.assert_array_equal(one.islands, expected)
    assert clean.islands is None                      # one piece: nothing to mark
    assert share == pytest.approx(64 / (image.size + clean.image.size))
    assert teacher.training                           # the caller's mode is restored
    one.image[one.islands] = -1.0                     # the teacher no longer sees the look-alike
    sweep_unlabeled(teacher, [one], [1], (16, 16, 16), 2, torch.device("cpu"))
    assert one.islands is None                        # a refresh clears a stale mask


class _Constant(torch.nn.Module):
    """A stand-in network whose logits favour ``cls`` everywhere, nudged by the input."""

    def __init__(self, cls: int):
        super().__init__()
        self.cls = cls

    def forward(self, x):
        base = torch.zeros(x.shape[0], 2, *x.shape[2:])
        base[:, self.cls] = 3.0
        return base + x * 0.1


def _unsup_loss(teacher_class: int, islands=None, floors=None) -> float:
    cfg = TrainConfig(method="sgrs", iterations=10, patch_size=(16, 16, 16), batch_size=4, labeled_batch_size=2,
                      gate="none").validate()
    g = torch.Generator().manual_seed(0)
    x, u = torch.randn(2, 1, 16, 16, 16, generator=g), torch.randn(2, 1, 16, 16, 16, generator=g)
    y = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    out = sgrs_step(_Constant(0), _Constant(teacher_class), x, y, u, 9, cfg, np.random.default_rng(1),
                    torch.Generator().manual_seed(2), 4.0, 2, islands=islands, floors=floors)
    return out.loss_unsup


def test_islands_turn_the_pseudo_label_into_background():
    everywhere = torch.ones(2, 16, 16, 16, dtype=torch.bool)
    background = _unsup_loss(0, None)
    foreground = _unsup_loss(1, None)
    assert foreground != pytest.approx(background)
    assert _unsup_loss(1, everywhere) == pytest.approx(background)        # every pseudo voxel suppressed
    assert _unsup_loss(1, ~everywhere) == pytest.approx(foreground)       # an empty mask changes nothing


def test_training_refreshes_the_islands_and_says_so(tiny_cohort, tmp_path):
    from napari_sgrs.core.io import find_cases
    from napari_sgrs.core.train import train

    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    train(tiny_config(iterations=6, val_every=2, pseudo_islands="background"), cases, tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    refreshes = [e for e in events if e["kind"] == "regions" and e.get("scope") == "islands"]
    assert [e["step"] for e in refreshes] == [2, 4]   # every val_every steps, not after the last
    assert all(e["classes"] == [1] and 0.0 <= e["islands"] < 1.0 for e in refreshes)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["pseudo_islands"] == "background"
    # supervised and the default never refresh
    train(tiny_config(iterations=4, val_every=2), cases, tmp_path / "default")
    assert '"islands"' not in (tmp_path / "default" / "events.jsonl").read_text()


def test_settings_are_checked(tiny_cohort, tmp_path, capsys):
    with pytest.raises(ConfigError, match="'both'"):
        tiny_config(pseudo_islands="both").validate()
    with pytest.raises(ConfigError, match="--workers 0 \\(got 2\\)"):
        tiny_config(pseudo_islands="background", workers=2).validate()
    code = main(["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
                 "--out", str(tmp_path / "run"), *TINY_ARGS, "--pseudo-islands", "background", "--workers", "2"])
    assert code == 2
    assert "--workers 0" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_terminal_says_when_no_class_qualifies(tiny_cohort, tmp_path, capsys):
    """A label with a second piece leaves no one-piece class: the option would do nothing, and the
    run says so on the terminal and in its event stream instead of training as if it worked."""
    images, labels = split_label_cohort(tiny_cohort, tmp_path)
    code = main(["train", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "run"),
                 *TINY_ARGS, "--pseudo-islands", "background"])
    assert code == 0
    assert "note: --pseudo-islands background does nothing" in capsys.readouterr().err
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["classes"] for e in events if e.get("scope") == "islands"] == [[]]


# ----------------------------------------------------------------------------- --pseudo-cap labels


def test_share_floors_trim_the_least_confident_surplus_only():
    from napari_sgrs.core.sgrs import share_floors

    bins = 10
    hist = np.zeros((3, bins))
    hist[1, 9] = 30      # class 1: 30 voxels at p in [0.9, 1.0]
    hist[1, 6] = 20      #          20 voxels at p in [0.6, 0.7)
    hist[2, 8] = 5       # class 2: 5 voxels, under its share
    floors = share_floors(hist, total=1000, label_share=[0.9, 0.03, 0.01])
    # class 1 holds 50 of 1000 voxels but 3 % are allowed: keep the 30 most confident ones
    assert floors[0] == 0.0 and floors[1] == pytest.approx(0.7) and floors[2] == 0.0
    assert share_floors(hist, total=1000, label_share=[0.9, 0.05, 0.01])[1] == 0.0   # at its share: alone
    assert share_floors(hist, total=1000, label_share=[0.9, 0.01, 0.01])[1] == pytest.approx(1.0)  # all trimmed


def test_apply_floors_turns_low_probability_voxels_into_background():
    from napari_sgrs.core.sgrs import apply_floors

    prob = torch.tensor([[0.1, 0.2, 0.6, 0.1], [0.9, 0.8, 0.4, 0.9]]).view(1, 2, 4, 1, 1)
    pseudo = prob.argmax(1)                          # [1, 1, 0, 1]
    out = apply_floors(pseudo, prob, torch.tensor([0.0, 0.85]))
    assert out.view(-1).tolist() == [1, 0, 0, 1]     # 0.8 < 0.85 goes, background stays


def test_the_sweep_histograms_each_class_by_its_probability():
    image = -np.ones((24, 20, 28), np.float32)
    image[2:10, 2:10, 2:10] = 1.0
    sample = make_sample("one", image, None, (16, 16, 16), 255)
    sweep = sweep_unlabeled(threshold_net(), [sample], [], (16, 16, 16), 2, torch.device("cpu"), histogram=True)
    assert sweep.total == image.size and sample.islands is None
    assert sweep.hist.shape == (2, 1000) and sweep.hist[0].sum() == 0
    assert sweep.hist[1].sum() == 512                # the positive cube is class 1
    p = torch.softmax(torch.tensor([-1.0, 1.0]), 0)[1].item()
    assert sweep.hist[1, int(p * 1000)] == 512       # binned at its probability


def test_floors_in_the_step_act_like_a_background_teacher():
    everywhere = torch.tensor([0.0, 1.01])           # no class-1 voxel can reach the floor
    assert _unsup_loss(1, floors=everywhere) == pytest.approx(_unsup_loss(0))
    assert _unsup_loss(1, floors=torch.zeros(2)) == pytest.approx(_unsup_loss(1))


def test_labeled_shares_leave_out_the_ignore_value():
    from napari_sgrs.core.train import labeled_shares

    a = np.zeros((4, 4, 4), np.uint8)
    a[0] = 1                                          # 16 of 64
    a[3] = 255                                        # 16 unannotated
    b = np.zeros((4, 4, 4), np.uint8)
    b[0, 0] = 2                                       # 4 of 64
    assert labeled_shares([a, b], 3, 255) == pytest.approx([92 / 112, 16 / 112, 4 / 112])


def test_training_caps_the_pseudo_labels_and_says_so(tiny_cohort, tmp_path, monkeypatch):
    import napari_sgrs.core.train as T
    from napari_sgrs.core.io import find_cases

    seen = []

    def recording_step(*args, **kwargs):
        f = kwargs.get("floors")
        seen.append(None if f is None else f.tolist())
        return sgrs_step(*args, **kwargs)

    monkeypatch.setattr(T, "sgrs_step", recording_step)
    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    T.train(tiny_config(iterations=6, val_every=2, pseudo_cap="labels"), cases, tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    caps = [e for e in events if e["kind"] == "regions" and e.get("scope") == "cap"]
    assert [e["step"] for e in caps] == [2, 4]
    for e in caps:
        assert len(e["floors"]) == len(e["label_share"]) == len(e["pseudo_share"]) == 2
        assert e["floors"][0] == 0.0 and sum(e["pseudo_share"]) == pytest.approx(1.0, abs=1e-4)
        # a floor is set exactly when the teacher labels more of the class than the labels hold
        assert (e["floors"][1] > 0) == (e["pseudo_share"][1] > e["label_share"][1])
    assert not any(e.get("scope") == "islands" for e in events)   # the two priors are independent
    # steps 0-1 run before the first sweep; each sweep's floors reach the steps that follow it
    assert seen[:2] == [None, None]
    assert seen[2:4] == [pytest.approx(caps[0]["floors"], abs=1e-4)] * 2
    assert seen[4:6] == [pytest.approx(caps[1]["floors"], abs=1e-4)] * 2
    with pytest.raises(ConfigError, match="'on'"):
        tiny_config(pseudo_cap="on").validate()


def test_the_island_masks_reach_the_training_step(tiny_cohort, tmp_path, monkeypatch):
    """Wiring: after a sweep, the masks it set come back with the unlabeled patches of each step."""
    import napari_sgrs.core.train as T
    from napari_sgrs.core.io import find_cases

    def mark_everything(teacher, samples, island_classes, *args, **kwargs):
        for sample in samples:
            sample.islands = np.ones(sample.image.shape, bool)
        return T.Sweep(1.0, None, sum(s.image.size for s in samples))

    seen = []

    def recording_step(*args, **kwargs):
        m = kwargs.get("islands")
        seen.append(None if m is None else bool(m.all()))
        return sgrs_step(*args, **kwargs)

    monkeypatch.setattr(T, "sweep_unlabeled", mark_everything)
    monkeypatch.setattr(T, "sgrs_step", recording_step)
    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    T.train(tiny_config(iterations=4, val_every=2, pseudo_islands="background"), cases, tmp_path / "run")
    assert seen == [None, None, True, True]


def test_a_resumed_run_sweeps_at_once(tiny_cohort, tmp_path):
    """Masks and floors are not in the checkpoint: a resumed run rebuilds them before its first step
    instead of training without them until the next sweep."""
    from napari_sgrs.core.io import find_cases
    from napari_sgrs.core.train import train

    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    run = tmp_path / "run"

    def stop_at_3(event):
        if event.kind.value == "progress" and event.step == 3:
            (run / "STOP").touch()

    cfg = dict(iterations=6, val_every=4, pseudo_cap="labels", pseudo_islands="background")
    assert train(tiny_config(**cfg), cases, run, listeners=[stop_at_3]).step == 3
    train(tiny_config(**cfg), cases, run, resume=True)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("scope") == "cap"] == [3, 4]
    assert [e["step"] for e in events if e.get("scope") == "islands"] == [3, 4]
