"""Training: Mean Teacher on a V-Net with Mix Augmentation and regional pseudo-label losses (SGRS-Net
and SGRS+), and the baselines.

``train(config, cases, run_dir)`` is the one entry point; the CLI and the napari plugin (which
runs ``sgrs train`` in a separate process) call it, and it runs a :class:`Trainer`. Progress goes
out as typed events (:mod:`.events`) to the run folder's events file (:class:`~.runfolder.RunFolder`)
and to optional in-process listeners. The loss of each method is a step function of :mod:`.steps`;
validation (the one use of inference) is :mod:`.validation`'s.

Ramp-up: the paper ramps the unlabeled-loss weight over 6,000 of 15,000 steps. With another
budget the ramp keeps that proportion: its length is ``rampup_fraction`` (0.4) x iterations,
so a 600-step run ramps over 240 steps instead of never reaching weight 1.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import sgrs as S
from .checkpoint import load_checkpoint, save_checkpoint
from .data import (BatchStream, PatchSampler, TwoStreamBatches, auto_patch, make_sample,
                   mask_outside_view, normalise, pad_to)
from .device import amp_dtype, configure_backends, peak_memory_mb, resolve_device, share_cpu_threads
from .distributed import (any_rank, barrier, broadcast_float, ddp, gather_objects, on_main_thread, rank_info,
                          start_group, stop_group)
from .errors import CheckpointError, InputError, ResourceError, SGRSError, TrainingDiverged, os_reason
from .events import EventKind, EventWriter
from .io import check_pair, read_volume, validate_label
from .memory import check_memory, estimate_training_memory  # noqa: F401 - estimate: re-exported
from .network import build_model, load_momentum, make_optimizer, optimizer_tensors, set_learning_rate
from .postprocess import single_component_classes
from .runfolder import RunFolder, process_start_time
from .settings import (MAX_CLASSES, TrainConfig, _check_ignore_is_no_class,  # TrainConfig: re-exported
                       check_resumable, current_method_name)
from .steps import STEPS, StepOutput
from .validation import validate


# ----------------------------------------------------------------------------- data loading

@dataclass
class LoadedCase:
    name: str
    image: np.ndarray             # raw intensities (D, H, W)
    label: np.ndarray | None      # int64 (D, H, W) or None
    spacing: tuple[float, float, float]


#: Without --num-classes, a label map with more distinct values than this is taken for an image
#: (--labels pointing at intensities) rather than trained as that many classes.
MAX_INFERRED_CLASSES = 64


def load_cases(cases: list, config: TrainConfig, notes: list[str] | None = None
               ) -> tuple[list[LoadedCase], int]:
    """Read, check and pair the volumes. Returns the cases and the class count.

    Labels that would train something other than what the user meant are refused with one line:
    an ignore index that is a class (or outside 0..255), a label map holding image intensities,
    more classes than a uint8 prediction holds, or no foreground in any label. When the class
    count is inferred and is not the plain 0/1 of every label, a one-line note naming the values
    found is appended to ``notes`` (the CLI prints it).
    """
    config.validate()  # the ranges of --ignore-index and --num-classes, before any volume is read
    ignore = config.ignore_index
    k_given = config.num_classes

    loaded: list[LoadedCase] = []
    values: dict[str, np.ndarray] = {}  # label file -> distinct values other than the ignore index
    for case in cases:
        img = read_volume(case.image, nan="keep")  # NaN: no data (outside the field of view), masked below
        lab = None
        if case.label is not None:
            lv = read_volume(case.label, dataset="label") if str(case.label).endswith((".h5", ".hdf5")) \
                else read_volume(case.label)
            check_pair(img, lv)
            lab = validate_label(lv, k_given, ignore)
        mask_outside_view(img.name, img.array, lab, ignore)  # NaN voxels: ignored, one warning line
        if lab is not None:
            values[lv.name] = _label_values(lab, ignore)
        loaded.append(LoadedCase(case.name, img.array, lab, tuple(img.geometry.spacing)))
    if not values:
        raise InputError("no labeled volume: put at least one label file with the same name as its image "
                         "in the --labels folder")
    found = np.unique(np.concatenate(list(values.values())))
    if k_given is not None:
        k = k_given  # validate_label has checked every value against it
    else:
        _check_plausible_classes(values)
        k = max(2, int(found.max(initial=0)) + 1)
        _check_ignore_is_no_class(ignore, k, found)
    if not (found > 0).any():
        ignored = sum(int((c.label == ignore).sum()) for c in loaded if c.label is not None)
        fix = (f"; {ignored} voxels hold {ignore}, the ignore index (unannotated) - if {ignore} marks your "
               f"structure, relabel it as 1" if ignored else " - label the structure as 1 (or 1..N)")
        raise InputError(f"no foreground in any label: every annotated voxel of the {len(values)} label file(s) "
                         f"({_some(values)}) is 0, background{fix}")
    note = _classes_note(values, found, k, ignore) if k_given is None else None
    if note and notes is not None:
        notes.append(note)
    return loaded, k


def _label_values(label: np.ndarray, ignore_index: int) -> np.ndarray:
    """Distinct values of a validated (non-negative int64) label map, the ignore index left out."""
    top = int(label.max(initial=0))
    present = np.flatnonzero(np.bincount(label.ravel())) if top < 1 << 16 else np.unique(label)
    return present[present != ignore_index]


def _some(names, at_most: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:at_most]) + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def _show_values(v: np.ndarray, at_most: int = 6) -> str:
    v = [int(x) for x in v]
    return ", ".join(map(str, v)) if len(v) <= at_most else \
        ", ".join(map(str, v[:at_most - 1])) + f", ..., {v[-1]}"


def _check_plausible_classes(values: dict[str, np.ndarray]) -> None:
    """Refuse labels that read as intensities, or as more classes than a prediction can hold."""
    name, worst = max(values.items(), key=lambda kv: len(kv[1]))
    if len(worst) > MAX_INFERRED_CLASSES:
        raise InputError(f"{name}: label holds {len(worst)} distinct values ({_show_values(worst)}), which "
                         f"looks like an image, not a label map - point --labels at the label maps, or pass "
                         f"--num-classes if these really are classes")
    name, worst = max(values.items(), key=lambda kv: kv[1].max(initial=0))
    top = int(worst.max(initial=0))
    if top + 1 > MAX_CLASSES:
        raise InputError(f"{name}: label value {top} would make {top + 1} classes, but prediction volumes are "
                         f"uint8 and hold at most {MAX_CLASSES} classes (0..{MAX_CLASSES - 1}) - renumber the "
                         f"classes 0..N-1")


def _classes_note(values: dict[str, np.ndarray], found: np.ndarray, k: int, ignore: int) -> str | None:
    """One line naming the label values and the inferred class count, so a stray value shows.

    None for the common case that needs no word: two classes, both annotated, and class 1 in
    every label file (a note on every run would bury the one that matters, and stderr of a
    failing run stays its one error line).
    """
    missing = sorted(set(range(k)) - {int(v) for v in found})
    rare = []
    if len(values) > 1:
        for v in found:
            holders = [n for n, vals in values.items() if v in vals]
            if len(holders) == 1 and v > 0:
                rare.append(f"value {int(v)} only in {holders[0]}")
    if k == 2 and not missing and not rare:
        return None
    parts = [f"classes from the labels: values {_show_values(found, 12)} found "
             f"(ignore index {ignore} left out) -> training {k} classes"]
    if missing:
        parts.append(f"class(es) {_show_values(np.array(missing))} have no voxel")
    parts = (parts + rare)[:5]  # one readable line, even for many rare values
    return "; ".join(parts) + "; --num-classes sets it"


def split_validation(labeled: list[LoadedCase], fraction: float, seed: int
                     ) -> tuple[list[LoadedCase], list[LoadedCase]]:
    """Validation volumes drawn from the labeled training volumes (never from test data).
    None when fewer than 3 labeled volumes: every label is needed for training then."""
    n = len(labeled)
    n_val = 0 if n < 3 or fraction <= 0 else max(1, int(round(fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    val = [labeled[i] for i in sorted(order[:n_val])]
    train = [labeled[i] for i in sorted(order[n_val:])]
    return train, val


# ----------------------------------------------------------------------------- stopping, the entry point

class _StopFlag:
    """A stop request: SIGINT/SIGTERM (once installed) or a STOP file. Installed right after the
    run's lock is taken, so a signal during the slow start-up also ends with a ``stopped`` event."""

    def __init__(self, stop_file: Path):
        self.stop_file = Path(stop_file)
        self.reason: str | None = None
        self._old = {}

    def install(self) -> None:
        if not on_main_thread():  # Python sets signal handlers from the main thread only
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def requested(self) -> bool:
        if self.reason is None and self.stop_file.exists():
            self.reason = "STOP file"
        return self.reason is not None

    def consume(self) -> None:
        """A STOP file that was honoured is spent: remove it, so it cannot stop the next run."""
        if self.reason == "STOP file":
            self.stop_file.unlink(missing_ok=True)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped: bool
    best_dice: float | None
    last_checkpoint: Path | None  # None: stopped before any checkpoint was written


