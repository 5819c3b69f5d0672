"""Checkpoints that load without running code, written atomically.

A checkpoint is one safetensors file: tensors ``student.*``, ``teacher.*``, ``optim.*`` and
``rng.*``, plus a JSON string in the file's metadata (step, settings, class count...). It is
written to a temporary file beside the target, fsynced, then renamed over the target, so a kill
at any moment leaves either the old or the new checkpoint, never a torn one. Pickle files are
never unpickled freely: a ``.pt``/``.pth`` import goes through
``torch.load(weights_only=True)``, which refuses objects that would run code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .errors import CheckpointError, ResourceError, SGRSError
from . import memory  # as a module: its free-memory probe is replaced in tests
from .network import build_model

# the one atomic writer (torch-free, shared with the CLI's output rules); re-exported here for callers
from .outputs import atomic_write_bytes, file_sha256, remove_stale_temp_files  # noqa: E402,F401
from .runfolder import RunFolder
from .vnet import MAX_BASE_FILTERS

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path
    sha256: str

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Atomically write a checkpoint; returns its sha256 (hex)."""
    meta = dict(meta, format_version=FORMAT_VERSION)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = save(flat, metadata={"sgrs": json.dumps(meta)})
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a checkpoint without executing anything it contains.

    Accepts our safetensors files, and ``.pt``/``.pth`` state dicts through
    ``torch.load(weights_only=True)``. Anything else, or a file that tries to run code, raises
    CheckpointError with the path and what to do. A run folder gives its last checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = RunFolder(path).last
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there; train first (sgrs train --out RUN) "
                              f"or pass the run folder that holds {RunFolder.relative('last')}")
    _check_fits_in_memory(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror})") from exc
    digest = hashlib.sha256(data).hexdigest()
    if path.suffix in (".pt", ".pth"):
        return _load_pickle_weights_only(path, digest)
    try:
        tensors = load(data)
        # metadata is in the header; safe_open parses only the JSON header, never code.
        with safetensors.safe_open(str(path), framework="pt") as fh:
            raw_meta = (fh.metadata() or {}).get("sgrs")
    except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
        head = data[:2]
        hint = (" It looks like a pickle (torch.save) file, which could run code when loaded:"
                " it is refused." if head[:1] == b"\x80" or data[:2] == b"PK" else "")
        raise CheckpointError(f"{path}: not a valid safetensors checkpoint ({exc}).{hint} "
                              f"Use a checkpoint written by sgrs train") from exc
    if raw_meta is None:
        raise CheckpointError(f"{path}: safetensors file without sgrs metadata; it was not written by "
                              f"sgrs train, use a run folder's {RunFolder.relative('last')}")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt metadata in checkpoint ({exc})") from exc
    _check_meta(path, meta, tensors)
    return Checkpoint(tensors=tensors, meta=meta, path=path, sha256=digest)


def _check_fits_in_memory(path: Path) -> None:
    """Loading holds the file's bytes and the tensors made from them: refuse before reading."""
    size = path.stat().st_size
    free = memory.host_available_bytes()
    if free is not None and 2 * size > memory.HEADROOM * free:
        gib = memory._gib
        raise ResourceError(f"{path}: loading this {gib(size)} checkpoint needs about {gib(2 * size)} of memory "
                            f"but only {gib(free)} is free; free memory or use a machine with more")


