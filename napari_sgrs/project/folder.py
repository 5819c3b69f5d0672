"""A napari-sgrs project folder: images, labels, corrections, runs, provenance, the autosave journal.

Everything here is plain Python + numpy (no Qt, no napari, no torch), so the napari panel stays a
thin layer and all of this is testable headless. Layout of a project folder::

    PROJECT/project.json          image sources, labels folder, corrections, runs (atomic rewrite)
    PROJECT/images/<case>.nii.gz  the training images (written once, with their geometry)
    PROJECT/labels/<case>.nii.gz  training labels, uint8; 255 marks unannotated voxels
    PROJECT/provenance/<case>.nii.gz  per voxel: 0 model-only, 1 accepted pseudo label, 2 human-drawn
    PROJECT/runs/run-NNN/         ``sgrs train --out`` run folders
    PROJECT/runs/run-NNN.settings.json  the panel's settings of that run, read by ``sgrs train --config``
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
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..core.codes import IGNORE_INDEX, Provenance
from ..core.errors import InputError
from ..core.runfolder import RunFolder
from ..core.settings import TrainConfig, current_method_name

PROJECT_FILE = "project.json"
PROJECT_VERSION = 1
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
    from ..core.outputs import atomic_write_bytes

    atomic_write_bytes(Path(path), data)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode("utf-8"))


def _write_volume(path: Path, array: np.ndarray, geometry: Any) -> Path:
    """``io.write_volume`` (atomic) into a folder created on demand (the engine wants it to exist)."""
    from ..core.io import write_volume

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
    from ..core.io import Geometry

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
        prov = np.full(label.shape, Provenance.HUMAN_DRAWN, np.uint8)
    else:
        model_prediction = np.asarray(model_prediction)
        if model_prediction.shape != label.shape:
            raise InputError(f"label shape {label.shape} differs from the prediction's {model_prediction.shape}")
        prov = np.where(label == model_prediction, Provenance.ACCEPTED_PSEUDO_LABEL,
                        Provenance.HUMAN_DRAWN).astype(np.uint8)
    if previous is not None and np.shape(previous) == label.shape:
        prov[np.asarray(previous) == Provenance.HUMAN_DRAWN] = Provenance.HUMAN_DRAWN
    prov[label == ignore_index] = Provenance.MODEL_ONLY
    return prov


def provenance_counts(provenance: np.ndarray) -> dict[str, int]:
    """Voxel counts per provenance class, keyed by name (model_only, accepted_pseudo_label, human_drawn)."""
    counts = np.bincount(np.asarray(provenance, dtype=np.uint8).ravel(), minlength=len(Provenance))
    return {p.key: int(counts[p]) for p in Provenance}


# --------------------------------------------------------------------------- training settings
#: The settings the panel chooses, by their TrainConfig names (``napari_sgrs/core/settings.py``):
#: what project.json keeps and the run's settings file gives ``sgrs train --config``. Every other
#: setting is TrainConfig's default, or on a resume the run's own (a resumed run keeps what it
#: saved except what the file gives again).
PANEL_SETTINGS = ("method", "iterations", "patch_size", "base_filters", "batch_size", "labeled_batch_size",
                  "device", "seed", "ignore_index", "checkpoint_every", "val_every")
#: The presets the panel offers, the first one a CPU's: ``preview`` gives a first pseudo label in
#: about a minute on the demo data with 2 CPU cores (benchmarks/RESULTS.md); ``plugin`` a GPU's.
PANEL_PRESETS = ("preview", "plugin", "paper")


def panel_preset(gpu: bool) -> str:
    """The preset the panel starts from: ``plugin`` with a GPU, ``preview`` without one (``plugin``
    takes about 87 s a step on 2 CPU cores, two days for a run)."""
    return "plugin" if gpu else "preview"


def panel_config(values: Mapping[str, Any] | None = None, preset: str = "plugin") -> TrainConfig:
    """The panel's settings: ``preset`` (see :func:`panel_preset`), then ``values`` (project.json's,
    or the panel's boxes) for the fields in :data:`PANEL_SETTINGS`. Other keys are left out, and so
    is None (the engine's default), as project.json of earlier versions writes it."""
    given = {k: v for k, v in (values or {}).items() if k in PANEL_SETTINGS and v is not None}
    if "patch_size" in given:
        given["patch_size"] = tuple(int(v) for v in given["patch_size"])
    if "method" in given:  # a project saved while our recipe had an earlier name
        given["method"] = current_method_name(given["method"])
    return TrainConfig.from_preset(preset, **given)


def panel_values(config: TrainConfig) -> dict[str, Any]:
    """The :data:`PANEL_SETTINGS` of ``config`` that are set, as JSON: what project.json keeps and the
    settings file holds (None, the engine's default, is left out)."""
    values = {k: getattr(config, k) for k in PANEL_SETTINGS}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if v is not None}


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
        from ..core.lockfile import FolderLock

        return FolderLock(root, what=cls.LOCK_WHAT, stop_hint=cls.LOCK_HINT).acquire()

    def _remove_stale_temp_files(self) -> None:
        """Under the lock no other writer is here: the temp files of project.json and of the
        journal are what a writer killed mid-write left."""
        from ..core.outputs import remove_stale_temp_files

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
                                 "prediction": None, "settings": {}}, lock)  # none chosen yet: Project.settings
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
        from ..core.io import read_volume

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
        from ..core.io import read_volume

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
        from ..core.io import read_volume

        return np.asarray(read_volume(path).array)

    # --- runs
    @property
    def current_run_name(self) -> str | None:
        return self.data["runs"][-1]["name"] if self.data["runs"] else None

    @property
    def current_run(self) -> Path | None:
        name = self.current_run_name
        return None if name is None else self.runs_dir / name

    def new_run(self, settings: TrainConfig) -> Path:
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
        self.data["runs"].append({"name": name, "created": time.time(), "settings": panel_values(settings)})
        self.data["settings"] = panel_values(settings)
        self.save()
        return run

    def settings(self, preset: str = "plugin") -> TrainConfig:
        """The panel's settings of the latest run; ``preset`` (the device's, :func:`panel_preset`)
        for those no run chose yet (see :func:`panel_config`)."""
        return panel_config(self.data.get("settings"), preset)

    def settings_file(self, run: Path) -> Path:
        """``runs/<run>.settings.json``: the settings ``sgrs train --config`` reads for ``run``. Beside
        the run folder, never in it: ``sgrs train --out`` takes a new run only in an empty folder."""
        return self.runs_dir / f"{Path(run).name}.settings.json"

    def write_settings_file(self, run: Path, settings: TrainConfig) -> Path:
        """Write the panel's ``settings`` for ``run`` (replacing an earlier launch's); returns the file."""
        path = self.settings_file(run)
        _atomic_write_json(path, panel_values(settings))
        return path

    def last_checkpoint(self, run: Path | None = None) -> Path | None:
        run = run or self.current_run
        if run is None:
            return None
        path = RunFolder(run).last
        return path if path.exists() else None

    def last_step(self, run: Path | None = None) -> int:
        """The step of the last checkpoint of ``run``, from its header (0 when there is none)."""
        run = run or self.current_run
        if run is None:
            return 0
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
        """Paths of the latest pseudo label / probability / regions / reliability of ``name`` that exist."""
        base = self.prediction_dir
        if base is None:
            return {}
        fname = f"{name}{LABEL_SUFFIX}"
        out = {"label": base / fname, "probability": base / "probability" / fname,
               "regions": base / "regions" / fname, "reliability": base / "reliability" / fname}
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
        from ..core.io import read_volume

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
            prov = np.where(unannotated, Provenance.MODEL_ONLY, prov).astype(np.uint8)
            return seg, prov, vol.geometry
        if pred is None:
            raise InputError(f"case '{name}' has neither a label nor a prediction; train first or label it")
        seg = np.asarray(pred.array).astype(np.uint8)
        return seg, np.full(seg.shape, Provenance.MODEL_ONLY, np.uint8), pred.geometry

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
            from ..core.outputs import file_sha256

            checkpoint_info = {"path": str(checkpoint), "sha256": file_sha256(checkpoint),
                               "step": self.last_step()}
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
                       "provenance_codes": {str(int(p)): p.key for p in Provenance},
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