def train(config: TrainConfig, cases: list, run_dir: str | Path, *, resume: bool = False,
          listeners: list[Callable] | None = None, progress_bar: bool = False) -> TrainResult:
    """Train a network on ``cases`` (io.Case list: image, label or None) into ``run_dir``.

    ``run_dir`` must be absent, empty or an sgrs run (with ``resume``: one with a checkpoint);
    anything else is refused before a byte is written. One process writes a run: the run's lock
    is taken first (under torchrun by rank 0, the only rank that writes), and a second trainer
    gets a LockedError naming the first. The training itself is a :class:`Trainer`'s.
    """
    config.validate()
    run = RunFolder(run_dir)
    rank, world, _ = rank_info()
    is_main = rank == 0
    # every rank checks (reads only, so a refused folder is left as it was); the lock is rank 0's
    run.check_output(resume, holding_lock=not is_main)
    existed = run.path.exists()
    lock = run.lock() if is_main else None
    stop = _StopFlag(run.stop_file)
    new = started = False

    def mark_started(event) -> None:
        nonlocal started
        started = started or event.kind is EventKind.STARTED

    try:
        stop.install()  # from now on SIGINT/SIGTERM end the run with a `stopped` event
        if is_main:
            new = _open_run_folder(run, config, resume)
        try:
            writer = EventWriter(run.events if is_main else None, [mark_started, *(listeners or [])] if is_main else [])
        except OSError as exc:
            raise ResourceError(f"cannot write {run.events} ({os_reason(exc)}); choose a writable --out") from exc
        try:
            trainer = Trainer(config, run, writer, stop, resume=resume, progress_bar=progress_bar)
            return trainer.run() if trainer.setup(cases) else trainer.stopped_before_training()
        finally:
            writer.close()
    except BaseException:
        if new and not started:  # a new run that failed in start-up: take back what it wrote
            for path in (run.config, run.events):
                with contextlib.suppress(OSError):
                    path.unlink()
        raise
    finally:
        stop.restore()
        if lock is not None:
            lock.release()
            if new and not started and not existed:
                with contextlib.suppress(OSError):
                    run.path.rmdir()


