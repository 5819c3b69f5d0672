"""Every `sgrs ...` command in the README and docs/REPRODUCE.md parses with today's CLI, so the
documented flags cannot drift from the real ones."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _commands(text: str) -> list[str]:
    """The `sgrs` command lines of the bash blocks, with continuation lines joined and comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            line = re.sub(r"^torchrun .*?\$\(which sgrs\)", "sgrs", line)
            if line.startswith("sgrs "):
                out.append(line)
    return out


@pytest.mark.parametrize("doc", ["README.md", "docs/REPRODUCE.md"])
def test_documented_commands_parse(doc):
    from napari_sgrs.cli import build_parser

    commands = _commands((ROOT / doc).read_text(encoding="utf-8"))
    assert len(commands) >= 3, f"{doc}: expected several sgrs commands, found {commands}"
    parser = build_parser()
    for cmd in commands:
        # a synopsis such as `sgrs demo-data DIR [--kind blob|vessel]`: the options, first choice
        cmd = re.sub(r"\[([^\]]*)\]", r"\1", cmd.replace('"$LA"', "LA"))
        argv = [t.split("|")[0] for t in shlex.split(cmd)[1:]]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # argparse's way of refusing
            pytest.fail(f"{doc}: `{cmd}` does not parse (exit {exc.code})")


def test_readme_make_targets_exist():
    """Every `make X` of the README's bash blocks is a target of the Makefile."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"^make ([\w-]+)", "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)), re.M)
    assert {"demo", "test"} <= set(targets)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in targets:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"README: `make {target}` is no Makefile target"


def test_readme_names_the_napari_menus_as_napari_shows_them():
    """napari (0.5 and later; checked by hand on 0.9.2) lists a widget under Plugins and a sample
    under File > Open Sample as '<its display name> (<the plugin's display name>)'."""
    import yaml

    manifest = yaml.safe_load((ROOT / "napari_sgrs" / "napari.yaml").read_text(encoding="utf-8"))
    plugin = manifest["display_name"]
    widget = manifest["contributions"]["widgets"][0]["display_name"]
    sample = manifest["contributions"]["sample_data"][0]["display_name"]
    text = " ".join(re.sub(r"[*`]", "", (ROOT / "README.md").read_text(encoding="utf-8")).split())
    assert f"Plugins > {widget} ({plugin})" in text
    assert f"File > Open Sample > {sample} ({plugin})" in text
