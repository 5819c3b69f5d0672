"""The docs stay short enough to read and true to the tree: README under 8 kB, RESULTS.md under
20 kB (the history of experiments lives in docs/experiments/), every relative link points at a file
that exists, and docs/ARCHITECTURE.md has one line per module of the package and no other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "napari_sgrs"

LIMITS = {"README.md": 8000, "benchmarks/RESULTS.md": 20000}
LINKED_DOCS = ["README.md", "benchmarks/RESULTS.md", "docs/ARCHITECTURE.md", "docs/REPRODUCE.md",
               *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs/experiments").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    """Targets of the markdown links and images outside fenced code, without web links or anchors."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    targets = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#")[0])
    return targets


@pytest.mark.parametrize("doc", sorted(LIMITS))
def test_doc_is_under_its_size(doc):
    size = len((ROOT / doc).read_bytes())
    assert size <= LIMITS[doc], f"{doc} is {size} bytes, over {LIMITS[doc]}: move detail to docs/"


@pytest.mark.parametrize("doc", LINKED_DOCS)
def test_relative_links_point_at_existing_files(doc):
    path = ROOT / doc
    links = relative_links(path.read_text(encoding="utf-8"))
    missing = [t for t in links if not (path.parent / t).exists()]
    assert not missing, f"{doc} links to files that do not exist: {missing}"


def test_link_check_sees_the_links_and_catches_a_broken_one():
    # the README's links are found (so an empty result above means no links, not a parse miss) ...
    links = relative_links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert {"docs/METHOD.md", "docs/ARCHITECTURE.md", "benchmarks/RESULTS.md"} <= set(links)
    # ... links in code, web links and anchors are not files, and a broken one is reported
    text = "[a](docs/nope.md) `x` [b](https://example.org) [c](#top)\n```\n[d](also/nope.md)\n```\n"
    assert relative_links(text) == ["docs/nope.md"]


def module_table() -> list[str]:
    text = (ROOT / "docs/ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)


def test_architecture_has_a_line_per_module_and_no_other():
    rows = module_table()
    modules = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))
    assert len(rows) == len(set(rows)), f"a module listed twice: {rows}"
    assert not [m for m in modules if m not in rows], \
        f"modules missing from docs/ARCHITECTURE.md's table: {[m for m in modules if m not in rows]}"
    assert not [r for r in rows if not (PACKAGE / r).exists()], \
        f"docs/ARCHITECTURE.md lists files that do not exist: {[r for r in rows if not (PACKAGE / r).exists()]}"