def _open_run_folder(run: RunFolder, config: TrainConfig, resume: bool) -> bool:
    """Under the run's lock, before the slow start-up: what a killed run left is cleared (a STOP
    touched before this process started, sgrs's own temp files), and a new run writes its
    settings at once, which makes the folder an sgrs run from now on. True for a new run."""
    run.check_output(resume, holding_lock=True)  # again: the folder cannot change under the lock
    try:
        run.clear_stale_stop(process_start_time())
    except OSError as exc:  # read-only or full disk: one line, not a traceback
        raise ResourceError(f"cannot write in the run folder {run.path} ({os_reason(exc)}); choose a writable "
                            f"--out") from exc
    run.remove_stale_temp_files()
    if run.is_run():
        return False
    run.write_config({"config": config.to_json()})
    return True


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    """One run's training in this process (one rank under torchrun; rank 0 alone writes).

    :meth:`setup` reads the volumes and builds the networks (from the last checkpoint with
    ``resume``: :meth:`restore`); :meth:`run` trains to the last step or a stop; :meth:`save` writes
    a checkpoint. The loss of a step is the method's step function (:data:`.steps.STEPS`).
    """

    def __init__(self, config: TrainConfig, folder: RunFolder, writer: EventWriter, stop: _StopFlag, *,
                 resume: bool = False, progress_bar: bool = False):
        self.config, self.folder, self.writer, self.stop = config, folder, writer, stop
        self.resume, self.progress_bar = resume, progress_bar
        self.rank, self.world, self.local_rank = rank_info()
        self.distributed = self.world > 1
        self.is_main = self.rank == 0
        self.step_fn = STEPS[config.method]
        self.step = 0
        self.best_dice: float | None = None
        self.saved_step: int | None = None  # the step of the last checkpoint on disk
        self.last_path: Path | None = None
        self.last_val: float | None = None
        self.bar = self.batch_source = None

    # ---- setup
    def setup(self, cases: list) -> bool:
        """Everything before the first step. False when a stop came while the volumes loaded:
        nothing was built then (:meth:`stopped_before_training`)."""
        self._start_device()
        if not self._load_data(cases):
            return False
        self._build_networks()
        if self.resume:
            self.restore()
        self._prepare_forward()
        self._write_record()
        return True

    def _start_device(self) -> None:
        """The device, the process group under torchrun, and the seeded generators (per rank)."""
        config = self.config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            share_cpu_threads()
        if self.distributed:
            self.device = start_group(self.device, self.local_rank, config.sync_bn)
        configure_backends(self.device, config)
        # Determinism on CPU for a given seed: seeded generators, deterministic algorithms.
        torch.manual_seed(config.seed + self.rank)
        self.rng = np.random.default_rng(config.seed + self.rank)
        self.gen = torch.Generator(device=self.device).manual_seed(config.seed + 7919 * (self.rank + 1))

    def _load_data(self, cases: list) -> bool:
        """Read and split the volumes, fix the patch and check memory; the patch sampler. False:
        stopped while the volumes loaded."""
        config = self.config
        self.notes: list[str] = []  # one-line notices from the data checks, sent with the started event
        loaded, self.num_classes = load_cases(cases, config, self.notes)
        if any_rank(self.stop.requested(), self.distributed, self.device):
            return False
        self.labeled = [c for c in loaded if c.label is not None]
        self.train_lab, self.val = split_validation(self.labeled, config.val_fraction, config.seed)
        # Validation volumes give their images (not labels) to the unlabeled stream: that is
        # what a semi-supervised method may use, and it keeps every image in play.
        self.unlabeled = [c for c in loaded if c.label is None] + self.val
        if config.method != "supervised" and not self.unlabeled:
            raise InputError("method needs unlabeled volumes but every image has a label: add images without "
                             "labels or use --method supervised")
        self.patch = tuple(config.patch_size) if config.patch_size else auto_patch([c.image.shape for c in loaded])
        config.patch_size = self.patch
        config.validate()  # what depends on the patch (batch normalisation's batch) now that it is known
        check_memory(config, self.patch, self.num_classes, self.device,
                     data_voxels=sum(c.image.size for c in loaded))  # before any model or batch exists
        self._make_batches()
        return True

    def _make_batches(self) -> None:
        config, patch = self.config, self.patch

        def prep(c: LoadedCase, with_label: bool):
            img = normalise(c.image, config.normalization, config.ct_window)
            return make_sample(c.name, img, c.label if with_label else None, patch, config.ignore_index)

        sampler = PatchSampler(patch, self.rng, augment=True, foreground_fraction=config.foreground_fraction,
                               flips=config.flips)
        lab_batch = config.batch_size if config.method == "supervised" else config.labeled_batch_size
        unl_batch = 0 if config.method == "supervised" else config.batch_size - config.labeled_batch_size
        self.batches = TwoStreamBatches([prep(c, True) for c in self.train_lab],
                                        [prep(c, False) for c in self.unlabeled],
                                        lab_batch, unl_batch, sampler, self.rank, self.world,
                                        draw=config.volume_draw)
        self.rank_volumes = {"rank": self.rank, "pid": os.getpid(),
                             "labeled": [s.name for s in self.batches.labeled],
                             "unlabeled": [s.name for s in self.batches.unlabeled]}

    def _build_networks(self) -> None:
        """Student, teacher (its EMA) and the optimiser."""
        config = self.config
        student = build_model(config, self.num_classes)
        if config.sync_bn and self.distributed:
            student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        # channels_last_3d: several times faster Conv3d backward on CPU (benchmarks/RESULTS.md)
        self.student = student.to(self.device, memory_format=torch.channels_last_3d)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.optimizer = make_optimizer(self.student, config)

    def _prepare_forward(self) -> None:
        """The student's forward (DDP, compiled) and mixed precision."""
        forward = ddp(self.student, self.device) if self.distributed else self.student
        self.forward_student = torch.compile(forward) if self.config.compile else forward
        self.amp_dtype = amp_dtype(self.config.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _write_record(self) -> None:
        """The run's record (settings, classes, case lists): config.json, and the metadata of
        every checkpoint. The ranks' volume lists go to the started event."""
        config, patch = self.config, self.patch
        self.meta = {"config": config.to_json(), "num_classes": self.num_classes, "tau": config.tau,
                     "patch_size": list(patch), "train_cases": [c.name for c in self.train_lab],
                     "val_cases": [c.name for c in self.val], "unlabeled_cases": [c.name for c in self.unlabeled],
                     # which classes `predict --largest-component auto` may reduce to one component
                     "single_component_classes": single_component_classes([c.label for c in self.labeled],
                                                                          self.num_classes)}
        if self.is_main:
            self.folder.write_config(self.meta)
        # (A stale STOP file went before the process group formed: rank 0 removes it right after
        # taking the lock.)
        self.per_rank_volumes = (gather_objects(self.rank_volumes, self.world) if self.distributed
                                 else [self.rank_volumes])
        self.saved_step = self.step if self.resume else None

    # ---- checkpoints
    def save(self, kind: str) -> Path:
        """Write the ``kind`` (last, best) checkpoint of this step and announce it."""
        path = self.folder.checkpoint(kind)
        tensors = {**{f"student.{k}": v for k, v in self.student.state_dict().items()},
                   **{f"teacher.{k}": v for k, v in self.teacher.state_dict().items()},
                   **optimizer_tensors(self.optimizer),
                   "rng.torch": torch.random.get_rng_state(), "rng.noise": self.gen.get_state()}
        meta = dict(self.meta, step=self.step, best_dice=self.best_dice, rng_numpy=self.rng.bit_generator.state,
                    method=self.config.method)
        if self.config.volume_draw == "permutation":  # where each stream stands in its permutation
            meta["draw_queues"] = self.batches.state()
        digest = save_checkpoint(path, tensors, meta)
        if kind == "last":
            self.saved_step = self.step
        self.writer.emit(EventKind.CHECKPOINT, self.step, path=str(path), sha256=digest, best=kind == "best")
        return path

    def restore(self) -> None:
        """Networks, optimiser, generators and step from the last checkpoint, refused when
        it does not match this run's settings and data."""
        ckpt = load_checkpoint(self.folder.last)
        meta = ckpt.meta
        check_resumable(meta.get("config", {}), ckpt.path)
        _check_same_run(meta, self.config, self.num_classes, self.patch)
        self.student.load_state_dict(ckpt.state_dict("student"))
        self.teacher.load_state_dict(ckpt.state_dict("teacher"))
        load_momentum(self.optimizer, ckpt.tensors, "optim.momentum")
        if "rng_numpy" in meta:
            self.rng.bit_generator.state = meta["rng_numpy"]
        if "draw_queues" in meta:
            self.batches.load_state(meta["draw_queues"])
        if "rng.torch" in ckpt.tensors:
            torch.random.set_rng_state(ckpt.tensors["rng.torch"])
        if "rng.noise" in ckpt.tensors:
            self.gen.set_state(ckpt.tensors["rng.noise"])
        self.step, self.best_dice = int(meta.get("step", 0)), meta.get("best_dice")
        if self.rank > 0:  # the checkpoint holds rank 0's generators: give the other ranks their own streams
            seed = self.config.seed
            self.rng.bit_generator.state = np.random.default_rng([seed, self.rank, self.step]).bit_generator.state
            self.gen.manual_seed(seed + 7919 * (self.rank + 1) + self.step)

    # ---- the loop
    def run(self) -> TrainResult:
        """Train from the current step to ``config.iterations`` or a stop request."""
        self._announce()
        self.batch_source = _batch_source(self.batches, self.config, self.rank, self.device, self.step)
        if self.progress_bar and self.is_main:
            self.bar = tqdm(total=self.config.iterations, initial=self.step, desc=self.config.method, unit="step",
                            dynamic_ncols=True)
        self.student.train()
        self.teacher.eval()  # teacher: EMA weights and BN statistics, no dropout
        self.t0, self.step0 = time.time(), self.step
        self.last_path = self.folder.last if self.resume else None
        stopped = False
        try:
            stopped = self._loop()
            self._finish(stopped)
        except SGRSError as exc:
            if not isinstance(exc, TrainingDiverged):
                self.writer.emit(EventKind.ERROR, self.step, message=str(exc))
            raise
        except torch.cuda.OutOfMemoryError as exc:
            msg = (f"the GPU ran out of memory at step {self.step}; use a smaller --patch-size, --batch-size or "
                   f"--base-filters, or --amp bf16")
            self.writer.emit(EventKind.ERROR, self.step, message=msg)
            raise ResourceError(msg) from exc
        finally:
            self._release()
        return TrainResult(self.folder.path, self.step, stopped, self.best_dice, self.last_path)

    def _announce(self) -> None:
        config = self.config
        self.rampup_len = config.rampup_fraction * config.iterations
        self.val_every = config.val_every or max(1, config.iterations // 10)
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else str(self.device)
        self.writer.emit(EventKind.STARTED, self.step, total=config.iterations, device=self.device_name,
                         method=config.method, num_classes=self.num_classes, patch_size=list(self.patch),
                         labeled=len(self.train_lab), unlabeled=len(self.unlabeled), validation=len(self.val),
                         world_size=self.world, ranks=self.per_rank_volumes, workers=config.workers,
                         **({"note": " ".join(self.notes)} if self.notes else {}))

    def _loop(self) -> bool:
        """Steps until the last; True when a stop request ended it."""
        while self.step < self.config.iterations:
            # Every rank takes the same branch (any rank's STOP/SIGTERM stops all), so none is
            # left waiting in a collective of DistributedDataParallel.
            if any_rank(self.stop.requested(), self.distributed, self.device):
                self.stop.reason = self.stop.reason or "stop requested on another rank"
                return True
            self._train_step()
        return False

    def _train_step(self) -> None:
        """One step: the method's loss, the SGD update, the teacher's EMA;
        then what falls due at the new step (log, validation, checkpoint)."""
        config = self.config
        x, y, u = self._next_batch()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = self.step_fn(self.forward_student, self.teacher, x, y, u, self.step, config, self.rng, self.gen,
                               self.rampup_len, self.num_classes)
        self._check_finite(out.loss)
        set_learning_rate(self.optimizer, config, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        S.teacher_update(self.teacher, self.student, self.step, config)
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
        self._after_step(out)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x, y, u = next(self.batch_source)
        if self.device.type == "cuda" and self.config.workers == 0:  # workers pin in the DataLoader
            x, y = x.pin_memory(), y.pin_memory()
            u = u.pin_memory() if u is not None else None
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        u = u.to(self.device, non_blocking=True) if u is not None else None
        x = x.to(memory_format=torch.channels_last_3d)
        u = u.to(memory_format=torch.channels_last_3d) if u is not None else None
        return x, y, u

    def _check_finite(self, loss: torch.Tensor) -> None:
        """TrainingDiverged (and an error event) when the loss is not finite on any rank."""
        if not any_rank(not bool(torch.isfinite(loss)), self.distributed, self.device):
            return
        value = f"{float(loss.detach())}" if not torch.isfinite(loss) else "non-finite on another rank"
        kept = (f"the last good checkpoint, {self.folder.last} (step {self.saved_step}), is kept"
                if self.saved_step is not None else "no checkpoint was written yet")
        msg = (f"{self.folder.path}: the loss became {value} at step {self.step}; training stopped and {kept}. "
               f"Lower --lr or check the images for extreme values")
        self.writer.emit(EventKind.ERROR, self.step, message=msg)
        raise TrainingDiverged(msg)

    def _after_step(self, out: StepOutput) -> None:
        config, step = self.config, self.step
        last = step == config.iterations
        # the first step of this process is reported at once: its time gives the first ETA (a
        # slow CPU setting would otherwise show no estimate until step log_every)
        if step % config.log_every == 0 or last or step == self.step0 + 1:
            self._log_progress(out)
        validate_now = self.val and (step % self.val_every == 0 or last)
        if self.is_main and validate_now:
            self._validate()
        if self.distributed and config.tau_auto and validate_now:
            config.tau = broadcast_float(config.tau, self.device)  # rank 0 recalibrated it
        if step % config.checkpoint_every == 0 or last:
            if self.is_main:
                self.last_path = self.save("last")
            self.saved_step = step  # every rank knows the checkpoint rank 0 wrote (for the divergence message)

    def _log_progress(self, out: StepOutput) -> None:
        config, step = self.config, self.step
        rate = (step - self.step0) / max(time.time() - self.t0, 1e-9)
        self.writer.emit(EventKind.PROGRESS, step, loss=float(out.loss.detach()), loss_sup=out.loss_sup,
                         loss_unsup=out.loss_unsup, weight=out.weight, total=config.iterations,
                         steps_per_s=rate, eta_s=(config.iterations - step) / max(rate, 1e-9),
                         device=self.device_name, memory_mb=peak_memory_mb(self.device))
        if out.regions:
            self.writer.emit(EventKind.REGIONS, step, scope="batch", **out.regions)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{float(out.loss.detach()):.3f}",
                                 val_dice="-" if self.last_val is None else f"{self.last_val:.3f}")

    def _validate(self) -> None:
        """Validate the student; a better Dice than any before is saved as the best checkpoint."""
        self.last_val = validate(self.student, self.val, self.meta, self.device, self.writer,
                                 self.step, self.config)
        if self.best_dice is None or self.last_val > self.best_dice:
            self.best_dice = self.last_val
            self.save("best")

    def _finish(self, stopped: bool) -> None:
        """The last checkpoint of a stopped run, and the run's final event."""
        if stopped and self.is_main:
            if self.step > self.step0:
                self.last_path = self.save("last")
            # else: stopped during start-up, nothing trained: the checkpoint on disk, if any, stands
            self.writer.emit(EventKind.STOPPED, self.step, reason=self.stop.reason,
                             path=None if self.last_path is None else str(self.last_path))
            with contextlib.suppress(OSError):
                self.stop.consume()
        elif self.is_main:
            self.writer.emit(EventKind.FINISHED, self.step, path=str(self.last_path), best_dice=self.best_dice)
        if self.distributed:
            # Clean end only (an exception skips this, so a failed rank cannot leave the others
            # waiting here): no rank tears its connections down while rank 0 still writes.
            barrier(self.device)

    def _release(self) -> None:
        """After the loop, whatever happened: the progress bar, the batch workers, cached GPU
        memory and the process group."""
        if self.bar is not None:
            self.bar.close()
        self.forward_student = self.batch_source = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.distributed:
            stop_group()

    def stopped_before_training(self) -> TrainResult:
        """A stop asked for while the volumes loaded: no network is built; a `stopped` event at the
        step of the checkpoint on disk (0 for a new run), which stays as it is."""
        last = self.folder.last if self.resume else None
        step = (self.folder.checkpoint_step() or 0) if self.resume else 0
        self.writer.emit(EventKind.STOPPED, step, reason=self.stop.reason, path=None if last is None else str(last),
                         note="stopped during start-up, before the first step")
        if self.is_main:  # the only rank that writes
            with contextlib.suppress(OSError):
                self.stop.consume()
        if self.distributed:
            barrier(self.device)
            stop_group()
        return TrainResult(self.folder.path, step, True, None, last)


def _check_same_run(meta: dict, config: TrainConfig, num_classes: int, patch: tuple[int, int, int]) -> None:
    """CheckpointError unless the checkpoint was trained with this network, method, classes and patch."""
    old = {**meta.get("config", {})}
    old["method"] = current_method_name(old.get("method"))
    for key in ("base_filters", "method"):
        if old.get(key) != getattr(config, key):
            raise CheckpointError(f"cannot resume: the run used --{key.replace('_', '-')} {old.get(key)}, "
                                  f"this command asks for {getattr(config, key)}; use the same value")
    if meta.get("num_classes") != num_classes:
        raise CheckpointError(f"cannot resume: the run has {meta.get('num_classes')} classes but the labels "
                              f"now have {num_classes}")
    if list(old.get("patch_size") or []) != list(patch):
        raise CheckpointError(f"cannot resume: the run used patch {old.get('patch_size')}, now {list(patch)}; "
                              f"pass --patch-size {' '.join(map(str, old.get('patch_size') or []))}")


def _batch_source(batches: TwoStreamBatches, config: TrainConfig, rank: int, device: torch.device, start_step: int):
    """The training batches: drawn in this process (``workers=0``, deterministic for a seed) or by
    ``config.workers`` DataLoader processes, each with its own generator seeded from (seed, rank,
    worker, start step), batches pinned for non-blocking copies on CUDA."""
    if config.workers <= 0:
        return batches
    stream = BatchStream(batches, seed=config.seed, rank=rank, start_step=start_step)
    loader = DataLoader(stream, batch_size=None, num_workers=config.workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4, persistent_workers=True)
    return iter(loader)
