"""The method-comparison benchmark runs end to end on a tiny setting, and its merge mode joins runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_methods.py"


def _load():
    spec = importlib.util.spec_from_file_location("compare_methods", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_methods_table_plot_and_merge(tmp_path):
    cm = _load()
    tiny = ["--kind", "blob", "--iterations", "3", "--shape", "32", "32", "32", "--patch", "16", "16", "16",
            "--filters", "2", "--cases", "4", "--labeled", "2", "--test", "1", "--seeds", "0"]
    assert cm.main(tiny + ["--variants", "supervised", "sgrs-plus", "--out", str(tmp_path / "a")]) == 0
    assert cm.main(tiny + ["--variants", "sgrs[tau=0.1]", "sgrs[tau_auto=True]", "--out", str(tmp_path / "b")]) == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())["results"]
    by = {r["variant"]: r for r in res}
    assert by["supervised"]["batch"] == [2, 0] and by["sgrs-plus"]["batch"] == [2, 2]
    assert all(0.0 <= r["dice"] <= 1.0 and 0.0 <= r["dice_unlabeled"] <= 1.0 for r in res)

    assert cm.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    table = (tmp_path / "m" / "table.md").read_text()
    for v in ("supervised", "sgrs-plus", "sgrs[tau=0.1]", "sgrs[tau_auto=True]"):
        assert f"| {v} |" in table
    assert "--variants supervised sgrs-plus" in table  # each part's command is kept
    assert (tmp_path / "m" / "dice.png").stat().st_size > 0 and (tmp_path / "m" / "tau.png").stat().st_size > 0
    # each SGRS method's own tau: ours the paper's 0.296, SGRS-Net the authors' code's band (0.29613)
    assert cm.tau_of("sgrs-plus") == 0.296 and round(cm.tau_of("sgrs"), 5) == 0.29613
    assert cm.tau_of("sgrs[tau=0.1]") == 0.1 and cm.tau_of("sgrs-plus[tau=0.2]") == 0.2
    assert cm.tau_of("sgrs[tau_auto=True]") == "auto" and cm.tau_of("sgrs-plus-no-mix") is None
    assert cm.tau_of("supervised") is None and cm.tau_of("sgrs-low-tau") is None  # a --rename name
    assert cm.tau_of("sgrs[tau=0.1,use_mix=False]") is None
    assert "2 labeled + 2 unlabeled training volumes, 1 test volumes" in table

    # runs made under an explicit setting that later became the default are shown under the new name
    assert cm.main(["--merge", str(tmp_path / "b"), "--out", str(tmp_path / "r"),
                    "--rename", "sgrs[tau=0.1]=sgrs-low-tau"]) == 0
    renamed = (tmp_path / "r" / "table.md").read_text()
    assert "| sgrs-low-tau |" in renamed and "| sgrs[tau=0.1] |" not in renamed
    assert "(variant 'sgrs[tau=0.1]' shown as 'sgrs-low-tau')" in renamed
    assert cm.parse_rename("sgrs[pseudo_views=mix]=sgrs") == ("sgrs[pseudo_views=mix]", "sgrs")


def test_merge_refuses_runs_with_different_settings(tmp_path):
    import pytest

    cm = _load()
    # a different budget, or a different number of (unlabeled) training volumes
    for name, it, cases in (("a", 600, 12), ("b", 1800, 12), ("c", 600, 24)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"args": {
            "kind": "blob", "iterations": it, "patch": [32, 32, 32], "filters": 8, "labeled": 4, "data_seed": 100,
            "cases": cases, "test": 8, "seeds": [0], "variants": ["sgrs"], "out": name}, "results": []}))
    for other in ("b", "c"):
        with pytest.raises(SystemExit, match="different settings"):
            cm.main(["--merge", str(tmp_path / "a"), str(tmp_path / other), "--out", str(tmp_path / "m")])


def test_error_breakdown_counts_far_false_positives():
    """error_breakdown.breakdown: a false positive next to the target's boundary is near, a blob
    elsewhere is far; volumes, FP and FN are voxel counts."""
    import numpy as np

    spec = importlib.util.spec_from_file_location("error_breakdown", BENCH.parent / "error_breakdown.py")
    eb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eb)
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:10, 5:10, 5:10] = 1                      # 125 true voxels
    pred = ref.copy()
    pred[5:10, 5:10, 10] = 1                       # 25 FP touching the target (1 mm away)
    pred[15:17, 15:17, 15:17] = 1                  # 8 FP far away (a distractor)
    pred[5, 5, 5] = 0                              # 1 FN
    b = eb.breakdown(pred, ref, (1.0, 1.0, 1.0), far_mm=3.0)
    assert b == {"pred": 157.0, "true": 125.0, "fp": 33.0, "fn": 1.0, "fp_far": 8.0}
    # spacing counts: with 0.1 mm voxels the distractor is 0.8 mm from the target, not far
    assert eb.breakdown(pred, ref, (0.1, 0.1, 0.1), far_mm=3.0)["fp_far"] == 0.0


def test_gpu_check_script_runs_end_to_end_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh is what a lent GPU runs, once, with little time to spare: its CPU
    smoke mode must keep working (demo data, training through the CLI, the JSON it reports)."""
    import os
    import subprocess
    import sys

    script = BENCH.parent / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "WORK": str(tmp_path / "work"),
           "STEPS": "30", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(script), "--cpu-smoke"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["steps"] == 30 and result["cpu_smoke"] is True and result["device"] == "cpu"
    assert result["loss_falls"] is True and result["loss_sup_last"] < result["loss_sup_first"]
    assert result["steps_per_s"] > 0 and result["projected_15000_steps_min"] > 0
    assert 0 <= result["first_step_s"] < result["train_wall_s"]
    assert "OK: loss" in done.stdout
    bad = subprocess.run(["bash", str(script), "--gpu"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown argument: --gpu" in bad.stderr


def test_gpu_figures_keeps_each_gpu_check_with_its_own_settings(tmp_path):
    """benchmarks/gpu_figures.sh runs gpu_check.sh three times: bf16, fp16, and (COMPILE=1) compiled.
    With stand-ins for gpu_check.sh and step_benchmark.py that echo their settings, each JSON must
    hold its own run's settings; COMPILE=1 or AMP=fp16 in the caller's environment must not leak into
    the runs that name other settings."""
    import os
    import shutil
    import subprocess
    import sys

    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    shutil.copy(BENCH.parent / "gpu_figures.sh", root / "benchmarks")
    (root / "benchmarks" / "gpu_check.sh").write_text(
        'echo "{\\"amp\\": \\"${AMP:-bf16}\\", \\"steps\\": ${STEPS}, \\"compile\\": ${COMPILE:-0}}" '
        '> "$OUT/gpu_check.json"\n')
    (root / "benchmarks" / "step_benchmark.py").write_text("print('{}')\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "COMPILE": "1", "AMP": "fp16", "STEPS": "7", "COMPILE_STEPS": "5",
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_figures.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    got = {name: json.loads((out / f"gpu_check_{name}.json").read_text()) for name in ("bf16", "fp16", "compile")}
    assert got == {"bf16": {"amp": "bf16", "steps": 7, "compile": 0},
                   "fp16": {"amp": "fp16", "steps": 7, "compile": 0},
                   "compile": {"amp": "bf16", "steps": 5, "compile": 1}}
    assert not (out / "gpu_check.json").exists()


def test_step_benchmark_reports_every_phase(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(BENCH.parent / "step_benchmark.py"), "--patch", "16", "16", "16",
                           "--filters", "2", "--steps", "2", "--warmup", "1", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(out["phases_s"]) == {"data", "teacher_forward", "student_forward_backward", "regions_losses",
                                    "optimizer", "ema"}
    assert all(v > 0 for v in out["phases_s"].values()) and out["step_s"] > 0
    assert out["cudnn_benchmark"] is True and out["pseudo_views"] == "mix"


def test_postprocess_benchmark_times_the_rule_on_one_piece_labels(tmp_path):
    spec = importlib.util.spec_from_file_location("postprocess_benchmark", BENCH.parent / "postprocess_benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--volumes", "3", "--shape", "24", "24", "24", "--json", str(tmp_path / "r.json")])
    assert out["single_component_classes_s"] > 0 and out["keep_largest_component_ms_per_volume"] > 0
    assert out["islands_removed_voxels"] > 0  # the extra islands were found
    assert json.loads((tmp_path / "r.json").read_text()) == out
