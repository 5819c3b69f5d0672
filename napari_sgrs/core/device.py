"""The compute device, shared by training and inference: which device, its backend switches,
mixed precision, and how much memory a run has used.

Neither :mod:`.train` nor :mod:`.infer` owns these, so the two import this module and not each other.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from .errors import ConfigError

try:  # POSIX only: the peak resident memory of a CPU run
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None


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


def configure_backends(device: torch.device, config: Any) -> None:
    """Backend switches for a run on ``device``; training, inference and the step benchmark call it,
    so all three time the same thing. ``config``: a TrainConfig, or the settings a checkpoint saved
    (a dict; a run saved before ``cudnn_benchmark`` existed autotuned)."""
    benchmark = config.get("cudnn_benchmark", True) if isinstance(config, Mapping) else config.cudnn_benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(benchmark)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device``; None: full float32 (always on CPU and MPS)."""
    if mode == "off" or device.type != "cuda":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def peak_memory_mb(device: torch.device) -> float:
    """The most memory this process has held: CUDA tensors on a GPU, resident memory on a CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if resource is None:  # pragma: no cover - Windows
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def share_cpu_threads() -> None:
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
