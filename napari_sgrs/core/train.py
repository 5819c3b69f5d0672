"""SGRS-Net training: Mean Teacher on a V-Net with Mix Augmentation and regional pseudo-label losses.

``train(config, cases, run_dir)`` is the one entry point; the CLI and the napari plugin (which
runs ``sgrs train`` in a separate process) call it. Progress goes out as typed events
(:mod:`.events`) to ``RUN/events.jsonl`` and to optional in-process listeners.

Ramp-up: the paper ramps the unlabeled-loss weight over 6,000 of 15,000 steps. With another
budget the ramp keeps that proportion: its length is ``rampup_fraction`` (0.4) x iterations,
so a 600-step run ramps over 240 steps instead of never reaching weight 1.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import sgrs as S
from .checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from .data import PatchSampler, TwoStreamBatches, auto_patch, make_sample, normalise
from .errors import CheckpointError, ConfigError, InputError, ResourceError, SGRSError, TrainingDiverged, os_reason
from .events import EventKind, EventWriter
from .memory import check_memory, estimate_training_memory  # noqa: F401 - estimate: re-exported
from .postprocess import single_component_classes
from .runfolder import RunFolder, process_start_time
from .settings import MAX_CLASSES, TrainConfig, _check_ignore_is_no_class, check_resumable  # TrainConfig: re-exported
from .vnet import VNet


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate at ``step``: constant (paper) or poly decay to 0 at the last step."""
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * (1.0 - min(step, config.iterations - 1) / config.iterations) ** 0.9


def resolve_device(device: str) -> torch.device:
    """auto -> CUDA, then Apple MPS, then CPU. An explicit device that is absent is an error."""
    d = (device or "auto").lower()
    if d == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is visible to PyTorch here; use --device cpu "
                              f"or auto")
        return torch.device(d)
    if d == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("--device mps: Apple MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")


def build_model(config: TrainConfig | dict, num_classes: int) -> VNet:
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_json(config)
    return VNet(1, num_classes, cfg.base_filters, dropout=cfg.dropout)


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
    from .data import mask_outside_view
    from .io import check_pair, read_volume, validate_label

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


def partner_patch(case: LoadedCase, patch: tuple[int, int, int], config: TrainConfig) -> np.ndarray:
    """A labeled patch centred on the target: the fixed mixing partner for whole-volume regions."""
    from .data import pad_to

    img = normalise(case.image, config.normalization, config.ct_window)
    img, _ = pad_to(img, patch, 0.0)
    lab, _ = pad_to(case.label, patch, config.ignore_index)
    fg = np.argwhere((lab > 0) & (lab != config.ignore_index))
    centre = fg.mean(0).astype(int) if len(fg) else np.array(img.shape) // 2
    z, y, x = (int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, img.shape))
    return np.ascontiguousarray(img[z:z + patch[0], y:y + patch[1], x:x + patch[2]])


# ----------------------------------------------------------------------------- the anchor

class LabelAnchor:
    """``--pseudo-anchor labels``: a second V-Net trained on the labeled patches alone.

    It has its own initialisation, optimizer and EMA (``ema``, in eval mode, as the teacher). The
    EMA's probabilities on the unlabeled patch are averaged with the teacher's to make the pseudo
    label (:func:`sgrs_step`). Pseudo labels never teach it, so a mistake of the student that the
    teacher confirms must also convince a network that has only seen labels: the loop that
    confirms the teacher's false positives loses half its gain (co-training, in a one-sided form).
    """

    SEED_OFFSET = 104729  # the anchor's initialisation stream, apart from the student's

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device, distributed: bool):
        with torch.random.fork_rng(devices=[]):  # the student's draws stay what they were without it
            torch.manual_seed(config.seed + self.SEED_OFFSET)
            net = build_model(config, num_classes)
        self.net = net.to(device, memory_format=torch.channels_last_3d).train()
        self.ema = copy.deepcopy(net).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.forward = _ddp(net, device) if distributed else net
        self.config = config
        amp = _amp_dtype(config.amp, device)
        self.autocast = dict(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """One supervised SGD step on the labeled patches, then its EMA update. Returns the loss,
        detached and left on the device: the loop reads it only when it logs, so a GPU step does
        not wait for it."""
        with torch.autocast(**self.autocast):
            loss = S.supervised_loss(self.forward(x), y, self.config.ignore_index)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        S.ema_update(self.ema, self.net, S.ema_alpha(step, self.config.ema_decay))
        return loss.detach()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"anchor.{k}": v for k, v in self.net.state_dict().items()},
                **{f"anchor_ema.{k}": v for k, v in self.ema.state_dict().items()},
                **{f"anchor_{k}": v for k, v in _optimizer_tensors(self.optimizer).items()}}

    def load(self, ckpt) -> None:
        """Restore from a checkpoint of an anchored run (CheckpointError if it has no anchor)."""
        state, ema = ckpt.state_dict("anchor"), ckpt.state_dict("anchor_ema")
        if not state or not ema:
            raise CheckpointError("cannot resume with --pseudo-anchor labels: the run was trained without the "
                                  "anchor; pass --pseudo-anchor off")
        self.net.load_state_dict(state)
        self.ema.load_state_dict(ema)
        _load_momentum(self.optimizer, ckpt, "anchor_optim.momentum")


