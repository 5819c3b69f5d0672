"""The `sgrs` command line: the issue's exact forms, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_sgrs.cli import main
from napari_sgrs.core.io import Geometry, read_volume, write_volume

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import TINY_ARGS  # noqa: E402


def _copy_cohort(c, tmp_path: Path) -> tuple[Path, Path]:
    images, labels = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(c.images_tr, images)
    shutil.copytree(c.labels_tr, labels)
    return images, labels


def test_train_predict_regions_evaluate_forms(tiny_cohort, tmp_path, capsys):
    run, pred = tmp_path / "run", tmp_path / "pred"
    assert main(["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
                 "--out", str(run), "--method", "sgrs", "--batch-size", "4", "--labeled-batch-size", "2",
                 "--seed", "1", *TINY_ARGS]) == 0
    assert main(["predict", "--run", str(run), "--images", str(tiny_cohort.images_tr), "--out", str(pred),
                 "--regions", "--labels", str(tiny_cohort.labels_tr), "--quiet"]) == 0
    for name in tiny_cohort.unlabeled_names:
        f = f"{name}.nii.gz"
        src = read_volume(tiny_cohort.images_tr / f)
        for sub in ("", "probability", "regions"):
            out = read_volume(pred / sub / f)
            assert out.array.shape == src.array.shape
            assert np.allclose(nib.load(pred / sub / f).affine, nib.load(tiny_cohort.images_tr / f).affine)
        assert set(np.unique(read_volume(pred / "regions" / f).array)) <= {1, 2, 3}
        p = read_volume(pred / "probability" / f).array
        assert p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
    # labeled volumes get a label but no region map
    assert not (pred / "regions" / f"{tiny_cohort.labeled_names[0]}.nii.gz").exists()
    assert (pred / f"{tiny_cohort.labeled_names[0]}.nii.gz").exists()
    # evaluate against references of the labeled ones
    ref = tmp_path / "ref"
    ref.mkdir()
    for name in tiny_cohort.labeled_names:
        shutil.copy(tiny_cohort.labels_tr / f"{name}.nii.gz", ref)
    only = tmp_path / "pred_labeled"
    only.mkdir()
    for name in tiny_cohort.labeled_names:
        shutil.copy(pred / f"{name}.nii.gz", only)
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(only), "--labels", str(ref), "--json", str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out
    assert "dice" in table.lower() and "hd95" in table.lower()
    data = json.loads((tmp_path / "m.json").read_text())
    assert len(data["cases"]) == len(tiny_cohort.labeled_names)


def _write(path: Path, array, geometry=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        write_volume(path, array, geometry or Geometry.identity())
    else:  # 2D / 4D: write raw NIfTI, the engine must refuse to read it
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def _case_2d(images, labels):
    _write(images / "flat.nii.gz", np.zeros((24, 24), np.float32))


def _case_4d(images, labels):
    _write(images / "time.nii.gz", np.zeros((24, 24, 24, 3), np.float32))


def _case_not_image(images, labels):
    (images / "notes.nii.gz").write_text("this is not an image")


def _case_shape_mismatch(images, labels):
    name = sorted(labels.iterdir())[0].name
    _write(labels / name, np.zeros((20, 24, 24), np.uint8))


def _case_geometry_mismatch(images, labels):
    p = sorted(labels.iterdir())[0]
    v = read_volume(p)
    _write(p, v.array, Geometry((3.0, 1.0, 1.0), (5.0, 0.0, 0.0), tuple(np.eye(3).ravel())))


def _case_label_out_of_range(images, labels):
    p = sorted(labels.iterdir())[0]
    v = read_volume(p)
    a = v.array.copy()
    a[0, 0, 0] = 7
    write_volume(p, a, v.geometry)


def _case_negative_label(images, labels):
    p = sorted(labels.iterdir())[0]
    v = read_volume(p)
    a = v.array.astype(np.int16)
    a[0, 0, 0] = -1
    write_volume(p, a, v.geometry)


def _case_nan(images, labels):
    p = sorted(images.iterdir())[0]
    v = read_volume(p)
    a = v.array.astype(np.float32)
    a[:] = np.nan  # NaN only: no data at all (some NaN voxels are masked, tests/core/test_io_bounds.py)
    write_volume(p, a, v.geometry)


def _case_inf(images, labels):
    p = sorted(images.iterdir())[-1]
    v = read_volume(p)
    a = v.array.astype(np.float32)
    a[1, 2, 3] = np.inf
    write_volume(p, a, v.geometry)


def _case_no_labels(images, labels):
    for p in labels.iterdir():
        p.unlink()


BAD = {
    "2d-volume": (_case_2d, [], "3D"),
    "4d-volume": (_case_4d, [], "3D"),
    "not-an-image": (_case_not_image, [], "notes.nii.gz"),
    "shape-mismatch": (_case_shape_mismatch, [], "shape"),
    "geometry-mismatch": (_case_geometry_mismatch, [], "spacing"),
    "label-out-of-range": (_case_label_out_of_range, ["--num-classes", "2"], "7"),
    "negative-label": (_case_negative_label, [], "-1"),
    "nan-voxels": (_case_nan, [], "NaN"),
    "inf-voxels": (_case_inf, [], "Inf"),
    "no-labeled-volume": (_case_no_labels, [], "label"),
    "patch-not-divisible-by-16": (None, ["--patch-size", "16", "20", "16"], "16"),
    "unknown-device": (None, ["--device", "tpu"], "tpu"),
    "cuda-absent": (None, ["--device", "cuda"], "cuda"),
    "no-room-for-unlabeled": (None, ["--batch-size", "4", "--labeled-batch-size", "4"], "labeled-batch-size"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_one_line_error_exit_2_nothing_written(case, tiny_cohort, tmp_path, capsys):
    import torch

    if case == "cuda-absent" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    make, extra, needle = BAD[case]
    images, labels = _copy_cohort(tiny_cohort, tmp_path)
    if make is not None:
        make(images, labels)
    run = tmp_path / "run"
    args = ["train", "--images", str(images), "--labels", str(labels), "--out", str(run), *TINY_ARGS]
    # later flags win in argparse: the case's own value overrides TINY_ARGS
    code = main(args + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert needle.lower() in err.lower(), err
    assert not (run / "checkpoints").exists()


def test_exit_code_and_no_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "napari_sgrs.cli", "train", "--images", str(tmp_path / "nope"),
                           "--labels", str(tmp_path / "nope"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_refuses_a_pickle_checkpoint(tmp_path, tiny_cohort, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    ck = tmp_path / "evil.pt"
    ck.write_bytes(pickle.dumps({"w": Evil()}))
    code = main(["predict", "--run", str(ck), "--images", str(tiny_cohort.images_ts), "--out", str(tmp_path / "o")])
    out = capsys.readouterr()
    assert code == 2 and "refused" in out.err and "pwned" not in out.out


def test_headless_demo_runs_the_whole_job(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "demo"), "--iterations", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "training SGRS+ (ours) for 2 steps" in out  # the default method, by its name
    assert "Held-out demo test volumes" in out and "dice" in out
    assert len(list((tmp_path / "demo" / "pseudo" / "regions").glob("*.nii.gz"))) == 4  # the unlabeled ones
    assert json.loads((tmp_path / "demo" / "evaluation.json").read_text())["cases"]
    from napari_sgrs.cli import build_parser

    assert build_parser().parse_args(["demo", "--method", "sgrs"]).method == "sgrs"
    assert build_parser().parse_args(["demo"]).method == "sgrs-plus"


def _train_config(argv: list[str], out: Path | str = "R"):
    from napari_sgrs.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["train", "--images", "I", "--out", str(out), *argv])
    return _config_from_args(args)


def test_loss_defaults_flags_and_the_paper_preset():
    """Our default recipe (sgrs-plus), each flag that switches a part back to the paper's, and
    --preset paper giving the paper's whole recipe (SGRS-Net, --method sgrs)."""
    ours = _train_config([])
    assert ours.method == "sgrs-plus"
    assert (ours.pseudo_views, ours.region_weighting, ours.lr_schedule) == ("mix", "voxels", "constant")
    assert (ours.batch_size, ours.labeled_batch_size) == (4, 2)  # the paper's 2 + 2
    assert _train_config(["--pseudo-views", "both"]).pseudo_views == "both"
    assert _train_config(["--region-weighting", "terms"]).region_weighting == "terms"
    paper = _train_config(["--preset", "paper"])
    assert paper.method == "sgrs"
    assert (paper.pseudo_views, paper.region_weighting, paper.lr_schedule) == ("both", "all-voxels", "constant")
    assert (paper.batch_size, paper.labeled_batch_size, paper.iterations) == (4, 2, 15000)
    assert _train_config(["--preset", "paper", "--pseudo-views", "mix"]).pseudo_views == "mix"


