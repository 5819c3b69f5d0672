"""Stop is a normal outcome whatever the step length: a SIGTERM that lands inside a slow step ends
the run at the next step boundary with a checkpoint, a ``stopped`` event and exit 0, and the wait
before any signal follows the measured step time."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from napari_sgrs.core.events import EventKind, read_events
from napari_sgrs.core.runfolder import RunFolder
from napari_sgrs.project import jobs
from napari_sgrs.project.jobs import Job, stop_grace_s

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import TINY_ARGS  # noqa: E402

#: ``sgrs`` whose every training step first sleeps SLOW_STEP_S: a CPU's slow step, in a test's time
SLOW_SGRS = """
import os, sys, time
import napari_sgrs.core.train as T
step = T.Trainer._train_step
def slow_step(self):
    time.sleep(float(os.environ["SLOW_STEP_S"]))
    step(self)
T.Trainer._train_step = slow_step
from napari_sgrs.cli import main
sys.exit(main())
"""


def slow_sgrs_command() -> list[str]:
    return [sys.executable, "-c", SLOW_SGRS]


def slow_env(step_s: float) -> dict[str, str]:
    return {"PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1", "SLOW_STEP_S": str(step_s)}


def _wait(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_grace_follows_the_step_time():
    assert stop_grace_s(None) == jobs.STOP_GRACE_S
    assert stop_grace_s(87.0) >= 2 * 87.0  # the step under way and the checkpoint after it


def test_sigterm_inside_a_slow_step_is_a_clean_stop(tiny_cohort, tmp_path):
    run = RunFolder(tmp_path / "run")
    args = TINY_ARGS + ["--iterations", "50", "--checkpoint-every", "100"]
    cmd = slow_sgrs_command() + ["train", "--images", str(tiny_cohort.images_tr), "--labels",
                                 str(tiny_cohort.labels_tr), "--out", str(run.path), *args]
    job = Job(cmd, tmp_path / "train.log", env=slow_env(3.0))  # no STOP file: Stop is SIGTERM at once
    _wait(lambda: any(e.kind is EventKind.PROGRESS for e in read_events(run.events)) or not job.running)
    assert job.running, job.error_message()
    job.request_stop()  # SIGTERM, inside step 2's 3 s
    asked = time.monotonic()
    while job.running:
        job.enforce_stop(stop_grace_s(3.0))
        time.sleep(0.05)
    assert job.poll() == 0, job.error_message()
    last = read_events(run.events)[-1]
    assert last.kind is EventKind.STOPPED and last.step == 2 and last.data["reason"] == "SIGTERM"
    assert run.last.exists() and run.checkpoint_step() == 2
    assert time.monotonic() - asked < stop_grace_s(3.0)

