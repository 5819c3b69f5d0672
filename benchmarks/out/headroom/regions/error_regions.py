"""Where a run's errors fall among the synergy regions of its own region map, and how confident the
false positives in the consistent region are. Test volumes, last checkpoint, student.

    python error_regions.py RUNS...      # compare_methods.py run folders (OUT/runs/<variant>_s<seed>)
"""
import sys
from pathlib import Path

import numpy as np

from napari_sgrs.core.infer import Predictor
from napari_sgrs.core.io import find_cases, read_volume
from napari_sgrs.core.codes import Region

NAMES = {r: r.key for r in (Region.DISREGARDED, Region.CONSISTENT, Region.INCONSISTENT)}


def shares(counts: np.ndarray) -> dict:
    return {name: round(float(counts[code] / max(counts.sum(), 1)), 3) for code, name in NAMES.items()}


for run in map(Path, sys.argv[1:]):
    cohort = run.parent.parent / "data"
    pred = Predictor.from_run(run, device="cpu", checkpoint="last")
    fp, fn, every, fp_prob = np.zeros(4), np.zeros(4), np.zeros(4), []
    for case in find_cases(cohort / "imagesTs", cohort / "labelsTs"):
        img, ref = read_volume(case.image), read_volume(case.label)
        out = pred.predict(img.array, regions=True)
        p, r, reg = out.label == 1, ref.array == 1, out.regions
        fp += np.bincount(reg[p & ~r], minlength=4)[:4]
        fn += np.bincount(reg[r & ~p], minlength=4)[:4]
        every += np.bincount(reg.ravel(), minlength=4)[:4]
        fp_prob.append(out.probability[p & ~r & (reg == Region.CONSISTENT)])
    fp_prob = np.concatenate(fp_prob)
    print(f"{run.parent.parent.name}/{run.name}: all voxels {shares(every)}; false positives {shares(fp)}; "
          f"false negatives {shares(fn)}; consistent-region false positives: median foreground probability "
          f"{np.median(fp_prob):.3f}, share above 0.9 {(fp_prob > 0.9).mean():.3f}", flush=True)
