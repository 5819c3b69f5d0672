"""The review queue: unlabeled cases ranked worst first, and where in a case to look first.

Region maps are ``sgrs predict --regions`` volumes (codes in :class:`napari_sgrs.core.codes.Region`),
axis order (D, H, W); the flagged voxels are the disregarded and inconsistent ones. A case's
estimated Dice (``OUT/review.json``, :func:`napari_sgrs.core.reliability.volume_review`) ranks it
when there is one; otherwise its flagged share does. Plain numpy and scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..core.codes import Region
from ..core.postprocess import largest_component


@dataclass
class ReviewItem:
    """One unlabeled case in the review queue. Shares are fractions of all voxels."""
    name: str
    score: float               # inconsistent + disregarded share (the flagged share)
    inconsistent: float
    disregarded: float
    estimated_dice: float | None = None  # calibrated on the validation split (review.json)
    dice_low: float | None = None
    dice_high: float | None = None

    def describe(self) -> str:
        """One line for a list: the estimated Dice with its interval, and the flagged share."""
        flagged = f"flagged {100 * self.score:.1f}%"
        if self.estimated_dice is None:
            return f"{self.name}   {flagged}"
        est = f"est. Dice {self.estimated_dice:.2f}"
        if self.dice_low is not None and self.dice_high is not None:
            est += f" ({self.dice_low:.2f}-{self.dice_high:.2f})"
        return f"{self.name}   {est} · {flagged}"


@dataclass
class RegionFocus:
    """Where to look in a case: the largest connected region of ``region`` (voxel indices, D, H, W)."""
    region: int
    center: tuple[float, float, float]
    size: int
    bbox: tuple[tuple[int, int], ...]


def review_item(name: str, regions: np.ndarray, estimate: dict | None = None) -> ReviewItem:
    """``estimate``: the case's line of review.json (estimated_dice, dice_low, dice_high), if any."""
    regions = np.asarray(regions)
    n = max(int(regions.size), 1)
    inc = float(np.count_nonzero(regions == Region.INCONSISTENT)) / n
    dis = float(np.count_nonzero(regions == Region.DISREGARDED)) / n
    est = estimate or {}
    return ReviewItem(name=name, score=inc + dis, inconsistent=inc, disregarded=dis,
                      estimated_dice=est.get("estimated_dice"), dice_low=est.get("dice_low"),
                      dice_high=est.get("dice_high"))


def rank_for_review(regions_by_case: dict[str, np.ndarray],
                    estimates: dict[str, dict] | None = None) -> list[ReviewItem]:
    """Unlabeled cases, worst first: by estimated Dice where there is one (cases without one after
    them), then by flagged share, then by name."""
    estimates = estimates or {}
    items = [review_item(name, regions, estimates.get(name)) for name, regions in regions_by_case.items()]
    return sorted(items, key=lambda it: (it.estimated_dice is None, it.estimated_dice or 0.0, -it.score,
                                         -it.inconsistent, it.name))


def largest_region(regions: np.ndarray) -> RegionFocus | None:
    """The largest 26-connected cluster of flagged (disregarded or inconsistent) voxels, None if
    there is none; its ``region`` is inconsistent when it holds an inconsistent voxel."""
    regions = np.asarray(regions)
    mask = np.isin(regions, Region.flagged())
    if mask.any():
        component = largest_component(mask)
        value = Region.INCONSISTENT if (regions[component] == Region.INCONSISTENT).any() else Region.DISREGARDED
        center = tuple(float(c) for c in ndimage.center_of_mass(component))
        # The centre of mass of a curved region can fall outside it: snap to its nearest voxel.
        idx = np.argwhere(component)
        nearest = idx[np.argmin(((idx - np.asarray(center)) ** 2).sum(axis=1))]
        box = ndimage.find_objects(component.astype(np.int8))[0]
        return RegionFocus(region=int(value), center=tuple(float(v) for v in nearest), size=int(component.sum()),
                           bbox=tuple((s.start, s.stop) for s in box))
    return None


class ReviewQueue:
    """Ranked unlabeled cases; :meth:`next` walks from the worst case down and wraps around."""

    def __init__(self, regions_by_case: dict[str, np.ndarray] | None = None,
                 estimates: dict[str, dict] | None = None):
        self.items: list[ReviewItem] = []
        self._cursor = -1
        self.update(regions_by_case or {}, estimates)

    def update(self, regions_by_case: dict[str, np.ndarray], estimates: dict[str, dict] | None = None) -> None:
        self.items = rank_for_review(regions_by_case, estimates)
        self._cursor = -1

    def remove(self, name: str) -> None:
        """Drop ``name`` (accepted); :meth:`next` still goes on to the item after it."""
        index = next((i for i, it in enumerate(self.items) if it.name == name), None)
        if index is None:
            return
        del self.items[index]
        if index <= self._cursor:
            self._cursor -= 1

    def peek(self) -> ReviewItem | None:
        """The item :meth:`next` returns, without moving on."""
        return self.items[(self._cursor + 1) % len(self.items)] if self.items else None

    def next(self) -> ReviewItem | None:
        if not self.items:
            return None
        self._cursor = (self._cursor + 1) % len(self.items)
        return self.items[self._cursor]
