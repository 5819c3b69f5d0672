"""Memory needed by a training step or a whole-volume prediction, checked before starting.

The point is to refuse a job that cannot fit with a one-line message that names a smaller
setting that does, instead of letting the OS kill the process (or CUDA fail) minutes later.

Training (per student sample and input voxel, float32): the V-Net keeps about ``36 F``
floats of activations, gradients and oneDNN work buffers (F = base filters), measured on
CPU as the peak RSS increase of one step: 34-41 F over patch 32-64^3, batch 2-4, F 4-8
(tests/core/test_memory.py re-measures one setting). SGRS forwards the student on
``labeled + 2 x unlabeled`` patches (X, U, U_mix); mean teacher on ``batch``; supervised on
``batch``. Parameters are held ~6 times (weights, gradients, momentum, teacher, the
checkpoint's serialised copy). The normalised copies of the training volumes and ~96 MiB that
torch loads on first use (optimizer, oneDNN kernels) come on top.

Inference: the sliding window keeps ``n_outputs`` (1, or 2 with regions) probability maps
of ``K x volume`` plus the weight map, the padded normalised volume and its raw copy, then
the argmax and foreground maps; a window batch adds a no-grad forward.
"""

from __future__ import annotations

import math
from typing import Sequence

from .errors import ResourceError
from .settings import SGRS_METHODS

BYTES_PER_FLOAT = 4
ACTIVATION_FLOATS_PER_FILTER = 36     # per student-sample voxel, times base filters (measured, see above)
LOSS_FLOATS_PER_CLASS = 8             # logits, softmax, loss gradients per class and voxel
VNET_PARAMS_AT_16 = 9_448_866         # V-Net parameters with 16 base filters, 2 classes
PARAM_COPIES = 6                      # weights, grads, momentum, teacher, checkpoint bytes (+ slack)
DATA_BYTES_PER_VOXEL = 12             # normalised float32 image + int64 label of each training volume
RUNTIME_BYTES = 256 * 2**20           # torch on first use (oneDNN kernels, allocator caches): measured 0.1-0.6 GiB on CPU
HEADROOM = 0.9                        # refuse above 90% of what is free: the OS and others need some


def student_samples(batch: int, labeled_batch: int | None, method: str) -> int:
    """Patches the student forwards per step (either SGRS method: X, U and U_mix)."""
    if method not in SGRS_METHODS:
        return batch
    labeled = labeled_batch if labeled_batch is not None else batch // 2
    return labeled + 2 * (batch - labeled)


def _param_bytes(base_filters: int) -> int:
    return int(VNET_PARAMS_AT_16 * (base_filters / 16) ** 2 * BYTES_PER_FLOAT * PARAM_COPIES)


def estimate_training_memory(patch: Sequence[int], batch: int, base_filters: int, num_classes: int = 2,
                             method: str = "sgrs", labeled_batch: int | None = None,
                             data_voxels: int = 0) -> int:
    """Peak bytes one training step adds to the process (not counting torch itself).

    patch: (D, H, W) voxels; batch: patches per step; data_voxels: total voxels of the training
    volumes (their normalised copies are held in memory for the whole run).
    """
    vox = math.prod(int(p) for p in patch)
    per_voxel = ACTIVATION_FLOATS_PER_FILTER * base_filters + LOSS_FLOATS_PER_CLASS * num_classes
    samples = student_samples(batch, labeled_batch, method)
    return int(samples * vox * per_voxel * BYTES_PER_FLOAT + _param_bytes(base_filters)
               + DATA_BYTES_PER_VOXEL * data_voxels + RUNTIME_BYTES)


def estimate_inference_memory(volume_shape: Sequence[int], patch: Sequence[int], num_classes: int,
                              regions: bool = False, base_filters: int = 16, sw_batch_size: int = 4) -> int:
    """Peak bytes of predicting one (D, H, W) volume with the sliding window.

    ``(1 + n_outputs) x K`` volume-sized float32 maps (the averaged probabilities, the argmax
    and region temporaries), the padded normalised volume, its raw copy and the weight map,
    plus one window batch forwarded without gradients.
    """
    padded = math.prod(max(int(s), int(p)) for s, p in zip(volume_shape, patch))
    n_outputs = 2 if regions else 1
    maps = (1 + n_outputs) * num_classes + 4           # probability sums (+ temporaries), volume copies, norm
    windows = sw_batch_size * n_outputs * math.prod(int(p) for p in patch)
    forward = windows * (8 * base_filters + 2 * num_classes)  # no-grad: a few live activations at a time
    return int((padded * maps + forward) * BYTES_PER_FLOAT + VNET_PARAMS_AT_16 * (base_filters / 16) ** 2 * 4)


