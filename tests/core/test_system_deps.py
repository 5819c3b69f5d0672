"""scripts/system_deps.sh and scripts/with_display.sh, which `make test`, `make demo` and .ci/run
share: with fake apt-get / dpkg-query / id / sudo on PATH, so no package is really installed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def _fake_bin(tmp_path: Path, *, uid: int, sudo_ok: bool, installed: bool, apt: bool = True) -> Path:
    """A PATH folder whose id/sudo/dpkg-query/apt-get say what the test wants; apt-get logs its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    tools = {
        "id": f"echo {uid}",
        "sudo": ('[ "$1" = -n ] && shift; [ "$1" = true ] && exit 0; exec "$@"' if sudo_ok else "exit 1"),
        "dpkg-query": ("echo 'install ok installed'" if installed else "exit 1"),
        "xvfb-run": 'while [ "${1#-}" != "$1" ]; do [ "$1" = -s ] && shift; shift; done; '
                    'echo "xvfb-run ran: $*"; exec "$@"',
    }
    if apt:
        tools["apt-get"] = f'echo "$*" >> {log}'
    for name, body in tools.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(0o755)
    return bin_dir


def _run(script: str, args: list[str], bin_dir: Path, display: str = "") -> subprocess.CompletedProcess:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "DISPLAY": display, "HOME": str(bin_dir)}
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_nothing_missing_installs_nothing(tmp_path):
    bin_dir = _fake_bin(tmp_path, uid=1000, sudo_ok=False, installed=True)
    proc = _run("system_deps.sh", ["install"], bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "apt.log").exists()


@pytest.mark.parametrize("uid, sudo_ok", [(0, False), (1000, True)], ids=["root", "passwordless-sudo"])
def test_missing_packages_are_installed_when_this_user_can(tmp_path, uid, sudo_ok):
    bin_dir = _fake_bin(tmp_path, uid=uid, sudo_ok=sudo_ok, installed=False)
    proc = _run("system_deps.sh", ["install"], bin_dir)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert any(c.startswith("install") and "xvfb" in c and "libgl1-mesa-dri" in c for c in calls), calls


@pytest.mark.parametrize("apt", [True, False], ids=["no-sudo", "no-apt-get"])
def test_cannot_install_prints_the_one_command_and_exits_2(tmp_path, apt):
    bin_dir = _fake_bin(tmp_path, uid=1000, sudo_ok=False, installed=False, apt=apt)
    proc = _run("system_deps.sh", ["install"], bin_dir)
    assert proc.returncode == 2
    assert "sudo apt-get install -y --no-install-recommends xvfb" in proc.stderr
    assert not (tmp_path / "apt.log").exists()


def test_with_display_runs_under_xvfb_after_installing(tmp_path):
    bin_dir = _fake_bin(tmp_path, uid=0, sudo_ok=False, installed=False)
    proc = _run("with_display.sh", ["echo", "payload"], bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert "xvfb-run ran: echo payload" in proc.stdout and "payload" in proc.stdout
    assert (tmp_path / "apt.log").exists()


def test_with_display_refuses_without_running_when_it_cannot_install(tmp_path):
    bin_dir = _fake_bin(tmp_path, uid=1000, sudo_ok=False, installed=False)
    proc = _run("with_display.sh", ["touch", str(tmp_path / "ran")], bin_dir)
    assert proc.returncode == 2
    assert not (tmp_path / "ran").exists()
    assert "apt-get install" in proc.stderr


def test_with_a_display_the_command_runs_as_it_is(tmp_path):
    bin_dir = _fake_bin(tmp_path, uid=1000, sudo_ok=False, installed=False)
    proc = _run("with_display.sh", ["echo", "payload"], bin_dir, display=":7")
    assert proc.returncode == 0 and proc.stdout.strip() == "payload"


def test_ci_leaves_the_system_packages_to_make():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "apt-get" not in ci and "make test" in ci and "git clone" in ci
    makefile = (ROOT / "Makefile").read_text()
    # make test and make demo reach system_deps.sh through their scripts
    assert "scripts/with_display.sh" in makefile and "scripts/demo.sh" in makefile
    for script in ("with_display.sh", "demo.sh"):
        assert 'system_deps.sh" install' in (ROOT / "scripts" / script).read_text()
