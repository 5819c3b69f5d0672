import numpy as np, sys
from pathlib import Path
from scipy import ndimage
from napari_sgrs.core.infer import Predictor
from napari_sgrs.core.io import find_cases, read_volume
S26 = np.ones((3,3,3), bool)
for run in map(Path, sys.argv[1:]):
    cohort = run.parent.parent / "data"
    pred = Predictor.from_run(run, device="cpu", checkpoint="last")
    print(run.name)
    for case in find_cases(cohort / "imagesTs", cohort / "labelsTs"):
        img, ref = read_volume(case.image), read_volume(case.label)
        p = pred.predict(img.array).label == 1; r = ref.array == 1
        lab, n = ndimage.label(p, structure=S26)
        sizes = np.bincount(lab.ravel())[1:]
        big = lab == (np.argmax(sizes)+1) if n else p
        print(f"  {case.name if hasattr(case,'name') else ''} true={r.sum()} pred={p.sum()} ncomp={n} big={big.sum()} big&true={(big&r).sum()} fp_in_big={(big&~r).sum()}")
