"""The viewer killed (SIGKILL) while it autosaves and while a run trains; one writer per project.

The viewer is a real napari process with the panel (tests/napari/viewer_process.py, on the
same Xvfb display as the test), so the panel's own QTimers autosave and poll as they do for a
user. The test kills it and reopens the project in a fresh viewer and panel.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_sgrs._napari._widget import AUTOSAVE_MS, SGRSTrainWidget
from napari_sgrs.core.checkpoint import load_checkpoint
from napari_sgrs.core.errors import LockedError, SGRSError
from napari_sgrs.core.events import EventKind, read_events
from napari_sgrs.core.project import Project, TrainerProcess
from napari_sgrs.core.runfolder import RunFolder

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from viewer_process import PAINT_S, edit_voxel  # noqa: E402

AUTOSAVE_S = AUTOSAVE_MS / 1000
# Timers on 2 CPU cores shared with other test processes fire late by this much at worst; the
# promise is "at most one autosave interval", the slack is the machine's, not the panel's.
SLACK_S = 1.0
START_S = 240  # a napari process (and a trainer) starting on a loaded machine


def _viewer(mode: str, project: Path, log: Path, *args: str) -> subprocess.Popen:
    """The viewer process, leader of a process group of its own (see :func:`_kill`)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("SGRS_TEST_SLOW_CHECKPOINT", None)
    out = open(log.with_suffix(".out"), "wb")
    try:
        return subprocess.Popen([sys.executable, str(HERE / "viewer_process.py"), mode, str(project), str(log),
                                 *map(str, args)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        out.close()


def _lines(log: Path) -> list[list[str]]:
    try:
        text = log.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line.split(" ") for line in text.splitlines() if line.endswith(tuple("0123456789y"))]


def _wait(condition, timeout: float, child: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if child is not None and child.poll() is not None:
            raise AssertionError(f"the viewer process exited ({child.returncode}) before {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _kill(child: subprocess.Popen) -> float:
    """SIGKILL the viewer and every process of its group, as a closed terminal or a session
    killed at once would: only a child that the panel detached survives it."""
    killed_at = time.time()
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    return killed_at


@pytest.mark.parametrize("during_write", [False, True], ids=["between-autosaves", "during-an-autosave"])
def test_viewer_killed_while_painting_loses_at_most_one_autosave_interval(
        during_write, make_napari_viewer, tmp_path):
    project_dir, log = tmp_path / "project", tmp_path / "viewer.log"
    journal = project_dir / "journal"
    # during-an-autosave: every write after the second autosave is held open before its rename
    slow_after = 2 if during_write else 0
    child = _viewer("paint", project_dir, log, "--slow-after", str(slow_after))
    try:
        _wait(lambda: (journal / "c0.npz").exists(), START_S, child, "the first autosave")
        if during_write:
            _wait(lambda: list(journal.glob(".*.tmp")), 60, child, "an autosave in progress")
        else:  # kill at an arbitrary moment 2.5 intervals after the first autosave
            first = sum(1 for line in _lines(log) if line[0] == "edit")
            _wait(lambda: sum(1 for line in _lines(log) if line[0] == "edit") >= first + 2.5 * AUTOSAVE_S / PAINT_S,
                  60, child, "painting")
        killed_at = _kill(child)
    finally:
        _kill(child)
    lines = _lines(log)
    edits = {int(line[1]): float(line[2]) for line in lines if line[0] == "edit"}
    autosaves = [i for i, line in enumerate(lines) if line[0] == "autosaved"]
    assert len(autosaves) >= 2 and len(edits) >= 10
    # the edits the last completed autosave held: every edit logged before it
    expected = max((int(line[1]) for line in lines[:autosaves[-1]] if line[0] == "edit"), default=0)
    if during_write:
        assert list(journal.glob(".*.tmp"))   # the kill left a torn autosave behind

    project = Project.open(project_dir)              # the killed viewer's lock went with it
    assert [e.name for e in project.pending_journal()] == ["c0"]
    recovered = project.load_journal("c0")
    present = [recovered[edit_voxel(k)] == k for k in sorted(edits)]
    kept = present.index(False) if False in present else len(present)
    assert present == [True] * kept + [False] * (len(present) - kept), "a torn autosave: edits out of order"
    # the last completed autosave, or (killed between autosaves) one that had just written
    assert kept == expected or (not during_write and kept == max(edits)), \
        f"the journal holds {kept} edits, the last completed autosave {expected}"
    old_enough = [k for k, t in edits.items() if t <= killed_at - AUTOSAVE_S - SLACK_S]
    assert old_enough and max(old_enough) <= kept, (
        f"edits older than one autosave interval were lost: {kept} kept, {max(old_enough)} were due")
    assert not list(journal.glob("*.tmp"))           # opening removed what the kill left
    project.close()

    # the panel of a fresh viewer offers the edits back into the label layer
    viewer = make_napari_viewer()
    widget = SGRSTrainWidget(viewer)
    widget.open_project(project_dir, recover=True)
    assert np.array_equal(widget.layer_for("c0", "label").data, recovered)
    widget.shutdown()


def _started_pid(log: Path) -> int | None:
    for line in _lines(log):
        if line[0] == "started":
            return int(line[1])
    return None


def _checkpoints(run: Path, after: int = -1) -> list[int]:
    return [e.step for e in read_events(run / "events.jsonl") if e.kind is EventKind.CHECKPOINT and e.step > after]


def _kill_trainer(run: Path, pids: set[int]) -> None:
    """Cleanup: SIGKILL the trainer that holds ``run``, if it is one this test started."""
    holder = RunFolder(run).holder()
    if holder is not None and holder.get("pid") in pids:
        os.kill(holder["pid"], signal.SIGKILL)


def test_viewer_killed_while_training_finds_the_run_again(make_napari_viewer, qtbot, cohort, tmp_path,
                                                          monkeypatch):
    project_dir, log = tmp_path / "project", tmp_path / "viewer.log"
    run = project_dir / "runs" / "run-001"
    errors = []
    monkeypatch.setattr("napari_sgrs._napari._widget.show_error", errors.append)
    pids: set[int] = set()
    child = _viewer("train", project_dir, log, cohort.images_tr, cohort.labels_tr)
    try:
        _wait(lambda: _started_pid(log) is not None and _checkpoints(run), START_S, child, "a checkpoint")
        trainer = _started_pid(log)
        pids.add(trainer)
        _kill(child)

        # 1. The trainer outlives the viewer; a new panel finds it, follows it and can Stop it.
        holder = RunFolder(run).holder()
        assert holder is not None and holder["pid"] == trainer, "the trainer died with the viewer"
        viewer = make_napari_viewer()
        widget = SGRSTrainWidget(viewer)
        widget.open_project(project_dir, recover=False)
        assert isinstance(widget.train_job, TrainerProcess) and widget.train_job.pid == trainer
        assert widget.stop_button.isEnabled() and not widget.start_button.isEnabled()
        assert not widget.resume_button.isEnabled() and "following it" in widget.status_label.text()
        seen = widget.last_event.step
        qtbot.waitUntil(lambda: widget.last_event.step > seen, timeout=120_000)
        # Never a second trainer in a run: Resume is refused while one trains there (the button is
        # off; the launch itself checks the run's lock too, for a trainer the panel does not know).
        with pytest.raises(SGRSError, match="already running"):
            widget.resume_training()
        with pytest.raises(LockedError, match=f"pid {trainer}"):
            widget._launch(run, resume=True, settings=widget.project.settings())
        with pytest.raises(SGRSError, match="Stop it"):    # nor a project swapped under a running run
            widget.open_project(project_dir)
        widget.stop_training()
        qtbot.waitUntil(lambda: widget.train_job is None, timeout=120_000)
        last = read_events(run / "events.jsonl")[-1]
        assert last.kind is EventKind.STOPPED and not errors
        stopped_at = last.step
        assert load_checkpoint(run).meta["step"] == stopped_at
        assert widget.resume_button.isEnabled()

        # 2. The trainer killed too (say with the viewer's whole session): reopening offers Resume
        #    from the last checkpoint, which is intact, and Resume takes the dead trainer's lock over.
        widget.resume_training()
        pids.add(widget.train_job.pid)
        qtbot.waitUntil(lambda: bool(_checkpoints(run, after=stopped_at)), timeout=START_S * 1000)
        os.kill(widget.train_job.pid, signal.SIGKILL)
        qtbot.waitUntil(lambda: widget.train_job is None, timeout=60_000)
        assert errors and errors[-1].startswith("training failed")
        widget.shutdown()
        last = max(_checkpoints(run))

        viewer = make_napari_viewer()
        widget = SGRSTrainWidget(viewer)
        widget.open_project(project_dir, recover=False)
        assert widget.train_job is None and widget.resume_button.isEnabled()
        assert f"Resume continues it from its last checkpoint (step {last})" in widget.status_label.text()
        assert load_checkpoint(run).meta["step"] == last
        widget.resume_training()
        pids.add(widget.train_job.pid)
        qtbot.waitUntil(lambda: bool(_checkpoints(run, after=last)), timeout=START_S * 1000)
        widget.shutdown()
        assert read_events(run / "events.jsonl")[-1].kind is EventKind.STOPPED
    finally:
        _kill(child)
        _kill_trainer(run, pids)


def test_a_second_viewer_on_an_open_project_is_refused_naming_the_first(make_napari_viewer, tmp_path,
                                                                        monkeypatch):
    from qtpy.QtWidgets import QApplication

    errors = []
    monkeypatch.setattr("napari_sgrs._napari._widget.show_error", errors.append)
    first_viewer = make_napari_viewer()
    first = SGRSTrainWidget(first_viewer, project=Project.create(tmp_path / "project"))
    first_viewer.window.add_dock_widget(first, name="SGRS: train")
    second = SGRSTrainWidget(make_napari_viewer())
    second._guard(second.open_project, tmp_path / "project")       # what Open project… does
    assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0] and "napari-sgrs project" in errors[0]
    assert str(tmp_path / "project") in errors[0] and "\n" not in errors[0]
    assert second.project is None and not second.viewer.layers
    # The first viewer is closed (the Python session goes on, as in IPython): the lock goes with
    # its panel, and the second viewer opens the project.
    first_viewer.close()
    for _ in range(10):
        QApplication.processEvents()
    second.open_project(tmp_path / "project")
    assert second.project is not None
    second.shutdown()
