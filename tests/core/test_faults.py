"""Nothing lost, nothing executed: kill -9, full or read-only disks, hostile checkpoints, CUDA
out-of-memory and divergence.

The kill test runs ``sgrs train`` in real processes; ``SGRS_TEST_SLOW_CHECKPOINT`` (see
``checkpoint._pause_for_fault_tests``) holds each atomic write between its complete temp file
and the rename so that a kill lands inside a checkpoint write on purpose, not by luck.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sgrs.cli import main
from napari_sgrs.core.checkpoint import load_checkpoint
from napari_sgrs.core.errors import ResourceError, TrainingDiverged
from napari_sgrs.core.events import Event, EventFollower, EventKind, read_events
from napari_sgrs.core.io import Geometry, find_cases, read_volume, write_volume

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import tiny_config  # noqa: E402

TEMP_NAME = re.compile(r"^\.(last|best)\.safetensors\..+\.tmp$")


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _temp_files(*folders: Path) -> list[Path]:
    return [p for f in folders if f.is_dir() for p in f.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def trained_run(tiny_cohort, tmp_path_factory):
    """A run folder after 2 steps (checkpoints at step 2), copied by each test that resumes it."""
    from napari_sgrs.core.train import train

    run = tmp_path_factory.mktemp("faults") / "run"
    train(tiny_config(iterations=2), find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr), run)
    return run


def _copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


# --------------------------------------------------------------------------- 1. kill -9

ITERATIONS = 24
KILL_ARGS = ["--iterations", str(ITERATIONS), "--patch-size", "16", "16", "16", "--base-filters", "2",
             "--device", "cpu", "--checkpoint-every", "1", "--val-every", "4", "--quiet"]

# When to send SIGKILL, in order. ("after", s): s seconds after spawn; ("started", s): s seconds
# after the run's "started" event; ("writing", name, n): while the n-th write of ``name`` in this
# process sits complete in its temp file, before the rename; ("event", kind, n): right after the
# n-th new event of ``kind``.
KILLS = [
    ("after", 0.2),                  # the interpreter is still starting
    ("after", 1.0),                  # importing torch
    ("writing", "last", 1),          # the very first checkpoint write: no checkpoint yet
    ("event", EventKind.CHECKPOINT, 2),  # just after a complete checkpoint
    ("writing", "config.json", 1),   # resuming: while config.json is rewritten
    ("after", 2.5),                  # wherever the process is by then
    ("writing", "last", 2),
    ("writing", "best", 1),          # the best-Dice checkpoint after a validation
    ("started", 0.3),                # in the middle of a step
    ("writing", "last", 3),
]


def _new_events(run: Path, offset: int) -> list[Event]:
    """The events after byte ``offset``: where the file ended when this trainer was started."""
    follower = EventFollower(run / "events.jsonl")
    follower.offset = offset
    return follower.poll()


def _write_paused(tmp: Path) -> bool:
    """True once the temp file has stopped growing, i.e. the writer sits in the test hook between
    its complete temp file and the rename (the file exists from mkstemp on, before any byte)."""
    try:
        size = tmp.stat().st_size
        time.sleep(0.1)
        return size > 0 and tmp.stat().st_size == size
    except FileNotFoundError:
        return False


def _wait_and_kill(proc: subprocess.Popen, run: Path, offset: int, when: tuple) -> Path | None:
    """Poll until ``when`` holds, SIGKILL the trainer; returns the temp file being written, if any."""
    t0 = time.monotonic()
    seen_temps: dict[str, set] = {}
    writing = None
    while True:
        assert proc.poll() is None, f"trainer ended (code {proc.returncode}) before kill point {when}"
        assert time.monotonic() - t0 < 90, f"kill point {when} never came"
        events = _new_events(run, offset)
        kind = when[0]
        if kind == "after" and time.monotonic() - t0 >= when[1]:
            break
        if kind == "started":
            started = [e for e in events if e.kind is EventKind.STARTED]
            if started and time.time() - started[0].time >= when[1]:
                break
        if kind == "event" and len([e for e in events if e.kind is when[1]]) >= when[2]:
            break
        if kind == "writing":
            name = when[1] if when[1] == "config.json" else f"{when[1]}.safetensors"
            folder = run if name == "config.json" else run / "checkpoints"
            temps = [p for p in _temp_files(folder) if p.name.startswith(f".{name}.")]
            seen = seen_temps.setdefault(name, set())
            seen.update(p.name for p in temps)
            if temps and len(seen) >= when[2] and _write_paused(temps[0]):
                writing = temps[0]
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    if writing is not None:
        assert writing.exists(), "the kill was meant to land inside the write"
    return writing


def _check_after_kill(run: Path, writing: Path | None) -> int | None:
    """The folder is readable; returns the step of the complete last checkpoint (None: none yet)."""
    if (run / "events.jsonl").exists():
        lines = [ln for ln in (run / "events.jsonl").read_bytes().split(b"\n") if ln.strip()]
        events = read_events(run / "events.jsonl")
        assert len(events) >= len(lines) - 1  # at most one torn line, and read_events skips it
    else:
        events = []
    if (run / "config.json").exists():
        assert "config" in json.loads((run / "config.json").read_text())
    ck_dir = run / "checkpoints"
    for p in (ck_dir.iterdir() if ck_dir.is_dir() else []):
        # only whole checkpoints under their real names; anything else is a hidden .tmp
        assert p.name in ("last.safetensors", "best.safetensors") or TEMP_NAME.match(p.name), p.name
    last_events = [e.step for e in events if e.kind is EventKind.CHECKPOINT and not e.data.get("best")]
    if not (ck_dir / "last.safetensors").exists():
        assert not last_events, "a checkpoint event for a checkpoint that is not there"
        return None
    step = load_checkpoint(run).meta["step"]
    if (ck_dir / "best.safetensors").exists():
        load_checkpoint(ck_dir / "best.safetensors")
    # the event follows the rename: the file is at most one write ahead of the log
    assert max(last_events, default=0) <= step <= max(last_events, default=0) + 1
    if writing is not None and writing.name.startswith(".last."):
        # the interrupted write was complete but never renamed: exactly the interval is lost
        assert load_checkpoint(writing).meta["step"] == step + 1
    return step


def test_kill_9_at_ten_moments_never_loses_the_run(tiny_cohort, tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "napari_sgrs.cli", "train", "--images", str(tiny_cohort.images_tr),
            "--labels", str(tiny_cohort.labels_tr), "--out", str(run), *KILL_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SGRS_TEST_SLOW_CHECKPOINT": "0.2"}
    step, kills_mid_write = None, 0
    for when in KILLS + [None]:
        offset = (run / "events.jsonl").stat().st_size if (run / "events.jsonl").exists() else 0
        resume = (run / "checkpoints" / "last.safetensors").exists()
        if when is None:
            env.pop("SGRS_TEST_SLOW_CHECKPOINT")
        with open(tmp_path / "stderr.txt", "w") as err:
            proc = subprocess.Popen(base + (["--resume"] if resume else []), env=env, stdout=subprocess.DEVNULL,
                                    stderr=err)
        if when is None:
            assert proc.wait(timeout=180) == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
        else:
            writing = _wait_and_kill(proc, run, offset, when)
            kills_mid_write += writing is not None
        new = _new_events(run, offset)
        started = [e.step for e in new if e.kind is EventKind.STARTED]
        if started:
            # resumed from the last complete checkpoint, not from scratch and not from a torn file
            assert started[0] == (step if resume else 0), (when, started, step)
        if when is not None:
            step = _check_after_kill(run, writing)
    assert kills_mid_write >= 5
    last = read_events(run / "events.jsonl")[-1]
    assert last.kind is EventKind.FINISHED and last.step == ITERATIONS
    assert load_checkpoint(run).meta["step"] == ITERATIONS
    # the resumed trainer swept away the temp files its killed predecessors left
    assert not _temp_files(run, run / "checkpoints")


# --------------------------------------------------------------------------- 2. full / read-only disk

def _enospc_on(monkeypatch, predicate):
    """Make os.replace fail with 'No space left on device' for destinations matching ``predicate``."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if predicate(Path(dst)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


