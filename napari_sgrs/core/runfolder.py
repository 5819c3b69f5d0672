"""A run folder: the one object that knows a run's file names, what makes a folder a run, and its lock.

Layout (``sgrs train --out RUN``)::

    RUN/config.json                    the run's settings ({"config": {...}, ...}); written first,
                                       so a folder is an sgrs run from the moment training starts
    RUN/events.jsonl                   typed progress events, one JSON object per line
    RUN/checkpoints/last.safetensors   the latest checkpoint
    RUN/checkpoints/best.safetensors   the best on the validation split
    RUN/STOP                           touch it to ask the trainer to checkpoint and stop
    RUN/train.log                      the napari panel's log of the trainer
    RUN/.sgrs.lock                     held by the one process writing the run (lockfile.py)

Torch-free: the CLI checks ``--out`` before it imports the engine.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .errors import CheckpointError, ConfigError, InputError, LockedError
from .lockfile import LOCK_NAME, FolderLock, holder_message, read_holder
from .outputs import atomic_write_bytes, is_temp_of, read_json, remove_stale_temp_files

__all__ = ["RunFolder", "process_start_time"]

_MAX_CONFIG_BYTES = 16 << 20


class RunFolder:
    """The run folder at ``path`` (which need not exist yet)."""

    CONFIG = "config.json"
    EVENTS = "events.jsonl"
    CHECKPOINTS = "checkpoints"
    STOP = "STOP"
    LOG = "train.log"
    LOCK = LOCK_NAME
    CHECKPOINT_KINDS = ("last", "best")
    #: Entries that do not make a folder "not empty" for a new run: what sgrs itself may have
    #: put there before a run wrote its config.json (the panel's log, a Stop, the lock).
    SCRATCH = (LOCK, STOP, LOG)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ---- names
    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def events(self) -> Path:
        return self.path / self.EVENTS

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    def checkpoint(self, kind: str = "last") -> Path:
        if kind not in self.CHECKPOINT_KINDS:
            raise ConfigError(f"checkpoint {kind!r}: use last or best")
        return self.path / self.relative(kind)

    @classmethod
    def relative(cls, kind: str = "last") -> str:
        """A checkpoint's place inside any run folder, as messages name it: ``checkpoints/last.safetensors``."""
        return f"{cls.CHECKPOINTS}/{kind}.safetensors"

    @property
    def last(self) -> Path:
        return self.checkpoint("last")

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    @property
    def stop_file(self) -> Path:
        return self.path / self.STOP

    @property
    def log(self) -> Path:
        return self.path / self.LOG

    # ---- what the folder is
    def is_run(self) -> bool:
        """An sgrs run: a config.json written by sgrs train (a JSON object whose ``config`` is an
        object), or a last checkpoint."""
        if self.last.is_file():
            return True
        try:
            if self.config.stat().st_size > _MAX_CONFIG_BYTES:
                return False
            data = json.loads(self.config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and isinstance(data.get("config"), dict)

    def read_config(self) -> dict:
        """The run's saved settings (config.json's ``config`` object). InputError, one line naming
        the file, when it is missing, not JSON, or not shaped as sgrs writes it."""
        path = self.config
        data = read_json(path, _MAX_CONFIG_BYTES, "the run's settings (config.json)", "restore the run's config.json")
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            found = (f"a JSON {type(data).__name__}" if not isinstance(data, dict)
                     else "no \"config\"" if "config" not in data else f"\"config\": {data['config']!r:.40}")
            raise InputError(f"{path}: the run's settings must be a JSON object under \"config\", found {found}; "
                             f"restore the run's config.json")
        return data["config"]

    def write_config(self, record: dict) -> None:
        """Replace config.json atomically with ``record`` (``{"config": {...}, ...}``), indented JSON."""
        atomic_write_bytes(self.config, json.dumps(record, indent=2).encode())

    def check_output(self, resume: bool = False, holding_lock: bool = False) -> None:
        """Refuse a folder that ``sgrs train --out`` must not write into (one line: the folder
        and the fix). A new run needs a folder that is absent, empty, or an sgrs run without a
        checkpoint (a run killed during start-up); ``resume`` needs a run with a last checkpoint.
        A folder locked by another process is refused first, naming the holder (skipped with
        ``holding_lock``: the caller's own lock). Reads only: nothing is written in a refused folder."""
        p = self.path
        if p.is_symlink() and not p.exists():
            raise ConfigError(f"--out {p} is a broken link; remove it or choose another --out")
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--out {p} is a file, not a folder; choose a folder for the run")
        holder = None if holding_lock else self.holder()
        if holder is not None:  # said first: whatever else is wrong, another process is writing here
            raise LockedError(holder_message(p, holder), holder)
        if resume:
            if not self.last.is_file():
                raise CheckpointError(f"{p}: nothing to resume (no {self.relative('last')}); start "
                                      f"without --resume")
            return
        if self.last.is_file():
            raise ConfigError(f"{p} already holds a run; pass --resume to continue it or choose a new --out")
        if not p.exists() or self.is_run():
            return
        # A STOP is the panel's (pressed while the trainer started) only beside the panel's log;
        # a STOP alone is a file of the user's, and this folder is not ours to write in.
        scratch = set(self.SCRATCH) if (p / self.LOG).is_file() else set(self.SCRATCH) - {self.STOP}
        try:
            others = sorted(e.name for e in p.iterdir()
                            if e.name not in scratch and not is_temp_of(e.name, (self.CONFIG,)))
        except OSError as exc:
            raise ConfigError(f"--out {p}: cannot list the folder ({exc.strerror}); choose another --out") from exc
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise ConfigError(f"--out {p} is not empty and is not an sgrs run (it holds {shown}); choose a new or "
                              f"empty folder (nothing there was changed)")

    # ---- one writer at a time
    def lock(self, what: str = "sgrs train") -> FolderLock:
        """Take the run's lock (creating the folder); LockedError names the holder."""
        return FolderLock(self.path, self.LOCK, what=what, stop_hint=f"touch {self.stop_file}").acquire()

    def holder(self) -> dict | None:
        """Who holds the run's lock (see lockfile.read_holder), or None."""
        return read_holder(self.path, self.LOCK)

    def remove_stale_temp_files(self) -> list[Path]:
        """Remove the temp files of sgrs's own atomic writes left by a killed run (hold the lock)."""
        return (remove_stale_temp_files(self.path, (self.CONFIG,))
                + remove_stale_temp_files(self.checkpoints, [p.name for p in map(self.checkpoint,
                                                                                 self.CHECKPOINT_KINDS)]))

    # ---- stopping
    def clear_stale_stop(self, since: float) -> bool:
        """Remove a STOP file touched before ``since`` (unix seconds): a leftover from an earlier
        run, not a request to this one. A STOP touched later is a request and stays."""
        try:
            if self.stop_file.stat().st_mtime < since:
                self.stop_file.unlink()
                return True
        except FileNotFoundError:
            pass
        return False

    def checkpoint_step(self, kind: str = "last") -> int | None:
        """The step recorded in a checkpoint's header (no tensor is read), or None."""
        try:
            from safetensors import safe_open

            with safe_open(str(self.checkpoint(kind)), framework="numpy") as fh:
                return int(json.loads((fh.metadata() or {})["sgrs"])["step"])
        except Exception:  # noqa: BLE001 - absent, foreign or damaged: no step to report
            return None

    def clear(self) -> None:
        """Delete the run's own files (hold the lock): config, events, checkpoints, STOP, log and
        their temp files. Anything else in the folder stays."""
        self.remove_stale_temp_files()
        for path in (self.config, self.events, *map(self.checkpoint, self.CHECKPOINT_KINDS), self.stop_file,
                     self.log):
            if path.is_file() or path.is_symlink():
                path.unlink()
        try:
            self.checkpoints.rmdir()
        except OSError:
            pass  # absent, or holds files that are not the run's


def process_start_time() -> float:
    """When this process started (unix seconds). Linux: from /proc, to 10 ms; elsewhere the time
    this module was imported, which the CLI does before its slow imports."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, counted after the ")" that ends the name
        since_boot = ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED


_IMPORTED = time.time()