def test_cudnn_benchmark_is_on_for_cuda_runs_unless_switched_off():
    """cuDNN times its algorithms for the fixed patch on CUDA (a large speed-up of 3D convs,
    benchmarks/RESULTS.md); --no-cudnn-benchmark keeps the heuristic choice; CPU runs are untouched."""
    import torch

    from napari_sgrs.core.device import configure_backends

    saved = torch.backends.cudnn.benchmark
    try:
        assert _train_config([]).cudnn_benchmark is True
        off = _train_config(["--no-cudnn-benchmark"])
        assert off.cudnn_benchmark is False
        torch.backends.cudnn.benchmark = False
        configure_backends(torch.device("cpu"), _train_config([]))
        assert torch.backends.cudnn.benchmark is False
        configure_backends(torch.device("cuda"), _train_config([]))
        assert torch.backends.cudnn.benchmark is True
        configure_backends(torch.device("cuda"), off)
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved


def test_resume_keeps_the_loss_a_run_started_with(tmp_path):
    """A run saved before the loss switches existed resumes with the paper's loss it was trained
    with, and one saved with explicit settings keeps them, whatever today's defaults are.
    (Every other setting: test_settings.py::test_resume_restores_every_saved_setting_not_given_again.)"""
    from napari_sgrs.core.train import TrainConfig

    old = TrainConfig(iterations=50).validate().to_json()
    for key in ("region_weighting", "pseudo_views"):
        del old[key]
    (tmp_path / "config.json").write_text(json.dumps({"config": old}))
    cfg = _train_config(["--resume"], out=tmp_path)
    assert (cfg.region_weighting, cfg.pseudo_views, cfg.iterations) == ("terms", "both", 50)

    saved = TrainConfig(pseudo_views="both", region_weighting="terms").validate().to_json()
    (tmp_path / "config.json").write_text(json.dumps({"config": saved}))
    cfg = _train_config(["--resume"], out=tmp_path)
    assert (cfg.pseudo_views, cfg.region_weighting) == ("both", "terms")
    assert _train_config(["--resume", "--pseudo-views", "mix"], out=tmp_path).pseudo_views == "mix"  # given again: wins
