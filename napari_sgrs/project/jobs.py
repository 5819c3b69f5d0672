"""The panel's background ``sgrs`` processes: a :class:`Job` it starts (train or predict, output
to a log file), and a :class:`TrainerProcess` it finds (a trainer started by an earlier viewer,
found through its run folder's lock). Nothing here blocks; the panel polls from a timer.
"""

from __future__ import annotations

import abc
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ..core.events import Event, EventKind, read_events
from ..core.runfolder import RunFolder


#: After Stop, at least this long for the trainer's own clean stop, then SIGTERM (still a clean
#: stop, at the next step boundary), then as long again before SIGKILL (see :func:`stop_grace_s`).
STOP_GRACE_S = 30.0


def stop_grace_s(step_s: float | None) -> float:
    """How long to wait, after Stop and again after SIGTERM, for a trainer whose steps take
    ``step_s`` seconds (None: not measured yet). The trainer stops at a step boundary, so the wait
    covers the step under way, the checkpoint (about a step's time on a CPU) and a margin: a
    fixed 30 s would kill a CPU run with 87 s steps before it could save."""
    return STOP_GRACE_S + 2 * max(float(step_s or 0.0), 0.0)


def sgrs_command() -> list[str]:
    """The engine's entry point, run with this interpreter (works without the ``sgrs`` script on PATH)."""
    return [sys.executable, "-m", "napari_sgrs.cli"]


def train_command(images_dir: Path, labels_dir: Path, run_dir: Path, settings_file: Path,
                  resume: bool = False) -> list[str]:
    """``sgrs train`` with the settings of ``settings_file`` (``--config``, see
    ``Project.write_settings_file``): the command names only the folders, never a setting."""
    cmd = sgrs_command() + ["train", "--config", str(settings_file), "--images", str(images_dir),
                            "--labels", str(labels_dir), "--out", str(run_dir)]
    return cmd + (["--resume"] if resume else [])


def predict_command(run_dir: Path, images_dir: Path, out_dir: Path, regions: bool = True) -> list[str]:
    cmd = sgrs_command() + ["predict", "--run", str(run_dir), "--images", str(images_dir), "--out", str(out_dir)]
    return cmd + (["--regions"] if regions else [])


class _StopsOnRequest(abc.ABC):
    """The Stop protocol that the panel's own :class:`Job` and a :class:`TrainerProcess` found
    again share: touch STOP (the trainer checkpoints, writes a ``stopped`` event and exits 0), then
    SIGTERM after a grace (it still checkpoints), SIGKILL a grace later. Subclasses give
    ``stop_file``, ``poll`` and ``_send(signal)``."""

    stop_file: Path | None
    stop_requested_at: float | None = None
    _terminated_at: float | None = None

    @abc.abstractmethod
    def poll(self) -> int | None:
        """Exit code, or None while running."""

    @abc.abstractmethod
    def _send(self, sig: int) -> None:
        """Send ``sig`` to the process, where this object may."""

    @property
    def running(self) -> bool:
        return self.poll() is None

    def request_stop(self) -> None:
        """Ask for a clean stop: touch the STOP file (without one: SIGTERM at once)."""
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        if self.stop_file is not None:
            self.stop_file.parent.mkdir(parents=True, exist_ok=True)
            self.stop_file.touch()
        else:
            self.terminate()

    def enforce_stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Call from the timer after :meth:`request_stop`: SIGTERM after ``grace_s``, SIGKILL
        ``grace_s`` later."""
        if self.stop_requested_at is None or not self.running:
            return
        now = time.monotonic()
        if self._terminated_at is None and now - self.stop_requested_at > grace_s:
            self.terminate()
        elif self._terminated_at is not None and now - self._terminated_at > grace_s:
            self._send(signal.SIGKILL)

    def terminate(self) -> None:
        if self.running:
            self._terminated_at = time.monotonic()
            self._send(signal.SIGTERM)


class Job(_StopsOnRequest):
    """A background ``sgrs`` process (train or predict); output goes to a log file, never a pipe.

    A pipe nobody drains would block the child once full; a file also survives the viewer.
    Poll :meth:`poll` from a timer; nothing here blocks.
    """

    def __init__(self, cmd: Sequence[str], log_path: Path, stop_file: Path | None = None,
                 env: dict[str, str] | None = None, cwd: Path | None = None, detach: bool = False):
        self.cmd = list(cmd)
        self.log_path = Path(log_path)
        self.stop_file = Path(stop_file) if stop_file is not None else None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.stop_file is not None and self.stop_file.exists():
            self.stop_file.unlink()  # a STOP left from an earlier Stop would end this run at once
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "ab")
        # detach: a session of its own, so no signal meant for the viewer (Ctrl-C in its terminal,
        # the terminal closing) reaches the child; see TrainerProcess for why a trainer outlives it.
        self.process = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=full_env, cwd=cwd,
                                        start_new_session=detach)
        self.started = time.monotonic()
        self.stop_requested_at: float | None = None
        self._terminated_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        """Exit code, or None while running. Closes the log once the process ended."""
        code = self.process.poll()
        if code is not None and not self._log.closed:
            self._log.close()
        return code

    def _send(self, sig: int) -> None:
        self.process.send_signal(sig)

    def kill(self) -> None:
        if self.running:
            self.process.kill()
            self.process.wait(timeout=10)
        self.poll()

    def error_message(self) -> str:
        """The engine's one-line ``error: ...`` message, or the log's last line."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"{self.cmd[3] if len(self.cmd) > 3 else 'sgrs'} failed (no log)"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        for line in reversed(lines):
            if line.startswith("error:"):
                return line[len("error:"):].strip()
        return lines[-1] if lines else f"process exited with code {self.process.returncode}"