def _ddp(module: torch.nn.Module, device: torch.device):
    """Wrap for DistributedDataParallel. A 1x1x1 kernel is contiguous and channels-last at once;
    channels_last gives it strides that the autograd gradient does not have, and DDP then warns
    ("grad strides do not match bucket view strides") and copies that gradient every step. Plain
    strides match it."""
    for p in module.parameters():
        if p.dim() == 5 and tuple(p.shape[2:]) == (1, 1, 1):
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------- the step

@dataclass
class StepOutput:
    loss: torch.Tensor
    loss_sup: float
    loss_unsup: float
    weight: float
    regions: dict[str, float] = field(default_factory=dict)


def sgrs_step(student, teacher, x, y, u, step: int, config: TrainConfig, rng: np.random.Generator,
              gen: torch.Generator | None, rampup_len: float, num_classes: int, anchor=None) -> StepOutput:
    """One training step's loss (no backward). x (b,1,D,H,W), y (b,D,H,W), u (bu,1,D,H,W) or None;
    anchor: a network (LabelAnchor.ema) whose probabilities are averaged with the teacher's into
    the pseudo label, or None."""
    b = x.shape[0]
    ignore = config.ignore_index
    if config.method == "supervised" or u is None:
        logits = student(x)
        ls = S.supervised_loss(logits, y, ignore)
        return StepOutput(ls, float(ls.detach()), 0.0, 0.0)
    bu = u.shape[0]
    weight = config.unsup_weight * S.sigmoid_rampup(step, rampup_len)
    u_noisy = S.add_noise(u, generator=gen)
    gated = config.gate == "teacher-dice" and config.method == "sgrs"  # mean-teacher stays the textbook baseline
    # the noisy labeled patches feed the mix and the gate only: no noise drawn when neither is on
    needs_x_noisy = gated or (config.method == "sgrs" and config.use_mix)
    x_noisy = S.add_noise(x, generator=gen) if needs_x_noisy else None
    with torch.no_grad():
        # With the gate, the teacher also sees the noisy labeled patches (one batched forward):
        # its Dice there says how far its pseudo labels can be trusted right now.
        t_out = teacher(torch.cat([u_noisy, x_noisy], 0) if gated else u_noisy)
        teacher_logits = t_out[:bu]
        if gated:
            weight *= S.teacher_reliability(torch.softmax(t_out[bu:].float(), 1), y, ignore)
    if config.method == "mean-teacher":
        logits = student(torch.cat([x, u], 0))
        ls = S.supervised_loss(logits[:b], y, ignore)
        lu = F.mse_loss(torch.softmax(logits[b:], 1), torch.softmax(teacher_logits.float(), 1))
        return StepOutput(ls + weight * lu, float(ls.detach()), float(lu.detach()), weight)
    if anchor is not None:
        with torch.no_grad():
            mean_probs = 0.5 * (torch.softmax(teacher_logits.float(), 1) + torch.softmax(anchor(u_noisy).float(), 1))
        pseudo = S.hard_label(mean_probs)
    else:
        pseudo = S.hard_label(teacher_logits)
    if config.use_mix:
        lam = S.sample_mix_lambda(bu, config.mix_alpha, rng)
        partner = torch.from_numpy(rng.integers(0, b, bu))
        u_mix = S.mix_augment(u_noisy, x_noisy, lam, partner)
    else:
        u_mix = u_noisy  # ablation: the second view is the noisy unlabeled patch alone
    logits = student(torch.cat([x, u, u_mix], 0))  # one forward over the three streams
    ls = S.supervised_loss(logits[:b], y, ignore)
    lu_logits, mix_logits = logits[b:b + bu], logits[b + bu:]
    with torch.no_grad():
        regions = S.synergy_regions(torch.softmax(lu_logits.float(), 1), torch.softmax(mix_logits.float(), 1),
                                    config.tau)
    if config.pseudo_views == "mix":
        lu_logits = lu_logits.detach()  # the pseudo label only teaches the view that did not make it
    lu = S.regional_loss(lu_logits.float(), mix_logits.float(), pseudo, regions,
                         use_regions=config.use_regions, reference_compat=config.reference_compat,
                         weighting=config.region_weighting)
    return StepOutput(ls + weight * lu, float(ls.detach()), float(lu.detach()), weight, regions.fractions())


