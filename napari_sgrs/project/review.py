"""The review queue: unlabeled cases ranked by how much of them the model is unsure of, and
where in a case to look first. Region maps are ``sgrs predict --regions`` volumes (codes in
:class:`napari_sgrs.core.codes.Region`), axis order (D, H, W). Plain numpy and scipy.
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
    score: float               # inconsistent + disregarded share: higher = review first
    inconsistent: float
    disregarded: float


@dataclass
class RegionFocus:
    """Where to look in a case: the largest connected region of ``region`` (voxel indices, D, H, W)."""
    region: int
    center: tuple[float, float, float]
    size: int
    bbox: tuple[tuple[int, int], ...]


def review_item(name: str, regions: np.ndarray) -> ReviewItem:
    regions = np.asarray(regions)
    n = max(int(regions.size), 1)
    inc = float(np.count_nonzero(regions == Region.INCONSISTENT)) / n
    dis = float(np.count_nonzero(regions == Region.DISREGARDED)) / n
    return ReviewItem(name=name, score=inc + dis, inconsistent=inc, disregarded=dis)


def rank_for_review(regions_by_case: dict[str, np.ndarray]) -> list[ReviewItem]:
    """Unlabeled cases, worst first: by share of inconsistent + disregarded voxels (ties: by name)."""
    items = [review_item(name, regions) for name, regions in regions_by_case.items()]
    return sorted(items, key=lambda it: (-it.score, -it.inconsistent, it.name))


def largest_region(regions: np.ndarray, region: int = Region.INCONSISTENT) -> RegionFocus | None:
    """The largest 26-connected component of voxels equal to ``region``; None if there is none.

    Falls back from inconsistent to disregarded voxels when a case has no inconsistent voxel.
    """
    regions = np.asarray(regions)
    for value in (region, Region.DISREGARDED) if region == Region.INCONSISTENT else (region,):
        mask = regions == value
        if not mask.any():
            continue
        component = largest_component(mask)
        center = tuple(float(c) for c in ndimage.center_of_mass(component))
        # The centre of mass of a curved region can fall outside it: snap to its nearest voxel.
        idx = np.argwhere(component)
        nearest = idx[np.argmin(((idx - np.asarray(center)) ** 2).sum(axis=1))]
        box = ndimage.find_objects(component.astype(np.int8))[0]
        return RegionFocus(region=value, center=tuple(float(v) for v in nearest), size=int(component.sum()),
                           bbox=tuple((s.start, s.stop) for s in box))
    return None


class ReviewQueue:
    """Ranked unlabeled cases; :meth:`next` walks from the worst case down and wraps around."""

    def __init__(self, regions_by_case: dict[str, np.ndarray] | None = None):
        self.items: list[ReviewItem] = []
        self._cursor = -1
        self.update(regions_by_case or {})

    def update(self, regions_by_case: dict[str, np.ndarray]) -> None:
        self.items = rank_for_review(regions_by_case)
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
