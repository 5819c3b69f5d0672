"""Training loop: determinism, resume, validation events, methods, divergence, stop."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from napari_sgrs.core.checkpoint import load_checkpoint
from napari_sgrs.core.errors import CheckpointError, ConfigError, InputError, TrainingDiverged
from napari_sgrs.core.events import EventKind, read_events
from napari_sgrs.core.io import find_cases
from napari_sgrs.core.train import train

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
from tiny import tiny_config  # noqa: E402


def _cases(c):
    return find_cases(c.images_tr, c.labels_tr)


def _weights(run):
    return load_checkpoint(run / "checkpoints" / "last.safetensors").tensors


@pytest.mark.parametrize("method", ["sgrs", "mean-teacher", "supervised"])
def test_each_method_trains_and_writes_a_run_folder(tiny_cohort, tmp_path, method):
    result = train(tiny_config(method=method), _cases(tiny_cohort), tmp_path / "run")
    assert result.step == 4 and not result.stopped
    kinds = [e.kind for e in read_events(tmp_path / "run" / "events.jsonl")]
    assert kinds[0] is EventKind.STARTED and kinds[-1] is EventKind.FINISHED
    assert EventKind.VALIDATION in kinds and EventKind.CHECKPOINT in kinds  # 3 labeled -> 1 validation volume
    meta = load_checkpoint(tmp_path / "run").meta
    assert meta["step"] == 4 and meta["num_classes"] == 2
    assert len(meta["val_cases"]) == 1 and meta["val_cases"][0] not in meta["train_cases"]


def test_sgrs_logs_region_shares(tiny_cohort, tmp_path):
    train(tiny_config(), _cases(tiny_cohort), tmp_path / "run")
    regions = [e.data for e in read_events(tmp_path / "run" / "events.jsonl") if e.kind is EventKind.REGIONS]
    batch = [d for d in regions if d["scope"] == "batch"]
    val = [d for d in regions if d["scope"] == "validation"]
    assert batch and val
    shares = batch[-1]["disregarded"] + batch[-1]["consistent"] + batch[-1]["inconsistent"]
    assert shares == pytest.approx(1.0)
    assert "accuracy_consistent" in val[-1]


def test_deterministic_on_cpu_for_a_seed(tiny_cohort, tmp_path):
    train(tiny_config(), _cases(tiny_cohort), tmp_path / "a")
    train(tiny_config(), _cases(tiny_cohort), tmp_path / "b")
    train(tiny_config(seed=1), _cases(tiny_cohort), tmp_path / "c")
    a, b, c = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if k.startswith("student."))


def test_resume_continues_with_same_step_optimizer_and_teacher(tiny_cohort, tmp_path):
    train(tiny_config(iterations=4), _cases(tiny_cohort), tmp_path / "full")
    half = tmp_path / "half"

    def stop_at_2(event):
        if event.kind is EventKind.PROGRESS and event.step == 2:
            (half / "STOP").touch()

    first = train(tiny_config(iterations=4), _cases(tiny_cohort), half, listeners=[stop_at_2])
    assert first.stopped and first.step == 2
    result = train(tiny_config(iterations=4), _cases(tiny_cohort), half, resume=True)
    assert result.step == 4
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "half")
    for k in full:
        if k.startswith(("student.", "teacher.", "optim.")):
            assert torch.allclose(full[k], resumed[k], atol=1e-6), k


def test_resume_needs_a_checkpoint_and_fresh_runs_refuse_to_overwrite(tiny_cohort, tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_config(), _cases(tiny_cohort), tmp_path / "run", resume=True)
    train(tiny_config(iterations=2), _cases(tiny_cohort), tmp_path / "run")
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(), _cases(tiny_cohort), tmp_path / "run")
    with pytest.raises(CheckpointError, match="base-filters"):
        train(tiny_config(base_filters=4), _cases(tiny_cohort), tmp_path / "run", resume=True)


def test_stop_file_checkpoints_and_stops(tiny_cohort, tmp_path):
    run = tmp_path / "run"
    seen = []

    def listener(event):
        seen.append(event.kind)
        if event.kind is EventKind.PROGRESS and event.step == 2:
            (run / "STOP").touch()

    result = train(tiny_config(iterations=50), _cases(tiny_cohort), run, listeners=[listener])
    assert result.stopped and result.step == 2
    assert seen[-1] is EventKind.STOPPED
    assert load_checkpoint(run).meta["step"] == 2


def test_divergence_stops_and_keeps_last_good_checkpoint(tiny_cohort, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(iterations=2), _cases(tiny_cohort), run)
    good = load_checkpoint(run).sha256
    with pytest.raises(TrainingDiverged, match="step"):
        train(tiny_config(iterations=6, lr=1e30), _cases(tiny_cohort), run, resume=True)
    assert load_checkpoint(run).sha256 == good or load_checkpoint(run).meta["step"] >= 2
    last = read_events(run / "events.jsonl")[-1]
    assert last.kind is EventKind.ERROR and "became" in last.data["message"]
    for t in load_checkpoint(run).tensors.values():
        if t.dtype.is_floating_point:
            assert torch.isfinite(t).all()


def test_partial_labels_train_on_annotated_slices_only(tiny_cohort, tmp_path):
    from napari_sgrs.core.demo import partial_label
    from napari_sgrs.core.io import read_volume, write_volume

    labels = tmp_path / "labels"
    labels.mkdir()
    for p in sorted(tiny_cohort.labels_tr.iterdir()):
        v = read_volume(p)
        write_volume(labels / p.name, partial_label(v.array, keep_every=4), v.geometry)
    result = train(tiny_config(method="supervised"), find_cases(tiny_cohort.images_tr, labels), tmp_path / "run")
    assert result.step == 4
    assert load_checkpoint(tmp_path / "run").meta["num_classes"] == 2  # 255 is not a class


def test_multiclass_labels(tmp_path):
    from napari_sgrs.core.demo import make_demo_cohort

    c = make_demo_cohort(tmp_path / "d", n_cases=4, n_labeled=2, n_test=0, shape=(20, 20, 20), n_classes=3)
    train(tiny_config(), find_cases(c.images_tr, c.labels_tr), tmp_path / "run")
    ck = load_checkpoint(tmp_path / "run")
    assert ck.meta["num_classes"] == 3 and ck.tensors["student.head.weight"].shape[0] == 3


def test_no_labeled_volume_is_an_error(tiny_cohort, tmp_path):
    with pytest.raises(InputError, match="no labeled volume"):
        train(tiny_config(), find_cases(tiny_cohort.images_tr, None), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_volumes_smaller_than_patch_are_padded(tiny_cohort, tmp_path):
    result = train(tiny_config(patch_size=(32, 32, 32), iterations=2), _cases(tiny_cohort), tmp_path / "run")
    assert result.step == 2


@pytest.mark.parametrize("method, given, expected", [
    ("supervised", {}, (2, 2)),
    ("sgrs", {}, (4, 2)),                           # the paper's 2 + 2
    ("sgrs-plus", {}, (4, 2)),
    ("mean-teacher", {}, (4, 2)),
    ("sgrs", {"batch_size": 6}, (6, 3)),
    ("sgrs", {"labeled_batch_size": 3}, (5, 3)),
    ("sgrs", {"batch_size": 8, "labeled_batch_size": 6}, (8, 6)),
    ("supervised", {"batch_size": 4}, (4, 4)),
    ("supervised", {"labeled_batch_size": 3}, (3, 3)),
])
def test_batch_defaults_give_every_method_the_same_labeled_stream(method, given, expected):
    from napari_sgrs.core.train import TrainConfig

    cfg = TrainConfig(method=method, **given).validate()
    assert (cfg.batch_size, cfg.labeled_batch_size) == expected


def test_pseudo_views_mix_sends_no_unlabeled_gradient_through_the_plain_view():
    """pseudo_views="mix": L_u teaches only P_mix. Checked on sgrs_step's loss: with the supervised
    and mixed parts of the batch taken out of the graph, nothing flows back to the U patches."""
    import copy

    import torch

    from napari_sgrs.core.network import build_model
    from napari_sgrs.core.steps import sgrs_step
    from napari_sgrs.core.train import TrainConfig

    torch.manual_seed(0)
    cfg = TrainConfig(patch_size=(16, 16, 16), base_filters=2, batch_size=4, labeled_batch_size=2,
                      dropout=0.0, use_mix=True).validate()
    student = build_model(cfg, 2).eval()  # eval: BatchNorm per sample, so samples do not interact
    teacher = copy.deepcopy(student)
    x, u = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16, requires_grad=True)
    y = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    y[:, 4:12, 4:12, 4:12] = 1

    def grad_on_u(views):
        cfg.pseudo_views = views
        u.grad = None
        out = sgrs_step(student, teacher, x, y, u, 10_000, cfg, np.random.default_rng(0),
                        torch.Generator().manual_seed(0), 1.0, 2)
        (out.loss - out.loss_sup).backward()
        return u.grad.abs().sum().item()

    both, mix_only = grad_on_u("both"), grad_on_u("mix")
    assert both > 0 and mix_only > 0      # U still reaches L_u through U_mix = lam U' + ...
    assert mix_only < both                 # ...but no longer through P itself
    with pytest.raises(ConfigError, match="--pseudo-views must be mix or both, got .plain."):
        TrainConfig(pseudo_views="plain").validate()
