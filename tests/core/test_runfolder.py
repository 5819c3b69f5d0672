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
