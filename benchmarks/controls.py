"""The controls of issue #20 item 4: what each part of our recipe buys, against the baselines a
reviewer asks for, on cohorts made for this test, at several seeds, at the LAST checkpoint.

Variants (one training each, except supervised-x2), for the code of today:

- ``supervised``: labels only.
- ``supervised-x2``: supervised with a second network's compute: a second supervised network (its
  own seed) trained beside ``supervised`` and the two ensembled (mean of the probabilities).
- ``sgrs``: SGRS-Net as published (``--method sgrs``: the paper's step, defects fixed), 2 + 2.
- ``sgrs-plus``: our recipe, the default (``--method sgrs-plus``).
- ``sgrs-plus-<part>``: ours with one part set back to the paper's choice (``mixview``: pseudo_views
  both; ``voxels``: region_weighting all-voxels; ``engine``: the paper's Dice forms, teacher mode, ramp
  stairs, uniform crops, flips and volume draw at once), or ``sgrs-plus-poly`` (the poly lr it had).
- any ``base[key=value,...]`` as in compare_methods.py.

Issue 20's runs (benchmarks/out/controls/, RULE.md) were made before the gate and the label-only
anchor were removed, by the script as it ran then (``benchmarks/out/controls/controls_as_run.py.txt``,
with napari_sgrs of commit 62aa2fd): its variants ``ours`` (the anchor, poly, 2 + 2, no gate),
``anchor-pseudo`` (the anchor alone as the pseudo-label source) and ``ours-no-anchor`` need that code.

Each training runs in its own process (``OMP_NUM_THREADS=1``, ``--jobs`` at a time) and writes
``results/<cohort>__<variant>__s<seed>.json``; a run whose result exists is skipped, so an
interrupted benchmark resumes. ``--summary`` writes ``summary.md``: mean +- sd per cohort, and the
paired difference of each variant to a reference (default ``sgrs-plus``) over every (cohort, seed) pair
with a 95 % t interval.

    python benchmarks/controls.py --out OUT --cohorts selA:blob:2:600 selB:blob:2:601 sel3:blob:3:603 \
        --iterations 300 --filters 4
    python benchmarks/controls.py --out OUTV --cohorts selV:vessel:2:602 --shape 48 48 48 \
        --iterations 600 --filters 8
    python benchmarks/controls.py --out OUT --summary
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from napari_sgrs.core.settings import PAPER_CODE_TAU

#: the paper's engine details that our engine changes (settings.METHOD_DEFAULTS), as one group
PAPER_ENGINE = dict(dice_form="paper", teacher_mode="train", rampup_stair=150, foreground_fraction=0.0,
                    flips="one-in-plane", volume_draw="permutation", tau=PAPER_CODE_TAU)
VARIANTS = {
    "supervised": dict(method="supervised"),
    "supervised-x2": dict(method="supervised"),
    "sgrs": dict(method="sgrs"),
    "sgrs-plus": dict(method="sgrs-plus"),
    "sgrs-plus-mixview": dict(method="sgrs-plus", pseudo_views="both"),
    "sgrs-plus-voxels": dict(method="sgrs-plus", region_weighting="all-voxels"),
    "sgrs-plus-engine": dict(method="sgrs-plus", **PAPER_ENGINE),
    "sgrs-plus-poly": dict(method="sgrs-plus", lr_schedule="poly"),
}
ENSEMBLE_SEED_OFFSET = 7919  # the second supervised network's seed: seed + this


def parse_variant(variant: str) -> dict:
    """A variant of VARIANTS, or ``base[key=value,...]`` (compare_methods.parse_variant)."""
    from compare_methods import parse_variant as parse  # this folder is on sys.path: run as a script

    return parse(variant, VARIANTS)


def parse_cohort(text: str) -> dict:
    name, kind, classes, seed = text.split(":")
    return dict(name=name, kind=kind, n_classes=int(classes), seed=int(seed))


def make_cohorts(args) -> None:
    from napari_sgrs.core.demo import make_demo_cohort

    for c in map(parse_cohort, args.cohorts):
        root = args.out / "data" / c["name"]
        if not (root / "cohort.json").exists():
            make_demo_cohort(root, kind=c["kind"], n_cases=args.cases, n_labeled=args.labeled, n_test=args.test,
                             shape=tuple(args.shape), seed=c["seed"], n_classes=c["n_classes"], overwrite=True)


def load_cohort(root: Path):
    from napari_sgrs.core.demo import DemoCohort

    d = json.loads((root / "cohort.json").read_text())
    return DemoCohort(root=root, kind=d["kind"], n_classes=d.get("n_classes", 2), images_tr=root / "imagesTr",
                      labels_tr=root / "labelsTr", images_ts=root / "imagesTs", labels_ts=root / "labelsTs",
                      train_names=tuple(d["train_names"]), labeled_names=tuple(d["labeled_names"]),
                      unlabeled_names=tuple(d["unlabeled_names"]), test_names=tuple(d["test_names"]),
                      shape=tuple(d["shape"]), spacing=tuple(d["spacing"]), origin=tuple(d["origin"]),
                      json_path=root / "cohort.json", seed=d["seed"])


def train_run(variant: str, seed: int, cohort, args, run: Path) -> float:
    import shutil

    from napari_sgrs.core.io import find_cases
    from napari_sgrs.core.train import TrainConfig, train

    overrides = parse_variant(variant)
    kwargs = dict(iterations=args.iterations, patch_size=tuple(args.patch), base_filters=args.filters, seed=seed,
                  device="cpu", checkpoint_every=args.iterations, log_every=50, val_fraction=0.0)
    kwargs.update(overrides)
    if run.exists():
        shutil.rmtree(run)
    t0 = time.time()
    train(TrainConfig(**kwargs), find_cases(cohort.images_tr, cohort.labels_tr), run)
    return time.time() - t0


def score(runs: list[Path], cohort) -> dict:
    """Dice (mean over the foreground classes) of the LAST checkpoint (the mean of the runs'
    probabilities when several) on the test volumes and on the unlabeled training volumes."""
    from napari_sgrs.core.infer import Predictor
    from napari_sgrs.core.io import read_volume
    from napari_sgrs.core.metrics import case_metrics

    predictors = [Predictor.from_run(r, device="cpu", checkpoint="last") for r in runs]

    def dice(image_path: Path, ref: np.ndarray) -> float:
        img = read_volume(image_path)
        probs = np.mean([p.predict(img.array, keep_probabilities=True).probabilities for p in predictors], 0)
        rows = case_metrics(probs.argmax(0).astype(np.uint8), ref, num_classes=cohort.n_classes)
        return float(np.mean([r.dice if np.isfinite(r.dice) else 0.0 for r in rows]))

    test = [dice(cohort.images_ts / f"{n}.nii.gz", read_volume(cohort.labels_ts / f"{n}.nii.gz").array)
            for n in cohort.test_names]
    unl = [dice(cohort.images_tr / f"{n}.nii.gz", cohort.hidden_label(n)) for n in cohort.unlabeled_names]
    return {"dice": float(np.mean(test)), "dice_unlabeled": float(np.mean(unl)), "dice_test_cases": test}


def one(args) -> int:
    """Train and score one (cohort, variant, seed) in this process; write its result file."""
    from napari_sgrs.core.runfolder import RunFolder

    cohort = load_cohort(args.out / "data" / args.cohort)
    runs = args.out / "runs" / args.cohort
    name = f"{args.variant}_s{args.seed}"
    if args.variant.startswith("supervised-x2"):
        base = runs / f"supervised_s{args.seed}"
        while not RunFolder(base).last.exists():
            time.sleep(5)  # the pair's first network is trained by the job "supervised"
        train_s = train_run("supervised", args.seed + ENSEMBLE_SEED_OFFSET, cohort, args, runs / name)
        res = score([base, runs / name], cohort)
    else:
        train_s = train_run(args.variant, args.seed, cohort, args, runs / name)
        res = score([runs / name], cohort)
    res.update(cohort=args.cohort, variant=args.variant, seed=args.seed, train_s=train_s,
               steps=args.iterations, config=RunFolder(runs / name).read_config())
    out = args.out / "results" / f"{args.cohort}__{args.variant}__s{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)
    print(json.dumps({k: res[k] for k in ("cohort", "variant", "seed", "dice", "dice_unlabeled", "train_s")}),
          flush=True)
    return 0


def run_all(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    make_cohorts(args)
    (args.out / "command.txt").write_text("python benchmarks/controls.py " + shlex.join(sys.argv[1:]) + "\n")
    jobs = []
    for seed in args.seeds:
        for c in map(parse_cohort, args.cohorts):
            for v in args.variants:
                if not (args.out / "results" / f"{c['name']}__{v}__s{seed}.json").exists():
                    jobs.append((c["name"], v, seed))
    common = ["--out", str(args.out), "--iterations", str(args.iterations), "--patch", *map(str, args.patch),
              "--filters", str(args.filters)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = (args.out / "log.txt").open("a")

    def launch(job):
        cohort, variant, seed = job
        cmd = [sys.executable, __file__, "--one", "--cohort", cohort, "--variant", variant, "--seed", str(seed),
               *common]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        log.write(p.stdout + (f"FAILED {job}: {p.stderr[-2000:]}\n" if p.returncode else ""))
        log.flush()
        return p.returncode

    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(launch, jobs))
    return int(any(codes))


def t_interval(d: np.ndarray) -> tuple[float, float, float]:
    from scipy import stats

    m = float(np.mean(d))
    if len(d) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d)))
    return m, m - h, m + h


def summary(args) -> int:
    rows = [json.loads(p.read_text()) for p in sorted((args.out / "results").glob("*.json"))]
    for r in rows:  # the run's config.json: its settings under "config"
        r["config"] = r["config"].get("config", r["config"])
    cohorts = list(dict.fromkeys(r["cohort"] for r in rows))
    order = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    order += [v for v in dict.fromkeys(r["variant"] for r in rows) if v not in order]
    by = {(r["cohort"], r["variant"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    cmd = (args.out / "command.txt").read_text().strip() if (args.out / "command.txt").exists() else "?"
    lines = [f"`OMP_NUM_THREADS=1 {cmd}`", "",
             f"LAST checkpoint, no validation split, seeds {seeds}; {rows[0]['steps']} steps, patch "
             f"{rows[0]['config']['patch_size']}, {rows[0]['config']['base_filters']} filters. Dice = mean over "
             "foreground classes; test = held-out volumes, unlabeled = the pseudo labels of the unlabeled training "
             "volumes.", ""]
    for key, title in (("dice", "test Dice"), ("dice_unlabeled", "unlabeled-volume Dice")):
        lines += [f"### {title}, mean ± sd over seeds", "",
                  "| variant | batch | " + " | ".join(cohorts) + " | all | train s |",
                  "|---|---|" + "---|" * (len(cohorts) + 2)]
        for v in order:
            rs = [r for r in rows if r["variant"] == v]
            cells = []
            for c in cohorts:
                a = [r[key] for r in rs if r["cohort"] == c]
                cells.append(f"{np.mean(a):.3f} ± {np.std(a, ddof=1) if len(a) > 1 else 0:.3f} (n={len(a)})"
                             if a else "-")
            cfg = rs[0]["config"]
            batch = (f"{cfg['labeled_batch_size']}" if cfg["method"] == "supervised"
                     else f"{cfg['labeled_batch_size']} + {cfg['batch_size'] - cfg['labeled_batch_size']}")
            lines.append(f"| {v} | {batch} | " + " | ".join(cells)
                         + f" | {np.mean([r[key] for r in rs]):.3f} | {np.mean([r['train_s'] for r in rs]):.0f} |")
        lines.append("")
        for ref in args.reference:
            lines += [f"#### paired difference (variant - {ref}) in {title}, per (cohort, seed), 95 % t interval",
                      "", "| variant | pairs | mean difference [95 % interval] | per cohort |", "|---|---|---|---|"]
            for v in order:
                if v == ref:
                    continue
                pairs = [(k[0], by[k][key] - by[(k[0], ref, k[2])][key]) for k in by
                         if k[1] == v and (k[0], ref, k[2]) in by]
                if not pairs:
                    continue
                m, lo, hi = t_interval(np.array([d for _, d in pairs]))
                per = ", ".join(f"{c} {np.mean([d for cc, d in pairs if cc == c]):+.3f}" for c in cohorts
                                if any(cc == c for cc, _ in pairs))
                lines.append(f"| {v} | {len(pairs)} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] | {per} |")
            lines.append("")
    text = "\n".join(lines)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cohorts", nargs="+", default=[], help="NAME:KIND:CLASSES:DATA_SEED")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cases", type=int, default=12)
    p.add_argument("--labeled", type=int, default=4)
    p.add_argument("--test", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3, default=(40, 40, 40))
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--patch", type=int, nargs=3, default=(32, 32, 32))
    p.add_argument("--filters", type=int, default=8)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--summary", action="store_true")
    p.add_argument("--reference", nargs="+", default=["sgrs-plus", "supervised"])
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cohort", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return one(args)
    if args.summary:
        return summary(args)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