# ----------------------------------------------------------------------------- the loop

class _StopFlag:
    """A stop request: SIGINT/SIGTERM (once installed) or a STOP file. Installed right after the
    run's lock is taken, so a signal during the slow start-up also ends with a ``stopped`` event."""

    def __init__(self, stop_file: Path):
        self.stop_file = Path(stop_file)
        self.reason: str | None = None
        self._old = {}

    def install(self) -> None:
        if not _on_main_thread():  # Python sets signal handlers from the main thread only
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


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def train(config: TrainConfig, cases: list, run_dir: str | Path, *, resume: bool = False,
          listeners: list[Callable] | None = None, progress_bar: bool = False) -> TrainResult:
    """Train a network on ``cases`` (io.Case list: image, label or None) into ``run_dir``.

    ``run_dir`` must be absent, empty or an sgrs run (with ``resume``: one with a checkpoint);
    anything else is refused before a byte is written. One process writes a run: the run's lock
    is taken first (under torchrun by rank 0, the only rank that writes), and a second trainer
    gets a LockedError naming the first.
    """
    config.validate()
    run = RunFolder(run_dir)
    rank, world, _ = _dist_info()
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
            return _train(config, cases, run, resume, writer, stop, progress_bar)
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
    config.json at once, which makes the folder an sgrs run from now on. True for a new run."""
    run.check_output(resume, holding_lock=True)  # again: the folder cannot change under the lock
    try:
        run.clear_stale_stop(process_start_time())
    except OSError as exc:  # read-only or full disk: one line, not a traceback
        raise ResourceError(f"cannot write in the run folder {run.path} ({os_reason(exc)}); choose a writable "
                            f"--out") from exc
    run.remove_stale_temp_files()
    if run.is_run():
        return False
    atomic_write_bytes(run.config, json.dumps({"config": config.to_json()}, indent=2).encode())
    return True


def _train(config: TrainConfig, cases: list, run: RunFolder, resume: bool, writer: EventWriter, stop: _StopFlag,
           progress_bar: bool) -> TrainResult:
    run_dir = run.path
    rank, world, local_rank = _dist_info()
    distributed = world > 1
    is_main = rank == 0

    device = resolve_device(config.device)
    if device.type == "cpu":
        _share_cpu_threads()
    if distributed:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if config.sync_bn and device.type != "cuda":
            raise ConfigError(f"--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on "
                              f"{device.type}); drop --sync-bn on CPU")
        if not dist.is_initialized():
            import datetime

            # Rank 0 validates and checkpoints while the others wait in the next collective:
            # a generous timeout keeps a long validation from killing the run.
            with _signals_to_main_thread():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                        timeout=datetime.timedelta(minutes=60))

    configure_backends(device, config)
    # Determinism on CPU for a given seed: seeded generators, deterministic algorithms.
    torch.manual_seed(config.seed + rank)
    rng = np.random.default_rng(config.seed + rank)
    gen = torch.Generator(device=device).manual_seed(config.seed + 7919 * (rank + 1))

    notes: list[str] = []  # one-line notices from the data checks, sent with the started event
    loaded, num_classes = load_cases(cases, config, notes)
    if _any_rank(stop.requested(), distributed, device):  # stopped while the volumes loaded
        return _stopped_before_training(run, resume, writer, stop, distributed, device)
    labeled = [c for c in loaded if c.label is not None]
    train_lab, val = split_validation(labeled, config.val_fraction, config.seed)
    # Validation volumes give their images (not labels) to the unlabeled stream: that is
    # what a semi-supervised method may use, and it keeps every image in play.
    unlabeled = [c for c in loaded if c.label is None] + val
    if config.method != "supervised" and not unlabeled:
        raise InputError("method needs unlabeled volumes but every image has a label: add images without "
                         "labels or use --method supervised")
    patch = tuple(config.patch_size) if config.patch_size else auto_patch([c.image.shape for c in loaded])
    config.patch_size = patch
    config.validate()  # what depends on the patch (batch normalisation's batch) now that it is known
    check_memory(config, patch, num_classes, device,
                 data_voxels=sum(c.image.size for c in loaded))  # before any model or batch exists

    def prep(c: LoadedCase, with_label: bool):
        img = normalise(c.image, config.normalization, config.ct_window)
        return make_sample(c.name, img, c.label if with_label else None, patch, config.ignore_index)

    sampler = PatchSampler(patch, rng, augment=True, foreground_fraction=config.foreground_fraction)
    lab_batch = config.batch_size if config.method == "supervised" else config.labeled_batch_size
    unl_batch = 0 if config.method == "supervised" else config.batch_size - config.labeled_batch_size
    batches = TwoStreamBatches([prep(c, True) for c in train_lab], [prep(c, False) for c in unlabeled],
                               lab_batch, unl_batch, sampler, rank, world)
    rank_volumes = {"rank": rank, "pid": os.getpid(), "labeled": [s.name for s in batches.labeled],
                    "unlabeled": [s.name for s in batches.unlabeled]}

    student = build_model(config, num_classes)
    if config.sync_bn and distributed:
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    # channels_last_3d: several times faster Conv3d backward on CPU (benchmarks/RESULTS.md)
    student = student.to(device, memory_format=torch.channels_last_3d)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)

    anchor = (LabelAnchor(config, num_classes, device, distributed)
              if config.method == "sgrs" and config.pseudo_anchor == "labels" else None)

    step = 0
    best_dice: float | None = None
    if resume:
        step, best_dice = _restore(run_dir, config, student, teacher, optimizer, rng, gen, num_classes, patch,
                                   anchor)
        if rank > 0:  # the checkpoint holds rank 0's generators: give the other ranks their own streams
            rng.bit_generator.state = np.random.default_rng([config.seed, rank, step]).bit_generator.state
            gen.manual_seed(config.seed + 7919 * (rank + 1) + step)

    forward_student = _ddp(student, device) if distributed else student
    if config.compile:
        forward_student = torch.compile(forward_student)

    amp_dtype = _amp_dtype(config.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    meta_base = {"config": config.to_json(), "num_classes": num_classes, "tau": config.tau,
                 "patch_size": list(patch), "train_cases": [c.name for c in train_lab],
                 "val_cases": [c.name for c in val], "unlabeled_cases": [c.name for c in unlabeled],
                 # which classes `predict --largest-component auto` may reduce to one component
                 "single_component_classes": single_component_classes([c.label for c in labeled], num_classes)}
    partner = torch.from_numpy(partner_patch(train_lab[0], patch, config))

    if is_main:
        atomic_write_bytes(run.config, json.dumps(meta_base, indent=2).encode())
    per_rank_volumes = [rank_volumes]
    if distributed:
        import torch.distributed as dist

        # The volume lists of the ranks go into the started event so a run shows how the data
        # was split. (A stale STOP file went before the process group formed: rank 0 removes it
        # right after taking the lock.)
        per_rank_volumes = [None] * world
        dist.all_gather_object(per_rank_volumes, rank_volumes)

    saved_step = step if resume else None  # the step of the last checkpoint on disk

    def save(kind: str) -> Path:
        nonlocal saved_step
        path = run.checkpoint(kind)
        tensors = {**{f"student.{k}": v for k, v in student.state_dict().items()},
                   **{f"teacher.{k}": v for k, v in teacher.state_dict().items()},
                   **_optimizer_tensors(optimizer), **(anchor.tensors() if anchor else {}), "partner.image": partner,
                   "rng.torch": torch.random.get_rng_state(), "rng.noise": gen.get_state()}
        meta = dict(meta_base, step=step, best_dice=best_dice, rng_numpy=_json_rng(rng),
                    method=config.method)
        digest = save_checkpoint(path, tensors, meta)
        if kind == "last":
            saved_step = step
        writer.emit(EventKind.CHECKPOINT, step, path=str(path), sha256=digest, best=kind == "best")
        return path

    rampup_len = config.rampup_fraction * config.iterations
    val_every = config.val_every or max(1, config.iterations // 10)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    writer.emit(EventKind.STARTED, step, total=config.iterations, device=device_name, method=config.method,
                num_classes=num_classes, patch_size=list(patch), labeled=len(train_lab),
                unlabeled=len(unlabeled), validation=len(val), world_size=world, ranks=per_rank_volumes,
                workers=config.workers, **({"note": " ".join(notes)} if notes else {}))
    batch_source = _batch_source(batches, config, rank, world, device, step)
    bar = None
    if progress_bar and is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.iterations, initial=step, desc=config.method, unit="step", dynamic_ncols=True)
    student.train()
    teacher.eval()  # teacher: EMA weights and BN statistics, no dropout
    t0, step0 = time.time(), step
    last_path = run.last if resume else None
    stopped = False
    last_val: float | None = None
    try:
        while step < config.iterations:
            # Every rank takes the same branch (any rank's STOP/SIGTERM stops all), so none is
            # left waiting in a collective of DistributedDataParallel.
            if _any_rank(stop.requested(), distributed, device):
                stopped = True
                stop.reason = stop.reason or "stop requested on another rank"
                break
            x, y, u = next(batch_source)
            if device.type == "cuda" and config.workers == 0:  # workers pin in the DataLoader
                x, y = x.pin_memory(), y.pin_memory()
                u = u.pin_memory() if u is not None else None
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            u = u.to(device, non_blocking=True) if u is not None else None
            x = x.to(memory_format=torch.channels_last_3d)
            u = u.to(memory_format=torch.channels_last_3d) if u is not None else None
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = sgrs_step(forward_student, teacher, x, y, u, step, config, rng, gen, rampup_len,
                                num_classes, anchor=anchor.ema if anchor else None)
            if _any_rank(not bool(torch.isfinite(out.loss)), distributed, device):
                value = (f"{float(out.loss.detach())}" if not torch.isfinite(out.loss)
                         else "non-finite on another rank")
                kept = (f"the last good checkpoint, {run.last} (step {saved_step}), is kept" if saved_step is not None
                        else "no checkpoint was written yet")
                msg = (f"{run_dir}: the loss became {value} at step {step}; training stopped and {kept}. "
                       f"Lower --lr or check the images for extreme values")
                writer.emit(EventKind.ERROR, step, message=msg)
                raise TrainingDiverged(msg)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if config.reference_compat:
                S.reference_weight_decay(student)
                S.ema_update(teacher, student, S.ema_alpha(step, config.ema_decay))
            S.ema_update(teacher, student, S.ema_alpha(step, config.ema_decay))
            # the anchor learns from the same labeled patches, never from pseudo labels
            loss_anchor = anchor.step(x, y, step) if anchor else None
            step += 1
            if bar is not None:
                bar.update(1)
            if step % config.log_every == 0 or step == config.iterations:
                rate = (step - step0) / max(time.time() - t0, 1e-9)
                writer.emit(EventKind.PROGRESS, step, loss=float(out.loss.detach()), loss_sup=out.loss_sup,
                            loss_unsup=out.loss_unsup, weight=out.weight, total=config.iterations,
                            **({"loss_anchor": float(loss_anchor)} if anchor else {}),
                            steps_per_s=rate, eta_s=(config.iterations - step) / max(rate, 1e-9),
                            device=device_name, memory_mb=_memory_mb(device))
                if out.regions:
                    writer.emit(EventKind.REGIONS, step, scope="batch", **out.regions)
                if bar is not None:
                    bar.set_postfix(loss=f"{float(out.loss.detach()):.3f}",
                                    val_dice="-" if last_val is None else f"{last_val:.3f}")
            if is_main and val and (step % val_every == 0 or step == config.iterations):
                last_val = _validate(student, teacher, val, meta_base, partner, device, writer, step, config)
                if best_dice is None or last_val > best_dice:
                    best_dice = last_val
                    save("best")
            if distributed and config.tau_auto and val and (step % val_every == 0 or step == config.iterations):
                import torch.distributed as dist

                tau = torch.tensor([config.tau], dtype=torch.float64, device=device)
                dist.broadcast(tau, 0)  # rank 0 recalibrated it; all ranks use the same regions
                config.tau = float(tau)
            if step % config.checkpoint_every == 0 or step == config.iterations:
                if is_main:
                    last_path = save("last")
                saved_step = step  # every rank knows the checkpoint rank 0 wrote (for the divergence message)
        if stopped and is_main:
            if step > step0:
                last_path = save("last")
            # else: stopped during start-up, nothing trained: the checkpoint on disk, if any, stands
            writer.emit(EventKind.STOPPED, step, reason=stop.reason, path=None if last_path is None else str(last_path))
            with contextlib.suppress(OSError):
                stop.consume()
        elif is_main:
            writer.emit(EventKind.FINISHED, step, path=str(last_path), best_dice=best_dice)
        if distributed:
            # Clean end only (an exception skips this, so a failed rank cannot leave the others
            # waiting here): no rank tears its connections down while rank 0 still writes.
            _barrier(device)
    except SGRSError as exc:
        if not isinstance(exc, TrainingDiverged):
            writer.emit(EventKind.ERROR, step, message=str(exc))
        raise
    except torch.cuda.OutOfMemoryError as exc:
        msg = (f"the GPU ran out of memory at step {step}; use a smaller --patch-size, --batch-size or "
               f"--base-filters, or --amp bf16")
        writer.emit(EventKind.ERROR, step, message=msg)
        raise ResourceError(msg) from exc
    finally:
        if bar is not None:
            bar.close()
        del forward_student, batch_source
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return TrainResult(run_dir, step, stopped, best_dice, last_path)


def _stopped_before_training(run: RunFolder, resume: bool, writer: EventWriter, stop: _StopFlag, distributed: bool,
                             device: torch.device) -> TrainResult:
    """A stop asked for while the volumes loaded: no network is built; a `stopped` event at the
    step of the checkpoint on disk (0 for a new run), which stays as it is."""
    last = run.last if resume else None
    step = (run.checkpoint_step() or 0) if resume else 0
    writer.emit(EventKind.STOPPED, step, reason=stop.reason, path=None if last is None else str(last),
                note="stopped during start-up, before the first step")
    if _dist_info()[0] == 0:  # the only rank that writes
        with contextlib.suppress(OSError):
            stop.consume()
    if distributed:
        import torch.distributed as dist

        _barrier(device)
        dist.destroy_process_group()
    return TrainResult(run.path, step, True, None, last)


def _validate(student, teacher, val: list[LoadedCase], meta: dict, partner, device, writer, step,
              config: TrainConfig) -> float:
    """Mean foreground Dice of the student on the validation volumes (eval mode), plus the
    per-region accuracy of its prediction: the evidence that regions separate good from bad."""
    from .infer import Predictor
    from .metrics import case_metrics

    predictor = Predictor(student, meta, device, partner=partner)
    try:
        dices, acc = [], {"disregarded": [0, 0], "consistent": [0, 0], "inconsistent": [0, 0]}
        probs, labels, valids = [], [], []
        for case in val:
            pred = predictor.predict(case.image, regions=True, keep_probabilities=config.tau_auto)
            valid = case.label != meta["config"]["ignore_index"]
            if config.tau_auto:
                probs.append(torch.from_numpy(pred.probabilities).flatten(1))
                labels.append(torch.from_numpy(case.label).flatten())
                valids.append(torch.from_numpy(valid).flatten())
            rows = case_metrics(np.where(valid, pred.label, 0), np.where(valid, case.label, 0),
                                spacing=case.spacing, num_classes=meta["num_classes"], name=case.name)
            dices.append(float(np.mean([r.dice for r in rows])))
            correct = (pred.label == case.label) & valid
            for code, name in ((1, "disregarded"), (2, "consistent"), (3, "inconsistent")):
                m = (pred.regions == code) & valid
                acc[name][0] += int((correct & m).sum())
                acc[name][1] += int(m.sum())
        dice = float(np.mean(dices))
        if config.tau_auto:
            tau = S.calibrate_tau(torch.cat(probs, 1), torch.cat(labels), torch.cat(valids),
                                  error_rate=config.tau_error_rate, default=config.tau)
            config.tau = tau
            meta["tau"] = tau
            meta["config"]["tau"] = tau
            writer.emit(EventKind.REGIONS, step, scope="tau", tau=tau, error_rate=config.tau_error_rate)
        writer.emit(EventKind.VALIDATION, step, dice=dice, per_case=dict(zip([c.name for c in val], dices)))
        total = sum(v[1] for v in acc.values()) or 1
        writer.emit(EventKind.REGIONS, step, scope="validation",
                    **{k: v[1] / total for k, v in acc.items()},
                    **{f"accuracy_{k}": (v[0] / v[1] if v[1] else None) for k, v in acc.items()})
        return dice
    finally:
        student.train()


def _share_cpu_threads() -> None:
    """One intra-op thread per CPU this process may use (containers and taskset limit it below
    os.cpu_count()), shared among the ranks of this node under torchrun. OMP_NUM_THREADS wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        usable = os.cpu_count() or 1
    per_rank = max(1, usable // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if torch.get_num_threads() != per_rank:
        torch.set_num_threads(per_rank)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _signals_to_main_thread():
    """Block SIGINT/SIGTERM while the process group starts its communication threads, which
    inherit the mask: a stop signal then always lands on the main thread (where Python runs the
    handler) and never interrupts a system call inside a gloo/NCCL thread. Main thread, POSIX only;
    a signal that arrives meanwhile stays pending and is delivered when the mask is restored."""
    if not hasattr(signal, "pthread_sigmask") or not _on_main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _barrier(device: torch.device) -> None:
    import torch.distributed as dist

    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def _any_rank(flag: bool, distributed: bool, device: torch.device) -> bool:
    """``flag`` OR-ed over the ranks (one tiny all-reduce), so every rank takes the same branch."""
    if not distributed:
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _batch_source(batches: TwoStreamBatches, config: TrainConfig, rank: int, world: int,
                  device: torch.device, start_step: int):
    """The training batches: drawn in this process (``workers=0``, deterministic for a seed) or by
    ``config.workers`` DataLoader processes, each with its own generator seeded from (seed, rank,
    worker, start step), batches pinned for non-blocking copies on CUDA."""
    if config.workers <= 0:
        return batches
    from torch.utils.data import DataLoader

    from .data import BatchStream

    stream = BatchStream(batches, seed=config.seed, rank=rank, start_step=start_step)
    loader = DataLoader(stream, batch_size=None, num_workers=config.workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4, persistent_workers=True)
    return iter(loader)


def configure_backends(device: torch.device, config: TrainConfig) -> None:
    """Backend switches for a run on ``device``; the step benchmark calls it too, so both time the same thing."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(config.cudnn_benchmark)


def _amp_dtype(mode: str, device: torch.device):
    if mode == "off" or device.type != "cuda":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:  # pragma: no cover - non-POSIX
        return 0.0


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[f"optim.momentum.{i}"] = buf
    return out


def _load_momentum(optimizer: torch.optim.Optimizer, ckpt, prefix: str) -> None:
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        buf = ckpt.tensors.get(f"{prefix}.{i}")
        if buf is not None:
            optimizer.state[p]["momentum_buffer"] = buf.to(p.device).clone()


def _json_rng(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _restore(run_dir: Path, config: TrainConfig, student, teacher, optimizer, rng, gen, num_classes, patch,
             anchor: LabelAnchor | None = None) -> tuple[int, float | None]:
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    meta = ckpt.meta
    old = meta.get("config", {})
    check_resumable(old, ckpt.path)
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
    student.load_state_dict(ckpt.state_dict("student"))
    teacher.load_state_dict(ckpt.state_dict("teacher"))
    _load_momentum(optimizer, ckpt, "optim.momentum")
    if anchor is not None:
        anchor.load(ckpt)
    if "rng_numpy" in meta:
        rng.bit_generator.state = meta["rng_numpy"]
    if "rng.torch" in ckpt.tensors:
        torch.random.set_rng_state(ckpt.tensors["rng.torch"])
    if "rng.noise" in ckpt.tensors:
        gen.set_state(ckpt.tensors["rng.noise"])
    return int(meta.get("step", 0)), meta.get("best_dice")