class TrainerProcess(_StopsOnRequest):
    """A trainer the panel did not start in this session, found through the lock it holds on its
    run folder: the panel follows and stops it as it would its own :class:`Job`.

    Why a trainer outlives the viewer that started it, rather than being stopped with it: a run
    can take hours of GPU time and needs nothing from the viewer (its checkpoints, events and
    log are files in the run folder), and a viewer that is killed cannot stop anything cleanly
    anyway. So the panel starts it detached (:class:`Job` ``detach``); reopening the project
    finds it by its run-folder lock, follows its ``events.jsonl``, and Stop touches its STOP
    file. When no process holds the run any more, the panel offers Resume from the last
    checkpoint instead.
    """

    def __init__(self, run_dir: Path, holder: dict):
        self.run = RunFolder(run_dir)
        self.run_dir = self.run.path
        self.holder = dict(holder)
        self.stop_file = self.run.stop_file
        self.started = time.monotonic()  # when this viewer found it: the run has lasted at least since
        self.stop_requested_at: float | None = None
        self._terminated_at: float | None = None
        self._code: int | None = None

    @property
    def pid(self) -> int | None:
        pid = self.holder.get("pid")
        return pid if type(pid) is int else None

    def poll(self) -> int | None:
        """None while a process holds the run; then 0 if its last event says it finished or
        stopped, 1 if it failed or vanished without a word (killed)."""
        if self._code is None and self.run.holder() is None:
            last = self._last_event()
            self._code = 0 if last is not None and last.kind in (EventKind.FINISHED, EventKind.STOPPED) else 1
        return self._code

    def kill(self) -> None:
        if self.running:
            self._send(signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.running and time.monotonic() < deadline:
                time.sleep(0.05)

    def _send(self, sig: int) -> None:
        """Signal the trainer, on this host only (a pid elsewhere means nothing here)."""
        holder = self.run.holder()
        # Only the process that holds the run now, and only on this host: a pid from an old
        # lock file may belong to anything by now.
        if holder is None or holder.get("pid") != self.pid or self.pid is None \
                or holder.get("host") != socket.gethostname():
            return
        try:
            os.kill(self.pid, sig)
        except OSError:
            pass

    def _last_event(self) -> Event | None:
        events = read_events(self.run.events)
        return events[-1] if events else None

    def error_message(self) -> str:
        last = self._last_event()
        if last is not None and last.kind is EventKind.ERROR:
            return str(last.data.get("message", "unknown error"))
        return (f"the trainer of {self.run_dir.name} (pid {self.pid}) ended without finishing, "
                f"after step {last.step if last else 0}: it was killed; Resume continues from the last checkpoint")