def available_bytes(device=None) -> int | None:
    """Free memory on ``device`` (a torch.device or its type name): CUDA free memory, else the
    kernel's MemAvailable. None when it cannot be known (the check is then skipped)."""
    kind = getattr(device, "type", device) or "cpu"
    if kind == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if kind == "mps":
        return None
    return host_available_bytes()


def host_available_bytes() -> int | None:
    """Free host memory (the kernel's MemAvailable), which reading files always uses, whatever the
    compute device. None when it cannot be known (the check is then skipped)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _smaller_training_setting(patch, batch, labeled_batch, base_filters, num_classes, method, data_voxels,
                              limit) -> str | None:
    """The first setting that fits, trying in turn: fewer patches per step, smaller patches,
    fewer filters. Returned as the command-line flags to use."""
    min_batch = 1 if method == "supervised" else 2
    patch = [int(p) for p in patch]
    lab = labeled_batch if labeled_batch is not None else batch // 2
    filters = base_filters
    changed: set[str] = set()

    def fits() -> bool:
        return estimate_training_memory(patch, batch, filters, num_classes, method, lab, data_voxels) <= limit

    while True:
        if fits():
            break
        if batch > min_batch:
            batch = max(min_batch, batch // 2)
            lab = max(1, min(lab, batch - 1)) if method != "supervised" else lab
            changed.add("batch")
        elif max(patch) > 16:
            i = patch.index(max(patch))
            patch[i] = max(16, (patch[i] // 2) // 16 * 16)
            changed.add("patch")
        elif filters > 2:
            filters = max(2, filters // 2)
            changed.add("filters")
        else:
            return None
    flags = []
    if "patch" in changed:
        flags.append("--patch-size " + " ".join(map(str, patch)))
    if "batch" in changed:
        flags.append(f"--batch-size {batch}")
        if method != "supervised":
            flags.append(f"--labeled-batch-size {lab}")
    if "filters" in changed:
        flags.append(f"--base-filters {filters}")
    return " ".join(flags)


def check_memory(config, patch: Sequence[int], num_classes: int, device, *, data_voxels: int = 0,
                 available: int | None = None) -> int:
    """Refuse a training whose step would not fit; returns the estimate in bytes.

    config: a TrainConfig (batch_size, labeled_batch_size, base_filters, method).
    Raises ResourceError naming the estimate, what is free and a setting that fits.
    """
    need = estimate_training_memory(patch, config.batch_size, config.base_filters, num_classes, config.method,
                                    config.labeled_batch_size, data_voxels)
    avail = available if available is not None else available_bytes(device)
    if avail is None or need <= HEADROOM * avail:
        return need
    smaller = _smaller_training_setting(patch, config.batch_size, config.labeled_batch_size, config.base_filters,
                                        num_classes, config.method, data_voxels, HEADROOM * avail)
    fix = (f"use {smaller}" if smaller else
           "even the smallest setting does not fit: free memory or use a machine with more")
    raise ResourceError(
        f"training with patch {'x'.join(map(str, patch))}, batch {config.batch_size} and "
        f"{config.base_filters} base filters needs about {_gib(need)} but only {_gib(avail)} is free on "
        f"{getattr(device, 'type', device)}; {fix}")


def check_inference_memory(volume_shape: Sequence[int], patch: Sequence[int], num_classes: int, device, *,
                           regions: bool = False, base_filters: int = 16, sw_batch_size: int = 4,
                           name: str = "the volume", available: int | None = None) -> int:
    """Refuse a prediction that would not fit; returns the estimate in bytes."""
    need = estimate_inference_memory(volume_shape, patch, num_classes, regions, base_filters, sw_batch_size)
    avail = available if available is not None else available_bytes(device)
    if avail is None or need <= HEADROOM * avail:
        return need
    hint = ("predict without --regions (about "
            f"{_gib(estimate_inference_memory(volume_shape, patch, num_classes, False, base_filters, 1))}), "
            if regions else "")
    shape = "x".join(map(str, volume_shape))
    raise ResourceError(
        f"predicting {name} ({shape} voxels, {num_classes} classes) needs about {_gib(need)} but only "
        f"{_gib(avail)} is free on {getattr(device, 'type', device)}; {hint}use --sw-batch-size 1, crop or "
        f"resample the volume, or use a machine with more memory")