def test_full_disk_during_checkpoint_keeps_the_previous_one(trained_run, tiny_cohort, tmp_path, monkeypatch):
    from napari_sgrs.core.train import train

    run = _copy_run(trained_run, tmp_path)
    before = {p.name: _sha(p) for p in (run / "checkpoints").iterdir()}
    sources = {p: _sha(p) for p in tiny_cohort.images_tr.iterdir()}
    _enospc_on(monkeypatch, lambda p: p.suffix == ".safetensors")
    with pytest.raises(ResourceError) as info:
        train(tiny_config(iterations=4), find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr), run, resume=True)
    msg = str(info.value)
    assert "\n" not in msg and "disk is full" in msg and "unchanged" in msg and "safetensors" in msg
    assert {p.name: _sha(p) for p in (run / "checkpoints").iterdir()} == before
    assert not _temp_files(run, run / "checkpoints")
    assert read_events(run / "events.jsonl")[-1].kind is EventKind.ERROR
    assert {p: _sha(p) for p in tiny_cohort.images_tr.iterdir()} == sources


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 16 MiB tmpfs (needs root, as in CI here); a really full, or read-only, disk."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root); the os.replace fault tests cover this")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_really_full_then_read_only_tmpfs(trained_run, tiny_cohort, tmp_path, tiny_tmpfs, capsys):
    run = tiny_tmpfs / "run"
    shutil.copytree(trained_run, run)
    before = {p.name: _sha(p) for p in (run / "checkpoints").iterdir()}
    # fill the disk, leaving room for config.json and events but not for a checkpoint
    free = os.statvfs(tiny_tmpfs).f_bavail * os.statvfs(tiny_tmpfs).f_frsize
    (tiny_tmpfs / "filler").write_bytes(b"\0" * (free - 96 * 1024))
    args = ["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr), "--out",
            str(run), "--resume", "--iterations", "4", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write") and "disk is full" in err and "\n" not in err, err
    assert {p.name: _sha(p) for p in (run / "checkpoints").iterdir()} == before
    assert not _temp_files(run, run / "checkpoints")
    # read-only: training and prediction into it both stop with one line, nothing changes
    (tiny_tmpfs / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "read-only" in err.lower() and "\n" not in err, err
    assert main(["predict", "--run", str(trained_run), "--images", str(tiny_cohort.images_ts), "--out",
                 str(tiny_tmpfs / "pred"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "pred" in err and "\n" not in err, err
    assert {p.name: _sha(p) for p in (run / "checkpoints").iterdir()} == before


def test_export_on_full_disk_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out" / "seg.nii.gz"
    target.parent.mkdir()
    write_volume(target, np.zeros((4, 5, 6), np.uint8), Geometry.identity())
    old = _sha(target)
    _enospc_on(monkeypatch, lambda p: p == target)
    with pytest.raises(ResourceError) as info:
        write_volume(target, np.ones((4, 5, 6), np.uint8), Geometry.identity())
    assert "disk full" in str(info.value) and "seg.nii.gz" in str(info.value) and "\n" not in str(info.value)
    assert _sha(target) == old
    assert sorted(p.name for p in target.parent.iterdir()) == ["seg.nii.gz"]  # no staging folder left


def _project(tmp_path):
    from napari_sgrs.project.folder import Project

    project = Project.create(tmp_path / "proj")
    source = tmp_path / "src.nii.gz"
    write_volume(source, np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), Geometry.identity())
    vol = read_volume(source)
    project.add_image("a", vol.array, vol.geometry, source=str(source))
    label = np.zeros((4, 5, 6), np.uint8)
    label[1] = 1
    project.set_label("a", label, vol.geometry)
    return project, source, label


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fail_on", ["a.nii.gz", "project.json"])
def test_accept_on_full_disk_leaves_the_project_untouched(tmp_path, monkeypatch, fail_on):
    project, source, label = _project(tmp_path)
    before, src = _snapshot(project.root), _sha(source)
    edited = label.copy()
    edited[2] = 1
    _enospc_on(monkeypatch, lambda p: p.name == fail_on and p.parent.name in ("labels", "proj"))
    with pytest.raises(ResourceError) as info:
        project.accept("a", edited, Geometry.identity(), model_prediction=label)
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    if fail_on == "a.nii.gz":
        assert _snapshot(project.root) == before
    else:  # the volumes were written; the project file, the record of the accept, is unchanged
        assert json.loads((project.root / "project.json").read_text())["corrections"] == []
    assert _sha(source) == src
    assert not _temp_files(project.root, project.root / "labels")
    assert not list(project.root.rglob(".sgrs-write-*"))


def test_project_export_on_full_disk(tmp_path, monkeypatch):
    project, source, _ = _project(tmp_path)
    before, src = _snapshot(project.root), _sha(source)
    out = tmp_path / "exports"
    _enospc_on(monkeypatch, lambda p: p.suffix == ".json" and p.parent == out)
    with pytest.raises(ResourceError) as info:
        project.export(out_dir=out)
    assert "\n" not in str(info.value) and "a.json" in str(info.value)
    assert _snapshot(project.root) == before and _sha(source) == src
    assert not _temp_files(out)


# --------------------------------------------------------------------------- 3. hostile checkpoints

class _Payload:
    """Unpickling this creates the marker file: proof that code ran."""

    marker: Path

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _payload(marker: Path) -> _Payload:
    p = _Payload()
    p.marker = marker
    return p


def _pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"student.w": _payload(marker)}))
    return path


def _torch_zip(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": _payload(marker)}}, path)
    return path


def _lying_header(change):
    def build(path: Path, marker: Path, source: Path) -> Path:
        data = source.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        header = change(header) if not isinstance(change, bytes) else header
        blob = json.dumps(header).encode()
        path.write_bytes(change if isinstance(change, bytes) else struct.pack("<Q", len(blob)) + blob + data[8 + n:])
        return path
    return build


def _retype(header, field, value, key="student.head.weight"):
    header[key][field] = value
    return header


def _lie_meta(**changes):
    def change(header):
        meta = json.loads(header["__metadata__"]["sgrs"])
        for k, v in changes.items():
            if k in ("base_filters", "patch_size"):
                meta["config"][k] = v
            else:
                meta[k] = v
        header["__metadata__"]["sgrs"] = json.dumps(meta)
        return header
    return change


HOSTILE = {
    "pickle.pt": (lambda p, m, s: _pickle(p, m), "refused"),
    "torch-zip.pt": (lambda p, m, s: _torch_zip(p, m), "refused"),
    "pickle.safetensors": (lambda p, m, s: _pickle(p, m), "not a valid"),
    "torch-zip.safetensors": (lambda p, m, s: _torch_zip(p, m), "not a valid"),
    "offsets-past-end.safetensors": (_lying_header(lambda h: _retype(h, "data_offsets", [0, 10**12])), "not a valid"),
    "wrong-dtype.safetensors": (_lying_header(lambda h: _retype(h, "dtype", "F64")), "not a valid"),
    "wrong-shape.safetensors": (_lying_header(lambda h: _retype(h, "shape", [4000, 4000, 1, 1, 1])), "not a valid"),
    "header-length-2^60.safetensors": (_lying_header(struct.pack("<Q", 2**60) + b"{}"), "not a valid"),
    "billion-classes.safetensors": (_lying_header(_lie_meta(num_classes=10**9)), "not a valid"),
    "filters-vs-weights.safetensors": (_lying_header(_lie_meta(base_filters=64)), "not a valid"),
    "text-patch.safetensors": (_lying_header(_lie_meta(patch_size="rm -rf /")), "not a valid"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_predict_refuses_hostile_checkpoints(name, trained_run, tiny_cohort, tmp_path, capsys):
    build, needle = HOSTILE[name]
    marker = tmp_path / "payload-ran"
    ck = build(tmp_path / name, marker, trained_run / "checkpoints" / "last.safetensors")
    code = main(["predict", "--run", str(ck), "--images", str(tiny_cohort.images_ts), "--out",
                 str(tmp_path / "pred"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert needle in err and name in err, err
    assert not marker.exists()
    assert not list(tmp_path.glob("pred/*.nii.gz"))


def test_hostile_checkpoints_in_a_real_process_and_on_resume(trained_run, tiny_cohort, tmp_path):
    marker = tmp_path / "payload-ran"
    run = _copy_run(trained_run, tmp_path)
    _pickle(run / "checkpoints" / "last.safetensors", marker)
    # (predict on hostile files runs in-process above; one real process proves the exit path)
    for args in (["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
                  "--out", str(run), "--resume", "--quiet"],):
        proc = subprocess.run([sys.executable, "-m", "napari_sgrs.cli", *args], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert "refused" in proc.stderr or "not a valid" in proc.stderr
        assert not marker.exists()


# --------------------------------------------------------------------------- 5. CUDA out of memory

def test_cuda_out_of_memory_is_reported_and_the_checkpoint_kept(trained_run, tiny_cohort, tmp_path, monkeypatch):
    import napari_sgrs.core.train as T
    from napari_sgrs.core.steps import STEPS

    run = _copy_run(trained_run, tmp_path)
    before = {p.name: _sha(p) for p in (run / "checkpoints").iterdir()}

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setitem(STEPS, "sgrs-plus", out_of_memory)  # the tiny config's method
    with pytest.raises(ResourceError) as info:
        T.train(tiny_config(iterations=4), find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr), run, resume=True)
    msg = str(info.value)
    assert "\n" not in msg and "out of memory at step 2" in msg and "--batch-size" in msg and "--patch-size" in msg
    last = read_events(run / "events.jsonl")[-1]
    assert last.kind is EventKind.ERROR and last.step == 2 and last.data["message"] == msg
    assert {p.name: _sha(p) for p in (run / "checkpoints").iterdir()} == before


# --------------------------------------------------------------------------- 7. divergence

def test_divergence_keeps_the_last_good_checkpoint_byte_for_byte(trained_run, tiny_cohort, tmp_path):
    from napari_sgrs.core.train import train

    run = _copy_run(trained_run, tmp_path)
    before = {p.name: _sha(p) for p in (run / "checkpoints").iterdir()}
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_config(iterations=8, lr=1e30), find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr), run,
              resume=True)
    msg = str(info.value)
    step = int(re.search(r"at step (\d+)", msg).group(1))
    assert step == 3  # step 2 updates with lr 1e30, step 3's loss is NaN: before the step-4 checkpoint
    # the message names the run and the checkpoint that is really there
    assert msg.startswith(f"{run}:") and f"{run / 'checkpoints' / 'last.safetensors'} (step 2), is kept" in msg
    error = read_events(run / "events.jsonl")[-1]
    assert error.kind is EventKind.ERROR and error.step == step and error.data["message"] == msg
    assert {p.name: _sha(p) for p in (run / "checkpoints").iterdir()} == before
    assert load_checkpoint(run).meta["step"] == 2
