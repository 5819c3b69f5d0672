"""RULE_LCC.md development stage: test Dice of existing last checkpoints, with and without the
largest-component post-processing (26-connectivity, switched on by the labels' auto rule).

    python lcc_eval.py --model student --json lcc_dev.json RUNS...
    python lcc_eval.py --model teacher --json lcc_teacher_dev.json RUNS...

RUNS are compare_methods.py run folders (OUT/runs/<variant>_s<seed>); the cohort is OUT/data.
"""
import argparse
import json
from pathlib import Path

import numpy as np

from napari_sgrs.core.infer import Predictor
from napari_sgrs.core.io import find_cases, read_volume
from napari_sgrs.core.postprocess import count_components, keep_largest_component


def dice(p, r):
    s = p.sum() + r.sum()
    return 2.0 * (p & r).sum() / s if s else float("nan")


ap = argparse.ArgumentParser()
ap.add_argument("runs", type=Path, nargs="+")
ap.add_argument("--model", choices=["student", "teacher"], default="student")
ap.add_argument("--json", type=Path, required=True)
args = ap.parse_args()
out = {}
for run in args.runs:
    cohort = run.parent.parent / "data"
    cfg = json.loads((run / "config.json").read_text())
    train = cfg["train_cases"] + cfg["val_cases"]
    single = all(count_components(read_volume(cohort / "labelsTr" / f"{c}.nii.gz").array == 1) == 1 for c in train)
    pred = Predictor.from_run(run, device="cpu", checkpoint="last", model=args.model)
    raw, post = [], []
    for case in find_cases(cohort / "imagesTs", cohort / "labelsTs"):
        img, ref = read_volume(case.image), read_volume(case.label)
        label = pred.predict(img.array).label
        r = ref.array == 1
        raw.append(dice(label == 1, r))
        post.append(dice(keep_largest_component(label, [1] if single else []) == 1, r))
    out[str(run)] = {"auto_on": single, "raw": float(np.mean(raw)), "lcc": float(np.mean(post))}
    print(run, single, round(np.mean(raw), 4), round(np.mean(post), 4), flush=True)
args.json.write_text(json.dumps(out, indent=1))
