"""A napari-sgrs project folder: images, labels, corrections, runs, provenance, review queue.

Everything here is plain Python + numpy (no Qt, no napari), so the napari panel stays a thin
layer and all of this is testable headless. Layout of a project folder::

    PROJECT/project.json          image sources, labels folder, corrections, runs (atomic rewrite)
    PROJECT/images/<case>.nii.gz  the training images (written once, with their geometry)
    PROJECT/labels/<case>.nii.gz  training labels, uint8; 255 marks unannotated voxels
    PROJECT/provenance/<case>.nii.gz  per voxel: 0 model-only, 1 accepted pseudo label, 2 human-drawn
    PROJECT/runs/run-NNN/         ``sgrs train --out`` run folders
    PROJECT/predictions/run-NNN-step-S/   ``sgrs predict --regions`` outputs for unlabeled cases
    PROJECT/journal/<case>.npz    autosaved label edits not yet accepted (array + case + time)
    PROJECT/exports/              default export folder
    PROJECT/.sgrs.lock            held by the one Project object (one viewer) that has the folder open

Arrays are label volumes in axis order (D, H, W).
"""

from __future__ import annotations

import io as _stdio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import InputError

PROJECT_FILE = "project.json"
PROJECT_VERSION = 1
IGNORE_INDEX = 255  # label value of unannotated voxels; the trainer's --ignore-index default

# Synergy regions as written by ``sgrs predict --regions``.
REGION_NONE, REGION_DISREGARDED, REGION_CONSISTENT, REGION_INCONSISTENT = 0, 1, 2, 3
REGION_NAMES = {REGION_DISREGARDED: "disregarded", REGION_CONSISTENT: "consistent",
                REGION_INCONSISTENT: "inconsistent"}
# Okabe-Ito colours (colour-blind safe). Disregarded is grey so it reads as "no opinion".
REGION_COLORS = {REGION_DISREGARDED: "#999999", REGION_CONSISTENT: "#009E73",
                 REGION_INCONSISTENT: "#D55E00"}

# Voxel provenance of a training label / exported segmentation.
PROVENANCE_MODEL, PROVENANCE_ACCEPTED, PROVENANCE_HUMAN = 0, 1, 2
PROVENANCE_NAMES = {PROVENANCE_MODEL: "model_only", PROVENANCE_ACCEPTED: "accepted_pseudo_label",
                    PROVENANCE_HUMAN: "human_drawn"}

LABEL_SUFFIX = ".nii.gz"
JOURNAL_SUFFIX = ".npz"      # one autosave file per case: the label array and its metadata


# --------------------------------------------------------------------------- small helpers
def case_name(text: str) -> str:
    """A file-system safe case name from a layer name or a file name (``case_003.nii.gz`` -> ``case_003``)."""
    base = Path(str(text)).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".h5", ".hdf5"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")
    return name or "case"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    # The one atomic writer (temp + fsync + rename, ResourceError on a full/read-only disk).
    from .outputs import atomic_write_bytes

    atomic_write_bytes(Path(path), data)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode("utf-8"))


def _write_volume(path: Path, array: np.ndarray, geometry: Any) -> Path:
    """``io.write_volume`` (atomic) into a folder created on demand (the engine wants it to exist)."""
    from .io import write_volume

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return Path(write_volume(Path(path), array, geometry))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def geometry_to_dict(geometry: Any) -> dict[str, Any]:
    """JSON-able form of a :class:`napari_sgrs.core.io.Geometry` (axis order D, H, W)."""
    if geometry is None:
        return {}
    if hasattr(geometry, "to_json"):
        value = geometry.to_json()
        return json.loads(value) if isinstance(value, str) else dict(value)
    out = {"spacing": [float(v) for v in geometry.spacing], "origin": [float(v) for v in geometry.origin],
           "direction": np.asarray(geometry.direction, dtype=float).tolist()}
    if getattr(geometry, "affine_ras", None) is not None:
        out["affine_ras"] = np.asarray(geometry.affine_ras, dtype=float).tolist()
    return out


