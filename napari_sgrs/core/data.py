"""Intensity normalisation, padding, random patches and the two-stream (labeled + unlabeled) batches.

Arrays are (D, H, W); batches are tensors ``image (B, 1, D, H, W)`` float32 and
``label (B, D, H, W)`` int64 where voxels equal to ``ignore_index`` carry no label.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.data

from .errors import ConfigError, InputError, InputWarning


_SLAB_VOXELS = 1 << 22  # float64 work buffers of normalise: 32 MiB at a time, not a volume copy


def _slabs(shape: tuple[int, ...]) -> list[slice]:
    step = max(1, _SLAB_VOXELS // max(1, math.prod(shape[1:])))
    return [slice(i, i + step) for i in range(0, shape[0], step)]


def normalise(image: np.ndarray, mode: str = "zscore", ct_window: tuple[float, float] = (-160.0, 240.0)
              ) -> np.ndarray:
    """Per-volume intensity normalisation -> float32, finite everywhere.

    ``zscore``: (x - mean) / std over the volume (MRI). ``ct``: clip to the window in HU and map
    it linearly to [-1, 1], so the same tissue gets the same value in every scan. ``none``: as is.

    NaN voxels (no data, e.g. outside the field of view; :func:`nan_mask`) are left out of the
    statistics and get the lowest normalised value, as if they were the darkest background.
    Statistics are computed in float64 on the volume scaled by its largest magnitude, so values
    near the float32 maximum (3.4e38), whose squares overflow float32, give finite results.

    Raises:
        InputError: Inf voxels, or (``none``) values beyond the float32 range.
    """
    if mode not in ("zscore", "ct", "none"):
        raise ConfigError(f"unknown normalisation {mode!r}: use zscore, ct or none")
    if mode == "ct" and not ct_window[1] > ct_window[0]:
        raise ConfigError(f"CT window must be (low, high) with high > low, got {ct_window}")
    x = np.asarray(image)
    missing = nan_mask(x)
    slabs = _slabs(x.shape) if x.ndim else [slice(None)]

    def finite_values(sl: slice) -> np.ndarray:
        v = x[sl].astype(np.float64)
        return v if missing is None else v[~missing[sl]]

    count, low, high = 0, math.inf, -math.inf
    for sl in slabs:
        v = finite_values(sl)
        if v.size:
            if not np.isfinite(v).all():
                raise InputError(f"the image holds {int(np.isinf(x).sum())} Inf voxels - fix them before use")
            count += v.size
            low, high = min(low, float(v.min())), max(high, float(v.max()))
    peak = max(abs(low), abs(high)) if count else 0.0
    out = np.empty(x.shape, np.float32)
    if mode == "ct":
        lo, hi = ct_window
        for sl in slabs:
            out[sl] = (np.clip(x[sl].astype(np.float64), lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
        fill = -1.0
    elif mode == "none":
        if peak > np.finfo(np.float32).max:
            raise InputError(f"the image holds values up to {peak:.3g}, beyond float32: use normalization zscore")
        for sl in slabs:
            out[sl] = x[sl]
        fill = low if count else 0.0
    else:
        scale = peak if peak > 0 else 1.0
        mean = sum(float((finite_values(sl) / scale).sum()) for sl in slabs) / max(count, 1)
        var = sum(float(np.square(finite_values(sl) / scale - mean).sum()) for sl in slabs) / max(count, 1)
        # the old float32 rule: a spread under 1e-8 (raw units) is a constant volume, divided by 1
        std = math.sqrt(var) if math.sqrt(var) * scale > 1e-8 else 1.0 / scale
        for sl in slabs:
            out[sl] = (x[sl].astype(np.float64) / scale - mean) / std
        fill = (low / scale - mean) / std if count else 0.0
    if missing is not None:
        out[missing] = fill
    return out


def nan_mask(image: np.ndarray) -> np.ndarray | None:
    """Where a float image is NaN - voxels without data, e.g. outside the field of view after
    resampling (``read_volume(..., nan="keep")``) - or None when it has no NaN voxel."""
    if not np.issubdtype(np.asarray(image).dtype, np.floating):
        return None
    mask = np.isnan(image)
    return mask if mask.any() else None


def mask_outside_view(name: str, image: np.ndarray, label: np.ndarray | None, ignore_index: int) -> None:
    """Training on an image with NaN voxels (no data): their label, if any, becomes ``ignore_index``
    (in place) so no loss is computed there; :func:`normalise` gives their image value. Warns in
    one line (:class:`~napari_sgrs.core.errors.InputWarning`) naming the file."""
    missing = nan_mask(image)
    if missing is None:
        return
    if label is not None:
        label[missing] = ignore_index
    share = 100.0 * missing.sum() / missing.size
    warnings.warn(InputWarning(f"{name}: {int(missing.sum())} voxels ({share:.1f}%) are NaN (no data, e.g. outside "
                               f"the field of view); training ignores them"), stacklevel=2)


def pad_to(array: np.ndarray, shape: tuple[int, ...], value: float) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad (symmetrically) so every axis is at least ``shape``; returns the array and the slices
    that recover the original region."""
    pads, region = [], []
    for n, p in zip(array.shape, shape):
        total = max(p - n, 0)
        before = total // 2
        pads.append((before, total - before))
        region.append(slice(before, before + n))
    if any(a or b for a, b in pads):
        array = np.pad(array, pads, mode="constant", constant_values=value)
    return array, tuple(region)


