"""Largest-component post-processing: the component rule, the auto decision from the labels, the
run's record of it, and `sgrs predict --largest-component`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sgrs.cli import main
from napari_sgrs.core.errors import ConfigError
from napari_sgrs.core.postprocess import (count_components, keep_largest_component, resolve_largest_component,
                                          single_component_classes)

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import TINY_ARGS, split_label_cohort, threshold_net, tiny_config  # noqa: E402


def _two_class_volume() -> np.ndarray:
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[1:4, 1:4, 1:4] = 1          # class 1, 27 voxels: the largest
    lab[4, 4, 4] = 1                # touches the cube only at a corner: the same 26-component
    lab[8:10, 8:10, 8:10] = 1       # class 1, 8 voxels: an island
    lab[1:3, 8:11, 1:3] = 2         # class 2, 12 voxels
    lab[9, 1, 9] = 2                # class 2 island, 1 voxel
    return lab


def test_keeps_the_largest_component_of_the_named_classes_only():
    lab = _two_class_volume()
    out = keep_largest_component(lab, [1])
    assert out is not lab and (lab == _two_class_volume()).all()  # the input is untouched
    assert (out[8:10, 8:10, 8:10] == 0).all()                     # the class-1 island became background
    assert out[4, 4, 4] == 1                                      # diagonal contact keeps a voxel (26-connectivity)
    assert (out == 1).sum() == 28
    np.testing.assert_array_equal(out == 2, lab == 2)             # class 2 was not named: unchanged
    both = keep_largest_component(lab, [1, 2])
    assert both[9, 1, 9] == 0 and (both == 2).sum() == 12
    assert count_components(both == 1) == count_components(both == 2) == 1


def test_a_class_in_one_piece_or_absent_is_left_alone():
    lab = _two_class_volume()
    lab[lab == 2] = 0
    np.testing.assert_array_equal(keep_largest_component(lab, [2]), lab)  # absent
    single = np.zeros((8, 8, 8), np.uint8)
    single[2:5, 2:5, 2:5] = 1
    np.testing.assert_array_equal(keep_largest_component(single, [1]), single)


def test_2d_input_is_refused_with_its_shape():
    with pytest.raises(ConfigError, match=r"\(4, 4\)"):
        keep_largest_component(np.zeros((4, 4), np.uint8), [1])


def test_auto_takes_the_classes_that_are_one_piece_in_every_label():
    one = np.zeros((10, 10, 10), np.int64)
    one[1:4, 1:4, 1:4] = 1
    one[6:9, 6:9, 6:9] = 2
    split = one.copy()
    split[6:9, 1:3, 1:3] = 2          # class 2 in two pieces here
    split[0, 9, 9] = 255              # the ignore value is not a class
    assert single_component_classes([one, one], 3) == [1, 2]
    assert single_component_classes([one, split], 3) == [1]
    missing = one.copy()
    missing[missing == 1] = 0         # class 1 absent from one volume: no evidence that it is one piece
    assert single_component_classes([one, missing], 3) == [2]
    assert single_component_classes([], 3) == []


def test_modes():
    meta = {"single_component_classes": [2]}
    assert resolve_largest_component("off", meta, 4) == []
    assert resolve_largest_component("on", meta, 4) == [1, 2, 3]
    assert resolve_largest_component("auto", meta, 4) == [2]
    assert resolve_largest_component("auto", {}, 4) == []  # a run from before the record: nothing
    with pytest.raises(ConfigError, match="'largest'.*off, auto, on"):
        resolve_largest_component("largest", meta, 4)


def test_the_predictor_post_processes_the_label_only():
    from napari_sgrs.core.infer import Predictor

    meta = {"config": {"patch_size": [16, 16, 16], "normalization": "zscore"}, "num_classes": 2,
            "single_component_classes": [1]}
    predictor = Predictor(threshold_net(), meta, torch.device("cpu"))
    image = np.zeros((24, 20, 28), np.float32)
    image[2:10, 2:10, 2:10] = 100.0     # the target
    image[15:19, 12:16, 20:24] = 100.0  # a look-alike island
    raw = predictor.predict(image)
    assert count_components(raw.label == 1) == 2
    for mode in ("auto", "on"):
        post = predictor.predict(image, largest_component=mode)
        expected = np.zeros(image.shape, np.uint8)
        expected[2:10, 2:10, 2:10] = 1
        np.testing.assert_array_equal(post.label, expected)
        np.testing.assert_array_equal(post.probability, raw.probability)  # the network's map, unchanged
    np.testing.assert_array_equal(predictor.predict(image, largest_component="off").label, raw.label)
    predictor.meta = dict(meta, single_component_classes=[])
    np.testing.assert_array_equal(predictor.predict(image, largest_component="auto").label, raw.label)


def test_training_records_the_single_component_classes(tiny_cohort, tmp_path):
    from napari_sgrs.core.checkpoint import load_checkpoint
    from napari_sgrs.core.io import find_cases, read_volume
    from napari_sgrs.core.train import train

    train(tiny_config(iterations=2, val_every=100), find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr),
          tmp_path / "run")
    meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors").meta
    labels = [read_volume(tiny_cohort.labels_tr / f"{n}.nii.gz").array for n in tiny_cohort.labeled_names]
    assert meta["single_component_classes"] == single_component_classes(labels, 2) == [1]

    # a labeled volume whose target is in two pieces switches auto off for that class
    images, labs = split_label_cohort(tiny_cohort, tmp_path)
    train(tiny_config(iterations=2, val_every=100), find_cases(images, labs), tmp_path / "run2")
    assert load_checkpoint(tmp_path / "run2" / "checkpoints" / "last.safetensors").meta[
        "single_component_classes"] == []


def test_cli_predict_largest_component(tiny_cohort, tmp_path, capsys, monkeypatch):
    from napari_sgrs.core.infer import Predictor
    from napari_sgrs.core.io import read_volume

    run = tmp_path / "run"
    assert main(["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
                 "--out", str(run), "--method", "supervised", *TINY_ARGS]) == 0
    # A 4-step network's output is arbitrary; a threshold on the bright voxels labels the target and
    # the distractor blobs alike, so the post-processing has islands to remove. Everything else (the
    # run's record, the CLI, the writer) is the real path.
    monkeypatch.setattr(Predictor, "_forward_probs",
                        lambda self, w: torch.softmax(torch.cat([-w + 0.8, w - 0.8], 1).float(), 1))
    outs = {}
    for mode in ("off", "auto", "on"):
        outs[mode] = tmp_path / f"pred_{mode}"
        capsys.readouterr()
        assert main(["predict", "--run", str(run), "--images", str(tiny_cohort.images_ts), "--out",
                     str(outs[mode]), "--largest-component", mode]) == 0
        err = capsys.readouterr().err
        assert ("class(es) 1" in err) == (mode != "off")
    files = sorted(p.name for p in outs["off"].glob("*.nii.gz"))
    assert files
    changed = 0
    for name in files:
        raw = read_volume(outs["off"] / name)
        for mode in ("auto", "on"):
            post = read_volume(outs[mode] / name)
            np.testing.assert_array_equal(post.array, keep_largest_component(raw.array, [1]))
            assert post.geometry == raw.geometry
        changed += int((keep_largest_component(raw.array, [1]) != raw.array).any())
    assert changed  # islands were there to remove, so the equality above was not trivial



def test_auto_on_a_run_without_the_record_says_nothing_is_done():
    from napari_sgrs.core.predict import largest_component_note

    assert "trained before the check was recorded" in largest_component_note("auto", {"num_classes": 2}, 2)
    none = {"num_classes": 2, "single_component_classes": []}
    assert "no class is one connected component" in largest_component_note("auto", none, 2)


def test_cli_rejects_an_unknown_mode(tiny_cohort, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--run", str(tmp_path), "--images", str(tiny_cohort.images_ts), "--out",
              str(tmp_path / "p"), "--largest-component", "largest"])
    assert exc.value.code == 2
    assert "largest" in capsys.readouterr().err