def _check_meta(path: Path, meta: Any, tensors: dict[str, torch.Tensor]) -> None:
    """The metadata sizes the network that is built before the weights are loaded: a header that
    lies (a billion classes, a text where a number goes) must fail here, not allocate or crash."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid sgrs checkpoint: {what}; use a checkpoint written by sgrs train")

    if not isinstance(meta, dict):
        raise bad("its metadata is not a JSON object")
    config = meta.get("config", {})
    if not isinstance(config, dict):
        raise bad("its settings are not a JSON object")
    k, f = meta.get("num_classes"), config.get("base_filters")
    head = tensors.get("student.head.weight")
    if k is not None and (type(k) is not int or not 2 <= k <= 255):
        raise bad(f"num_classes {k!r} is not an integer in 2..255")
    if f is not None and (type(f) is not int or not 1 <= f <= MAX_BASE_FILTERS):
        raise bad(f"base_filters {f!r} is not an integer in 1..{MAX_BASE_FILTERS}")
    if head is not None and k is not None and f is not None and tuple(head.shape[:2]) != (k, f):
        raise bad(f"the metadata says {k} classes and {f} filters but the weights hold "
                  f"{head.shape[0]} and {head.shape[1]}")
    patch = config.get("patch_size", meta.get("patch_size"))
    if patch is not None and not (isinstance(patch, list) and len(patch) == 3
                                  and all(type(p) is int and 16 <= p <= 4096 and p % 16 == 0 for p in patch)):
        raise bad(f"patch_size {patch!r} is not 3 multiples of 16")
    window = config.get("ct_window")  # read back as a pair by Predictor
    if "ct_window" in config and not (isinstance(window, list) and len(window) == 2
                                      and all(type(w) in (int, float) and math.isfinite(w) for w in window)):
        raise bad(f"ct_window {window!r} is not 2 numbers")
    tau = meta.get("tau")
    if tau is not None and not (type(tau) in (int, float) and 0 < tau < float("inf")):
        raise bad(f"tau {tau!r} is not a positive number")
    partner = tensors.get("partner.image")
    if partner is not None and patch is not None and list(partner.shape) != patch:
        raise bad(f"its partner patch has shape {list(partner.shape)}, not the patch size {patch}")
    for key in ("rng.torch", "rng.noise"):
        state = tensors.get(key)
        if state is not None and (state.dtype != torch.uint8 or state.dim() != 1 or state.numel() > 1 << 20):
            raise bad(f"{key} is not a random generator state")
    if k is not None:
        _check_shapes(config, k, tensors, bad)


# Tensor name prefixes of whole networks (state dicts), and of momentum buffers (optim.momentum.<i>
# is the buffer of the network's i-th parameter). A checkpoint written before the label-only anchor
# was removed also holds anchor.*, anchor_ema.* and anchor_optim.momentum.*: nothing reads them, so
# they are left unchecked and the file still predicts.
_NETWORKS = ("student", "teacher")
_MOMENTA = ("optim.momentum.",)


def _check_shapes(config: dict, num_classes: int, tensors: dict[str, torch.Tensor], bad) -> None:
    """Every weight must have the shape of the network that the metadata describes.

    That network is built on torch's meta device, which allocates nothing, so metadata asking
    for a huge network costs a few Python objects here instead of gigabytes later; a real
    network is built only once every tensor matches it (and then has the file's size).
    """
    try:
        with torch.device("meta"):
            net = build_model(config, num_classes)
    except (TypeError, ValueError, SGRSError) as exc:
        raise bad(f"its settings do not describe a network ({exc})") from exc
    expected = {name: tuple(t.shape) for name, t in net.state_dict().items()}
    params = [tuple(p.shape) for p in net.parameters()]
    size = f"{num_classes} classes, {net.base_filters} base filters, {sum(math.prod(p) for p in params):,} parameters"
    for prefix in _NETWORKS:
        got = {name[len(prefix) + 1:]: tuple(t.shape) for name, t in tensors.items() if name.startswith(prefix + ".")}
        if not got:
            continue
        for name, shape in got.items():
            if name not in expected:
                raise bad(f"{prefix}.{name} is not a weight of the network its metadata describes ({size})")
            if shape != expected[name]:
                raise bad(f"{prefix}.{name} has shape {list(shape)} but the network its metadata describes "
                          f"({size}) needs {list(expected[name])}")
        missing = sorted(expected.keys() - got.keys())
        if missing:
            raise bad(f"{prefix} lacks {len(missing)} weights of the network its metadata describes ({size}), "
                      f"e.g. {missing[0]}")
    for name, t in tensors.items():
        for prefix in _MOMENTA:
            if name.startswith(prefix):
                index = name[len(prefix):]
                if not (index.isdigit() and int(index) < len(params) and tuple(t.shape) == params[int(index)]):
                    raise bad(f"{name} has shape {list(t.shape)}, which matches no parameter of the network "
                              f"its metadata describes ({size})")


def _load_pickle_weights_only(path: Path, digest: str) -> Checkpoint:
    try:
        with warnings.catch_warnings():
            # torch notes any pickle protocol but its own (2); the file is taken as plain tensors or
            # refused below in one line, and the note would print ahead of that line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{path}: refused: this pickle checkpoint holds objects that would run code when loaded "
            f"(or is corrupt); only plain tensor state dicts are accepted") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    tensors = {k if k.startswith(("student.", "teacher.")) else "student." + k: v for k, v in obj.items()}
    return Checkpoint(tensors=tensors, meta={}, path=path, sha256=digest)
