"""Post-processing of label volumes: keep the largest connected component of a class.

A prediction of a structure that is one connected piece (a left atrium, a pancreas) often carries
small islands elsewhere: bright look-alikes that the network labels too. Keeping each such class's
largest 26-connected component removes them; the removed voxels become background (0). nnU-Net
decides this per class on validation data; some peers' LA test scripts offer it (``--nms``).
With the few labels of a semi-supervised run there is no useful validation split, so the run's
labels decide it: a class qualifies only if it is exactly one connected component in *every*
labeled training volume (:func:`single_component_classes`, stored in the run's checkpoint
metadata). ``sgrs predict --largest-component auto`` applies it to those classes, ``on`` to every
foreground class, ``off`` (the default) to none. Measured effect: benchmarks/RESULTS.md.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .errors import ConfigError

LARGEST_COMPONENT_MODES = ("off", "auto", "on")
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: diagonal neighbours touch


def count_components(mask: np.ndarray) -> int:
    """Number of 26-connected components of a boolean 3D mask."""
    return int(ndimage.label(mask, structure=_CONNECTIVITY)[1])


def single_component_classes(labels: Iterable[np.ndarray], num_classes: int) -> list[int]:
    """Foreground classes (1..K-1) that are exactly one 26-connected component in every label volume.

    Voxels of any other value (other classes, the ignore value) do not count as the class. No
    labels at all gives no class: the rule needs evidence.
    """
    labels = list(labels)
    if not labels:
        return []
    return [k for k in range(1, num_classes) if all(count_components(lab == k) == 1 for lab in labels)]


def largest_component(mask: np.ndarray, full_connectivity: bool = True) -> np.ndarray:
    """The largest connected component of a boolean mask of any dimension (the mask itself if it has
    at most one). ``full_connectivity``: diagonal neighbours touch (26 in 3D), else only face
    neighbours (6 in 3D). Ties keep the component found first in C order (the same every time)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim if full_connectivity else 1)
    components, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == (int(np.argmax(sizes)) + 1)


def keep_largest_component(label: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """A copy of ``label`` where each class in ``classes`` keeps only its largest 26-connected
    component; the voxels of its other components become background (0)."""
    if label.ndim != 3:
        raise ConfigError(f"largest-component post-processing needs a 3D label volume, got shape {label.shape}")
    out = label.copy()
    for k in classes:
        mask = label == k
        out[mask & ~largest_component(mask)] = 0
    return out


def resolve_largest_component(mode: str, meta: dict, num_classes: int) -> list[int]:
    """The classes that ``mode`` (off, auto, on) post-processes for a run with checkpoint ``meta``."""
    if mode not in LARGEST_COMPONENT_MODES:
        raise ConfigError(f"largest-component mode {mode!r} is not one of {', '.join(LARGEST_COMPONENT_MODES)}")
    if mode == "off":
        return []
    if mode == "on":
        return list(range(1, num_classes))
    return [int(k) for k in meta.get("single_component_classes", [])]
