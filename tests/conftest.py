"""Shared fixtures: tiny demo cohorts, so every test trains in seconds on 2 CPU cores."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """6 training volumes (3 labeled) + 2 test volumes of 24^3, written as NIfTI."""
    from napari_sgrs.core.demo import make_demo_cohort

    root = tmp_path_factory.mktemp("tiny_cohort")
    return make_demo_cohort(root, kind="blob", n_cases=6, n_labeled=3, n_test=2, shape=(24, 24, 24), seed=3)

