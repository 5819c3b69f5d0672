"""The codes in users' files never change: old prediction and project folders still read."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_sgrs.core.codes import IGNORE_INDEX, Provenance, Region
from napari_sgrs.core.project import provenance_counts, review_item

ROOT = Path(__file__).parents[2]


def test_region_codes_are_those_in_region_maps_on_disk():
    assert {r.key: int(r) for r in Region} == {"none": 0, "disregarded": 1, "consistent": 2, "inconsistent": 3}
    assert Region.shown() == (Region.DISREGARDED, Region.CONSISTENT, Region.INCONSISTENT)
    assert all(r.legend and r.colour for r in Region)
    # a region map as `sgrs predict --regions` has written it since the first release
    on_disk = np.array([0, 1, 1, 2, 3, 3, 3, 2], np.uint8)
    item = review_item("c0", on_disk)
    assert (item.disregarded, item.inconsistent) == (2 / 8, 3 / 8)


def test_provenance_codes_are_those_in_project_folders_on_disk():
    assert {p.key: int(p) for p in Provenance} == {"model_only": 0, "accepted_pseudo_label": 1, "human_drawn": 2}
    # a provenance map of an existing project folder, and its counts as project.json keeps them
    on_disk = np.array([0, 1, 1, 2, 2, 2], np.uint8)
    assert provenance_counts(on_disk) == {"model_only": 1, "accepted_pseudo_label": 2, "human_drawn": 3}
    assert IGNORE_INDEX == 255


def _documents() -> dict[str, str]:
    """What a user or a reader of the file formats reads: README, docs/, the CLI's help, and the
    project module's account of the project folder (wherever that module lives)."""
    paths = [ROOT / "README.md", ROOT / "napari_sgrs" / "cli.py", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "napari_sgrs").glob("**/project.py"))]
    return {p.name: p.read_text(encoding="utf-8") for p in paths}


@pytest.mark.parametrize("codes, spelling", [
    (Region, {r.key: r for r in Region}),
    (Provenance, {"model-only": Provenance.MODEL_ONLY, "accepted pseudo label": Provenance.ACCEPTED_PSEUDO_LABEL,
                  "human-drawn": Provenance.HUMAN_DRAWN}),
])
def test_wherever_the_docs_spell_out_a_code_it_is_the_code(codes, spelling):
    pattern = re.compile(r"\b(\d+) (" + "|".join(map(re.escape, spelling)) + r")\b")
    found = [(name, int(n), spelling[word]) for name, text in _documents().items()
             for n, word in pattern.findall(text)]
    assert {code for _, _, code in found} == set(codes)  # the docs list every code somewhere
    assert [(name, n) for name, n, code in found if n != code] == []


def test_codes_and_events_import_neither_torch_nor_qt():
    code = ("import sys, napari_sgrs.core.codes, napari_sgrs.core.events\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'qtpy', 'napari', 'PyQt5', 'PyQt6'})\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)
