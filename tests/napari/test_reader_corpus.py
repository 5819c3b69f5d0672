"""The napari reader on the malformed-file corpus of tests/core/test_malformed.py: it declines
(None) or shows the engine's one-line error, and never raises into napari."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from napari_sgrs._napari._reader import napari_get_reader

sys.path.insert(0, str(Path(__file__).parents[1] / "core"))
import test_malformed as M  # noqa: E402

CASES = [p for p in M.CORPUS if p.values[1] is M.read]


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("build", [pytest.param(p.values[0], id=p.id) for p in CASES])
def test_reader_declines_or_notifies(build, tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    path = str(build(tmp_path))
    reader = napari_get_reader(path)
    if reader is None:
        assert not shown
        return
    assert reader(path) == [(None,)]  # napari's "nothing to add"; no second "no reader" error
    assert len(shown) == 1 and "\n" not in shown[0], shown
    assert os.fsencode(Path(path).name).decode("utf-8", "backslashreplace") in shown[0], shown[0]
