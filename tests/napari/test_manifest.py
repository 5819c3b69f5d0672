"""The npe2 manifest: valid, identical at the top level, every python_name importable."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from npe2 import PluginManifest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_MANIFEST = ROOT / "napari_sgrs" / "napari.yaml"


def test_top_level_manifest_is_identical_copy():
    assert (ROOT / "napari.yaml").read_bytes() == PACKAGE_MANIFEST.read_bytes()


def test_every_python_name_imports():
    manifest = yaml.safe_load(PACKAGE_MANIFEST.read_text())
    commands = manifest["contributions"]["commands"]
    assert commands and all(c["id"].startswith("napari-sgrs.") for c in commands)
    for command in commands:
        module, _, attr = command["python_name"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), command["python_name"]


def test_npe2_validates():
    manifest = PluginManifest.from_file(PACKAGE_MANIFEST)
    manifest.validate_imports()
    assert manifest.name == "napari-sgrs"
    widgets = [w.display_name for w in manifest.contributions.widgets]
    assert widgets == ["SGRS: train"]


def test_installed_plugin_is_discovered():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    assert pm.get_manifest("napari-sgrs").name == "napari-sgrs"