@dataclass
class Sample:
    """One in-memory training volume (normalised image, labels or None)."""

    name: str
    image: np.ndarray          # (D, H, W) float32, normalised and padded to >= patch
    label: np.ndarray | None   # (D, H, W) uint8/int64, padded with ignore_index
    foreground: np.ndarray | None = None  # (N, 3) coordinates of labeled foreground voxels


def make_sample(name: str, image: np.ndarray, label: np.ndarray | None, patch: tuple[int, int, int],
                ignore_index: int) -> Sample:
    image, _ = pad_to(image, patch, 0.0)  # 0 is the mean after z-score normalisation
    fg = None
    if label is not None:
        label, _ = pad_to(label, patch, ignore_index)  # padding is unannotated, not background
        # A sparse subset of foreground voxels is enough to centre patches on the target.
        coords = np.argwhere((label > 0) & (label != ignore_index))
        if len(coords) > 10000:
            coords = coords[np.linspace(0, len(coords) - 1, 10000).astype(int)]
        fg = coords if len(coords) else None
    return Sample(name=name, image=image, label=label, foreground=fg)


class PatchSampler:
    """Random patches with flips and axial 90-degree rotations, from a numpy Generator.

    ``foreground_fraction`` of labeled patches are centred on a labeled foreground voxel
    (nnU-Net's oversampling), so small targets are seen often enough. ``flips``: all (each axis
    with probability 1/2) or one-in-plane (the authors' RandomRotFlip: always one of H, W).
    """

    def __init__(self, patch: tuple[int, int, int], rng: np.random.Generator, augment: bool = True,
                 foreground_fraction: float = 0.33, flips: str = "all"):
        self.patch = tuple(int(p) for p in patch)
        self.rng = rng
        self.augment = augment
        self.foreground_fraction = foreground_fraction
        self.flips = flips

    def _corner(self, sample: Sample, labeled: bool) -> tuple[int, int, int]:
        shape = sample.image.shape
        if labeled and sample.foreground is not None and self.rng.random() < self.foreground_fraction:
            centre = sample.foreground[self.rng.integers(len(sample.foreground))]
            return tuple(int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, self.patch, shape))
        return tuple(int(self.rng.integers(0, s - p + 1)) for s, p in zip(shape, self.patch))

    def draw(self, sample: Sample, labeled: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """An image patch and, for a labeled draw, its label patch under the same crop, flips and
        rotation (None for an unlabeled draw)."""
        z, y, x = self._corner(sample, labeled)
        d, h, w = self.patch
        img = sample.image[z:z + d, y:y + h, x:x + w]
        lab = sample.label[z:z + d, y:y + h, x:x + w] if labeled else None
        if self.augment:
            if h == w:
                k = int(self.rng.integers(4))
                img = np.rot90(img, k, axes=(1, 2))
                lab = np.rot90(lab, k, axes=(1, 2)) if lab is not None else None
            if self.flips == "one-in-plane":
                axes = [1 + int(self.rng.integers(2))]
            else:
                axes = [axis for axis in range(3) if self.rng.random() < 0.5]
            for axis in axes:
                img = np.flip(img, axis)
                lab = np.flip(lab, axis) if lab is not None else None
        img = np.ascontiguousarray(img, dtype=np.float32)
        lab = np.ascontiguousarray(lab, dtype=np.int64) if lab is not None else None
        return img, lab


class TwoStreamBatches:
    """Infinite iterator of (labeled images, labels, unlabeled images) batches; the unlabeled
    images are None without unlabeled patches.

    Each step draws ``labeled_batch`` patches from labeled volumes and ``unlabeled_batch``
    from unlabeled ones. ``draw`` random: volumes picked uniformly at random with replacement;
    permutation: as the authors' batch sampler, each stream walks through a fresh permutation of
    its volumes, a remainder too short for a batch dropped. With several ranks (torchrun) each
    rank draws from its own share of the volumes.
    """

    def __init__(self, labeled: list[Sample], unlabeled: list[Sample], labeled_batch: int,
                 unlabeled_batch: int, sampler: PatchSampler, rank: int = 0, world: int = 1,
                 draw: str = "random"):
        if not labeled:
            raise ConfigError("no labeled volume to train on: give at least one image with a label file")
        self.labeled = labeled[rank::world] if len(labeled) >= world else labeled
        self.unlabeled = (unlabeled[rank::world] if len(unlabeled) >= world else unlabeled)
        self.labeled_batch, self.unlabeled_batch = labeled_batch, unlabeled_batch
        self.sampler = sampler
        self.draw = draw
        self._queues: dict[str, list[int]] = {"labeled": [], "unlabeled": []}

    def __iter__(self):
        return self

    def state(self) -> dict[str, list[int]]:
        """What is left of each stream's permutation (``draw`` permutation): saved in checkpoints so
        a resumed run draws the volumes the uninterrupted one would."""
        return {k: [int(i) for i in v] for k, v in self._queues.items()}

    def load_state(self, state: dict[str, list[int]]) -> None:
        for key in self._queues:
            self._queues[key][:] = [int(i) for i in state.get(key, [])]

    def _indices(self, stream: str, n_volumes: int, n: int) -> np.ndarray:
        rng = self.sampler.rng
        if self.draw != "permutation":
            return rng.integers(0, n_volumes, n)
        queue = self._queues[stream]
        if len(queue) < n:  # a new epoch; fewer volumes than a batch: permutations back to back
            queue[:] = np.concatenate([rng.permutation(n_volumes) for _ in range(-(-n // n_volumes))]).tolist()
        out, queue[:] = queue[:n], queue[n:]
        return np.asarray(out)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        imgs, labs = [], []
        for i in self._indices("labeled", len(self.labeled), self.labeled_batch):
            img, lab = self.sampler.draw(self.labeled[i], labeled=True)
            imgs.append(img)
            labs.append(lab)
        x = torch.from_numpy(np.stack(imgs)[:, None])
        y = torch.from_numpy(np.stack(labs))
        u = None
        if self.unlabeled_batch > 0 and self.unlabeled:
            draws = [self.sampler.draw(self.unlabeled[i], labeled=False)[0]
                     for i in self._indices("unlabeled", len(self.unlabeled), self.unlabeled_batch)]
            u = torch.from_numpy(np.stack(draws)[:, None])
        return x, y, u


class BatchStream(torch.utils.data.IterableDataset):
    """The batches of a :class:`TwoStreamBatches` drawn in DataLoader worker processes.

    Each worker draws from the same volumes (this rank's share) with its own numpy Generator
    seeded from (seed, rank, worker id, start step), so workers never repeat each other and a
    resumed run does not replay the first steps' patches. Use with ``DataLoader(batch_size=None)``.
    Unlike ``workers=0`` the order in which workers' batches arrive is not part of the seed's
    guarantee of identical runs.
    """

    def __init__(self, batches: TwoStreamBatches, seed: int, rank: int = 0, start_step: int = 0):
        super().__init__()
        self.batches, self.seed, self.rank, self.start_step = batches, seed, rank, start_step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        src = self.batches
        rng = np.random.default_rng([self.seed, self.rank, worker, self.start_step])
        sampler = PatchSampler(src.sampler.patch, rng, src.sampler.augment, src.sampler.foreground_fraction,
                               src.sampler.flips)
        # src already holds this rank's share of the volumes: rank 0 of world 1 keeps all of it.
        own = TwoStreamBatches(src.labeled, src.unlabeled, src.labeled_batch, src.unlabeled_batch, sampler,
                               draw=src.draw)
        while True:
            yield next(own)


def auto_patch(shapes: list[tuple[int, ...]], limit: tuple[int, int, int] = (80, 112, 112)) -> tuple[int, int, int]:
    """Default patch: the paper's LA patch (80, 112, 112 in D, H, W), shrunk to the median volume
    size rounded up to a multiple of 16 so small volumes are not padded needlessly."""
    med = np.median(np.array(shapes), axis=0)
    return tuple(int(min(lim, max(16, int(np.ceil(m / 16.0)) * 16))) for m, lim in zip(med, limit))