def geometry_from_dict(d: dict[str, Any] | None, ndim: int = 3) -> Any:
    """Inverse of :func:`geometry_to_dict`; missing fields default to unit spacing, zero origin,
    identity direction (e.g. a layer made in napari with only scale and translate)."""
    from .io import Geometry

    d = dict(d or {})
    return Geometry.from_json({"spacing": d.get("spacing") or [1.0] * ndim,
                               "origin": d.get("origin") or [0.0] * ndim,
                               "direction": d.get("direction") or list(np.eye(ndim).ravel()),
                               "affine_ras": d.get("affine_ras")})


# --------------------------------------------------------------------------- labels, provenance
def mark_unpainted_slices(label: np.ndarray, axis: int = 0, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Mark every slice along ``axis`` that holds no painted (non-zero) voxel as unannotated.

    A user who labels a few slices leaves the others at 0; without this the trainer would take
    them as background. Returns a uint8 copy where such slices are ``ignore_index``.
    """
    label = np.asarray(label)
    if label.size and (int(label.min()) < 0 or int(label.max()) > 255):
        raise InputError(f"label values {int(label.min())}..{int(label.max())} do not fit 0..255; use fewer classes")
    out = label.astype(np.uint8, copy=True)
    other = tuple(i for i in range(label.ndim) if i != axis)
    painted = np.any((label != 0) & (label != ignore_index), axis=other)
    index = [slice(None)] * label.ndim
    index[axis] = ~painted
    out[tuple(index)] = ignore_index
    return out


def provenance_for_accept(label: np.ndarray, model_prediction: np.ndarray | None,
                          previous: np.ndarray | None = None,
                          ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Per-voxel provenance (uint8) of a label the user accepts.

    1 (accepted pseudo label) where the label equals the model's prediction, 2 (human-drawn)
    where the user changed it; voxels that were human-drawn in an earlier accept stay 2;
    unannotated voxels (``ignore_index``) are 0. Without a model prediction every annotated
    voxel is human-drawn (a label the user brought).
    """
    label = np.asarray(label)
    if model_prediction is None:
        prov = np.full(label.shape, PROVENANCE_HUMAN, np.uint8)
    else:
        model_prediction = np.asarray(model_prediction)
        if model_prediction.shape != label.shape:
            raise InputError(f"label shape {label.shape} differs from the prediction's {model_prediction.shape}")
        prov = np.where(label == model_prediction, PROVENANCE_ACCEPTED, PROVENANCE_HUMAN).astype(np.uint8)
    if previous is not None and np.shape(previous) == label.shape:
        prov[np.asarray(previous) == PROVENANCE_HUMAN] = PROVENANCE_HUMAN
    prov[label == ignore_index] = PROVENANCE_MODEL
    return prov


def provenance_counts(provenance: np.ndarray) -> dict[str, int]:
    """Voxel counts per provenance class, keyed by name (model_only, accepted_pseudo_label, human_drawn)."""
    counts = np.bincount(np.asarray(provenance, dtype=np.uint8).ravel(), minlength=3)
    return {name: int(counts[value]) for value, name in PROVENANCE_NAMES.items()}


# --------------------------------------------------------------------------- review queue
@dataclass
class ReviewItem:
    """One unlabeled case in the review queue. Shares are fractions of all voxels."""
    name: str
    score: float               # inconsistent + disregarded share: higher = review first
    inconsistent: float
    disregarded: float


@dataclass
class RegionFocus:
    """Where to look in a case: the largest connected region of ``region`` (voxel indices, D, H, W)."""
    region: int
    center: tuple[float, float, float]
    size: int
    bbox: tuple[tuple[int, int], ...]


def review_item(name: str, regions: np.ndarray) -> ReviewItem:
    regions = np.asarray(regions)
    n = max(int(regions.size), 1)
    inc = float(np.count_nonzero(regions == REGION_INCONSISTENT)) / n
    dis = float(np.count_nonzero(regions == REGION_DISREGARDED)) / n
    return ReviewItem(name=name, score=inc + dis, inconsistent=inc, disregarded=dis)


def rank_for_review(regions_by_case: dict[str, np.ndarray]) -> list[ReviewItem]:
    """Unlabeled cases, worst first: by share of inconsistent + disregarded voxels (ties: by name)."""
    items = [review_item(name, regions) for name, regions in regions_by_case.items()]
    return sorted(items, key=lambda it: (-it.score, -it.inconsistent, it.name))


def largest_region(regions: np.ndarray, region: int = REGION_INCONSISTENT) -> RegionFocus | None:
    """The largest 26-connected component of voxels equal to ``region``; None if there is none.

    Falls back from inconsistent to disregarded voxels when a case has no inconsistent voxel.
    """
    from scipy import ndimage

    from .postprocess import largest_component

    regions = np.asarray(regions)
    for value in (region, REGION_DISREGARDED) if region == REGION_INCONSISTENT else (region,):
        mask = regions == value
        if not mask.any():
            continue
        component = largest_component(mask)
        center = tuple(float(c) for c in ndimage.center_of_mass(component))
        # The centre of mass of a curved region can fall outside it: snap to its nearest voxel.
        idx = np.argwhere(component)
        nearest = idx[np.argmin(((idx - np.asarray(center)) ** 2).sum(axis=1))]
        box = ndimage.find_objects(component.astype(np.int8))[0]
        return RegionFocus(region=value, center=tuple(float(v) for v in nearest), size=int(component.sum()),
                           bbox=tuple((s.start, s.stop) for s in box))
    return None


class ReviewQueue:
    """Ranked unlabeled cases; :meth:`next` walks from the worst case down and wraps around."""

    def __init__(self, regions_by_case: dict[str, np.ndarray] | None = None):
        self.items: list[ReviewItem] = []
        self._cursor = -1
        self.update(regions_by_case or {})

    def update(self, regions_by_case: dict[str, np.ndarray]) -> None:
        self.items = rank_for_review(regions_by_case)
        self._cursor = -1

    def remove(self, name: str) -> None:
        self.items = [it for it in self.items if it.name != name]
        self._cursor = min(self._cursor, len(self.items) - 1)

    def next(self) -> ReviewItem | None:
        if not self.items:
            return None
        self._cursor = (self._cursor + 1) % len(self.items)
        return self.items[self._cursor]


# --------------------------------------------------------------------------- training settings / commands
@dataclass
class TrainSettings:
    """What the panel lets the user choose; maps one-to-one onto ``sgrs train`` options."""
    method: str = "sgrs"
    iterations: int = 2000
    patch_size: tuple[int, int, int] = (96, 96, 96)
    base_filters: int = 16
    batch_size: int | None = None          # None: the engine's default (TrainConfig._resolve_batch)
    labeled_batch_size: int | None = None
    device: str = "auto"
    seed: int = 1337
    ignore_index: int = IGNORE_INDEX
    checkpoint_every: int | None = None

    def cli_args(self) -> list[str]:
        args = ["--method", self.method, "--iterations", str(int(self.iterations)),
                "--patch-size", *[str(int(v)) for v in self.patch_size],
                "--base-filters", str(int(self.base_filters)), "--device", self.device,
                "--seed", str(int(self.seed)), "--ignore-index", str(int(self.ignore_index))]
        if self.batch_size is not None:
            args += ["--batch-size", str(int(self.batch_size))]
        if self.labeled_batch_size is not None:
            args += ["--labeled-batch-size", str(int(self.labeled_batch_size))]
        if self.checkpoint_every:
            args += ["--checkpoint-every", str(int(self.checkpoint_every))]
        return args

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainSettings":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "patch_size" in known:
            known["patch_size"] = tuple(int(v) for v in known["patch_size"])
        return cls(**known)


def sgrs_command() -> list[str]:
    """The engine's entry point, run with this interpreter (works without the ``sgrs`` script on PATH)."""
    return [sys.executable, "-m", "napari_sgrs.cli"]


def train_command(images_dir: Path, labels_dir: Path, run_dir: Path, settings: TrainSettings,
                  resume: bool = False) -> list[str]:
    cmd = sgrs_command() + ["train", "--images", str(images_dir), "--labels", str(labels_dir),
                            "--out", str(run_dir)] + settings.cli_args()
    return cmd + (["--resume"] if resume else [])


def predict_command(run_dir: Path, images_dir: Path, out_dir: Path, regions: bool = True) -> list[str]:
    cmd = sgrs_command() + ["predict", "--run", str(run_dir), "--images", str(images_dir), "--out", str(out_dir)]
    return cmd + (["--regions"] if regions else [])


class Job:
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

    @property
    def running(self) -> bool:
        return self.poll() is None

    def request_stop(self) -> None:
        """Ask for a clean stop: touch the STOP file (checkpoint, ``stopped`` event, exit 0)."""
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        if self.stop_file is not None:
            self.stop_file.parent.mkdir(parents=True, exist_ok=True)
            self.stop_file.touch()
        else:
            self.terminate()

    def enforce_stop(self, grace_s: float = 30.0) -> None:
        """Call from the timer after :meth:`request_stop`: SIGTERM after ``grace_s`` (the trainer
        still checkpoints on SIGTERM), SIGKILL ``grace_s`` later."""
        if self.stop_requested_at is None or not self.running:
            return
        now = time.monotonic()
        if self._terminated_at is None and now - self.stop_requested_at > grace_s:
            self.terminate()
        elif self._terminated_at is not None and now - self._terminated_at > grace_s:
            self.process.kill()

    def terminate(self) -> None:
        if self.running:
            self._terminated_at = time.monotonic()
            self.process.send_signal(signal.SIGTERM)

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


class TrainerProcess:
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
        from .runfolder import RunFolder

        self.run = RunFolder(run_dir)
        self.run_dir = self.run.path
        self.holder = dict(holder)
        self.stop_file = self.run.stop_file
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
            self._code = 0 if last.get("kind") in ("finished", "stopped") else 1
        return self._code

    @property
    def running(self) -> bool:
        return self.poll() is None

    def request_stop(self) -> None:
        """The trainer checkpoints, writes a ``stopped`` event and exits when it sees STOP."""
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        self.stop_file.touch()

    def enforce_stop(self, grace_s: float = 30.0) -> None:
        """As :meth:`Job.enforce_stop`, for a trainer on this host only (a pid elsewhere means
        nothing here): SIGTERM after ``grace_s`` (it still checkpoints), SIGKILL ``grace_s`` later."""
        if self.stop_requested_at is None or not self.running:
            return
        now = time.monotonic()
        if self._terminated_at is None and now - self.stop_requested_at > grace_s:
            self._terminated_at = now
            self._signal(signal.SIGTERM)
        elif self._terminated_at is not None and now - self._terminated_at > grace_s:
            self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        if self.running:
            self._terminated_at = time.monotonic()
            self._signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.running:
            self._signal(signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.running and time.monotonic() < deadline:
                time.sleep(0.05)

    def _signal(self, sig: int) -> None:
        import socket

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

    def _last_event(self) -> dict:
        from .events import read_events

        events, _ = read_events(self.run.events)
        return events[-1] if events else {}

    def error_message(self) -> str:
        last = self._last_event()
        if last.get("kind") == "error":
            return str(last.get("message", "unknown error"))
        return (f"the trainer of {self.run_dir.name} (pid {self.pid}) ended without finishing, "
                f"after step {int(last.get('step', 0))}: it was killed; Resume continues from the last checkpoint")


# --------------------------------------------------------------------------- the project
@dataclass
class ImageEntry:
    name: str
    image: str                       # relative to the project: images/<name>.nii.gz
    source: str | None = None        # where the user's file was (None: created in napari)
    source_format: str | None = None


@dataclass
class JournalEntry:
    name: str
    time: float
    path: Path


class Project:
    """A project folder (see module docstring). All writes are atomic; ``project.json`` is rewritten
    after every change so closing napari at any moment loses nothing.

    A Project object holds the folder's lock (``PROJECT/.sgrs.lock``, see ``core/lockfile.py``)
    from :meth:`create` / :meth:`open` until :meth:`close`: a second Project on the same folder,
    in this process or another viewer, is refused with a message naming the holder. Refused,
    not opened read-only: a read-only panel would still show editable label layers and buttons,
    and edits made there could be neither autosaved nor accepted, the silent loss this lock is
    for. The operating system drops the lock when its process ends, so a killed viewer never
    keeps its project from being reopened.
    """

    LOCK_WHAT = "napari-sgrs project"
    LOCK_HINT = "close the project in the viewer that has it open"

    def __init__(self, root: Path, data: dict[str, Any], lock: Any = None):
        self.root = Path(root)
        self.data = data
        self._lock = lock

    # --- create / open
    @classmethod
    def _acquire(cls, root: Path):
        from .lockfile import FolderLock

        return FolderLock(root, what=cls.LOCK_WHAT, stop_hint=cls.LOCK_HINT).acquire()

    def _remove_stale_temp_files(self) -> None:
        """Under the lock no other writer is here: the temp files of project.json and of the
        journal are what a writer killed mid-write left."""
        from .outputs import remove_stale_temp_files

        remove_stale_temp_files(self.root, [PROJECT_FILE])
        cases = set(self.case_names()) | {p.stem for p in self.journal_dir.glob(f"*{JOURNAL_SUFFIX}")}
        remove_stale_temp_files(self.journal_dir, [f"{case_name(c)}{JOURNAL_SUFFIX}" for c in cases])

    @classmethod
    def create(cls, root: str | os.PathLike) -> "Project":
        """A new project in ``root``, which must be absent or empty (the project writes images/,
        labels/... there and must not replace a file it did not write); an existing project is
        opened instead."""
        root = Path(root)
        if (root / PROJECT_FILE).exists():
            return cls.open(root)
        if root.exists() and not root.is_dir():
            raise InputError(f"{root} is a file; choose an empty folder for the project")
        lock = cls._acquire(root)
        try:
            if (root / PROJECT_FILE).exists():  # made by another viewer meanwhile
                lock.release()
                return cls.open(root)
            others = sorted(e.name for e in root.iterdir() if e.name != Path(lock.path).name)
            if others:
                shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
                raise InputError(f"{root} is not empty and is not a napari-sgrs project (it holds {shown}); "
                                 f"choose an empty folder (nothing there was changed)")
            project = cls(root, {"version": PROJECT_VERSION, "created": time.time(), "images": [],
                                 "labels_dir": "labels", "corrections": [], "runs": [],
                                 "prediction": None, "settings": asdict(TrainSettings())}, lock)
            project.save()
        except BaseException:
            lock.release()
            raise
        return project

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Project":
        root = Path(root)
        path = root / PROJECT_FILE
        if not path.is_file():
            raise InputError(f"{root} is not a napari-sgrs project (no {PROJECT_FILE}); create one with New project")
        lock = cls._acquire(root)
        try:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(f"cannot read {path}: {exc}; restore it from a backup") from exc
            if not isinstance(data, dict) or "images" not in data:
                raise InputError(f"{path} is not a napari-sgrs project file")
        except BaseException:
            lock.release()
            raise
        project = cls(root, data, lock)
        project._remove_stale_temp_files()
        return project

    def close(self) -> None:
        """Release the folder's lock (another viewer may open it then); the object is done."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def save(self) -> None:
        _atomic_write_json(self.root / PROJECT_FILE, self.data)

    # --- folders
    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def labels_dir(self) -> Path:
        return self.root / self.data.get("labels_dir", "labels")

    @property
    def provenance_dir(self) -> Path:
        return self.root / "provenance"

    @property
    def journal_dir(self) -> Path:
        return self.root / "journal"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    # --- images and labels
    @property
    def images(self) -> list[ImageEntry]:
        return [ImageEntry(**e) for e in self.data["images"]]

    def image_path(self, name: str) -> Path:
        return self.images_dir / f"{name}{LABEL_SUFFIX}"

    def label_path(self, name: str) -> Path:
        return self.labels_dir / f"{name}{LABEL_SUFFIX}"

    def provenance_path(self, name: str) -> Path:
        return self.provenance_dir / f"{name}{LABEL_SUFFIX}"

    def case_names(self) -> list[str]:
        return [e["name"] for e in self.data["images"]]

    def labeled_cases(self) -> list[str]:
        return [n for n in self.case_names() if self.label_path(n).exists()]

    def unlabeled_cases(self) -> list[str]:
        return [n for n in self.case_names() if not self.label_path(n).exists()]

    def add_image(self, name: str, array: np.ndarray, geometry: Any, source: str | None = None,
                  source_format: str | None = None) -> Path:
        """Write an image into the project (once per name; same name again replaces it)."""
        name = case_name(name)
        path = _write_volume(self.image_path(name), np.asarray(array), geometry)
        entry = asdict(ImageEntry(name=name, image=str(Path(path).relative_to(self.root)),
                                  source=None if source is None else str(source), source_format=source_format))
        self.data["images"] = [e for e in self.data["images"] if e["name"] != name] + [entry]
        self.save()
        return Path(path)

    def read_image(self, name: str):
        from .io import read_volume

        return read_volume(self.image_path(name))

    def set_label(self, name: str, label: np.ndarray, geometry: Any,
                  provenance: np.ndarray | None = None, kind: str = "initial") -> Path:
        """Save a training label (uint8, 255 = unannotated) and its provenance at once."""
        label = np.asarray(label)
        if label.size and (label.min() < 0 or label.max() > 255):
            raise InputError(f"label '{name}' has values outside 0..255 ({label.min()}..{label.max()})")
        label = label.astype(np.uint8)
        if provenance is None:
            provenance = provenance_for_accept(label, None)
        path = _write_volume(self.label_path(name), label, geometry)
        _write_volume(self.provenance_path(name), np.asarray(provenance, np.uint8), geometry)
        if kind != "initial":
            self.data["corrections"].append({"case": name, "kind": kind, "time": time.time(),
                                             "run": self.current_run_name,
                                             "provenance": provenance_counts(provenance)})
        self.clear_journal(name)
        self.save()
        return Path(path)

    def update_label(self, name: str, label: np.ndarray, geometry: Any) -> bool:
        """Save a label layer as the training label of ``name`` unless it is unchanged on disk.

        A new label is human-drawn throughout; for an existing one only the changed voxels become
        human-drawn, the rest keep their provenance. Returns whether anything was written.
        """
        label = np.asarray(label)
        if not self.label_path(name).exists():
            self.set_label(name, label, geometry)
            return True
        from .io import read_volume

        old = np.asarray(read_volume(self.label_path(name)).array)
        if old.shape == label.shape and np.array_equal(old, label):
            return False
        previous = self.read_provenance(name)
        prov = provenance_for_accept(label, old if old.shape == label.shape else None, None)
        if previous is not None and previous.shape == label.shape:
            prov = np.where(label == old, previous, prov).astype(np.uint8)
        self.set_label(name, label, geometry, prov, kind="edit")
        return True

    def accept(self, name: str, label: np.ndarray, geometry: Any,
               model_prediction: np.ndarray | None) -> np.ndarray:
        """Make an edited pseudo label a training label; returns its provenance (see
        :func:`provenance_for_accept`)."""
        previous = self.read_provenance(name)
        prov = provenance_for_accept(np.asarray(label), model_prediction, previous)
        self.set_label(name, label, geometry, prov, kind="accept")
        return prov

    def read_provenance(self, name: str) -> np.ndarray | None:
        path = self.provenance_path(name)
        if not path.exists():
            return None
        from .io import read_volume

        return np.asarray(read_volume(path).array)

    # --- runs
    @property
    def current_run_name(self) -> str | None:
        return self.data["runs"][-1]["name"] if self.data["runs"] else None

    @property
    def current_run(self) -> Path | None:
        name = self.current_run_name
        return None if name is None else self.runs_dir / name

    def new_run(self, settings: TrainSettings) -> Path:
        """A new, empty run folder ``runs/run-NNN`` (a name no folder has yet, so a run made by
        anyone else, e.g. ``sgrs train --out`` by hand, is never trained into)."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        number = len(self.data["runs"]) + 1
        while True:
            name = f"run-{number:03d}"
            run = self.runs_dir / name
            try:
                run.mkdir()
                break
            except FileExistsError:
                number += 1
        self.data["runs"].append({"name": name, "created": time.time(), "settings": asdict(settings)})
        self.data["settings"] = asdict(settings)
        self.save()
        return run

    def settings(self) -> TrainSettings:
        return TrainSettings.from_dict(self.data.get("settings") or {})

    def last_checkpoint(self, run: Path | None = None) -> Path | None:
        run = run or self.current_run
        if run is None:
            return None
        from .runfolder import RunFolder

        path = RunFolder(run).last
        return path if path.exists() else None

    def last_step(self, run: Path | None = None) -> int:
        """The step of the last checkpoint of ``run``, from its header (0 when there is none)."""
        run = run or self.current_run
        if run is None:
            return 0
        from .runfolder import RunFolder

        return RunFolder(run).checkpoint_step() or 0

    # --- prediction for the unlabeled cases
    def prediction_inputs(self) -> Path:
        """A folder holding (links to) the unlabeled images only, the input of ``sgrs predict``."""
        folder = self.root / "predict_inputs"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for name in self.unlabeled_cases():
            src = self.image_path(name)
            dst = folder / src.name
            try:
                os.symlink(os.path.relpath(src, folder), dst)
            except OSError:  # file systems without symlinks
                shutil.copy2(src, dst)
        return folder

    def new_prediction_dir(self, step: int) -> Path:
        name = f"{self.current_run_name or 'run'}-step-{int(step):06d}"
        return self.predictions_dir / name

    def set_prediction(self, out_dir: Path, step: int) -> None:
        self.data["prediction"] = {"dir": str(Path(out_dir).relative_to(self.root)), "step": int(step),
                                   "run": self.current_run_name, "time": time.time()}
        self.save()

    @property
    def prediction_dir(self) -> Path | None:
        p = self.data.get("prediction")
        return None if not p else self.root / p["dir"]

    def prediction_files(self, name: str) -> dict[str, Path]:
        """Paths of the latest pseudo label / probability / regions of ``name`` that exist."""
        base = self.prediction_dir
        if base is None:
            return {}
        fname = f"{name}{LABEL_SUFFIX}"
        out = {"label": base / fname, "probability": base / "probability" / fname,
               "regions": base / "regions" / fname}
        return {k: v for k, v in out.items() if v.exists()}

    # --- autosave journal
    def journal_path(self, name: str) -> Path:
        return self.journal_dir / f"{case_name(name)}{JOURNAL_SUFFIX}"

    def save_journal(self, name: str, array: np.ndarray) -> Path:
        """Autosave an unaccepted label edit. Reopening the project offers it back.

        One file holds the array and its case name and time, replaced whole (temp + fsync +
        rename): a kill at any moment leaves the previous autosave or this one, never a torn
        file, and never an array paired with another autosave's metadata.
        """
        array = np.asarray(array)
        meta = json.dumps({"case": name, "time": time.time(), "shape": list(array.shape)}).encode("utf-8")
        buf = _stdio.BytesIO()
        np.savez(buf, label=array, meta=np.frombuffer(meta, np.uint8))
        path = self.journal_path(name)
        _atomic_write_bytes(path, buf.getvalue())
        for legacy in (path.with_suffix(".npy"), path.with_suffix(".json")):
            legacy.unlink(missing_ok=True)  # an older version's pair for this case is superseded
        return path

    def pending_journal(self) -> list[JournalEntry]:
        """Autosaved edits not yet accepted, oldest first (an unreadable one is listed too, so
        :meth:`load_journal` can name it rather than it vanishing silently)."""
        out = {}
        for path in sorted(self.journal_dir.glob(f"*{JOURNAL_SUFFIX}")):
            try:
                with np.load(path, allow_pickle=False) as npz:
                    meta = json.loads(npz["meta"].tobytes().decode("utf-8"))
                out[path.stem] = JournalEntry(name=str(meta["case"]), time=float(meta["time"]), path=path)
            except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
                out[path.stem] = JournalEntry(name=path.stem, time=path.stat().st_mtime, path=path)
        # An older version wrote <case>.npy + <case>.json; offer those edits back too.
        for npy in sorted(self.journal_dir.glob("*.npy")):
            if npy.stem in out:
                continue
            try:
                meta = json.loads(npy.with_suffix(".json").read_text(encoding="utf-8"))
                out[npy.stem] = JournalEntry(name=str(meta.get("case", npy.stem)),
                                             time=float(meta.get("time", 0)), path=npy)
            except (OSError, ValueError, AttributeError):
                out[npy.stem] = JournalEntry(name=npy.stem, time=npy.stat().st_mtime, path=npy)
        return sorted(out.values(), key=lambda e: e.time)

    def load_journal(self, name: str) -> np.ndarray:
        path = self.journal_path(name)
        if not path.exists() and path.with_suffix(".npy").exists():
            path = path.with_suffix(".npy")
        try:
            # never unpickle: the folder may travel
            if path.suffix == ".npy":
                return np.load(path, allow_pickle=False)
            with np.load(path, allow_pickle=False) as npz:
                return np.asarray(npz["label"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise InputError(f"cannot read autosaved edits {path}: {exc}; discard them") from exc

    def clear_journal(self, name: str) -> None:
        path = self.journal_path(name)
        for p in (path, path.with_suffix(".npy"), path.with_suffix(".json")):
            p.unlink(missing_ok=True)

    # --- export
    def segmentation(self, name: str) -> tuple[np.ndarray, np.ndarray, Any]:
        """The refined segmentation of a case, its provenance and geometry.

        A labeled case gives its label (unannotated voxels filled from the latest prediction,
        provenance model-only); an unlabeled case gives its pseudo label (all model-only).
        """
        from .io import read_volume

        pred_path = self.prediction_files(name).get("label")
        pred = read_volume(pred_path) if pred_path else None
        if self.label_path(name).exists():
            vol = read_volume(self.label_path(name))
            seg = np.asarray(vol.array).astype(np.uint8)
            prov = self.read_provenance(name)
            if prov is None:
                prov = provenance_for_accept(seg, None)
            unannotated = seg == IGNORE_INDEX
            seg[unannotated] = np.asarray(pred.array)[unannotated] if pred is not None else 0
            prov = np.where(unannotated, PROVENANCE_MODEL, prov).astype(np.uint8)
            return seg, prov, vol.geometry
        if pred is None:
            raise InputError(f"case '{name}' has neither a label nor a prediction; train first or label it")
        seg = np.asarray(pred.array).astype(np.uint8)
        return seg, np.zeros(seg.shape, np.uint8), pred.geometry

    def export(self, names: Iterable[str] | None = None, out_dir: Path | None = None) -> list[Path]:
        """Write each case's segmentation as NIfTI (and in its source format where writable) with
        the source geometry, plus ``<case>.json``: provenance counts, checkpoint sha256, settings."""
        out_dir = Path(out_dir or self.exports_dir)
        names = list(names) if names is not None else self.case_names()
        unknown = sorted(set(names) - set(self.case_names()))
        if unknown:
            raise InputError(f"no such case in the project: {', '.join(unknown)}")
        checkpoint = self.last_checkpoint()
        checkpoint_info = None
        if checkpoint is not None:
            from .outputs import file_sha256

            checkpoint_info = {"path": str(checkpoint), "sha256": file_sha256(checkpoint),
                               "step": self.last_step()}
        from .runfolder import RunFolder

        config_path = RunFolder(self.current_run).config if self.current_run else None
        settings = None
        if config_path is not None and config_path.exists():
            settings = json.loads(config_path.read_text(encoding="utf-8"))
        entries = {e.name: e for e in self.images}
        written: list[Path] = []
        for name in names:
            seg, prov, geometry = self.segmentation(name)
            files = [_write_volume(out_dir / f"{name}{LABEL_SUFFIX}", seg, geometry)]
            fmt = _writable_source_suffix(entries[name].source)
            if fmt is not None and fmt not in (".nii.gz",):
                files.append(_write_volume(out_dir / f"{name}{fmt}", seg, geometry))
            sidecar = {"case": name, "source_image": entries[name].source, "files": [Path(f).name for f in files],
                       "geometry": geometry_to_dict(geometry), "provenance": provenance_counts(prov),
                       "provenance_codes": {str(k): v for k, v in PROVENANCE_NAMES.items()},
                       "checkpoint": checkpoint_info, "training_settings": settings,
                       "corrections": [c for c in self.data["corrections"] if c["case"] == name]}
            sidecar_path = out_dir / f"{name}.json"
            _atomic_write_json(sidecar_path, sidecar)
            written += [Path(f) for f in files] + [sidecar_path]
        return written


def _writable_source_suffix(source: str | None) -> str | None:
    if not source:
        return None
    low = str(source).lower()
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if low.endswith(suffix):
            return suffix
    return None
