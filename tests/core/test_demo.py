"""Tests of napari_sgrs.core.demo (determinism, layout, geometry, label content, difficulty), of `sgrs demo`
(the preview setting, what it says trains) and of `make demo`'s script (which demo runs, where results land)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_sgrs.core.demo import make_demo_case, make_demo_cohort, partial_label
from napari_sgrs.core.errors import ConfigError, InputError
from napari_sgrs.core.io import read_volume

SHAPE = (32, 36, 40)
SPACING = (1.5, 0.8, 0.8)


@pytest.fixture(scope="module")
def blob_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("blob")
    return make_demo_cohort(
        out, kind="blob", n_cases=5, n_labeled=2, n_test=2, shape=SHAPE, spacing=SPACING, seed=3
    )


# --- determinism ---------------------------------------------------------------------

@pytest.mark.parametrize("kind, n_classes", [("blob", 2), ("blob", 3), ("vessel", 2)])
def test_same_seed_same_case_and_other_seed_differs(kind, n_classes):
    a = make_demo_case(kind, shape=SHAPE, seed=7, index=2, n_classes=n_classes)
    b = make_demo_case(kind, shape=SHAPE, seed=7, index=2, n_classes=n_classes)
    other_seed = make_demo_case(kind, shape=SHAPE, seed=8, index=2, n_classes=n_classes)
    other_case = make_demo_case(kind, shape=SHAPE, seed=7, index=3, n_classes=n_classes)
    for x, y in zip(a, b):
        assert x.tobytes() == y.tobytes()
    assert not np.array_equal(a[0], other_seed[0]) and not np.array_equal(a[1], other_seed[1])
    assert not np.array_equal(a[1], other_case[1])


def test_cohort_files_are_reproducible(blob_cohort, tmp_path):
    again = make_demo_cohort(
        tmp_path, kind="blob", n_cases=5, n_labeled=2, n_test=2, shape=SHAPE, spacing=SPACING,
        seed=3,
    )
    for folder, name in [
        ("images_tr", "blob_004"),
        ("labels_tr", "blob_001"),
        ("images_ts", "blob_006"),
        ("labels_ts", "blob_005"),
    ]:
        first = read_volume(getattr(blob_cohort, folder) / f"{name}.nii.gz").array
        second = read_volume(getattr(again, folder) / f"{name}.nii.gz").array
        assert first.tobytes() == second.tobytes()
    # A case does not depend on the cohort size: case i of a smaller cohort is the same.
    image, label = make_demo_case("blob", shape=SHAPE, seed=3, index=1)
    assert np.array_equal(read_volume(blob_cohort.labels_tr / "blob_001.nii.gz").array, label)
    assert np.array_equal(read_volume(blob_cohort.images_tr / "blob_001.nii.gz").array, image)


# --- layout and geometry -------------------------------------------------------------

def _names(folder):
    return sorted(p.name[: -len(".nii.gz")] for p in folder.glob("*.nii.gz"))


def test_cohort_layout_and_json(blob_cohort):
    c = blob_cohort
    assert _names(c.images_tr) == [f"blob_{i:03d}" for i in range(5)]
    assert _names(c.labels_tr) == ["blob_000", "blob_001"]  # first n_labeled only
    assert _names(c.images_ts) == _names(c.labels_ts) == ["blob_005", "blob_006"]
    assert c.labeled_names == ("blob_000", "blob_001")
    assert c.unlabeled_names == ("blob_002", "blob_003", "blob_004")
    assert c.test_names == ("blob_005", "blob_006")
    meta = json.loads(c.json_path.read_text())
    assert meta["kind"] == "blob" and meta["seed"] == 3 and meta["n_classes"] == 2
    assert meta["shape"] == list(SHAPE) and meta["spacing"] == list(SPACING)
    assert meta["train_names"] == list(c.train_names)
    assert meta["labeled_names"] == list(c.labeled_names)
    assert meta["test_names"] == list(c.test_names)


def test_cohort_pairs_with_find_cases(blob_cohort):
    from napari_sgrs.core.io import find_cases

    cases = find_cases(blob_cohort.images_tr, blob_cohort.labels_tr)
    labeled = [c.name for c in cases if c.label is not None]
    assert labeled == list(blob_cohort.labeled_names)
    assert len(cases) == 5


def test_geometry_is_written_and_read_back(blob_cohort):
    for path in [
        blob_cohort.images_tr / "blob_000.nii.gz",
        blob_cohort.labels_ts / "blob_005.nii.gz",
    ]:
        volume = read_volume(path)
        assert volume.array.shape == SHAPE
        assert volume.geometry.spacing == pytest.approx(SPACING, abs=1e-5)
        assert volume.geometry.origin == pytest.approx(blob_cohort.origin, abs=1e-4)
        assert all(abs(o) > 1.0 for o in volume.geometry.origin)  # non-zero origin


# --- label content and difficulty ----------------------------------------------------

@pytest.mark.parametrize(
    "kind, n_classes, values, lo, hi",
    [
        ("blob", 2, {0, 1}, 0.01, 0.20),
        ("blob", 3, {0, 1, 2}, 0.01, 0.25),
        ("vessel", 2, {0, 1}, 0.003, 0.05),
    ],
)
def test_labels_and_target_fraction(kind, n_classes, values, lo, hi):
    for index in range(6):
        image, label = make_demo_case(
            kind, shape=(48, 48, 48), seed=0, index=index, n_classes=n_classes
        )
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert set(np.unique(label)) == values
        assert lo <= (label > 0).mean() <= hi, (index, (label > 0).mean())
        # the target is one connected structure, not speckle
        assert ndimage.label(label == 1)[1] <= 2


def _best_threshold_dice(image, target, darker):
    best = 0.0
    for t in np.unique(np.percentile(image, np.linspace(0.5, 99.5, 300))):
        mask = image < t if darker else image > t
        best = max(best, 2 * (mask & target).sum() / (mask.sum() + target.sum()))
    return best


@pytest.mark.parametrize("kind", ["blob", "vessel"])
def test_target_is_not_trivially_thresholdable(kind):
    for index in range(4):
        image, label = make_demo_case(kind, shape=(48, 48, 48), seed=1, index=index)
        target = label == 1
        assert _best_threshold_dice(image, target, darker=kind == "vessel") < 0.9
        assert _best_threshold_dice(image, target, darker=kind != "vessel") < 0.9


@pytest.mark.parametrize("kind, brighter", [("blob", True), ("vessel", False)])
def test_target_contrast_direction_and_scale(kind, brighter):
    image, label = make_demo_case(kind, shape=(48, 48, 48), seed=2, index=0)
    target = label == 1
    shell = ndimage.binary_dilation(target, iterations=3) & ~ndimage.binary_dilation(target)
    inside, around = np.median(image[target]), np.median(image[shell])
    assert (inside > around) if brighter else (inside < around)
    if kind == "vessel":  # Hounsfield-like scale
        assert -400 < np.percentile(image, 1) and np.percentile(image, 99) < 500
    else:  # MRI-like, non-negative magnitudes
        assert image.min() >= 0


# --- partial labels ------------------------------------------------------------------

@pytest.mark.parametrize("axis, keep_every, start", [(0, 4, 0), (1, 3, 1), (2, 1, 0), (-1, 5, 4)])
def test_partial_label_keeps_every_kth_slice(axis, keep_every, start):
    _, label = make_demo_case("blob", shape=SHAPE, seed=0, index=0, n_classes=3)
    partial = partial_label(label, keep_every=keep_every, axis=axis, start=start)
    assert partial.shape == label.shape and partial.dtype == label.dtype
    kept = np.zeros(label.shape[axis], dtype=bool)
    kept[start::keep_every] = True
    moved_p, moved_l = np.moveaxis(partial, axis, 0), np.moveaxis(label, axis, 0)
    assert np.array_equal(moved_p[kept], moved_l[kept])
    assert np.all(moved_p[~kept] == 255)
    assert label.max() == 2  # input untouched


def test_partial_label_widens_dtype_and_rejects_clashes():
    label = np.zeros((4, 4, 4), dtype=np.uint8)
    assert partial_label(label, ignore_index=1000).dtype == np.uint16
    with pytest.raises(InputError, match="ignore_index=0"):
        partial_label(label, ignore_index=0)
    with pytest.raises(ConfigError, match="keep_every=0"):
        partial_label(label, keep_every=0)


# --- settings and output folder ------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "spleen"}, "spleen"),
        ({"n_cases": 2, "n_labeled": 3}, "n_labeled=3"),
        ({"n_cases": 0}, "n_cases=0"),
        ({"n_test": -1}, "n_test=-1"),
        ({"kind": "vessel", "n_classes": 3}, "n_classes=3"),
        ({"shape": (8, 32, 32)}, "shape"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
    ],
)
def test_bad_settings_raise_config_error(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_demo_cohort(tmp_path, **kwargs)
    assert not (tmp_path / "cohort.json").exists()


def test_existing_cohort_needs_overwrite(tmp_path):
    small = dict(shape=(16, 16, 16), n_cases=2, n_labeled=1, n_test=1)
    make_demo_cohort(tmp_path, seed=0, **small)
    with pytest.raises(InputError, match="overwrite=True"):
        make_demo_cohort(tmp_path, seed=1, **small)
    c = make_demo_cohort(tmp_path, kind="vessel", seed=1, overwrite=True, **small)
    assert _names(c.images_tr) == ["vessel_000", "vessel_001"]  # old blob files removed
    assert _names(c.labels_tr) == ["vessel_000"]
    assert json.loads(c.json_path.read_text())["kind"] == "vessel"


def test_default_labels_half_of_the_training_cases(tmp_path):
    c = make_demo_cohort(tmp_path, shape=(16, 16, 16), n_cases=3, n_test=0)
    assert c.labeled_names == ("blob_000",) and c.test_names == ()
    assert _names(c.labels_tr) == ["blob_000"] and _names(c.images_ts) == []


def test_hidden_label_regenerates_every_case_label(tmp_path):
    from napari_sgrs.core.errors import ConfigError
    from napari_sgrs.core.io import read_volume

    c = make_demo_cohort(tmp_path, n_cases=3, n_labeled=1, n_test=1, shape=(24, 24, 24), seed=7)
    for name in (c.labeled_names[0], c.test_names[0]):
        folder = c.labels_tr if name in c.labeled_names else c.labels_ts
        assert np.array_equal(c.hidden_label(name), read_volume(folder / f"{name}.nii.gz").array)
    unlabeled = c.hidden_label(c.unlabeled_names[0])
    assert unlabeled.shape == (24, 24, 24) and unlabeled.any()
    assert not (c.labels_tr / f"{c.unlabeled_names[0]}.nii.gz").exists()
    with pytest.raises(ConfigError, match="blob_999"):
        c.hidden_label("blob_999")


# --- sgrs demo: the engine demo trains what it says, with the panel's CPU setting -----------------

def test_sgrs_demo_says_what_trains_and_uses_the_preview_setting(tmp_path, capsys):
    from napari_sgrs.cli import main
    from napari_sgrs.core.settings import PRESETS

    assert main(["demo", str(tmp_path / "demo"), "--iterations", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "demo" / "run" / "config.json").read_text())
    # the announced split is the trainer's own: 4 labeled demo volumes, one held out for validation
    assert (len(saved["train_cases"]), len(saved["val_cases"])) == (3, 1)
    assert "on 4 labeled (3 train, 1 validation) + 4 unlabeled demo volumes" in out
    preview = {k: list(v) if isinstance(v, tuple) else v for k, v in PRESETS["preview"].items() if k != "iterations"}
    assert {k: saved["config"][k] for k in preview} == preview and saved["config"]["iterations"] == 2
    for folder in ("data/", "run/", "pseudo/", "evaluation.json"):  # where the results are, said at the end
        assert folder in out.splitlines()[-1]


# --- make demo (scripts/demo.sh): which demo runs, and where it says the results are --------------

def _demo_script(tmp_path, xvfb: bool):
    """scripts/demo.sh in a copy whose system_deps.sh answers ``xvfb``, with stand-ins for the
    venv's sgrs and for xvfb-run that print the command they were given."""
    import shutil
    import stat

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "scripts").mkdir()
    shutil.copy(root / "scripts" / "demo.sh", tmp_path / "scripts" / "demo.sh")
    stubs = {"scripts/system_deps.sh": f"exit {0 if xvfb else 2}", "venv/bin/sgrs": 'echo "sgrs $*"',
             "bin/xvfb-run": 'echo "xvfb-run $*"'}
    for name, body in stubs.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def run():
        env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
        env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
        return subprocess.run(["bash", "scripts/demo.sh", "venv/bin/python", "demo"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    return run


def test_make_demo_without_xvfb_runs_the_engine_demo_and_says_so(tmp_path):
    done = _demo_script(tmp_path, xvfb=False)()
    assert done.returncode == 0
    assert "no Xvfb" in done.stdout and "preview setting" in done.stdout and "results in demo/" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "sgrs demo demo"  # the preview-sized engine demo (above)


def test_make_demo_under_xvfb_runs_the_panel_loop_and_names_its_screenshot(tmp_path):
    run = _demo_script(tmp_path, xvfb=True)
    (tmp_path / "demo" / "napari-project").mkdir(parents=True)
    (tmp_path / "demo" / "napari-project" / "thesis.txt").write_text("not a project")
    refused = run()
    assert refused.returncode == 2 and "is not a napari-sgrs project" in refused.stderr
    assert (tmp_path / "demo" / "napari-project" / "thesis.txt").exists()  # left alone

    (tmp_path / "demo" / "napari-project" / "thesis.txt").unlink()
    (tmp_path / "demo" / "napari-project" / "project.json").write_text("{}")  # an earlier demo's project
    done = run()
    assert done.returncode == 0
    assert ("-m napari_sgrs._napari.demo_app --headless-screenshot demo/screenshot.png --panel-screenshot "
            "demo/panel.png --project demo/napari-project") in done.stdout
    assert "open demo/screenshot.png" in done.stdout
    assert not (tmp_path / "demo" / "napari-project").exists()  # replaced by the new run (xvfb-run stubbed here)
