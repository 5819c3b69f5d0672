"""`--pseudo-islands background`: the one-piece prior on the pseudo labels during training.

The teacher's whole-volume islands (voxels of a one-piece class outside its largest component)
are found by sweep_unlabeled, travel with the unlabeled patches under the same crop, flips and
rotation, and turn the pseudo label there into background in sgrs_step."""

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
from tiny import TINY_ARGS, tiny_config  # noqa: E402


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


class _Threshold(torch.nn.Module):
    """A stand-in teacher: class 1 wherever the input is positive."""

    def forward(self, x):
        return torch.cat([-x, x], 1)


def test_refresh_marks_the_teachers_smaller_pieces():
    image = -np.ones((24, 20, 28), np.float32)
    image[2:10, 2:10, 2:10] = 1.0     # the target: 512 voxels
    image[15:19, 12:16, 20:24] = 1.0  # a look-alike: 64 voxels
    one = make_sample("one", image, None, (16, 16, 16), 255)
    clean = make_sample("clean", np.where(image[:12] > 0, image[:12], -1.0), None, (16, 16, 16), 255)
    teacher = _Threshold().train()
    share = sweep_unlabeled(teacher, [one, clean], [1], (16, 16, 16), 2, torch.device("cpu")).islands
    expected = np.zeros(image.shape, bool)
    expected[15:19, 12:16, 20:24] = True
    np.testing.assert_array_equal(one.islands, expected)
    assert clean.islands is None                      # one piece: nothing to mark
    assert share == pytest.approx(64 / (image.size + clean.image.size))
    assert teacher.training                           # the caller's mode is restored
    sweep_unlabeled(teacher, [one], [], (16, 16, 16), 2, torch.device("cpu"))
    assert one.islands is None                        # no one-piece class: no mask


class _Constant(torch.nn.Module):
    """A stand-in network with a learnable bias: logits favour ``cls`` everywhere."""

    def __init__(self, cls: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(2))
        self.cls = cls

    def forward(self, x):
        base = torch.zeros(x.shape[0], 2, *x.shape[2:])
        base[:, self.cls] = 3.0
        return base + x * 0.1 + self.bias.view(1, 2, 1, 1, 1)


def _unsup_loss(teacher_class: int, islands) -> float:
    cfg = TrainConfig(method="sgrs", iterations=10, patch_size=(16, 16, 16), batch_size=4, labeled_batch_size=2,
                      gate="none").validate()
    g = torch.Generator().manual_seed(0)
    x, u = torch.randn(2, 1, 16, 16, 16, generator=g), torch.randn(2, 1, 16, 16, 16, generator=g)
    y = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    out = sgrs_step(_Constant(0), _Constant(teacher_class), x, y, u, 9, cfg, np.random.default_rng(1),
                    torch.Generator().manual_seed(2), 4.0, 2, islands=islands)
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
    from napari_sgrs.core.io import read_volume, write_volume

    images, labels = tmp_path / "img", tmp_path / "lab"
    images.mkdir()
    labels.mkdir()
    for f in tiny_cohort.images_tr.iterdir():
        (images / f.name).symlink_to(f)
    for i, f in enumerate(sorted(tiny_cohort.labels_tr.iterdir())):
        vol = read_volume(f)
        arr = vol.array.copy()
        if i == 0:
            arr[0:2, 0:2, 0:2] = 1   # a far corner island: class 1 is two pieces in this label
        write_volume(labels / f.name, arr, vol.geometry)
    code = main(["train", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "run"),
                 *TINY_ARGS, "--pseudo-islands", "background"])
    assert code == 0
    assert "note: --pseudo-islands background does nothing" in capsys.readouterr().err
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["classes"] for e in events if e.get("scope") == "islands"] == [[]]
