"""The napari tests run on PyQt6, the binding the napari extra installs, not on PyQt5."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import qtpy
from pytestqt.qt_compat import qt_api

ROOT = Path(__file__).resolve().parents[2]


def test_napari_tests_run_on_pyqt6(qapp):
    assert qt_api.pytest_qt_api == "pyqt6"
    assert qtpy.API_NAME == "PyQt6"
    assert type(qapp).__module__.startswith("PyQt6.")
    # one binding per process: a second one loaded beside it would mean something bypassed qtpy
    assert "PyQt5" not in sys.modules


def test_viewer_processes_run_on_pyqt6():
    # the test_viewer_killed children are plain Python processes with this environment: qtpy
    # there picks its binding from QT_API, and prefers PyQt5 where both are installed
    out = subprocess.run([sys.executable, "-c", "import qtpy; print(qtpy.API_NAME)"], env=dict(os.environ),
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "PyQt6", out.stderr


def test_demo_prefers_pyqt6_beside_pyqt5():
    # `make demo` in an environment that still has PyQt5 from before the napari extra moved
    env = {k: v for k, v in os.environ.items() if k != "QT_API"}
    env["PYTHONPATH"] = str(ROOT)
    code = "from napari_sgrs._napari.demo_app import prefer_qt6; prefer_qt6(); import qtpy; print(qtpy.API_NAME)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "PyQt6", out.stderr
