"""Time from Start to the first pseudo label with regions, with the CPU ``--preset preview``.

What a user of the napari panel waits for: the wall time from launching ``sgrs train --preset
preview`` (process start, imports, data loading, training) until ``sgrs predict --regions`` has
written the pseudo labels and synergy regions of the unlabeled volumes. Both commands run as
fresh processes, as the panel runs them. The Dice of those pseudo labels is measured against the
demo's hidden labels (the demo generator is a pure function of its seed, so they are regenerated).

    python benchmarks/preview_benchmark.py --workdir /tmp/preview_bench
    python benchmarks/preview_benchmark.py --workdir /tmp/pb -- --iterations 200   # extra train args
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _cpu_name() -> str:
    from _machine import cpu_name  # benchmarks/ is on sys.path when a script there runs

    return cpu_name()


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    p, r = pred > 0, ref > 0
    denom = p.sum() + r.sum()
    return float(2 * (p & r).sum() / denom) if denom else 1.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("preview_bench"))
    p.add_argument("--seed", type=int, default=0, help="demo cohort seed (the `sgrs demo` cohort: 8 x 48^3, 4 labeled)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("train_args", nargs="*", help="extra `sgrs train` arguments (after --)")
    args = p.parse_args(argv)

    from napari_sgrs.core.codes import Region
    from napari_sgrs.core.demo import make_demo_cohort
    from napari_sgrs.core.io import read_volume
    from napari_sgrs.core.runfolder import RunFolder

    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    cohort = make_demo_cohort(work / "data", kind="blob", n_cases=8, n_labeled=4, n_test=4, shape=(48, 48, 48),
                              seed=args.seed)
    sgrs = [sys.executable, "-m", "napari_sgrs.cli"]
    run, pseudo = work / "run", work / "pseudo"
    load_before = os.getloadavg()
    t0 = time.time()
    subprocess.run(sgrs + ["train", "--preset", "preview", "--images", str(cohort.images_tr), "--labels",
                           str(cohort.labels_tr), "--out", str(run), "--device", "cpu", "--quiet",
                           *args.train_args], check=True)
    t_train = time.time() - t0
    subprocess.run(sgrs + ["predict", "--run", str(run), "--images", str(cohort.images_tr), "--labels",
                           str(cohort.labels_tr), "--out", str(pseudo), "--regions", "--device", "cpu",
                           "--quiet"], check=True)
    t_total = time.time() - t0

    dices, region_share = {}, {}
    for name in cohort.unlabeled_names:
        truth = cohort.hidden_label(name)
        pred = read_volume(pseudo / f"{name}.nii.gz").array
        regions = read_volume(pseudo / "regions" / f"{name}.nii.gz").array
        dices[name] = dice(pred, truth)
        region_share[name] = {r.key: float((regions == r).mean()) for r in Region.shown()}
    config = RunFolder(run).read_config()
    result = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores", "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "preset": {k: config[k] for k in ("iterations", "patch_size", "base_filters", "batch_size",
                                           "labeled_batch_size")},
        "train_s": round(t_train, 1), "start_to_pseudo_label_s": round(t_total, 1),
        "pseudo_label_dice_mean": round(float(np.mean(list(dices.values()))), 4),
        "pseudo_label_dice": {k: round(v, 4) for k, v in dices.items()},
        "regions": region_share,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
