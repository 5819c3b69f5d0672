"""Compare supervised, mean-teacher, SGRS-Net (sgrs), SGRS+ (sgrs-plus, ours) and the
ablations of ours on a demo cohort at a fixed budget.

Every run trains through the same engine as ``sgrs train`` (same defaults unless a flag here
says otherwise), predicts the held-out test volumes with the LAST checkpoint (no selection on
test data, no selection at all) through ``sgrs predict``'s folder loop (``predict_folder``, files
under --out/predictions), and is scored with Dice, Jaccard, HD95 and ASD. Writes
``results.json``, ``table.md`` and ``dice.png`` into --out.

Example (the figure in benchmarks/RESULTS.md):

    python benchmarks/compare_methods.py --kind blob --iterations 400 --seeds 0 1 2 \
        --out benchmarks/out/blob
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "supervised": dict(method="supervised"),
    "mean-teacher": dict(method="mean-teacher"),
    # SGRS-Net: the paper's step (settings.METHOD_DEFAULTS) at this budget, ramp scaled to it
    "sgrs": dict(method="sgrs"),
    # the published code: its defects too, the paper's 2 + 2 batch and the ramp over 6,000 steps
    # whatever the budget
    "sgrs-published": dict(method="sgrs", reference_compat=True, rampup_steps=6000, batch_size=4,
                           labeled_batch_size=2),
    "sgrs-plus": dict(method="sgrs-plus"),
    "sgrs-plus-no-mix": dict(method="sgrs-plus", use_mix=False),
    "sgrs-plus-no-regions": dict(method="sgrs-plus", use_regions=False),
    # ours, but L_u on both views as in the paper (the ablation of pseudo_views="mix")
    "sgrs-plus-both-views": dict(method="sgrs-plus", pseudo_views="both"),
}


def parse_variant(variant: str, variants: dict | None = None) -> dict:
    """A named variant of ``variants`` (default: this script's), or ``base[key=value,key=value]``
    (e.g. ``sgrs[tau=0.2]``, ``sgrs-plus[pseudo_views=both]``, ``supervised[batch_size=2]``) to
    override TrainConfig fields."""
    import ast

    variants = VARIANTS if variants is None else variants
    name, _, rest = variant.partition("[")
    if name not in variants:
        raise SystemExit(f"unknown variant {name!r}; use one of {', '.join(variants)}")
    overrides = dict(variants[name])
    for item in filter(None, rest.rstrip("]").split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    return overrides


def run_one(variant: str, seed: int, cohort, args, out: Path) -> dict:
    from napari_sgrs.core.io import find_cases, read_volume
    from napari_sgrs.core.metrics import case_metrics
    from napari_sgrs.core.predict import predict_folder
    from napari_sgrs.core.train import TrainConfig, train

    overrides = parse_variant(variant)
    kwargs = dict(iterations=args.iterations, patch_size=tuple(args.patch), base_filters=args.filters,
                  batch_size=args.batch_size, labeled_batch_size=args.labeled_batch_size, seed=seed,
                  device=args.device, checkpoint_every=args.iterations, log_every=50)
    kwargs.update(overrides)
    if "rampup_steps" in kwargs:
        kwargs["rampup_fraction"] = kwargs.pop("rampup_steps") / args.iterations
    cfg = TrainConfig(**kwargs)
    run = out / "runs" / f"{variant}_s{seed}"
    predictions = out / "predictions" / f"{variant}_s{seed}"
    for folder in (run, predictions):
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
    t0 = time.time()
    train(cfg, find_cases(cohort.images_tr, cohort.labels_tr), run)
    train_s = time.time() - t0
    # the LAST checkpoint, through the folder loop of `sgrs predict` (its files are kept beside the runs)
    predict = dict(device=args.device, checkpoint="last", largest_component=args.largest_component)
    test = predict_folder(run, predictions / "test", images=cohort.images_ts, **predict)
    rows = []
    for case in find_cases(cohort.images_ts, cohort.labels_ts):
        pred, ref = read_volume(test.label(case.name)), read_volume(case.label)
        rows += case_metrics(pred.array, ref.array, spacing=pred.geometry.spacing, name=case.name)
    res = {"variant": variant, "seed": seed, "train_s": train_s, "largest_component": args.largest_component,
           "batch": [cfg.labeled_batch_size,
           cfg.batch_size - cfg.labeled_batch_size if cfg.method != "supervised" else 0]}
    for key in ("dice", "jaccard", "hd95_mm", "asd_mm", "hd95_vox", "asd_vox"):
        vals = np.array([getattr(r, key) for r in rows], dtype=float)
        finite = vals[np.isfinite(vals)]
        res[key] = float(finite.mean()) if len(finite) else float("nan")
        res[key + "_n_undefined"] = int((~np.isfinite(vals)).sum())
    # Transductive: the unlabeled TRAINING volumes, scored against the demo's hidden labels (the
    # generator is a pure function of its seed). This is what the plugin's user gets: pseudo labels
    # for the volumes they did not label. Reported apart from the held-out test Dice.
    unlabeled = [c for c in find_cases(cohort.images_tr, cohort.labels_tr) if c.name in cohort.unlabeled_names]
    pseudo = predict_folder(run, predictions / "unlabeled", cases=unlabeled, **predict)
    dices = []
    for case in unlabeled:
        pred = read_volume(pseudo.label(case.name))
        dices += [r.dice for r in case_metrics(pred.array, cohort.hidden_label(case.name),
                                               spacing=pred.geometry.spacing, name=case.name)]
    res["dice_unlabeled"] = float(np.mean(dices)) if dices else float("nan")
    print(json.dumps(res), flush=True)
    return res


def summarise(results: list[dict], variants: list[str]) -> str:
    lines = ["| method | labeled + unlabeled / step | Dice | Jaccard | HD95 (mm) | ASD (mm) | HD95 (vox) | "
             "Dice, unlabeled train vols | seeds | train s/run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        rs = [r for r in results if r["variant"] == v]
        if not rs:
            continue

        def ms(key, fmt="{:.3f}"):
            a = np.array([r[key] for r in rs], dtype=float)
            return (fmt + " ± " + fmt).format(np.nanmean(a), np.nanstd(a))

        batch = rs[0].get("batch")
        batch = f"{batch[0]} + {batch[1]}" if batch else "?"
        unl = ms("dice_unlabeled") if all("dice_unlabeled" in r for r in rs) else "-"
        lines.append(f"| {v} | {batch} | {ms('dice')} | {ms('jaccard')} | {ms('hd95_mm', '{:.2f}')} | "
                     f"{ms('asd_mm', '{:.2f}')} | {ms('hd95_vox', '{:.2f}')} | {unl} | {len(rs)} | "
                     f"{np.mean([r['train_s'] for r in rs]):.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], variants: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.3 * len(variants) + 2, 3.6))
    for i, v in enumerate(variants):
        d = [r["dice"] for r in results if r["variant"] == v]
        ax.scatter([i] * len(d), d, color="#0072B2", zorder=3)
        if d:
            ax.plot([i - 0.25, i + 0.25], [np.mean(d)] * 2, color="#D55E00", lw=2)
    ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right")
    ax.set_ylabel("Dice on held-out test volumes")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def describe(a: dict, seeds) -> tuple[str, str]:
    """The table header's first line and the plot title for runs made with the arguments ``a``
    (``vars(args)``, or the ``args`` a results.json stores): one wording for single runs and merges."""
    kind, labeled, cases, iterations = a["kind"], a["labeled"], a.get("cases", 12), a["iterations"]
    header = (f"{kind} cohort, {labeled} labeled + {cases - labeled} unlabeled training volumes, "
              f"{a.get('test', 8)} test volumes; {iterations} steps, patch {tuple(a['patch'])}, {a['filters']} "
              f"filters; LAST checkpoint (no selection); mean ± std over seeds {list(seeds)}.")
    title = (f"{kind} (data seed {a['data_seed']}): {labeled} labeled + {cases - labeled} unlabeled volumes, "
             f"{iterations} steps, last checkpoint")
    return header, title


def parse_rename(item: str) -> tuple[str, str]:
    """``OLD=NEW`` for --rename; OLD may hold '=' inside brackets (``sgrs[pseudo_views=mix]=sgrs``)."""
    depth = 0
    for i, ch in enumerate(item):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "=" and depth == 0:
            return item[:i], item[i + 1:]
    raise SystemExit(f"--rename wants OLD=NEW, got {item!r}")


def merge(args) -> int:
    """One table and plot from several results.json (the same cohort and budget, split by seed/variant)."""
    results, commands, settings = [], [], set()
    renames = dict(parse_rename(item) for item in args.rename or [])
    for folder in args.merge:
        d = json.loads((folder / "results.json").read_text())
        a = d["args"]
        settings.add((a["kind"], a["iterations"], tuple(a["patch"]), a["filters"], a["labeled"], a["data_seed"],
                      a.get("cases", 12), a.get("test", 8)))
        results += [{**r, "variant": renames.get(r["variant"], r["variant"])} for r in d["results"]]
        cmd = a.get("cmd") or " ".join(  # results written before the command was recorded: rebuild it
            [f"--kind {a['kind']} --iterations {a['iterations']} --seeds {' '.join(map(str, a['seeds']))}",
             "--variants " + " ".join(f'"{v}"' for v in a["variants"]), f"--out {a['out']}"])
        commands.append(f"python benchmarks/compare_methods.py {cmd}")
    if len(settings) != 1:
        raise SystemExit(f"the folders were run with different settings: {sorted(settings)}")
    variants = list(dict.fromkeys(r["variant"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"merged_from": [str(f) for f in args.merge],
                                                       "commands": commands, "results": results}, indent=1))
    renamed = "".join(f"\n    (variant {old!r} shown as {new!r})" for old, new in renames.items())
    first, title = describe(a, seeds)  # the settings are one and the same for every folder
    header = (first + " Merged from:\n\n"
              + "\n".join(f"    OMP_NUM_THREADS=1 {c}" for c in commands) + renamed + "\n\n")
    table = summarise(results, variants)
    (args.out / "table.md").write_text(header + table + "\n")
    plot(results, variants, args.out / "dice.png", title)
    if any(tau_of(v) is not None and "[" in v for v in variants):
        tau_plot(results, args.out / "tau.png",
                 f"{a['kind']}: sgrs Dice against tau, {a['iterations']} steps, last checkpoint")
    print(header + table)
    return 0


def tau_of(variant: str) -> float | str | None:
    """The tau of a variant of either SGRS method: a number, "auto", or None for other methods."""
    from napari_sgrs.core.settings import METHOD_DEFAULTS, SGRS_METHODS

    if variant.partition("[")[0] not in VARIANTS:
        return None  # a name given by --rename
    o = parse_variant(variant)
    if o.get("method") not in SGRS_METHODS or any(k not in ("method", "tau", "tau_auto") for k in o):
        return None  # another method, or another change as well: not a point of the tau curve
    return "auto" if o.get("tau_auto") else float(o.get("tau", METHOD_DEFAULTS[o["method"]]["tau"]))


def tau_plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed, auto = {}, []
    for r in results:
        t = tau_of(r["variant"])
        if t == "auto":
            auto.append(r["dice"])
        elif t is not None:
            fixed.setdefault(t, []).append(r["dice"])
    fig, ax = plt.subplots(figsize=(5, 3.4))
    taus = sorted(fixed)
    for t in taus:
        ax.scatter([t] * len(fixed[t]), fixed[t], color="#0072B2", zorder=3)
    ax.plot(taus, [np.mean(fixed[t]) for t in taus], color="#0072B2", label="fixed tau (mean)")
    if auto:
        ax.axhline(np.mean(auto), color="#D55E00", ls="--", label=f"tau auto (mean of {len(auto)})")
    sup = [r["dice"] for r in results if r["variant"] == "supervised"]
    if sup:
        ax.axhline(np.mean(sup), color="0.4", ls=":", label="supervised (mean)")
    ax.set_xlabel("tau (normalised entropy, log10 units; paper 0.296)")
    ax.set_ylabel("Dice, held-out test volumes")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["blob", "vessel"], default="blob")
    p.add_argument("--cases", type=int, default=12)
    p.add_argument("--labeled", type=int, default=4)
    p.add_argument("--test", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=(48, 48, 48))
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--patch", type=int, nargs=3, default=(32, 32, 32))
    p.add_argument("--filters", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the engine's (4 labeled for every method, + 2 unlabeled for the semi-supervised "
                        "methods)")
    p.add_argument("--labeled-batch-size", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["supervised", "mean-teacher", "sgrs", "sgrs-plus",
                                                     "sgrs-plus-no-mix", "sgrs-plus-no-regions"])
    p.add_argument("--data-seed", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--largest-component", choices=["off", "auto", "on"], default="off",
                   help="post-process every prediction as `sgrs predict --largest-component` does")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/compare"))
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="no training: merge the results.json of these --out folders (runs split across "
                        "processes) into one table and plot in --out")
    p.add_argument("--rename", nargs="+", default=None, metavar="OLD=NEW",
                   help="with --merge: show variant OLD as NEW (runs made under an explicit setting that "
                        "has since become the default); the table's header records each renaming")
    args = p.parse_args(argv)
    import shlex

    cmd_args = shlex.join(sys.argv[1:] if argv is None else list(argv))
    if args.merge:
        return merge(args)

    from napari_sgrs.core.demo import make_demo_cohort

    args.out.mkdir(parents=True, exist_ok=True)
    cohort = make_demo_cohort(args.out / "data", kind=args.kind, n_cases=args.cases, n_labeled=args.labeled,
                              n_test=args.test, shape=tuple(args.shape), seed=args.data_seed, overwrite=True)
    results_path = args.out / "results.json"
    results = []
    for seed in args.seeds:
        for v in args.variants:
            results.append(run_one(v, seed, cohort, args, args.out))
            results_path.write_text(json.dumps({"args": {**{k: (str(v) if isinstance(v, Path) else v)
                                                            for k, v in vars(args).items()},
                                                         "cmd": cmd_args},
                                                "results": results}, indent=1))
    table = summarise(results, args.variants)
    cmd = "python benchmarks/compare_methods.py " + cmd_args
    first, title = describe(vars(args), args.seeds)
    header = f"{first} Volumes {tuple(args.shape)}.\n\n`{cmd}`\n\n"
    (args.out / "table.md").write_text(header + table + "\n")
    plot(results, args.variants, args.out / "dice.png", title)
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
