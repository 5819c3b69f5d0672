"""Labels that would train (or score) something other than what the user meant: each is refused
with one line and exit 2 before anything is written, and legitimate labels still train.

Issue 19, "silent wrong results": every voxel 255, --labels = --images, an ignore index that is
a class, no foreground, more than 255 classes, a folder named like a label file, evaluate counting
255 as a class. Issue 22 item 7: the class count inferred from the labels is noted in one line.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_sgrs.cli import main
from napari_sgrs.core.errors import SGRSError
from napari_sgrs.core.events import EventKind, read_events
from napari_sgrs.core.io import find_cases, read_volume, write_volume

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import TINY_ARGS, tiny_config  # noqa: E402


# ----------------------------------------------------------------------------- helpers

def _cohort(tiny_cohort, tmp_path: Path) -> tuple[Path, Path]:
    images, labels = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(tiny_cohort.images_tr, images)
    shutil.copytree(tiny_cohort.labels_tr, labels)
    return images, labels


def _rewrite(path: Path, change) -> None:
    """Rewrite the label at ``path`` with ``change(array)`` (returns the new array)."""
    vol = read_volume(path)
    write_volume(path, change(vol.array.copy()), vol.geometry)


def _first(labels: Path) -> Path:
    return sorted(labels.iterdir())[0]


def _expect_one_line_error(capsys, code: int, needles: list[str], out: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    # nothing written: no run folder, or (should a lock create one) an empty one
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
    return err


# ----------------------------------------------------------------------------- train: refused

def _all_ignored(images, labels):
    first = _first(labels)
    _rewrite(first, lambda a: np.full_like(a, 255))
    return [], [first.name, "every voxel is the ignore index 255", "nothing is annotated"]


def _every_label_ignored(images, labels):
    for p in labels.iterdir():
        _rewrite(p, lambda a: np.full_like(a, 255))
    return [], [_first(labels).name, "nothing is annotated"]


def _labels_are_images(images, labels):
    return ["--labels", str(images)], ["is the --images folder"]


def _labels_alias_images(images, labels):
    alias = images.parent / "alias"
    alias.symlink_to(images, target_is_directory=True)  # another spelling of the same folder
    return ["--labels", str(alias / ".")], ["is the --images folder"]


def _intensity_labels_integer(images, labels):
    """Images copied over the labels as whole numbers: a 'label' with hundreds of values."""
    first = _first(labels)
    image = read_volume(images / first.name)
    a = image.array
    write_volume(first, np.round((a - a.min()) / (a.max() - a.min()) * 838).astype(np.uint16), image.geometry)
    return [], [first.name, "distinct values", "looks like an image", "--num-classes"]


def _images_copied_as_labels(images, labels):
    first = _first(labels)
    shutil.copy(images / first.name, first)
    return [], [first.name, "distinct values", "looks like an image"]


def _probability_map_as_label(images, labels):
    first = _first(labels)
    _rewrite(first, lambda a: (a * 0.8 + 0.1).astype(np.float32))
    return [], [first.name, "whole numbers", "0.1"]


def _over_255_classes(images, labels):
    first = _first(labels)
    _rewrite(first, lambda a: np.where(a == 1, 1000, a.astype(np.uint16)))
    return [], [first.name, "1001 classes", "at most 255 classes"]


def _ignore_only_foreground(images, labels):
    return ["--ignore-index", "1"], ["--ignore-index 1", "the only foreground class"]


def _ignore_background(images, labels):
    return ["--ignore-index", "0"], ["--ignore-index 0", "background"]


def _ignore_a_class(images, labels):
    return ["--ignore-index", "2", "--num-classes", "3"], ["--ignore-index 2", "one of the 3 classes"]


def _ignore_too_large(images, labels):
    return ["--ignore-index", "256"], ["--ignore-index", "0..255", "256"]


def _ignore_negative(images, labels):
    return ["--ignore-index=-100"], ["--ignore-index", "0..255", "-100"]


def _num_classes_too_many(images, labels):
    return ["--num-classes", "300"], ["--num-classes", "2..255", "300"]


def _num_classes_one(images, labels):
    return ["--num-classes", "1"], ["--num-classes", "2..255"]


def _no_foreground(images, labels):
    for p in labels.iterdir():
        _rewrite(p, np.zeros_like)
    return [], ["no foreground in any label", _first(labels).name]


def _foreground_is_255(images, labels):
    """Binary masks saved as 0/255: with the default ignore index the structure vanishes."""
    for p in labels.iterdir():
        _rewrite(p, lambda a: np.where(a > 0, 255, 0).astype(np.uint8))
    return [], ["no foreground in any label", "relabel it as 1"]


def _label_is_a_folder(images, labels):
    first = _first(labels)
    first.unlink()
    first.mkdir()
    return [], [first.name, "is a folder"]


def _label_is_a_broken_link(images, labels):
    first = _first(labels)
    first.unlink()
    first.symlink_to(labels / "gone.nii.gz")
    return [], [first.name, "not a readable file"]


def _label_is_a_link_loop(images, labels):
    first = _first(labels)
    first.unlink()
    first.symlink_to(first)
    return [], [first.name, "not a readable file"]


REFUSED = {
    "all-ignored": _all_ignored,
    "every-label-ignored": _every_label_ignored,
    "labels-are-images": _labels_are_images,
    "labels-alias-images": _labels_alias_images,
    "intensity-labels-integer": _intensity_labels_integer,
    "images-copied-as-labels": _images_copied_as_labels,
    "probability-map-as-label": _probability_map_as_label,
    "over-255-classes": _over_255_classes,
    "ignore-only-foreground": _ignore_only_foreground,
    "ignore-background": _ignore_background,
    "ignore-a-class": _ignore_a_class,
    "ignore-too-large": _ignore_too_large,
    "ignore-negative": _ignore_negative,
    "num-classes-300": _num_classes_too_many,
    "num-classes-1": _num_classes_one,
    "no-foreground": _no_foreground,
    "foreground-is-255": _foreground_is_255,
    "label-is-a-folder": _label_is_a_folder,
    "label-is-a-broken-link": _label_is_a_broken_link,
    "label-is-a-link-loop": _label_is_a_link_loop,
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_train_refuses_labels_that_train_the_wrong_thing(case, tiny_cohort, tmp_path, capsys):
    images, labels = _cohort(tiny_cohort, tmp_path)
    extra, needles = REFUSED[case](images, labels)
    run = tmp_path / "run"
    # later flags win in argparse: a case's --labels replaces the default one
    code = main(["train", "--images", str(images), "--labels", str(labels), "--out", str(run), *TINY_ARGS, *extra])
    _expect_one_line_error(capsys, code, needles, run)


def test_predict_refuses_labels_equal_to_images(tiny_cohort, tmp_path, capsys):
    """predict --labels marks which images are labeled: the images folder would mark them all."""
    run = tmp_path / "run"
    assert main(["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
                 "--out", str(run), *TINY_ARGS, "--iterations", "1"]) == 0
    capsys.readouterr()
    out = tmp_path / "pred"
    code = main(["predict", "--run", str(run), "--images", str(tiny_cohort.images_tr), "--labels",
                 str(tiny_cohort.images_tr), "--out", str(out), "--regions", "--quiet"])
    _expect_one_line_error(capsys, code, ["is the --images folder"], out)


@pytest.mark.parametrize("kind", ["folder", "broken-link", "link-loop"])
def test_find_cases_refuses_an_image_name_that_is_not_a_file(kind, tiny_cohort, tmp_path):
    images, labels = _cohort(tiny_cohort, tmp_path)
    bad = sorted(images.iterdir())[-1]
    bad.unlink()
    if kind == "folder":
        bad.mkdir()
    else:
        bad.symlink_to(images / "gone.nii.gz" if kind == "broken-link" else bad)
    with pytest.raises(SGRSError, match=f"{bad.name}: named like a volume file"):
        find_cases(images, labels)


# ----------------------------------------------------------------------------- train: accepted

def _partial(a, i=0):
    out = np.full_like(a, 255)
    out[::4] = a[::4]  # every fourth slice annotated, the rest unannotated
    return out


def _stray_in_first(a, i):
    if i == 0:
        a[0, 0, 0] = 2
    return a


LEGIT = {
    # id: (change(label, index), TrainConfig settings, class count, words of the note; None: no note)
    "partial-255": (_partial, {}, 2, None),
    "float-0-1": (lambda a, i: a.astype(np.float32), {}, 2, None),
    "other-ignore-index": (lambda a, i: np.where(_partial(a) == 255, 254, a).astype(np.uint8),
                           {"ignore_index": 254}, 2, None),
    "explicit-classes": (lambda a, i: a, {"num_classes": 4}, 4, None),
    "stray-value": (_stray_in_first, {}, 3, ["values 0, 1, 2 found", "ignore index 255 left out",
                                             "training 3 classes", "value 2 only in", "blob_000.nii.gz"]),
    "sparse-values": (lambda a, i: np.where(a == 1, 4, a), {}, 5,
                      ["values 0, 4 found", "training 5 classes", "class(es) 1, 2, 3 have no voxel"]),
    "no-background-annotated": (lambda a, i: np.where(a == 0, 255, a), {}, 2,
                                ["values 1 found", "class(es) 0 have no voxel"]),
}


@pytest.mark.parametrize("case", list(LEGIT), ids=list(LEGIT))
def test_legitimate_labels_load(case, tiny_cohort, tmp_path):
    from napari_sgrs.core.train import load_cases

    images, labels = _cohort(tiny_cohort, tmp_path)
    change, settings, k, words = LEGIT[case]
    for i, p in enumerate(sorted(labels.iterdir())):
        _rewrite(p, lambda a: change(a, i))
    notes: list[str] = []
    loaded, num_classes = load_cases(find_cases(images, labels), tiny_config(**settings), notes)
    assert num_classes == k
    assert sum(c.label is not None for c in loaded) == len(tiny_cohort.labeled_names)
    if words is None:
        assert notes == []  # plain 0/1 labels, or a class count the user gave: nothing to say
    else:
        assert len(notes) == 1 and "\n" not in notes[0], notes
        for w in words:
            assert w in notes[0], notes[0]


def test_multiclass_demo_cohort_loads_with_a_note(tmp_path):
    from napari_sgrs.core.demo import make_demo_cohort
    from napari_sgrs.core.train import load_cases

    c = make_demo_cohort(tmp_path / "d", n_cases=4, n_labeled=2, n_test=0, shape=(20, 20, 20), n_classes=3)
    notes: list[str] = []
    _, k = load_cases(find_cases(c.images_tr, c.labels_tr), tiny_config(), notes)
    assert k == 3 and "values 0, 1, 2 found" in notes[0] and "training 3 classes" in notes[0]


def test_a_stray_value_is_named_in_the_note_of_a_real_run(tiny_cohort, tmp_path, capsys):
    """Issue 22 item 7: one voxel of value 2 in one label makes a 3-class model; the user sees it."""
    images, labels = _cohort(tiny_cohort, tmp_path)
    stray = _first(labels)

    def add_stray(a):
        a[0, 0, 0] = 2
        return a

    _rewrite(stray, add_stray)
    run = tmp_path / "run"
    assert main(["train", "--images", str(images), "--labels", str(labels), "--out", str(run), *TINY_ARGS,
                 "--iterations", "1"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: classes")]
    assert len(notes) == 1, notes
    assert "values 0, 1, 2 found" in notes[0] and "training 3 classes" in notes[0]
    assert f"value 2 only in {stray}" in notes[0]
    started = read_events(run / "events.jsonl")[0]
    assert started.kind is EventKind.STARTED and "training 3 classes" in started.data["note"]


# ----------------------------------------------------------------------------- evaluate

def _eval_folders(tmp_path: Path, ref: np.ndarray, pred: np.ndarray) -> tuple[Path, Path]:
    from napari_sgrs.core.io import Geometry

    for folder, array in (("labels", ref), ("pred", pred)):
        (tmp_path / folder).mkdir(exist_ok=True)
        write_volume(tmp_path / folder / "c.nii.gz", array.astype(np.uint8), Geometry.identity())
    return tmp_path / "pred", tmp_path / "labels"


def _box_ref_and_pred():
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    pred = ref.copy()
    ref[8:, :, :] = 255         # unannotated slices of a partial reference
    pred[9:11, 3:7, 3:7] = 1    # the prediction finds something there: not an error, not a class
    return ref, pred


def test_evaluate_leaves_the_ignore_index_out_of_every_metric(tmp_path, capsys):
    ref, pred = _box_ref_and_pred()
    pred_dir, label_dir = _eval_folders(tmp_path, ref, pred)
    out = tmp_path / "m.json"
    assert main(["evaluate", "--pred", str(pred_dir), "--labels", str(label_dir), "--json", str(out)]) == 0
    captured = capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["num_classes"] == 2 and list(report["summary"]) == ["1"]  # 255 is no class
    (case,) = report["cases"]
    assert case["dice"] == 1.0 and case["hd95_vox"] == 0.0  # the ignored slices are not false alarms
    assert case["pred_voxels"] == case["ref_voxels"] == 64
    assert report["ignore_index"] == 255 and report["ignored_voxels"] == 4 * 12 * 12
    assert f"note: {4 * 12 * 12} voxels hold the ignore index 255" in captured.err


def test_evaluate_ignore_index_option(tmp_path, capsys):
    ref, pred = _box_ref_and_pred()
    ref[ref == 255] = 7
    pred_dir, label_dir = _eval_folders(tmp_path, ref, pred)
    out = tmp_path / "m.json"
    assert main(["evaluate", "--pred", str(pred_dir), "--labels", str(label_dir), "--json", str(out),
                 "--ignore-index", "7"]) == 0
    report = json.loads(out.read_text())
    assert report["num_classes"] == 2 and report["cases"][0]["dice"] == 1.0


def _eval_all_ignored(ref, pred):
    return np.full_like(ref, 255), pred, [], ["labels/c.nii.gz", "every voxel holds the ignore index 255"]


def _eval_ignore_background(ref, pred):
    return ref, pred, ["--ignore-index", "0"], ["--ignore-index 0", "one of the"]


def _eval_ignore_only_class(ref, pred):
    return ref, pred, ["--ignore-index", "1"], ["--ignore-index 1", "one of the 2 classes"]


def _eval_ignore_too_large(ref, pred):
    return ref, pred, ["--ignore-index", "300"], ["--ignore-index", "0..255", "300"]


REFUSED_EVAL = {
    "reference-all-ignored": _eval_all_ignored,
    "ignore-background": _eval_ignore_background,
    "ignore-the-only-class": _eval_ignore_only_class,
    "ignore-too-large": _eval_ignore_too_large,
}


@pytest.mark.parametrize("case", list(REFUSED_EVAL), ids=list(REFUSED_EVAL))
def test_evaluate_refuses_an_ignore_index_that_hides_everything(case, tmp_path, capsys):
    ref, pred = _box_ref_and_pred()
    ref, pred, extra, needles = REFUSED_EVAL[case](ref, pred)
    pred_dir, label_dir = _eval_folders(tmp_path, ref, pred)
    out = tmp_path / "m.json"
    code = main(["evaluate", "--pred", str(pred_dir), "--labels", str(label_dir), "--json", str(out), *extra])
    _expect_one_line_error(capsys, code, needles, out)


def test_evaluate_refuses_a_reference_folder_named_like_a_volume(tmp_path, capsys):
    ref, pred = _box_ref_and_pred()
    pred_dir, label_dir = _eval_folders(tmp_path, ref, pred)
    write_volume(pred_dir / "d.nii.gz", pred, read_volume(pred_dir / "c.nii.gz").geometry)
    (label_dir / "d.nii.gz").mkdir()
    code = main(["evaluate", "--pred", str(pred_dir), "--labels", str(label_dir)])
    _expect_one_line_error(capsys, code, ["d.nii.gz", "is a folder"], tmp_path / "m.json")


def test_case_metrics_leaves_the_ignore_index_out():
    from napari_sgrs.core.metrics import case_metrics

    ref, pred = _box_ref_and_pred()
    (rec,) = case_metrics(pred, ref)
    assert rec.label == 1 and rec.dice == 1.0
    assert [r.label for r in case_metrics(pred, ref, ignore_index=None)][-1] == 255  # the old count, on request
