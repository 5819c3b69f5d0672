"""Training on several processes (``torchrun``): the rank variables, the process group, and the
few collectives the trainer needs so that every rank takes the same branch.

Without torchrun (``WORLD_SIZE`` unset or 1) nothing here starts a process group; the helpers that
take ``distributed`` then answer for this process alone.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError

#: Rank 0 validates and checkpoints while the others wait in the next collective: a generous
#: timeout keeps a long validation from killing the run.
GROUP_TIMEOUT = datetime.timedelta(minutes=60)


def rank_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def start_group(device: torch.device, local_rank: int, sync_bn: bool) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo elsewhere) and return this rank's device.
    ``--sync-bn`` off CUDA is refused before any group exists."""
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if sync_bn and device.type != "cuda":
        raise ConfigError(f"--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on "
                          f"{device.type}); drop --sync-bn on CPU")
    if not dist.is_initialized():
        with signals_to_main_thread():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=GROUP_TIMEOUT)
    return device


def stop_group() -> None:
    dist.destroy_process_group()


@contextlib.contextmanager
def signals_to_main_thread():
    """Block SIGINT/SIGTERM while the process group starts its communication threads, which
    inherit the mask: a stop signal then always lands on the main thread (where Python runs the
    handler) and never interrupts a system call inside a gloo/NCCL thread. Main thread, POSIX only;
    a signal that arrives meanwhile stays pending and is delivered when the mask is restored."""
    if not hasattr(signal, "pthread_sigmask") or not on_main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def barrier(device: torch.device) -> None:
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def any_rank(flag: bool, distributed: bool, device: torch.device) -> bool:
    """``flag`` OR-ed over the ranks (one tiny all-reduce), so every rank takes the same branch."""
    if not distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_float(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t)


def gather_objects(obj: Any, world: int) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """Wrap for DistributedDataParallel. A 1x1x1 kernel is contiguous and channels-last at once;
    channels_last gives it strides that the autograd gradient does not have, and DDP then warns
    ("grad strides do not match bucket view strides") and copies that gradient every step. Plain
    strides match it."""
    for p in module.parameters():
        if p.dim() == 5 and tuple(p.shape[2:]) == (1, 1, 1):
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)
