"""What sgrs writes and where: never into an input, never over a file it did not write, never
outside the folder a cohort file names; and every bad option is one line with exit code 2.

Each refusal here is checked to leave every file it could have touched byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_sgrs.cli import main
from napari_sgrs.core.io import read_volume, write_volume

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import TINY_ARGS, tiny_config  # noqa: E402

REPO = str(Path(__file__).parents[2])


def _snapshot(*folders: Path) -> dict[str, bytes | str]:
    """Every entry under the folders (links not followed), with file bytes."""
    snap = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            snap[str(p)] = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return snap


def _sgrs(capsys, *args) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, stderr). argparse's own errors exit via SystemExit."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _one_line(code: int, err: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def trained(tiny_cohort, tmp_path_factory):
    from napari_sgrs.core.io import find_cases
    from napari_sgrs.core.train import train

    run = tmp_path_factory.mktemp("rules") / "run"
    train(tiny_config(iterations=2), find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr), run)
    return run


@pytest.fixture
def data(tiny_cohort, trained, tmp_path):
    """A private copy of the test images, their labels and the run, all inside tmp_path/data."""
    root = tmp_path / "data"
    shutil.copytree(tiny_cohort.images_ts, root / "images")
    shutil.copytree(tiny_cohort.labels_ts, root / "labels")
    shutil.copytree(trained, root / "run")
    return root


# --------------------------------------------------------------------------- predict --out

def _predict(capsys, data: Path, out: Path, *extra) -> tuple[int, str]:
    return _sgrs(capsys, "predict", "--run", data / "run", "--images", data / "images", "--labels",
                 data / "labels", "--out", out, "--quiet", *extra)


PREDICT_OUT = {
    # name: (the --out, relative to the data folder, and the words of the refusal)
    "is-images": ("images", "is the input --images"),
    "is-labels": ("labels", "is the input --labels"),
    "inside-labels": ("labels/pred", "is inside the input --labels"),
    "is-run": ("run", "is the input --run"),
    "inside-run": ("run/checkpoints", "is inside the input --run"),
    "contains-the-inputs": (".", "contains the input --images"),
    "a-link-to-images": ("link", "is the input --images"),
    "regions-linked-into-labels": ("pred", "pred/regions is the input --labels"),  # a link to the labels
}


@pytest.mark.parametrize("name", list(PREDICT_OUT))
def test_predict_never_writes_into_its_inputs(name, data, capsys):
    rel, needle = PREDICT_OUT[name]
    (data / "link").symlink_to(data / "images")
    (data / "pred").mkdir()
    (data / "pred" / "regions").symlink_to(data / "labels")
    before = _snapshot(data)
    code, err = _predict(capsys, data, data / rel, "--regions")
    _one_line(code, err)
    assert needle in err and "never writes into its inputs" in err, err
    assert _snapshot(data) == before


def test_predict_never_overwrites_a_file_it_did_not_write(data, tmp_path, capsys):
    out = tmp_path / "pred"
    out.mkdir()
    first = sorted((data / "images").iterdir())[0].name
    (out / first).write_bytes(b"the user's own segmentation")
    before = _snapshot(out)
    code, err = _predict(capsys, data, out)
    _one_line(code, err)
    assert f"{out / first} exists and was not written by sgrs predict" in err, err
    assert _snapshot(out) == before  # refused before predicting anything: no other case written
    (out / first).unlink()
    # its own outputs it replaces, run after run; one the user changed since, it does not
    assert _predict(capsys, data, out)[0] == 0
    assert _predict(capsys, data, out)[0] == 0
    (out / first).write_bytes(b"edited by hand")
    code, err = _predict(capsys, data, out)
    _one_line(code, err)
    assert (out / first).read_bytes() == b"edited by hand" and "was changed since" in err


def _nhdr(folder: Path, name: str, array: np.ndarray) -> Path:
    """A detached NRRD header and its raw payload (sgrs reads .nhdr, it does not write it)."""
    (folder / f"{name}.raw").write_bytes(np.ascontiguousarray(array.astype("<i2")).tobytes())
    d, h, w = array.shape
    (folder / f"{name}.nhdr").write_text(
        "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {w} {h} {d}\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\n"
        f"endian: little\nencoding: raw\ndata file: {name}.raw\n\n")
    return folder / f"{name}.nhdr"


def test_inputs_without_a_single_file_writer_are_predicted_as_nifti(data, tmp_path, capsys):
    """.nhdr (detached header) and .mhd (header + .raw) inputs give <case>.nii.gz, decided before
    predicting: no header companion is written, none is overwritten."""
    images = tmp_path / "mixed"
    images.mkdir()
    vol = read_volume(sorted((data / "images").iterdir())[0])
    _nhdr(images, "detached", vol.array)
    write_volume(images / "meta.mhd", vol.array, vol.geometry)
    shutil.copy(sorted((data / "images").iterdir())[1], images / "plain.nii.gz")
    out = tmp_path / "pred"
    code, err = _sgrs(capsys, "predict", "--run", data / "run", "--images", images, "--out", out, "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".sgrs-written.json", "detached.nii.gz", "meta.nii.gz",
                                                     "plain.nii.gz"]
    assert read_volume(out / "detached.nii.gz").array.shape == vol.array.shape


# --------------------------------------------------------------------------- evaluate --json

def _evaluation(tmp_path: Path, data: Path) -> tuple[Path, Path]:
    pred = tmp_path / "pred"
    shutil.copytree(data / "labels", pred)
    return pred, data / "labels"


EVALUATE_JSON = {
    # name: (the --json, relative to tmp_path, and the words of the refusal)
    "a-prediction": ("pred/FIRST", "is inside the input --pred"),
    "inside-pred": ("pred/m.json", "is inside the input --pred"),
    "inside-labels": ("data/labels/m.json", "is inside the input --labels"),
    "a-folder": ("somewhere", "is a folder"),
    "no-such-folder": ("nope/m.json", "does not exist"),
    "someone-elses-json": ("notes.json", "is not an sgrs evaluation report"),
}


@pytest.mark.parametrize("name", list(EVALUATE_JSON))
def test_evaluate_json_is_never_an_input_a_folder_or_someone_elses_file(name, data, tmp_path, capsys):
    pred, labels = _evaluation(tmp_path, data)
    (tmp_path / "somewhere").mkdir()
    (tmp_path / "notes.json").write_text('{"mine": true}')
    rel, needle = EVALUATE_JSON[name]
    target = tmp_path / rel.replace("FIRST", sorted(pred.iterdir())[0].name)
    before = _snapshot(tmp_path)
    code, err = _sgrs(capsys, "evaluate", "--pred", pred, "--labels", labels, "--json", target)
    _one_line(code, err)
    assert needle in err, err
    assert _snapshot(tmp_path) == before


def test_evaluate_json_replaces_its_own_earlier_report(data, tmp_path, capsys):
    pred, labels = _evaluation(tmp_path, data)
    report = tmp_path / "m.json"
    for _ in range(2):
        code, err = _sgrs(capsys, "evaluate", "--pred", pred, "--labels", labels, "--json", report)
        assert code == 0, err
    assert json.loads(report.read_text())["cases"]


# --------------------------------------------------------------------------- demo-data, demo

SMALL = ["--cases", "2", "--labeled", "1", "--test", "0", "--shape", "16", "16", "16"]


def _cohort(capsys, root: Path) -> None:
    code, err = _sgrs(capsys, "demo-data", root, *SMALL)
    assert code == 0, err


def _name_in_cohort(root: Path, name: str) -> None:
    meta = json.loads((root / "cohort.json").read_text())
    meta["train_names"].append(name)
    (root / "cohort.json").write_text(json.dumps(meta))


def _escape_up(root: Path) -> None:
    (root.parent / "x.nii.gz").write_text("the user's file")  # imagesTr/../../x.nii.gz
    _name_in_cohort(root, "../../x")


def _escape_absolute(root: Path) -> None:
    (root.parent / "abs.nii.gz").write_text("the user's file")
    _name_in_cohort(root, str(root.parent / "abs"))


def _escape_by_link(root: Path) -> None:
    (root.parent / "linked.nii.gz").write_text("the user's file")
    (root / "imagesTr" / "linked.nii.gz").symlink_to(root.parent / "linked.nii.gz")
    _name_in_cohort(root, "linked")


def _foreign_volume(root: Path) -> None:
    (root / "imagesTr" / "mine.nii.gz").write_text("the user's volume")


def _edited_volume(root: Path) -> None:
    (root / "labelsTr" / "blob_000.nii.gz").write_bytes(b"corrected by hand")


COHORT = {
    # name: (change made to a cohort sgrs wrote, words of the refusal)
    "name-going-up": (_escape_up, "is not a plain file name"),
    "absolute-name": (_escape_absolute, "is not a plain file name"),
    "link-leading-out": (_escape_by_link, "leads outside the cohort folder"),
    "not-json": (lambda r: (r / "cohort.json").write_text("{not json"), "not a readable cohort file"),
    "names-not-a-list": (lambda r: (r / "cohort.json").write_text('{"train_names": 5}'), "not a list"),
    "a-volume-sgrs-did-not-write": (_foreign_volume, "mine.nii.gz was not written by sgrs demo-data"),
    "a-volume-edited-since": (_edited_volume, "blob_000.nii.gz was not written by sgrs demo-data or was changed"),
}


@pytest.mark.parametrize("name", list(COHORT))
def test_demo_data_overwrite_removes_only_what_it_wrote_inside_the_cohort(name, tmp_path, capsys):
    root = tmp_path / "a" / "cohort"
    _cohort(capsys, root)
    change, needle = COHORT[name]
    change(root)
    before = _snapshot(tmp_path)
    code, err = _sgrs(capsys, "demo-data", root, *SMALL, "--overwrite", "--seed", "1")
    _one_line(code, err)
    assert needle in err, err
    assert _snapshot(tmp_path) == before


def test_demo_data_overwrite_replaces_its_own_cohort(tmp_path, capsys):
    root = tmp_path / "cohort"
    _cohort(capsys, root)
    first = (root / "imagesTr" / "blob_000.nii.gz").read_bytes()
    code, err = _sgrs(capsys, "demo-data", root, *SMALL, "--overwrite", "--seed", "1")
    assert code == 0, err
    assert (root / "imagesTr" / "blob_000.nii.gz").read_bytes() != first


@pytest.mark.parametrize("args, needle", [
    (["--shape", "4096", "4096", "4096"], "256^3"),
    (["--shape", "16", "16", "-16"], "at least 16"),
    (["--cases", "100000"], "at most 1000"),
    (["--cases", "0"], "n_cases=0"),
    (["--classes", "7"], "n_classes=7"),
    (["--seed", "-1"], "seed=-1"),
])
def test_demo_data_bad_settings_are_one_line_before_anything_is_made(args, needle, tmp_path, capsys):
    code, err = _sgrs(capsys, "demo-data", tmp_path / "cohort", *args)
    _one_line(code, err)
    assert needle in err and not (tmp_path / "cohort").exists(), err


def test_demo_data_into_a_file_and_demo_over_a_user_folder_are_refused(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    (tmp_path / "demo" / "run").mkdir(parents=True)
    (tmp_path / "demo" / "run" / "notes.txt").write_text("the user's run notes")
    before = _snapshot(tmp_path)
    code, err = _sgrs(capsys, "demo-data", afile)
    _one_line(code, err)
    assert "is a file, not a folder" in err
    code, err = _sgrs(capsys, "demo", tmp_path / "demo", "--iterations", "2", "--device", "cpu")
    _one_line(code, err)
    assert "is not an sgrs run" in err
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------- options: one line, exit 2

TRAIN_OPTIONS = [
    (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
    (["--log-every", "0"], "--log-every must be >= 1, got 0"),
    (["--val-every", "0"], "--val-every must be >= 1, got 0"),
    (["--iterations", "0"], "--iterations must be >= 1, got 0"),
    (["--iterations", "-5"], "--iterations must be >= 1, got -5"),
    (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    (["--method", "supervised", "--batch-size", "1"], "--batch-size 1 with patch [16, 16, 16]"),
    (["--batch-size", "1"], "--batch-size must be >= 2 for sgrs-plus"),
    (["--labeled-batch-size", "0"], "--labeled-batch-size must be >= 1, got 0"),
    (["--tau", "nan"], "--tau must be a finite number, got nan"),
    (["--lr", "0"], "--lr must be > 0, got 0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--num-classes", "1"], "--num-classes must be a whole number in 2..255"),
    (["--num-classes", "2", "--ignore-index", "1"], "--ignore-index 1: 1 is one of the 2 classes"),
    (["--workers", "-1"], "--workers must be between 0"),
    (["--rampup-fraction", "2"], "--rampup-fraction must be in [0, 1], got 2"),
    (["--ct-window", "5", "5"], "--ct-window needs LOW < HIGH"),
    (["--base-filters", "0"], "--base-filters must be between 1 and 1024, got 0"),
    (["--unsup-weight", "-1"], "--unsup-weight must be >= 0"),
    (["--val-fraction", "1"], "--val-fraction must be in [0, 1)"),
    (["--iterations", "ten"], "invalid int value: 'ten'"),
]


@pytest.mark.parametrize("extra, needle", TRAIN_OPTIONS, ids=[" ".join(e) for e, _ in TRAIN_OPTIONS])
def test_bad_train_options_are_one_line_and_write_nothing(extra, needle, tiny_cohort, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = _sgrs(capsys, "train", "--images", tiny_cohort.images_tr, "--labels", tiny_cohort.labels_tr,
                      "--out", run, *TINY_ARGS, *extra)
    _one_line(code, err)
    assert needle in err, err
    assert not run.exists()


PREDICT_OPTIONS = [
    (["--sw-batch-size", "0"], "must be >= 1, got 0"),
    (["--sw-batch-size", "-1"], "must be >= 1, got -1"),
    (["--overlap", "1"], "must be in [0, 1), got 1"),
    (["--overlap", "-0.5"], "must be in [0, 1), got -0.5"),
    (["--overlap", "nan"], "must be in [0, 1), got nan"),
]


@pytest.mark.parametrize("extra, needle", PREDICT_OPTIONS, ids=[" ".join(e) for e, _ in PREDICT_OPTIONS])
def test_bad_predict_options_are_one_line_and_write_nothing(extra, needle, data, tmp_path, capsys):
    code, err = _predict(capsys, data, tmp_path / "pred", *extra)
    _one_line(code, err)
    assert needle in err, err
    assert not (tmp_path / "pred").exists()


BAD_CONFIG = {
    "not-json": ("{not json", "not valid JSON"),
    "config-is-a-number": ('{"config": 5}', 'found "config": 5'),
    "a-list": ("[]", "found a JSON list"),
    "no-config": ('{"num_classes": 2}', 'found no "config"'),
}


@pytest.mark.parametrize("name", list(BAD_CONFIG))
def test_a_damaged_config_json_is_one_line_on_predict_and_on_resume(name, data, tiny_cohort, tmp_path, capsys):
    text, needle = BAD_CONFIG[name]
    run = data / "run"
    (run / "config.json").write_text(text)
    before = _snapshot(data)
    code, err = _predict(capsys, data, tmp_path / "pred")
    _one_line(code, err)
    assert f"{run / 'config.json'}:" in err and needle in err, err
    code, err = _sgrs(capsys, "train", "--images", tiny_cohort.images_tr, "--labels", tiny_cohort.labels_tr,
                      "--out", run, "--resume", *TINY_ARGS)
    _one_line(code, err)
    assert f"{run / 'config.json'}:" in err and needle in err, err
    assert _snapshot(data) == before and not (tmp_path / "pred").exists()


@pytest.mark.parametrize("settings, needle", [
    ({"iterations": "ten"}, "--iterations must be an integer, got 'ten'"),
    ({"lr": "fast"}, "--lr must be a finite number, got 'fast'"),
    ({"patch_size": [16, 16]}, "--patch-size must be 3 numbers"),
    ({"use_mix": "yes"}, "use_mix must be true or false"),
    ({"checkpoint_every": 0}, "--checkpoint-every must be >= 1"),
])
def test_wrong_typed_saved_settings_are_one_line_on_resume(settings, needle, data, tiny_cohort, capsys):
    run = data / "run"
    saved = json.loads((run / "config.json").read_text())
    saved["config"].update(settings)
    (run / "config.json").write_text(json.dumps(saved))
    before = _snapshot(data)
    code, err = _sgrs(capsys, "train", "--images", tiny_cohort.images_tr, "--labels", tiny_cohort.labels_tr,
                      "--out", run, "--resume", *TINY_ARGS)
    _one_line(code, err)
    assert f"{run / 'config.json'}: the saved run settings are invalid" in err and needle in err, err
    assert _snapshot(data) == before


def test_option_errors_in_a_real_process(tiny_cohort, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    for args in (["train", "--images", str(tiny_cohort.images_tr), "--out", str(tmp_path / "run"),
                  "--checkpoint-every", "0"],
                 ["predict", "--run", str(tmp_path), "--images", str(tiny_cohort.images_ts), "--out",
                  str(tmp_path / "p"), "--overlap", "1"]):
        proc = subprocess.run([sys.executable, "-m", "napari_sgrs.cli", *args], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, \
            proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "p").exists()


def _add_bad_volume(images: Path) -> Path:
    """A NIfTI cut in half, named to sort after the good ones (so a loop would have written them)."""
    good = sorted(images.iterdir())[0]
    bad = images / "zz_cut.nii.gz"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    return bad


def test_predict_checks_every_input_before_writing_any_output(data, capsys):
    bad = _add_bad_volume((data / "images"))
    out = data.parent / "pred"
    code = main(["predict", "--run", str((data / "run")), "--images", str((data / "images")), "--out", str(out),
                 "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and bad.name in err and "\n" not in err, err
    assert not out.exists()  # nothing half-made: the good volumes were not written either


def test_predict_skip_bad_predicts_the_others_with_one_warning(data, capsys):
    bad = _add_bad_volume((data / "images"))
    out = data.parent / "pred"
    code = main(["predict", "--run", str((data / "run")), "--images", str((data / "images")), "--out", str(out),
                 "--device", "cpu", "--quiet", "--skip-bad"])
    err = capsys.readouterr().err.strip()
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(warned) == 1 and bad.name in warned[0], err
    goods = sorted(p.name for p in (data / "images").iterdir() if p != bad)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == goods


def test_a_huge_sw_batch_size_is_capped_at_the_window_count(data, capsys):
    out = data.parent / "pred"
    code = main(["predict", "--run", str((data / "run")), "--images", str((data / "images")), "--out", str(out),
                 "--device", "cpu", "--quiet", "--sw-batch-size", "1000000"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in (data / "images").iterdir())


@pytest.mark.parametrize("text, words", [("[" * 2000, "2000 bytes is no a settings file; restore it"),
                                         ("{oops", "not valid JSON"), (b"\xff\xfe", "not valid JSON")])
def test_read_json_names_the_file_and_what_is_wrong(tmp_path, text, words):
    """One reader of sgrs's JSON files (config.json, --config): an oversized file is refused by its
    size, before reading, not reported as broken JSON; junk and non-UTF-8 are 'not valid JSON'."""
    from napari_sgrs.core.errors import InputError
    from napari_sgrs.core.outputs import read_json

    path = tmp_path / "x.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError) as err:
        read_json(path, 1024, "a settings file", "restore it")
    assert str(err.value).startswith(f"{path}: ") and words in str(err.value), err.value
