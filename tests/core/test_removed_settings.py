"""Settings removed in 0.2 (CHANGELOG.md): runs written before still predict, and resume when they
used the values that behaved as the code does now; a run that used a removed experiment is
refused on --resume in one line naming the option, and nothing of it changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sgrs.cli import main
from napari_sgrs.core.checkpoint import load_checkpoint, save_checkpoint
from napari_sgrs.core.errors import CheckpointError
from tiny import TINY_ARGS, tiny_config

#: What config.json and the checkpoints of a 0.1 run held for the removed settings, as defaults.
OLD_DEFAULTS = {"pseudo_islands": "keep", "pseudo_cap": "off", "channels_last": True, "bn_streams": False,
                "select": "last"}


def _sgrs(capsys, *args) -> tuple[int, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    return code, capsys.readouterr().err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _as_old_run(run: Path, **settings) -> None:
    """Give a run the removed keys that a 0.1 run wrote, in config.json and in every checkpoint."""
    saved = json.loads((run / "config.json").read_text())
    saved["config"].update(settings)
    (run / "config.json").write_text(json.dumps(saved))
    for path in (run / "checkpoints").glob("*.safetensors"):
        ckpt = load_checkpoint(path)
        save_checkpoint(path, ckpt.tensors, {**ckpt.meta, "config": {**ckpt.meta["config"], **settings}})


@pytest.fixture()
def old_run(tiny_cohort, tmp_path):
    """A 4-step run without a validation split (so no best checkpoint), made to look like a 0.1 run."""
    from napari_sgrs.core.io import find_cases
    from napari_sgrs.core.train import train

    run = tmp_path / "run"
    train(tiny_config(val_fraction=0.0), find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr), run)
    assert not (run / "checkpoints" / "best.safetensors").exists()
    return run


def test_the_removed_options_are_gone(tiny_cohort, tmp_path, capsys):
    for extra in (["--pseudo-islands", "keep"], ["--pseudo-cap", "off"], ["--channels-last"], ["--select", "last"],
                  ["--pseudo-anchor", "labels"]):
        code, err = _sgrs(capsys, "train", "--images", tiny_cohort.images_tr, "--labels", tiny_cohort.labels_tr,
                          "--out", tmp_path / "run", *TINY_ARGS, *extra)
        assert code == 2 and f"unrecognized option {extra[0]}; removed in 0.2" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
    for name, value in {**OLD_DEFAULTS, "pseudo_anchor": "off"}.items():
        with pytest.raises(TypeError):
            tiny_config(**{name: value})


def test_an_old_run_with_the_default_values_predicts_and_resumes(old_run, tiny_cohort, tmp_path, capsys):
    from napari_sgrs.core.train import TrainConfig

    # "select": "best" was the run's choice of checkpoint for predict: now ignored (--checkpoint says it;
    # the run has no best checkpoint, so honouring the key would fail)
    _as_old_run(old_run, **{**OLD_DEFAULTS, "select": "best"})
    assert TrainConfig.from_json(json.loads((old_run / "config.json").read_text())["config"]).validate()
    code, err = _sgrs(capsys, "predict", "--run", old_run, "--images", tiny_cohort.images_ts, "--out",
                      tmp_path / "pred", "--quiet")
    assert code == 0, err
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == len(list(tiny_cohort.images_ts.iterdir()))
    code, err = _sgrs(capsys, "train", "--images", tiny_cohort.images_tr, "--labels", tiny_cohort.labels_tr,
                      "--out", old_run, "--resume", *TINY_ARGS, "--iterations", "6")
    assert code == 0, err
    assert load_checkpoint(old_run).meta["step"] == 6


@pytest.mark.parametrize("settings, option", [
    ({"pseudo_islands": "background"}, "--pseudo-islands background"),
    ({"pseudo_cap": "labels"}, "--pseudo-cap labels"),
    ({"bn_streams": True}, "bn_streams True"),
    ({"pseudo_anchor": "labels"}, "--pseudo-anchor labels"),
])
def test_an_old_run_that_used_a_removed_experiment_predicts_but_does_not_resume(settings, option, old_run,
                                                                                 tiny_cohort, tmp_path, capsys):
    from napari_sgrs.core.io import find_cases
    from napari_sgrs.core.train import train

    _as_old_run(old_run, **{**OLD_DEFAULTS, **settings})
    code, err = _sgrs(capsys, "predict", "--run", old_run, "--images", tiny_cohort.images_ts, "--out",
                      tmp_path / "pred", "--quiet")
    assert code == 0, err
    before = _snapshot(old_run)
    code, err = _sgrs(capsys, "train", "--images", tiny_cohort.images_tr, "--labels", tiny_cohort.labels_tr,
                      "--out", old_run, "--resume", *TINY_ARGS, "--iterations", "6")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {old_run / 'config.json'}: cannot resume: the run was trained with {option}, "
                          f"which was removed in 0.2 (see CHANGELOG.md)"), err
    assert _snapshot(old_run) == before  # refused before anything was written
    # the Python API goes by the checkpoint's own record of the settings
    with pytest.raises(CheckpointError, match=f"last.safetensors: cannot resume: the run was trained with {option},"):
        train(tiny_config(val_fraction=0.0, iterations=6), find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr),
              old_run, resume=True)


def test_a_0_2_sgrs_run_resumes_and_predicts_as_before(tiny_cohort, tmp_path, capsys):
    """0.2 named our recipe "sgrs" (now sgrs-plus, "sgrs" being the paper's method) and saved
    every setting. Such a run (ours, with that name put back in config.json and every checkpoint)
    predicts what it predicted, and `sgrs train --resume` continues it with its saved recipe to the
    weights of the run that never stopped."""
    from napari_sgrs.core.events import EventKind
    from napari_sgrs.core.io import find_cases, read_volume
    from napari_sgrs.core.runfolder import RunFolder
    from napari_sgrs.core.train import train

    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    config = dict(val_fraction=0.0, iterations=6, checkpoint_every=2)
    full, old = tmp_path / "full", tmp_path / "old"
    train(tiny_config(**config), cases, full)

    def stop_at_2(event):
        if event.kind is EventKind.PROGRESS and event.step == 2:
            (old / "STOP").touch()

    assert train(tiny_config(**config), cases, old, listeners=[stop_at_2]).step == 2
    predicted = {}
    for name in ("ours", "0.2"):
        if name == "0.2":
            _as_old_run(old, method="sgrs")
            assert json.loads((old / "config.json").read_text())["config"]["method"] == "sgrs"
        code, err = _sgrs(capsys, "predict", "--run", old, "--images", tiny_cohort.images_ts, "--out",
                          tmp_path / name, "--quiet")
        assert code == 0, err
        predicted[name] = {f.name: read_volume(f).array for f in sorted((tmp_path / name).glob("*.nii.gz"))}
    assert predicted["ours"] and predicted["ours"].keys() == predicted["0.2"].keys()
    assert all(np.array_equal(predicted["ours"][k], predicted["0.2"][k]) for k in predicted["ours"])

    code, err = _sgrs(capsys, "train", "--images", tiny_cohort.images_tr, "--labels", tiny_cohort.labels_tr,
                      "--out", old, "--resume", "--quiet")
    assert code == 0, err
    resumed, uninterrupted = (load_checkpoint(RunFolder(p).last) for p in (old, full))
    assert resumed.meta["step"] == 6 and resumed.meta["config"]["method"] == "sgrs"
    for k, v in uninterrupted.tensors.items():
        if k.startswith(("student.", "teacher.")):
            assert torch.equal(v, resumed.tensors[k]), k


def test_a_checkpoint_with_the_removed_anchor_still_predicts(old_run, tiny_cohort, tmp_path, capsys):
    """A run trained with the label-only anchor (removed after the controls of #20) holds its
    networks and momenta beside the student's. sgrs predict and Predictor.from_run read the student
    alone, so they predict what the same run without those tensors predicts."""
    from napari_sgrs.core.infer import Predictor
    from napari_sgrs.core.io import read_volume

    image = read_volume(sorted(tiny_cohort.images_ts.iterdir())[0]).array

    def predict(name):
        code, err = _sgrs(capsys, "predict", "--run", old_run, "--images", tiny_cohort.images_ts, "--out",
                          tmp_path / name, "--quiet")
        assert code == 0, err
        api = Predictor.from_run(old_run, device="cpu").predict(image).label
        return {"api": api, **{f.name: read_volume(f).array for f in sorted((tmp_path / name).glob("*.nii.gz"))}}

    plain = predict("plain")
    torch.manual_seed(0)
    for path in (old_run / "checkpoints").glob("*.safetensors"):
        ckpt = load_checkpoint(path)
        old = {}
        for k, v in ckpt.tensors.items():  # the anchor's tensors, as the trainer named them; other values
            if k.startswith("student."):
                other = torch.randn_like(v) if v.is_floating_point() else v.clone()
                old[f"anchor.{k[8:]}"], old[f"anchor_ema.{k[8:]}"] = other, other.clone()
            elif k.startswith("optim.momentum."):
                old[f"anchor_{k}"] = torch.randn_like(v)
        assert any(k.startswith("anchor_optim.momentum.") for k in old)
        save_checkpoint(path, {**ckpt.tensors, **old},
                        {**ckpt.meta, "config": {**ckpt.meta["config"], "pseudo_anchor": "labels"}})
    _as_old_run(old_run, pseudo_anchor="labels")
    assert any(k.startswith("anchor_ema.") for k in load_checkpoint(old_run).tensors)
    anchored = predict("anchored")
    assert len(plain) > 1 and plain.keys() == anchored.keys()
    assert all(np.array_equal(plain[k], anchored[k]) for k in plain)
