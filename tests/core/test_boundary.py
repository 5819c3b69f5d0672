"""The core and the CLI stay free of Qt and napari (one core, thin faces)."""

from __future__ import annotations

import subprocess
import sys

GUI_PACKAGES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt")


def test_core_and_cli_import_no_gui_module():
    code = (
        "import sys, pkgutil, importlib, napari_sgrs.core as core, napari_sgrs.cli\n"
        "for m in pkgutil.iter_modules(core.__path__): importlib.import_module('napari_sgrs.core.' + m.name)\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({GUI_PACKAGES!r}))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
