"""Every case of hostile_cases.py run as a real `sgrs` process (issue 19, must-have 5).

A case fails on: a traceback; an exit code other than the expected; on exit 2, stderr that is not
exactly one line "error: ..." (naming the case's bad file or option); a user file changed, deleted
or added; a half-made output left behind by an exit 2; a peak memory that shows a size was not
checked before allocating. The failure message starts with a [tag] saying which.

USAGE-* cases are argparse errors: at most two lines (a short usage line and the error) and a
suggestion (issue 22 item 9).
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hostile_cases as H

ROOT = Path(__file__).parents[2]
TIMEOUT_S = 120
#: Address space of each process: large enough for torch and a tiny run, small enough that a
#: lying header fails fast instead of swapping the machine.
RLIMIT_AS = 6 * 2**30
#: Peak resident memory of any case. A tiny run peaks near 0.4 GiB; more means something
#: declared by a file or an option was allocated before it was checked.
MAX_RSS_BYTES = int(1.5 * 2**30)
#: Cases run at once: each is mostly interpreter start-up, one core apiece.
JOBS = int(os.environ.get("SGRS_HOSTILE_JOBS", min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def tiny_run(tiny_cohort, tmp_path_factory) -> Path:
    """One trained tiny run shared by the cases that need one (each copies it)."""
    from napari_sgrs.cli import main

    run = tmp_path_factory.mktemp("hostile_run") / "run"
    assert main(["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
                 "--out", str(run), *H.TINY_ARGS]) == 0
    return run


# ----------------------------------------------------------------------------- snapshots


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(path: Path) -> dict[str, str]:
    """relative path -> what is there (sha256 of a file, the target of a link, 'dir'), for
    ``path`` and everything below it, hidden files included; links are not followed."""
    if not os.path.lexists(path):
        return {".": "absent"}
    if path.is_symlink():
        return {".": "link -> " + os.readlink(path)}
    if path.is_file():
        return {".": _sha(path)}
    found = {".": "dir"}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(path))
            if p.is_symlink():
                found[rel] = "link -> " + os.readlink(p)
            elif p.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = _sha(p)
    return found


def differences(before: dict[str, str], after: dict[str, str], *, new_allowed: bool = False) -> list[str]:
    changes = []
    for rel, what in before.items():
        if rel not in after or after[rel] == "absent":
            changes.append(f"{rel} deleted")
        elif after[rel] != what:
            changes.append(f"{rel} changed")
    if not new_allowed:
        changes += [f"{rel} added" for rel in after if rel not in before and after[rel] != "absent"]
    return changes


# ----------------------------------------------------------------------------- running


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str, max_rss: int, timed_out: bool):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
        self.max_rss, self.timed_out = max_rss, timed_out


def run_sgrs(argv: list[str], cwd: Path, logs: Path) -> Result:
    """``python -m napari_sgrs.cli *argv`` with the code under test, its peak memory measured."""
    limit = RLIMIT_AS
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("SGRS_TEST_SLOW_CHECKPOINT", None)
    logs.mkdir(exist_ok=True)
    with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "napari_sgrs.cli", *argv], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        # prlimit right after the start, not preexec_fn (unsafe with the runner's threads): the
        # child is still importing when it takes effect, long before it could allocate a volume
        if hasattr(resource, "prlimit"):
            try:
                resource.prlimit(proc.pid, resource.RLIMIT_AS, (limit, limit))
                resource.prlimit(proc.pid, resource.RLIMIT_CORE, (0, 0))
            except ProcessLookupError:
                pass  # already gone: wait4 below reports how it ended
        deadline, timed_out = time.monotonic() + TIMEOUT_S, False
        while True:  # wait4, not wait: it gives this child's own peak memory
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline and not timed_out:
                timed_out = True
                proc.send_signal(signal.SIGKILL)
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Result(proc.returncode, _text(logs / "stdout"), _text(logs / "stderr"), usage.ru_maxrss * 1024,
                  timed_out)


def _text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace")


def _normal(text: str) -> str:
    return text.lower().replace("_", "-")


def _tail(text: str, n: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-n:])


def problems_of(case: H.HostileCase, sc: H.Scenario, res: Result, before: dict, out_before: dict,
                keep_before: dict) -> list[str]:
    found = []
    if res.timed_out:
        found.append(f"[timeout] killed after {TIMEOUT_S} s")
    if "Traceback (most recent call last)" in res.stderr:
        found.append(f"[traceback] {_tail(res.stderr, 3)}")
    if res.returncode not in case.expect:
        found.append(f"[exit {res.returncode}] expected {'/'.join(map(str, case.expect))}; stderr: "
                     f"{_tail(res.stderr, 3) or '(empty)'}")
    lines = res.stderr.strip("\n").splitlines()
    if res.returncode == 2 and case.usage_suggests is not None:
        if len(lines) > 2 or not any("error:" in line for line in lines):
            found.append(f"[usage] {len(lines)} stderr lines, want a short usage line and the error: "
                         f"{_tail(res.stderr, 2)}")
        if case.usage_suggests not in res.stderr:
            found.append(f"[usage] no suggestion {case.usage_suggests!r}: {_tail(res.stderr, 1)}")
    elif res.returncode == 2:
        if len(lines) != 1 or not lines[0].startswith("error: "):
            found.append(f"[stderr] {len(lines)} lines, want one 'error: ...': {_tail(res.stderr, 4)}")
        elif sc.needle and _normal(sc.needle) not in _normal(lines[0]):
            found.append(f"[message] does not name {sc.needle!r}: {lines[0][:300]}")
    for path, snap in before.items():
        changes = differences(snap, snapshot(path))
        if changes:
            found.append(f"[user files] {path.name}: {', '.join(changes[:5])}"
                         + (f" (+{len(changes) - 5} more)" if len(changes) > 5 else ""))
    for path, snap in keep_before.items():
        changes = differences(snap, snapshot(path), new_allowed=True)
        if changes:
            found.append(f"[run files] {path.name}: {', '.join(changes[:5])}")
    if res.returncode == 2:
        for path, snap in out_before.items():
            after = snapshot(path)
            if snap == {".": "absent"} and after != snap:
                found.append(f"[half-made] {path.name} was created ({len(after) - 1} entries) by a refused command")
            elif snap != {".": "absent"} and differences(snap, after):
                found.append(f"[half-made] {path.name} changed by a refused command")
    if res.max_rss > MAX_RSS_BYTES:
        found.append(f"[memory] peak {res.max_rss / 2**30:.2f} GiB: a size was not checked before allocating")
    if res.returncode == 0 and sc.check is not None and not found:
        try:
            sc.check(res)
        except AssertionError as exc:
            found.append(f"[result] {str(exc).splitlines()[0] if str(exc) else 'check failed'}")
        except Exception as exc:  # noqa: BLE001 - e.g. sgrs refusing to read what it wrote
            found.append(f"[result] {type(exc).__name__}: {str(exc)[:300]}")
    return found




def execute(case: H.HostileCase, folder: Path, cohort, run_source: Path | None) -> list[str]:
    """Build the case under ``folder``, run it, and return its problems (empty: it behaved)."""
    ctx = H.Ctx(tmp=folder / "case", cohort=cohort, run_source=run_source)
    ctx.tmp.mkdir()
    sc = case.build(ctx)
    before = {p: snapshot(p) for p in sc.user}
    out_before = {p: snapshot(p) for p in sc.outputs}
    keep_before = {p: snapshot(p) for p in sc.keep}
    res = run_sgrs(sc.argv, cwd=folder, logs=folder / "logs")
    return problems_of(case, sc, res, before, out_before, keep_before)


@pytest.fixture(scope="module")
def outcomes(request, tiny_cohort, tmp_path_factory):
    """Run every selected case, JOBS at a time (each is a separate process), as soon as the first
    test asks; each test then waits for its own case's problems."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_hostile_command"
                and item.path == request.node.path]
    run_source = request.getfixturevalue("tiny_run") if any(c.needs_run for c in selected) else None
    pool = ThreadPoolExecutor(max_workers=JOBS)
    futures = {c.id: pool.submit(execute, c, tmp_path_factory.mktemp(c.id[:40]), tiny_cohort,
                                 run_source if c.needs_run else None) for c in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case", H.CASES, ids=H.CASE_IDS)
def test_hostile_command(case: H.HostileCase, outcomes):
    found = outcomes[case.id].result()
    assert not found, "\n".join(found)


# ----------------------------------------------------------------------------- the corpus itself


def test_corpus_is_large_and_covers_every_family():
    assert len(H.CASES) >= 70
    families = {c.family for c in H.CASES}
    assert families == {"data-loss", "escape", "resources", "traceback", "silent", "rough", "mistyped"}
    assert all(c.expect and set(c.expect) <= {0, 2} for c in H.CASES)
    # a case that may exit 0 must say what a correct exit 0 is, or be a pure refusal-or-cope case
    assert [c.id for c in H.CASES if c.usage_suggests] == ["USAGE-train-iteratons", "USAGE-train-label-ambiguous"]


@pytest.mark.parametrize("kind", ["nrrd", "nhdr", "mhd"])
def test_the_escaping_layouts_are_well_formed_inside_their_folder(kind, tiny_cohort, tmp_path):
    """The escape cases fail for the escape alone: the same header with its data beside it reads."""
    from napari_sgrs.core.io import read_volume

    expected = read_volume(H.first(tiny_cohort.images_tr)).array.astype("f4")
    assert np.array_equal(read_volume(H.inside_twin(tmp_path, kind, expected)).array, expected)


def test_the_escaping_label_is_a_good_label_once_its_data_is_inside(tiny_cohort, tmp_path):
    from napari_sgrs.core.io import check_pair, read_volume, validate_label

    ctx = H.Ctx(tmp=tmp_path, cohort=tiny_cohort, run_source=None)
    labels = ctx.labels()
    bad = H.escaping_label(ctx, labels)
    (tmp_path / "secret" / bad.with_suffix(".raw").name).rename(labels / bad.with_suffix(".raw").name)
    bad.write_text(bad.read_text().replace("../secret/", ""))
    label = read_volume(bad)
    check_pair(read_volume(tiny_cohort.images_tr / f"{bad.stem}.nii.gz"), label)
    assert set(np.unique(validate_label(label, None, 255))) == {0, 1}


@pytest.mark.parametrize("kind", ["nrrd", "nhdr", "mhd"])
@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "list", "pattern"])
def test_the_escaping_headers_really_reach_outside(kind, how, tiny_cohort, tmp_path):
    """ITK itself follows each escaping header to the secret voxels: the cases are real escapes."""
    import SimpleITK as sitk

    ctx = H.Ctx(tmp=tmp_path, cohort=tiny_cohort, run_source=None)
    folder = tmp_path / "images"
    folder.mkdir()
    header = H.escaping_header(ctx, folder, kind, how)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(header)))
    from napari_sgrs.core.io import read_volume

    assert np.array_equal(array, read_volume(H.first(tiny_cohort.images_tr)).array.astype("f4"))


@pytest.mark.parametrize("how", ["storage", "link", "virtual"])
def test_the_escaping_h5_files_really_reach_outside(how, tiny_cohort, tmp_path):
    import h5py

    from napari_sgrs.core.io import read_volume

    ctx = H.Ctx(tmp=tmp_path, cohort=tiny_cohort, run_source=None)
    (tmp_path / "images").mkdir()
    path = H.h5_external(ctx, tmp_path / "images" / "x.h5", how)
    with h5py.File(path, "r") as f:
        array = f["image"][()]
    assert np.array_equal(array, read_volume(H.first(tiny_cohort.images_tr)).array.astype("f4"))
