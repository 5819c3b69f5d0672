"""Memory estimates: they scale as they should, refuse absurd jobs before allocating, and match
a measured CPU step within a factor of 3."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from napari_sgrs.cli import main
from napari_sgrs.core import memory
from napari_sgrs.core.errors import ResourceError
from napari_sgrs.core.memory import (
    check_inference_memory,
    check_memory,
    estimate_inference_memory,
    estimate_training_memory,
)

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import TINY_ARGS, tiny_config  # noqa: E402


def test_training_estimate_scales_with_patch_batch_filters_and_method():
    def step(*args, **kwargs):  # what the step adds beyond the fixed cost of torch's libraries
        return estimate_training_memory(*args, **kwargs) - memory.RUNTIME_BYTES

    base = step((32, 32, 32), 4, 8)
    assert step((64, 64, 64), 4, 8) > 6 * base      # activations ~ patch voxels
    assert step((32, 32, 32), 8, 8) > 1.75 * base   # ~ batch
    assert step((32, 32, 32), 4, 16) > 2 * base     # ~ filters (+ filters^2 weights)
    assert step((32,) * 3, 4, 8, data_voxels=10**8) > base + 10**9  # the volumes
    # SGRS forwards X, U and U_mix: more than mean teacher on the same batch
    assert estimate_training_memory((32,) * 3, 4, 8, method="sgrs") > estimate_training_memory(
        (32,) * 3, 4, 8, method="mean-teacher")
    # train.py keeps the old name importable
    from napari_sgrs.core.train import estimate_training_memory as old_name

    assert old_name is estimate_training_memory


def test_inference_estimate_counts_the_probability_maps():
    vol = (128, 256, 256)
    plain = estimate_inference_memory(vol, (96, 96, 96), 2)
    with_regions = estimate_inference_memory(vol, (96, 96, 96), 2, regions=True)
    maps = 128 * 256 * 256 * 4
    assert plain >= (1 + 1) * 2 * maps and with_regions >= (1 + 2) * 2 * maps
    assert estimate_inference_memory(vol, (96,) * 3, 5) > plain
    # a volume smaller than the patch is padded to the patch first
    assert estimate_inference_memory((8, 8, 8), (64,) * 3, 2) >= 4 * 64 ** 3 * 4


def test_absurd_training_is_refused_with_a_setting_that_fits():
    cfg = tiny_config(patch_size=(512, 512, 512), batch_size=64, labeled_batch_size=32, base_filters=16)
    with pytest.raises(ResourceError) as info:
        check_memory(cfg, (512, 512, 512), 2, "cpu", available=8 * 2**30)
    msg = str(info.value)
    assert "\n" not in msg and "512x512x512" in msg and "GiB" in msg
    flags = msg.split("use ", 1)[1].split()
    # the suggestion is concrete and really fits in what is free
    patch = tuple(int(flags[flags.index("--patch-size") + i]) for i in (1, 2, 3))
    batch = int(flags[flags.index("--batch-size") + 1])
    lab = int(flags[flags.index("--labeled-batch-size") + 1])
    assert 1 <= lab < batch < 64 and all(p % 16 == 0 and p < 512 for p in patch)
    assert estimate_training_memory(patch, batch, 16, 2, "sgrs", lab) <= 0.9 * 8 * 2**30
    # a job that fits passes and returns its estimate
    assert check_memory(tiny_config(), (16, 16, 16), 2, "cpu", available=8 * 2**30) > 0


def test_absurd_inference_is_refused():
    with pytest.raises(ResourceError, match="without --regions"):
        check_inference_memory((2000, 2000, 2000), (96, 96, 96), 3, "cpu", regions=True, name="huge.nii.gz",
                               available=64 * 2**30)
    assert check_inference_memory((64, 64, 64), (32,) * 3, 2, "cpu", available=8 * 2**30) > 0


def test_cli_refuses_absurd_training_before_allocating(tiny_cohort, tmp_path, capsys):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = tmp_path / "run"
    code = main(["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
                 "--out", str(run), *TINY_ARGS, "--patch-size", "512", "512", "512", "--batch-size", "64",
                 "--labeled-batch-size", "32", "--base-filters", "16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "needs about" in err and "--batch-size" in err and "--patch-size" in err
    assert not (run / "checkpoints").exists()
    # 512^3 x 96 patches would be terabytes; nothing near one patch (0.5 GiB) was allocated
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024


def test_cli_predict_checks_memory_per_volume(tiny_cohort, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
                 "--out", str(run), *TINY_ARGS, "--iterations", "1", "--val-fraction", "0"]) == 0
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 2**20)  # a 1 MiB machine
    code = main(["predict", "--run", str(run), "--images", str(tiny_cohort.images_ts), "--out",
                 str(tmp_path / "pred"), "--regions", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: predicting ") and "\n" not in err, err
    assert tiny_cohort.test_names[0] in err and "--sw-batch-size 1" in err
    assert not list((tmp_path / "pred").glob("*.nii.gz"))


MEASURE = textwrap.dedent("""
    import json, resource, sys
    import psutil
    import napari_sgrs.core.train as T
    from napari_sgrs.cli import main

    seen = {}
    real_check = T.check_memory

    def measuring_check(config, patch, num_classes, device, **kw):
        seen["estimate"] = real_check(config, patch, num_classes, device, **kw)
        seen["rss_before"] = psutil.Process().memory_info().rss
        return seen["estimate"]

    T.check_memory = measuring_check
    code = main(sys.argv[1:])
    seen["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seen["code"] = code
    print(json.dumps(seen))
""")


def test_training_estimate_within_3x_of_measured_peak(tiny_cohort, tmp_path):
    """One process trains 2 steps of patch 32^3, batch 4, 4 filters (CPU, no validation) and reports
    its peak RSS increase over the RSS at the memory check, i.e. before the model existed."""
    args = ["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
            "--out", str(tmp_path / "run"), "--iterations", "2", "--patch-size", "32", "32", "32",
            "--base-filters", "4", "--batch-size", "4", "--labeled-batch-size", "2", "--device", "cpu",
            "--val-fraction", "0", "--checkpoint-every", "2", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    measured = seen["peak"] - seen["rss_before"]
    ratio = seen["estimate"] / measured
    assert 1 / 3 <= ratio <= 3, f"estimate {seen['estimate'] / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"
