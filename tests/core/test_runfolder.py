"""One writer per run folder: the folder lock (real processes), the run layout, start-up stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from napari_sgrs.core.errors import ConfigError, LockedError
from napari_sgrs.core.events import Event, EventKind, read_events
from napari_sgrs.core.lockfile import LOCK_NAME, FolderLock, read_holder

REPO = str(Path(__file__).parents[2])
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that takes the folder lock, says so on stdout, and sleeps."""
    code = textwrap.dedent(f"""
        import sys, time
        from napari_sgrs.core.lockfile import FolderLock
        lock = FolderLock({str(folder)!r}, what="sgrs train", stop_hint="touch {folder}/STOP").acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# --------------------------------------------------------------------------- the lock itself

def test_lock_is_exclusive_names_its_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    holder = _hold_lock(folder)
    try:
        info = read_holder(folder)
        assert info["pid"] == holder.pid and info["what"] == "sgrs train"
        with pytest.raises(LockedError) as caught:
            FolderLock(folder).acquire()
        msg = str(caught.value)
        assert isinstance(caught.value, ConfigError) and "\n" not in msg
        assert msg.startswith(f"{folder} is in use by `sgrs train` (pid {holder.pid} on host ")
        assert f"stop it (touch {folder}/STOP)" in msg and "since " in msg
        assert caught.value.holder["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # the killed process left its lock file behind, naming it: the OS dropped the flock, so it is stale
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == holder.pid
    assert read_holder(folder) is None
    with FolderLock(folder, what="sgrs train") as lock:
        assert lock.held and read_holder(folder)["pid"] == os.getpid()
        with pytest.raises(LockedError):  # a second lock in the same process is refused too
            FolderLock(folder).acquire()
    assert read_holder(folder) is None and not lock.held
    FolderLock(folder).acquire().release()  # and free again after release


def test_read_holder_of_an_unlocked_or_missing_folder_is_none(tmp_path):
    assert read_holder(tmp_path / "absent") is None
    assert read_holder(tmp_path) is None
    (tmp_path / LOCK_NAME).write_text('{"pid": 1, "what": "sgrs train"}')  # stale content, no flock
    assert read_holder(tmp_path) is None


def test_a_holder_file_that_lies_or_is_garbage_still_gives_one_short_line(tmp_path):
    from napari_sgrs.core.lockfile import holder_message

    assert holder_message(tmp_path, {}) == f"{tmp_path} is in use by `another process`; wait for it to finish"
    msg = holder_message(tmp_path, {"what": "x\n" * 5000, "pid": "1\n2", "started": "yesterday"})
    assert len(msg) < 600 and "since yesterday" in msg  # each field cut to 200 characters


# --------------------------------------------------------------------------- trainers as real processes

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import TINY_ARGS, tiny_config  # noqa: E402


def _train_cmd(cohort, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "napari_sgrs.cli", "train", "--images", str(cohort.images_tr), "--labels",
            str(cohort.labels_tr), "--out", str(run), *TINY_ARGS, *extra]


def _wait_until(condition, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    t0 = time.monotonic()
    while not condition():
        assert proc.poll() is None, f"the trainer ended (code {proc.returncode}) before the moment the test waits for"
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


def _events(run: Path) -> list[Event]:
    return read_events(run / "events.jsonl")


def test_a_second_trainer_on_a_running_run_exits_2_naming_the_first_which_finishes_intact(tiny_cohort, tmp_path):
    run = tmp_path / "run"
    # each atomic write pauses, so the first trainer is still running when the others arrive
    first = subprocess.Popen(_train_cmd(tiny_cohort, run), env={**ENV, "SGRS_TEST_SLOW_CHECKPOINT": "0.5"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until(lambda: read_holder(run) is not None, first)
    for extra in ([], ["--resume"]):
        second = subprocess.run(_train_cmd(tiny_cohort, run, *extra), env=ENV, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert second.stderr.startswith(f"error: {run} is in use by `sgrs train` (pid {first.pid} on host ")
        assert f"stop it (touch {run / 'STOP'})" in second.stderr
    out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err[-2000:]
    kinds = [e.kind for e in _events(run)]
    assert kinds.count(EventKind.STARTED) == 1 and kinds[-1] is EventKind.FINISHED and EventKind.ERROR not in kinds
    from napari_sgrs.core.checkpoint import load_checkpoint

    assert load_checkpoint(run).meta["step"] == 4
    assert json.loads((run / "config.json").read_text())["config"]["iterations"] == 4
    assert read_holder(run) is None and not (run / LOCK_NAME).exists()  # released and removed


def test_the_lock_of_a_killed_trainer_is_taken_over(tiny_cohort, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tiny_cohort, run), env={**ENV, "SGRS_TEST_SLOW_CHECKPOINT": "5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_until(lambda: read_holder(run) is not None, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid  # left behind by the kill
    again = subprocess.run(_train_cmd(tiny_cohort, run), env=ENV, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _events(run)[-1].kind is EventKind.FINISHED
    # the killed trainer's half-written config.json temp file went with its lock
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("how", ["STOP", "SIGTERM", "SIGINT"])
def test_a_stop_during_start_up_ends_with_a_stopped_event_and_exit_0(how, tiny_cohort, tmp_path):
    """The panel's Stop (a STOP file), SIGTERM and Ctrl-C while the trainer starts (it holds the
    lock, writes its first config.json, loads the volumes): a `stopped` event, no traceback."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tiny_cohort, run), env={**ENV, "SGRS_TEST_SLOW_CHECKPOINT": "1.5"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until(lambda: read_holder(run) is not None, proc)
    if how == "STOP":
        (run / "STOP").touch()
    else:
        proc.send_signal(getattr(signal, how))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "stopped at step 0; no checkpoint yet" in out
    last = _events(run)[-1]
    assert last.kind is EventKind.STOPPED and last.step == 0 and last.data["path"] is None
    assert last.data["reason"] == ("STOP file" if how == "STOP" else how)
    assert not (run / "checkpoints" / "last.safetensors").exists()
    assert not (run / "STOP").exists()  # an honoured STOP is spent: it will not stop the next run
    resumed = subprocess.run(_train_cmd(tiny_cohort, run), env=ENV, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0 and _events(run)[-1].kind is EventKind.FINISHED, resumed.stderr


def _catches(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as fh:
        caught = next(line for line in fh if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) & (1 << (sig - 1)))


def test_sigterm_before_the_run_is_locked_is_one_line_and_writes_nothing(tiny_cohort, tmp_path):
    """SIGTERM while the CLI still imports the engine (before the lock): exit 130, `error:
    interrupted`; had it come a moment later, the run's own stop (exit 0, `stopped`) applies."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(tiny_cohort, run), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_until(lambda: _catches(proc.pid, signal.SIGTERM), proc, timeout=30)  # the CLI's handler is in
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err
    if proc.returncode == 130:
        assert err == "error: interrupted\n"
        assert not run.exists() or not list(run.iterdir())
    else:  # the import was quicker than the signal
        assert proc.returncode == 0 and _events(run)[-1].kind is EventKind.STOPPED, err


# --------------------------------------------------------------------------- in-process start-up rules

def _cases(cohort):
    from napari_sgrs.core.io import find_cases

    return find_cases(cohort.images_tr, cohort.labels_tr)


def test_a_stale_stop_is_removed_and_a_fresh_one_honoured_before_the_first_step(tiny_cohort, tmp_path, monkeypatch):
    import napari_sgrs.core.train as T
    from napari_sgrs.core.runfolder import process_start_time

    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").touch()  # a folder the panel made for the run (a lone STOP is a user's file)
    (run / "STOP").touch()
    old = process_start_time() - 60  # touched before this process started: a leftover
    os.utime(run / "STOP", (old, old))
    result = T.train(tiny_config(iterations=2), _cases(tiny_cohort), run)
    assert not result.stopped and result.step == 2 and not (run / "STOP").exists()

    real = T.load_cases

    def stop_while_loading(cases, config, *rest):  # the panel's Stop while the volumes load
        (run / "STOP").touch()
        return real(cases, config, *rest)

    before = (run / "checkpoints" / "last.safetensors").read_bytes()
    for when in ("before the call", "while loading"):
        if when == "before the call":  # after this process started: a request, not a leftover
            (run / "STOP").touch()
        else:
            monkeypatch.setattr(T, "load_cases", stop_while_loading)
        result = T.train(tiny_config(iterations=4), _cases(tiny_cohort), run, resume=True)
        assert result.stopped and result.step == 2, when
        assert result.last_checkpoint == run / "checkpoints" / "last.safetensors"
        assert (run / "checkpoints" / "last.safetensors").read_bytes() == before  # nothing trained or rewritten
        last = _events(run)[-1]
        assert last.kind is EventKind.STOPPED and last.step == 2 and last.data["reason"] == "STOP file"
        assert not (run / "STOP").exists()


def test_divergence_names_the_run_and_promises_no_checkpoint_that_does_not_exist(tiny_cohort, tmp_path):
    from napari_sgrs.core.errors import TrainingDiverged
    from napari_sgrs.core.train import train

    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as caught:
        train(tiny_config(iterations=8, lr=1e30, checkpoint_every=100, val_every=100), _cases(tiny_cohort), run)
    msg = str(caught.value)
    assert msg.startswith(f"{run}: the loss became ") and "no checkpoint was written yet" in msg
    assert "last good" not in msg and not (run / "checkpoints" / "last.safetensors").exists()


def test_temp_cleanup_removes_only_sgrs_own_temp_names(tiny_cohort, tmp_path):
    from napari_sgrs.core.train import train

    run = tmp_path / "run"
    train(tiny_config(iterations=2), _cases(tiny_cohort), run)
    ours = [run / ".config.json.k2j4_x9a.tmp", run / "checkpoints" / ".last.safetensors.abcdefgh.tmp",
            run / "checkpoints" / ".best.safetensors.0123456z.tmp"]
    theirs = [run / ".notes.txt.abcdefgh.tmp", run / "checkpoints" / ".mine.tmp", run / ".config.json.tmp",
              run / "checkpoints" / ".last.safetensors.toolongname.tmp"]
    for p in ours + theirs:
        p.write_bytes(b"x")
    train(tiny_config(iterations=4), _cases(tiny_cohort), run, resume=True)
    assert not [p for p in ours if p.exists()]
    assert all(p.read_bytes() == b"x" for p in theirs)


# --------------------------------------------------------------------------- train --out

def _snapshot(folder: Path) -> dict[str, bytes | str]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


def _user_files(folder: Path) -> None:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text('{"my": "settings"}')
    (folder / "events.jsonl").write_text("my log\n")
    (folder / "STOP").write_text("my stop sign")
    (folder / ".config.json.abcdefgh.tmp").write_text("mine")
    (folder / "checkpoints" / ".last.safetensors.abcdefgh.tmp").write_text("mine too")


NOT_A_RUN = {
    # name: (fill the folder, extra options, words of the error)
    "user-files": (_user_files, [], "is not empty and is not an sgrs run"),
    "user-files-resume": (_user_files, ["--resume"], "nothing to resume"),
    "a-json-list-config": (lambda f: (f / "config.json").write_text("[1, 2]"), [], "config.json"),
    "events-only": (lambda f: (f / "events.jsonl").write_text("{}\n"), [], "events.jsonl"),
    "one-file": (lambda f: (f / "notes.txt").write_text("hi"), [], "notes.txt"),
    "many-files": (lambda f: [(f / f"n{i}.txt").write_text("hi") for i in range(5)], [], "and 2 more"),
}


@pytest.mark.parametrize("name", list(NOT_A_RUN))
def test_train_out_on_a_folder_that_is_not_a_run_changes_nothing(name, tiny_cohort, tmp_path, capsys):
    from napari_sgrs.cli import main

    fill, extra, needle = NOT_A_RUN[name]
    out = tmp_path / "out"
    out.mkdir()
    fill(out)
    before = _snapshot(out)
    code = main(["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
                 "--out", str(out), *TINY_ARGS, *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and str(out) in err, err
    assert needle in err, err
    assert _snapshot(out) == before  # byte for byte, and no lock file or anything else added


def test_train_out_that_is_a_file_or_an_input_is_refused(tiny_cohort, tmp_path, capsys):
    from napari_sgrs.cli import main

    afile = tmp_path / "file"
    afile.write_text("keep")
    for out, needle in ((afile, "is a file"), (tiny_cohort.labels_tr, "is the input --labels"),
                        (tiny_cohort.images_tr / "run", "is inside the input --images")):
        before = _snapshot(tmp_path), _snapshot(tiny_cohort.root)
        code = main(["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
                     "--out", str(out), *TINY_ARGS])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err, err
        assert (_snapshot(tmp_path), _snapshot(tiny_cohort.root)) == before


def test_a_folder_holding_only_what_sgrs_puts_there_first_is_a_new_run(tiny_cohort, tmp_path):
    """The panel writes train.log (and may touch STOP) before the trainer starts; a killed start
    leaves a lock and a temp config: none of these makes the folder 'not empty'."""
    from napari_sgrs.core.runfolder import RunFolder

    out = tmp_path / "out"
    out.mkdir()
    for name in ("train.log", "STOP", LOCK_NAME, ".config.json.abcdefgh.tmp"):
        (out / name).write_text("")
    RunFolder(out).check_output()
    (out / "config.json").write_text(json.dumps({"config": {}}))  # an sgrs run (started, killed)
    (out / "notes.txt").write_text("")
    RunFolder(out).check_output()
    assert RunFolder(out).is_run()
