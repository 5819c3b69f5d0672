"""Intensity normalisation, padding, random patches and the two-stream (labeled + unlabeled) batches.

Arrays are (D, H, W); batches are tensors ``image (B, 1, D, H, W)`` float32 and
``label (B, D, H, W)`` int64 where voxels equal to ``ignore_index`` carry no label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.data

from .errors import ConfigError


def normalise(image: np.ndarray, mode: str = "zscore", ct_window: tuple[float, float] = (-160.0, 240.0)
              ) -> np.ndarray:
    """Per-volume intensity normalisation -> float32.

    ``zscore``: (x - mean) / std over the whole volume (MRI). ``ct``: clip to the window in HU
    and map it linearly to [-1, 1], so the same tissue gets the same value in every scan.
    """
    x = image.astype(np.float32, copy=False)
    if mode == "zscore":
        mean, std = float(x.mean()), float(x.std())
        return ((x - mean) / (std if std > 1e-8 else 1.0)).astype(np.float32)
    if mode == "ct":
        lo, hi = ct_window
        if not hi > lo:
            raise ConfigError(f"CT window must be (low, high) with high > low, got {ct_window}")
        return ((np.clip(x, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0).astype(np.float32)
    if mode == "none":
        return x.astype(np.float32)
    raise ConfigError(f"unknown normalisation {mode!r}: use zscore, ct or none")


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
    # unlabeled volumes under --pseudo-islands background: voxels of the teacher's last whole-volume
    # prediction that lie outside the largest component of a one-piece class (train.sweep_unlabeled)
    islands: np.ndarray | None = None


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
    (nnU-Net's oversampling), so small targets are seen often enough.
    """

    def __init__(self, patch: tuple[int, int, int], rng: np.random.Generator, augment: bool = True,
                 foreground_fraction: float = 0.33):
        self.patch = tuple(int(p) for p in patch)
        self.rng = rng
        self.augment = augment
        self.foreground_fraction = foreground_fraction

    def _corner(self, sample: Sample, labeled: bool) -> tuple[int, int, int]:
        shape = sample.image.shape
        if labeled and sample.foreground is not None and self.rng.random() < self.foreground_fraction:
            centre = sample.foreground[self.rng.integers(len(sample.foreground))]
            return tuple(int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, self.patch, shape))
        return tuple(int(self.rng.integers(0, s - p + 1)) for s, p in zip(shape, self.patch))

    def draw(self, sample: Sample, labeled: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """An image patch and its companion under the same crop, flips and rotation: the label
        patch for a labeled draw; for an unlabeled one the island mask when the sample has one
        (bool), else None."""
        z, y, x = self._corner(sample, labeled)
        d, h, w = self.patch
        img = sample.image[z:z + d, y:y + h, x:x + w]
        companion = sample.label if labeled else sample.islands
        lab = companion[z:z + d, y:y + h, x:x + w] if companion is not None else None
        if self.augment:
            if h == w:
                k = int(self.rng.integers(4))
                img = np.rot90(img, k, axes=(1, 2))
                lab = np.rot90(lab, k, axes=(1, 2)) if lab is not None else None
            for axis in range(3):
                if self.rng.random() < 0.5:
                    img = np.flip(img, axis)
                    lab = np.flip(lab, axis) if lab is not None else None
        img = np.ascontiguousarray(img, dtype=np.float32)
        lab = np.ascontiguousarray(lab, dtype=np.int64 if labeled else bool) if lab is not None else None
        return img, lab


class TwoStreamBatches:
    """Infinite iterator of (labeled images, labels, unlabeled images, unlabeled island masks)
    batches; the last two are None without unlabeled patches, the masks (bool) also when no
    unlabeled volume has one (a volume without a mask gives an all-False one).

    Each step draws ``labeled_batch`` patches from labeled volumes and ``unlabeled_batch``
    from unlabeled ones, volumes picked uniformly at random with replacement. With several
    ranks (torchrun) each rank draws from its own share of the volumes.
    """

    def __init__(self, labeled: list[Sample], unlabeled: list[Sample], labeled_batch: int,
                 unlabeled_batch: int, sampler: PatchSampler, rank: int = 0, world: int = 1):
        if not labeled:
            raise ConfigError("no labeled volume to train on: give at least one image with a label file")
        self.labeled = labeled[rank::world] if len(labeled) >= world else labeled
        self.unlabeled = (unlabeled[rank::world] if len(unlabeled) >= world else unlabeled)
        self.labeled_batch, self.unlabeled_batch = labeled_batch, unlabeled_batch
        self.sampler = sampler

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        rng = self.sampler.rng
        imgs, labs = [], []
        for i in rng.integers(0, len(self.labeled), self.labeled_batch):
            img, lab = self.sampler.draw(self.labeled[i], labeled=True)
            imgs.append(img)
            labs.append(lab)
        x = torch.from_numpy(np.stack(imgs)[:, None])
        y = torch.from_numpy(np.stack(labs))
        u = masks = None
        if self.unlabeled_batch > 0 and self.unlabeled:
            draws = [self.sampler.draw(self.unlabeled[i], labeled=False)
                     for i in rng.integers(0, len(self.unlabeled), self.unlabeled_batch)]
            u = torch.from_numpy(np.stack([img for img, _ in draws])[:, None])
            if any(m is not None for _, m in draws):
                masks = torch.from_numpy(np.stack([m if m is not None else np.zeros(img.shape, bool)
                                                   for img, m in draws]))
        return x, y, u, masks


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
        sampler = PatchSampler(src.sampler.patch, rng, src.sampler.augment, src.sampler.foreground_fraction)
        # src already holds this rank's share of the volumes: rank 0 of world 1 keeps all of it.
        own = TwoStreamBatches(src.labeled, src.unlabeled, src.labeled_batch, src.unlabeled_batch, sampler)
        while True:
            yield next(own)


def auto_patch(shapes: list[tuple[int, ...]], limit: tuple[int, int, int] = (80, 112, 112)) -> tuple[int, int, int]:
    """Default patch: the paper's LA patch (80, 112, 112 in D, H, W), shrunk to the median volume
    size rounded up to a multiple of 16 so small volumes are not padded needlessly."""
    med = np.median(np.array(shapes), axis=0)
    return tuple(int(min(lim, max(16, int(np.ceil(m / 16.0)) * 16))) for m, lim in zip(med, limit))


def check_patch(patch: tuple[int, ...]) -> tuple[int, int, int]:
    if len(patch) != 3:
        raise ConfigError(f"patch size needs 3 numbers (D H W), got {list(patch)}")
    bad = [p for p in patch if p <= 0 or p % 16]
    if bad:
        raise ConfigError(f"patch size must be positive multiples of 16 in every axis (V-Net downsamples "
                          f"4 times), got {list(patch)}; try {[max(16, round(p / 16) * 16) for p in patch]}")
    return tuple(int(p) for p in patch)
