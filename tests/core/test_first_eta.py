"""The first ETA comes with the first step, not at step ``log_every``: a CPU step can take minutes."""

from __future__ import annotations

import sys
from pathlib import Path

from napari_sgrs.core.events import EventKind, read_events
from napari_sgrs.core.io import find_cases
from napari_sgrs.core.train import train

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import tiny_config  # noqa: E402


def test_the_first_step_reports_progress_with_an_eta(tiny_cohort, tmp_path):
    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    train(tiny_config(iterations=4, log_every=10, val_every=10), cases, tmp_path / "run")
    progress = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e.kind is EventKind.PROGRESS]
    assert [e.step for e in progress] == [1, 4]  # step 1 at once, then the last step
    first = progress[0].data
    assert first["steps_per_s"] > 0 and first["eta_s"] > 0
    assert abs(first["eta_s"] - 3 / first["steps_per_s"]) < 1e-6 * first["eta_s"] + 1e-9


def test_a_resumed_run_reports_its_first_step_too(tiny_cohort, tmp_path):
    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    train(tiny_config(iterations=2, log_every=10, val_every=10), cases, tmp_path / "run")
    train(tiny_config(iterations=5, log_every=10, val_every=10), cases, tmp_path / "run", resume=True)
    progress = [e.step for e in read_events(tmp_path / "run" / "events.jsonl") if e.kind is EventKind.PROGRESS]
    assert progress == [1, 2, 3, 5]
