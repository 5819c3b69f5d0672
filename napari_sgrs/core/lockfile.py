"""One process at a time in a folder: an advisory lock for train, resume and the napari panel.

The lock is an exclusive ``flock`` on ``FOLDER/.sgrs.lock``. The operating system drops it
when the process that holds it ends, however it ends (exit, exception, SIGKILL), so a lock
left behind by a killed process is stale by construction and the next :meth:`FolderLock.acquire`
simply takes it over. The file's content, JSON naming the holder (pid, host, start time, what
it does, its command line), only feeds the message a contender shows; the decision is the
flock alone. A release removes the file; an acquire that locked a file which was removed
meanwhile starts again on the current one, so two processes never hold two files of one name.

POSIX only (``fcntl``). On network file systems where ``flock`` is local to each host, two
hosts are not kept apart.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .errors import LockedError, ResourceError, os_reason

__all__ = ["LOCK_NAME", "FolderLock", "read_holder", "holder_message"]

LOCK_NAME = ".sgrs.lock"
# A read_holder() probe holds a shared lock for microseconds; an acquire() that meets one retries
# this long before it reports the folder as taken.
_PROBE_GRACE_S = 0.5


class FolderLock:
    """An exclusive, non-blocking lock on ``folder``, usable as a context manager.

    ``what`` names the holder's job in a contender's message (``"sgrs train"``); ``stop_hint``,
    if given, says how to stop it (``"touch runs/a/STOP"``). :meth:`acquire` creates the folder
    if needed and raises :class:`LockedError` (one line naming the holder) when another process,
    or another FolderLock in this process, holds it.
    """

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_NAME, *, what: str = "sgrs",
                 stop_hint: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what
        self.stop_hint = stop_hint
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this FolderLock is already held")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise ResourceError(f"cannot lock the folder {self.folder}: {os_reason(exc)}; choose a writable "
                                f"folder") from exc
        deadline = time.monotonic() + _PROBE_GRACE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                holder = _read(fd)
                os.close(fd)
                raise LockedError(holder_message(self.folder, holder), holder) from None
            except OSError as exc:  # a file system without flock
                os.close(fd)
                raise ResourceError(f"cannot lock the folder {self.folder}: {os_reason(exc)}") from exc
            if _same_file(fd, self.path):
                break
            # the holder released and removed the file between our open and our flock: the lock
            # we got is on a name nobody else will open, so start again on the current file
            os.close(fd)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as exc:
                raise ResourceError(f"cannot lock the folder {self.folder}: {os_reason(exc)}") from exc
        self._fd = fd
        self._write_holder()
        return self

    def release(self) -> None:
        """Remove the lock file, then unlock. (Removing it while still holding the lock is safe
        because acquire() checks that the file it locked is still the one under the name.)"""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _write_holder(self) -> None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "what": self.what, "stop": self.stop_hint, "command": " ".join(sys.argv)}
        data = json.dumps(holder).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only the contender's message is vaguer


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        holder = json.loads(raw.decode("utf-8", "replace"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def read_holder(folder: str | os.PathLike, name: str = LOCK_NAME) -> dict | None:
    """The holder of ``folder``'s lock (a dict, possibly empty while the holder is still writing
    it), or None when nobody holds it (no lock file, or a stale one). Probes with a non-blocking
    shared flock, so it never waits and never takes the lock for longer than the probe."""
    try:
        fd = os.open(Path(folder) / name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def holder_message(folder: str | os.PathLike, holder: dict | None) -> str:
    """One line: who holds ``folder`` and what to do, e.g. "runs/a is in use by `sgrs train`
    (pid 1234 on host x, since 2026-11-30 01:20); wait for it to finish or stop it (touch
    runs/a/STOP)"."""
    # the file is anyone's to write: keep each field short so the message stays one readable line
    holder = {k: (v if isinstance(v, (int, float)) or v is None else str(v)[:200])
              for k, v in (holder or {}).items()}
    what = holder.get("what") or "another process"
    pid = f"pid {holder['pid']}" if holder.get("pid") is not None else ""
    host = f"on host {holder['host']}" if holder.get("host") else ""
    since = ""
    if isinstance(holder.get("started"), str):
        try:
            since = f"since {datetime.datetime.fromisoformat(holder['started']):%Y-%m-%d %H:%M}"
        except ValueError:
            since = f"since {holder['started']}"
    details = ", ".join(p for p in (" ".join(p for p in (pid, host) if p), since) if p)
    where = f" ({details})" if details else ""
    stop = f" or stop it ({holder['stop']})" if holder.get("stop") else ""
    return f"{folder} is in use by `{what}`{where}; wait for it to finish{stop}"
