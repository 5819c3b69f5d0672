"""The malformed-file corpus of test_malformed.py, placed in an ``sgrs train --images`` folder
beside good volumes: each gives exit 2 and one line naming the file, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from napari_sgrs.cli import main

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import test_malformed as M  # noqa: E402
from tiny import TINY_ARGS  # noqa: E402

# Inputs that the folder scan skips on purpose (a .png, a file that is not there, a looping
# link are not volumes of the folder): the CLI meets them as the --images path itself.
AS_IMAGES_ARG = {"missing-file", "unsupported-suffix", "symlink-loop"}

CASES = [p for p in M.CORPUS if p.values[1] is M.read]


def _shown(path: Path) -> str:
    return os.fsencode(path.name).decode("utf-8", "backslashreplace")


def _folders(tiny_cohort, tmp_path: Path) -> tuple[Path, Path]:
    images, labels = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(tiny_cohort.images_tr, images)
    shutil.copytree(tiny_cohort.labels_tr, labels)
    return images, labels


def _train_args(images: Path, labels: Path, run: Path) -> list[str]:
    return ["train", "--images", str(images), "--labels", str(labels), "--out", str(run), *TINY_ARGS]


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("build", [pytest.param(p.values[0], id=p.id) for p in CASES])
def test_train_on_a_folder_with_a_malformed_input(build, request, tiny_cohort, tmp_path, capsys):
    images, labels = _folders(tiny_cohort, tmp_path)
    case_id = request.node.callspec.id
    if case_id in AS_IMAGES_ARG:
        bad = build(tmp_path)
        images = bad
    else:
        bad = build(images)
    run = tmp_path / "run"
    code = main(_train_args(images, labels, run))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert _shown(bad) in err, err
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize("case_id", ["truncated-header.mha", "dicom-two-series"])
def test_malformed_input_in_a_real_process(case_id, tiny_cohort, tmp_path):
    """MetaIO aborts the whole process on some headers: only a real process shows it does not."""
    build = next(p.values[0] for p in CASES if p.id == case_id)
    images, labels = _folders(tiny_cohort, tmp_path)
    bad = build(images)
    proc = subprocess.run([sys.executable, "-m", "napari_sgrs.cli", *_train_args(images, labels, tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert _shown(bad) in proc.stderr
