"""Shared fixtures for the napari tests (run under ``xvfb-run -a``)."""

from __future__ import annotations

import os

import pytest

# The napari tests run on PyQt6, the binding the napari extra installs (napari drops PyQt5 in
# fall 2026). pytest-qt loads it at start-up (qt_api in setup.cfg) and qtpy follows the binding
# already loaded; the viewer processes the tests start load none, and their qtpy would pick PyQt5
# wherever both are installed, so they inherit this choice. Set before anything imports qtpy.
os.environ["QT_API"] = "pyqt6"

pytest.importorskip("napari")
pytest.importorskip("pytestqt")


@pytest.fixture(autouse=True)
def _quiet_small_env(monkeypatch, tmp_path):
    # Background `sgrs` processes inherit these: one thread each on a small shared CI machine,
    # and a demo cache inside the test's temp folder.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("NAPARI_SGRS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """A tiny demo cohort: 4 training cases of 32^3, the first 2 labeled."""
    from napari_sgrs.core.demo import make_demo_cohort

    return make_demo_cohort(tmp_path_factory.mktemp("demo"), n_cases=4, n_labeled=2, n_test=0, shape=(32, 32, 32))
