"""`--pseudo-anchor labels`: a second V-Net trained on the labeled patches alone, whose EMA's
probabilities are averaged with the teacher's into the pseudo labels (steps.LabelAnchor)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sgrs.cli import main
from napari_sgrs.core.checkpoint import load_checkpoint
from napari_sgrs.core.errors import CheckpointError, ConfigError
from napari_sgrs.core.events import EventKind, read_events
from napari_sgrs.core.io import find_cases
from napari_sgrs.core.memory import estimate_training_memory
from napari_sgrs.core.steps import STEPS, LabelAnchor, sgrs_step
from napari_sgrs.core.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import TINY_ARGS, tiny_config  # noqa: E402


class _Logits(torch.nn.Module):
    """A stand-in network with the same logits (background, foreground) at every voxel."""

    def __init__(self, background: float, foreground: float):
        super().__init__()
        self.logits = torch.tensor([background, foreground])

    def forward(self, x):
        return self.logits.view(1, 2, 1, 1, 1).expand(x.shape[0], 2, *x.shape[2:]).clone()


def _unsup_loss(teacher, anchor=None) -> float:
    """The unlabeled loss of one step with a fixed student: it depends on the pseudo label only."""
    cfg = TrainConfig(method="anchored-sgrs", iterations=10, patch_size=(16, 16, 16), batch_size=4,
                      labeled_batch_size=2).validate()
    g = torch.Generator().manual_seed(0)
    x, u = torch.randn(2, 1, 16, 16, 16, generator=g), torch.randn(2, 1, 16, 16, 16, generator=g)
    y = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    out = sgrs_step(_Logits(2.0, 0.0), teacher, x, y, u, 9, cfg, np.random.default_rng(1),
                    torch.Generator().manual_seed(2), 4.0, 2, anchor=anchor)
    return out.loss_unsup


def test_the_pseudo_label_is_the_mean_of_teacher_and_anchor():
    fg_teacher = _Logits(0.0, 3.0)                     # foreground with p = 0.95
    background, foreground = _unsup_loss(_Logits(3.0, 0.0)), _unsup_loss(fg_teacher)
    assert foreground != pytest.approx(background)
    # a confident background anchor (p = 0.002) outvotes the teacher: mean p = 0.476
    assert _unsup_loss(fg_teacher, _Logits(6.0, 0.0)) == pytest.approx(background)
    # a doubtful one (p = 0.27) does not: mean p = 0.61, the teacher's foreground stays
    assert _unsup_loss(fg_teacher, _Logits(1.0, 0.0)) == pytest.approx(foreground)
    # an anchor cannot make foreground of what a confident teacher calls background either way round
    assert _unsup_loss(_Logits(3.0, 0.0), _Logits(0.0, 1.0)) == pytest.approx(background)


def test_training_with_the_anchor(tiny_cohort, tmp_path, monkeypatch):
    import napari_sgrs.core.train as T

    created, seen = [], []

    class Recording(LabelAnchor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.start = {k: v.clone() for k, v in self.net.state_dict().items()}
            created.append(self)

    def recording_step(*args, **kwargs):
        seen.append(kwargs.get("anchor"))
        return sgrs_step(*args, **kwargs)

    monkeypatch.setattr(T, "LabelAnchor", Recording)
    monkeypatch.setitem(STEPS, "anchored-sgrs", recording_step)
    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    train(tiny_config(iterations=4, pseudo_anchor="labels"), cases, tmp_path / "run")
    (anchor,) = created
    assert len(seen) == 4 and all(a is anchor.ema for a in seen)     # its EMA makes the pseudo labels
    assert not anchor.ema.training
    moved = [k for k, v in anchor.net.state_dict().items() if v.is_floating_point()
             and not torch.equal(v, anchor.start[k])]
    assert moved                                                       # it trained
    tensors = load_checkpoint(tmp_path / "run").tensors
    for k, v in anchor.net.state_dict().items():
        assert torch.equal(tensors[f"anchor.{k}"], v)
    for k, v in anchor.ema.state_dict().items():
        assert torch.equal(tensors[f"anchor_ema.{k}"], v)
    assert any(k.startswith("anchor_optim.momentum.") for k in tensors)
    # its own initialisation, not a copy of the student's (train seeds the student with config.seed)
    torch.manual_seed(0)
    student_start = T.build_model(tiny_config(), 2).state_dict()
    assert all(not torch.equal(v, anchor.start[k]) for k, v in student_start.items() if v.dim() == 5)
    progress = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e.kind is EventKind.PROGRESS]
    assert progress and all(e.data["loss_anchor"] > 0 for e in progress)


def test_the_anchor_leaves_the_students_initialisation_alone(tiny_cohort, tmp_path):
    """The anchor is initialised from its own stream: the student starts from the same weights and
    draws the same first batch, so with the unlabeled loss off the first step is the same step.
    (Later steps differ: the anchor's dropout draws from the global stream after the student's.)"""
    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    train(tiny_config(iterations=1, unsup_weight=0.0, pseudo_anchor="off"), cases, tmp_path / "plain")
    train(tiny_config(iterations=1, unsup_weight=0.0, pseudo_anchor="labels"), cases, tmp_path / "anchored")
    a, b = load_checkpoint(tmp_path / "plain").tensors, load_checkpoint(tmp_path / "anchored").tensors
    for k in a:
        if k.startswith(("student.", "teacher.")):
            assert torch.equal(a[k], b[k]), k
    assert any(k.startswith("anchor.") for k in b) and not any(k.startswith("anchor.") for k in a)


def test_resume_continues_the_anchor(tiny_cohort, tmp_path):
    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    cfg = dict(iterations=4, pseudo_anchor="labels")
    train(tiny_config(**cfg), cases, tmp_path / "full")
    half = tmp_path / "half"

    def stop_at_2(event):
        if event.kind is EventKind.PROGRESS and event.step == 2:
            (half / "STOP").touch()

    assert train(tiny_config(**cfg), cases, half, listeners=[stop_at_2]).step == 2
    assert train(tiny_config(**cfg), cases, half, resume=True).step == 4
    full, resumed = load_checkpoint(tmp_path / "full").tensors, load_checkpoint(half).tensors
    keys = [k for k in full if k.startswith(("student.", "teacher.", "anchor"))]
    assert any(k.startswith("anchor_optim.") for k in keys)
    for k in keys:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k


def test_resuming_an_unanchored_run_with_the_anchor_is_refused(tiny_cohort, tmp_path):
    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    train(tiny_config(iterations=2, pseudo_anchor="off"), cases, tmp_path / "run")
    with pytest.raises(CheckpointError, match="--pseudo-anchor off"):
        train(tiny_config(iterations=4, pseudo_anchor="labels"), cases, tmp_path / "run", resume=True)


def test_cli_option_resume_and_settings(tiny_cohort, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
            "--out", str(run), *TINY_ARGS]
    assert main(base + ["--pseudo-anchor", "labels", "--iterations", "2"]) == 0
    assert json.loads((run / "config.json").read_text())["config"]["pseudo_anchor"] == "labels"
    # a resumed run keeps the anchor it was trained with unless told otherwise
    assert main(base + ["--resume", "--iterations", "4"]) == 0
    assert load_checkpoint(run).meta["step"] == 4
    assert any(k.startswith("anchor.") for k in load_checkpoint(run).tensors)
    with pytest.raises(ConfigError, match="'on'"):
        tiny_config(pseudo_anchor="on").validate()
    with pytest.raises(SystemExit):
        main(base + ["--pseudo-anchor", "on"])
    assert "--pseudo-anchor" in capsys.readouterr().err
    # runs saved before the option existed resume as they were trained: without it
    assert TrainConfig.from_json({"method": "sgrs"}).pseudo_anchor == "off"


def test_the_paper_has_no_anchor():
    from napari_sgrs.cli import PRESETS

    assert TrainConfig(**PRESETS["paper"]).validate().pseudo_anchor == "off"
    assert TrainConfig(method="sgrs").validate().pseudo_anchor == "off"


def test_the_memory_estimate_counts_the_anchor():
    plain = estimate_training_memory((32, 32, 32), 6, 8, 2, "sgrs", 4)
    anchored = estimate_training_memory((32, 32, 32), 6, 8, 2, "sgrs", 4, anchor=True)
    from napari_sgrs.core.memory import _param_bytes

    assert anchored - plain == _param_bytes(8)


def test_under_torchrun_the_anchor_is_wrapped_for_gradient_averaging(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        anchor = LabelAnchor(tiny_config(pseudo_anchor="labels").validate(), 2, torch.device("cpu"), True)
        assert isinstance(anchor.forward, torch.nn.parallel.DistributedDataParallel)
        assert anchor.forward.module is anchor.net
        x, y = torch.randn(2, 1, 16, 16, 16), torch.zeros(2, 16, 16, 16, dtype=torch.long)
        assert anchor.step(x.to(memory_format=torch.channels_last_3d), y, 0) > 0
    finally:
        dist.destroy_process_group()
