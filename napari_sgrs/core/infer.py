"""Whole-volume inference: Gaussian-weighted sliding window, pseudo labels, review regions.

A :class:`Predictor` is loaded once from a run folder and used by the CLI, the trainer's
validation and the napari plugin alike.

How regions are computed on a whole volume (:mod:`.reliability`): every window is predicted as
it is and flipped along each axis (four views); the label is the plain view's argmax and each
voxel's error score is 1 - the views' mean probability of that label. The regions, the
reliability map and the estimated Dice follow from that score and the run's validation
calibration. benchmarks/RESULTS.md ("Does the overlay point at the errors?") has the measurements
that chose this over mixing each window with a partner patch, the paper's training-time test.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .codes import Region
from .data import nan_mask, normalise, pad_to
from .device import configure_backends, resolve_device
from .errors import CheckpointError, ConfigError, InputError, InputWarning
from .network import build_model
from .postprocess import keep_largest_component, resolve_largest_component
from .runfolder import RunFolder
from .reliability import (REVIEW_FLIPS, ReviewCalibration, error_score, outvoted, review_regions, volume_review,
                          volume_threshold)
from .sgrs import PAPER_TAU


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """(D, H, W) Gaussian weights, peak 1 at the centre, sigma = patch * sigma_scale (nnU-Net)."""
    grids = torch.meshgrid(*[torch.arange(p, dtype=torch.float32) - (p - 1) / 2 for p in patch], indexing="ij")
    expo = sum((g / (p * sigma_scale)) ** 2 for g, p in zip(grids, patch))
    w = torch.exp(-0.5 * expo)
    w = w / w.max()
    return w.clamp_min(w[w > 0].min().item())  # no zero weight at the corners


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start offsets along one axis so windows of ``patch`` cover ``size`` with >= ``overlap``."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    n = math.ceil((size - patch) / step) + 1
    # spread the windows evenly so the last one ends exactly at the border
    return [round(i * (size - patch) / (n - 1)) for i in range(n)]


@torch.no_grad()
def sliding_window(volume: torch.Tensor, forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
                   patch: Sequence[int], n_outputs: int, num_classes: int, overlap: float = 0.5,
                   batch_size: int = 4, weight: torch.Tensor | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
    """Average ``forward``'s probability maps over overlapping windows.

    volume: (1, D, H, W) on the compute device, every axis >= patch. ``forward`` takes
    windows (n, 1, d, h, w) and returns ``n_outputs`` tensors (n, K, d, h, w). Returns
    ``n_outputs`` tensors (K, D, H, W) on the same device. Memory: n_outputs + 1 volume-sized
    maps (times K), whatever the overlap.
    """
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
    _, D, H, W = volume.shape
    d, h, w = patch
    weight = gaussian_importance(patch) if weight is None else weight
    weight = weight.to(volume.device)
    sums = [torch.zeros((num_classes, D, H, W), device=volume.device) for _ in range(n_outputs)]
    norm = torch.zeros((D, H, W), device=volume.device)
    corners = [(z, y, x) for z in window_starts(D, d, overlap) for y in window_starts(H, h, overlap)
               for x in window_starts(W, w, overlap)]
    for i in range(0, len(corners), batch_size):
        chunk = corners[i:i + batch_size]
        windows = torch.stack([volume[:, z:z + d, y:y + h, x:x + w] for z, y, x in chunk])
        outs = forward(windows)
        for j, (z, y, x) in enumerate(chunk):
            for s, o in zip(sums, outs):
                s[:, z:z + d, y:y + h, x:x + w].addcmul_(o[j].float(), weight)
            norm[z:z + d, y:y + h, x:x + w] += weight
        if progress is not None:
            progress(min(i + batch_size, len(corners)), len(corners))
    for s in sums:
        s.div_(norm)
    return sums


@dataclass
class Prediction:
    """Outputs for one volume, all (D, H, W) in the input's voxel grid."""

    label: np.ndarray                 # uint8 argmax
    probability: np.ndarray           # float32, 1 - p(background): the foreground probability
    regions: np.ndarray | None = None  # uint8 Region codes, with regions=True
    reliability: np.ndarray | None = None  # float32 0-1, the views' probability of the label (regions=True)
    review: dict | None = None  # the volume's estimated Dice and flagged share (regions=True)
    probabilities: np.ndarray | None = None  # (K, D, H, W) float32, only with keep_probabilities


