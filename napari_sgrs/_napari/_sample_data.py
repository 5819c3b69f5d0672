"""npe2 sample data: the synthetic demo cohort, generated once into a cache folder."""

from __future__ import annotations

import os
from pathlib import Path


def demo_cache_dir() -> Path:
    base = os.environ.get("NAPARI_SGRS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "napari-sgrs")
    return Path(base)


def demo_cohort(shape=(48, 48, 48), n_cases: int = 6, n_labeled: int = 2, kind: str = "blob"):
    """Generate (or reuse) a demo cohort in the cache; returns the engine's ``DemoCohort``."""
    from napari_sgrs.core.demo import make_demo_cohort

    root = demo_cache_dir() / f"demo-{kind}-{'x'.join(map(str, shape))}-{n_cases}-{n_labeled}"
    return make_demo_cohort(root, kind=kind, n_cases=n_cases, n_labeled=n_labeled, n_test=0,
                            shape=tuple(shape), overwrite=True)


def make_demo_data(shape=(48, 48, 48), n_cases: int = 6, n_labeled: int = 2) -> list[tuple]:
    """Image layers for every training case and Labels layers for the labeled ones."""
    from napari_sgrs.core.io import read_volume

    from ._layers import layer_data_from_volume

    cohort = demo_cohort(shape, n_cases, n_labeled)
    layers = []
    for name in cohort.train_names:
        layers.append(layer_data_from_volume(read_volume(cohort.images_tr / f"{name}.nii.gz"), role="image"))
    for name in cohort.labeled_names:
        layers.append(layer_data_from_volume(read_volume(cohort.labels_tr / f"{name}.nii.gz"), role="label"))
    return layers
