"""Dev stage of RULE_LCC: Dice of existing last checkpoints with/without largest-component post-processing."""
import json, sys
from pathlib import Path
import numpy as np
from scipy import ndimage
from napari_sgrs.core.infer import Predictor
from napari_sgrs.core.io import find_cases, read_volume

MODEL = "teacher"
S26 = np.ones((3, 3, 3), bool)

def n_comp(mask):
    return ndimage.label(mask, structure=S26)[1]

def lcc(mask):
    lab, n = ndimage.label(mask, structure=S26)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(np.argmax(sizes)) + 1)

def dice(p, r):
    s = p.sum() + r.sum()
    return 2.0 * (p & r).sum() / s if s else float("nan")

out = {}
for run in map(Path, sys.argv[1:]):
    cohort = run.parent.parent / "data"
    cfg = json.loads((run / "config.json").read_text())
    train = cfg["train_cases"] + cfg["val_cases"]
    single = all(n_comp(read_volume(cohort / "labelsTr" / f"{c}.nii.gz").array == 1) == 1 for c in train)
    pred = Predictor.from_run(run, device="cpu", checkpoint="last", model=MODEL)
    raw, post = [], []
    for case in find_cases(cohort / "imagesTs", cohort / "labelsTs"):
        img, ref = read_volume(case.image), read_volume(case.label)
        p = pred.predict(img.array).label == 1
        r = ref.array == 1
        raw.append(dice(p, r)); post.append(dice(lcc(p), r))
    out[str(run)] = {"auto_on": single, "raw": float(np.mean(raw)), "lcc": float(np.mean(post))}
    print(run, single, round(np.mean(raw), 4), round(np.mean(post), 4), flush=True)
json.dump(out, open("/tmp/exp/lcc_teacher_dev.json", "w"), indent=1)