class Predictor:
    """A trained network plus the settings it was trained with, ready to segment volumes."""

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device, checkpoint_sha256: str = ""):
        self.model = model.eval()
        self.meta = meta
        self.device = device
        self.checkpoint_sha256 = checkpoint_sha256
        cfg = meta.get("config", {})
        self.patch = tuple(cfg.get("patch_size") or meta.get("patch_size"))
        self.num_classes = int(meta["num_classes"])
        self.normalization = cfg.get("normalization", "zscore")
        self.ct_window = tuple(cfg.get("ct_window", (-160.0, 240.0)))
        self.tau = float(meta.get("tau", cfg.get("tau") if isinstance(cfg.get("tau"), (int, float)) else PAPER_TAU))
        self.amp = False
        # channels_last_3d convolutions are ~2x faster on CPU (benchmarks/infer_benchmark.py); the
        # windows follow the weights' layout (from_run converts a freshly loaded network).
        self.channels_last = any(p.dim() == 5 and p.shape[1] > 1 and not p.is_contiguous()
                                 and p.is_contiguous(memory_format=torch.channels_last_3d)
                                 for p in model.parameters())

    @classmethod
    def from_run(cls, run: str | Path, device: str = "auto", checkpoint: str = "last",
                 model: str = "student") -> "Predictor":
        """Load a run folder's ``checkpoint`` (last or best; :class:`~.runfolder.RunFolder`), or a
        checkpoint file path."""
        run = Path(run)
        folder = RunFolder(run)
        path = run if run.is_file() else folder.checkpoint(checkpoint)
        if not path.exists() and run.is_dir() and not folder.checkpoints.exists():
            raise CheckpointError(f"{run}: not a run folder (no {RunFolder.CHECKPOINTS}/ inside); pass the folder given "
                                  f"to sgrs train --out")
        ckpt = load_checkpoint(path)
        meta = ckpt.meta
        if "num_classes" not in meta:
            raise CheckpointError(f"{path}: checkpoint metadata lacks num_classes; use a checkpoint written by "
                                  f"sgrs train")
        dev = resolve_device(device)
        configure_backends(dev, meta["config"])  # windows have one shape: cuDNN autotunes
        net = build_model(meta["config"], meta["num_classes"])
        state = ckpt.state_dict(model)
        if not state:
            raise CheckpointError(f"{path}: the checkpoint holds no {model!r} weights")
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not fit the network described in its metadata "
                                  f"({str(exc).splitlines()[0]})") from exc
        net = net.to(dev, memory_format=torch.channels_last_3d)
        return cls(net, meta, dev, checkpoint_sha256=ckpt.sha256)

    def _forward_probs(self, windows: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            windows = windows.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return torch.softmax(self.model(windows).float(), 1)

    @torch.no_grad()
    def predict(self, image: np.ndarray, regions: bool = False, overlap: float = 0.5,
                batch_size: int = 4, keep_probabilities: bool = False,
                progress: Callable[[int, int], None] | None = None,
                largest_component: str = "off", name: str | None = None) -> Prediction:
        """Segment one (D, H, W) volume given in raw intensities (normalised here as in training).

        ``largest_component`` (off, auto, on; :mod:`.postprocess`) reduces classes of the label to
        their largest connected component; the probability and region maps stay the network's.
        NaN voxels (no data, e.g. outside the field of view) are background with probability 0 and
        no region; with ``name`` (the file, for messages) a one-line InputWarning says how many.

        Raises:
            InputError: Inf voxels, or intensities so far from the training range that the network's
                probabilities are not finite (nothing is returned then).
        """
        classes = resolve_largest_component(largest_component, self.meta, self.num_classes)
        if image.ndim != 3:
            raise ConfigError(f"expected a 3D volume (D, H, W), got shape {image.shape}")
        where = f"{name}: " if name else ""
        try:
            x = normalise(image, self.normalization, self.ct_window)
        except InputError as exc:
            raise InputError(where + str(exc)) from exc
        missing = nan_mask(image)
        x, region = pad_to(x, self.patch, 0.0)
        vol = torch.from_numpy(np.ascontiguousarray(x))[None].to(self.device)
        if regions:
            def forward(win: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                plain = self._forward_probs(win)
                views = plain.clone()
                for axes in REVIEW_FLIPS:  # one view at a time: the activations of one batch
                    views += torch.flip(self._forward_probs(torch.flip(win, axes)), axes)
                return plain, views / (1 + len(REVIEW_FLIPS))

            prob, prob_views = sliding_window(vol, forward, self.patch, 2, self.num_classes, overlap,
                                              batch_size, progress=progress)
        else:
            (prob,) = sliding_window(vol, lambda w: (self._forward_probs(w),), self.patch, 1,
                                     self.num_classes, overlap, batch_size, progress=progress)
            prob_views = None
        crop = (slice(None),) + region
        prob = prob[crop]
        if not bool(torch.isfinite(prob).all()) or (prob_views is not None and not bool(torch.isfinite(prob_views).all())):
            raise InputError(f"{where}the network's probabilities are not finite on this volume: its intensities "
                             f"({float(np.nanmin(image)):.3g} to {float(np.nanmax(image)):.3g}) are far outside what it "
                             f"was trained on with normalisation {self.normalization!r}; rescale the image or train "
                             f"with normalization zscore")
        if prob_views is not None:
            prob_views = prob_views[crop]
        if missing is not None:
            outside = torch.from_numpy(missing).to(prob.device)
            for p in (prob,) if prob_views is None else (prob, prob_views):
                p[:, outside] = 0.0
                p[0, outside] = 1.0  # background, certain
            if name:
                warnings.warn(InputWarning(f"{name}: {int(missing.sum())} voxels are NaN (no data, e.g. outside the "
                                           f"field of view); they are labelled background"), stacklevel=2)
        label = prob.argmax(0).to(torch.uint8)
        label = label.cpu().numpy()
        if classes:
            label = keep_largest_component(label, classes)
        out = Prediction(label=label, probability=(1.0 - prob[0]).cpu().numpy().astype(np.float32))
        if regions:
            views = prob_views.cpu().numpy()
            score = error_score(views, out.label)
            calibration = ReviewCalibration.from_meta(self.meta)
            valid = None if missing is None else ~missing
            threshold = volume_threshold(score, calibration, valid)
            out.regions = review_regions(score, threshold, outvoted(views, out.label))
            out.reliability = (1.0 - score).astype(np.float32)
            if missing is not None:
                out.regions[missing] = Region.NONE
            out.review = volume_review(views, out.label, out.regions, calibration, threshold, valid)
        if keep_probabilities:
            out.probabilities = prob.cpu().numpy()
        return out
