"""Where a trained run's errors are: over-segmentation, and false positives away from the target.

For every run folder given (as written by ``compare_methods.py`` under ``OUT/runs/``), predicts the
held-out test volumes of its cohort with the LAST checkpoint and reports, summed over the volumes:

- predicted / true foreground volume (1.0: no over- or under-segmentation),
- the share of false-positive voxels lying more than ``--far`` mm from the true target (errors on
  the distractors, not on the target's boundary),
- false positives and false negatives as a share of the true foreground.

Example (the figures in benchmarks/RESULTS.md)::

    python benchmarks/error_breakdown.py --cohort /tmp/exp/conf200/data /tmp/exp/conf200/runs/*_s0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage


def breakdown(pred: np.ndarray, ref: np.ndarray, spacing, far_mm: float) -> dict[str, float]:
    """Voxel counts of one volume (binary: foreground is any label > 0)."""
    p, r = pred > 0, ref > 0
    fp = p & ~r
    # distance (mm) of every voxel to the nearest true target voxel
    dist = ndimage.distance_transform_edt(~r, sampling=spacing) if r.any() else np.full(r.shape, np.inf)
    return {"pred": float(p.sum()), "true": float(r.sum()), "fp": float(fp.sum()),
            "fn": float((r & ~p).sum()), "fp_far": float((fp & (dist > far_mm)).sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="run folders (each with config.json and checkpoints)")
    ap.add_argument("--cohort", type=Path, required=True, help="the demo cohort folder the runs were trained on")
    ap.add_argument("--far", type=float, default=3.0, help="a false positive this far (mm) from the target is 'far'")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from napari_sgrs.core.infer import Predictor
    from napari_sgrs.core.io import find_cases, read_volume

    cases = find_cases(args.cohort / "imagesTs", args.cohort / "labelsTs")
    rows = []
    print("| run | predicted / true volume | FP / true | FN / true | FP farther than "
          f"{args.far:g} mm / all FP |\n|---|---|---|---|---|")
    for run in args.runs:
        predictor = Predictor.from_run(run, device="cpu", checkpoint="last")
        tot = {"pred": 0.0, "true": 0.0, "fp": 0.0, "fn": 0.0, "fp_far": 0.0}
        for case in cases:
            img, ref = read_volume(case.image), read_volume(case.label)
            b = breakdown(predictor.predict(img.array).label, ref.array, img.geometry.spacing, args.far)
            tot = {k: tot[k] + b[k] for k in tot}
        row = {"run": run.name, "volume_ratio": tot["pred"] / tot["true"], "fp_rate": tot["fp"] / tot["true"],
               "fn_rate": tot["fn"] / tot["true"], "fp_far_share": tot["fp_far"] / max(tot["fp"], 1.0)}
        rows.append(row)
        print(f"| {row['run']} | {row['volume_ratio']:.3f} | {row['fp_rate']:.3f} | {row['fn_rate']:.3f} | "
              f"{row['fp_far_share']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
