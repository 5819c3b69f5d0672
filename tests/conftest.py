"""Shared fixtures: tiny demo cohorts, so every test trains in seconds on 2 CPU cores."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """6 training volumes (3 labeled) + 2 test volumes of 24^3, written as NIfTI."""
    from napari_sgrs.core.demo import make_demo_cohort

    root = tmp_path_factory.mktemp("tiny_cohort")
    return make_demo_cohort(root, kind="blob", n_cases=6, n_labeled=3, n_test=2, shape=(24, 24, 24), seed=3)


def tiny_config(**overrides):
    from napari_sgrs.core.train import TrainConfig

    base = dict(iterations=4, patch_size=(16, 16, 16), base_filters=2, batch_size=4, labeled_batch_size=2,
                seed=0, device="cpu", checkpoint_every=2, val_every=2, log_every=1)
    base.update(overrides)
    return TrainConfig(**base)


TINY_ARGS = ["--iterations", "4", "--patch-size", "16", "16", "16", "--base-filters", "2", "--device", "cpu",
             "--checkpoint-every", "2", "--quiet"]
