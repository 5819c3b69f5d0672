"""The ``sgrs`` command line: a thin argparse layer over :mod:`napari_sgrs.core`.

User errors (``SGRSError``) print ``error: <one line>`` and exit with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from .core.errors import ConfigError, InputError, InputWarning, SGRSError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error form: one line, ``error: ...``, exit code 2 (no usage block)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _overlap(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, help="folder of images (NIfTI, NRRD, MHA/MHD, DICOM series folders)")
    p.add_argument("--labels", type=Path, help="folder of labels, paired with images by file name; "
                                                "an image without a label file is unlabeled")
    p.add_argument("--h5-root", type=Path, help="benchmark h5 layout (LA, Pancreas-CT, BraTS2019) instead "
                                                 "of --images/--labels")
    p.add_argument("--labeled-list", type=Path, help="with --h5-root: list of the labeled cases")
    p.add_argument("--unlabeled-list", type=Path, help="with --h5-root: list of the unlabeled cases")
    p.add_argument("--out", type=Path, required=True,
                   help="run folder (checkpoints, events.jsonl, config.json): absent, empty, or an earlier sgrs run; "
                        "one trainer at a time (a second one is refused, naming the first)")
    p.add_argument("--method", default="sgrs", choices=["sgrs", "mean-teacher", "supervised"])
    p.add_argument("--preset", choices=["paper", "preview"], default=None,
                   help="paper: the published LA recipe (15000 steps, patch 80 112 112, 16 filters); "
                        "preview: small and fast for a CPU (patch 32^3, 8 filters, 300 steps)")
    p.add_argument("--iterations", type=int, default=None, help="training steps (paper: 15000)")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="training patch, multiples of 16 (default: the paper's 80 112 112, shrunk to the "
                        "volumes' size)")
    p.add_argument("--base-filters", type=int, default=None, help="V-Net base filters F (paper: 16)")
    p.add_argument("--batch-size", type=int, default=None, help="patches per step (paper: 4)")
    p.add_argument("--labeled-batch-size", type=int, default=None, help="labeled patches per step (paper: 2)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--tau", default=None,
                   help="entropy threshold of the disregarded region (log10 units; paper 0.296), or 'auto' to "
                        "calibrate it on the labeled validation volumes")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (paper: 0.01)")
    p.add_argument("--lr-schedule", choices=["poly", "constant"], default=None,
                   help="poly (default): decays to 0 at the last step, so the last checkpoint is settled; "
                        "constant: the paper's")
    p.add_argument("--no-mix", action="store_true", help="ablation: no Mix Augmentation")
    p.add_argument("--no-regions", action="store_true", help="ablation: one loss on every pseudo-label voxel")
    p.add_argument("--unsup-weight", type=float, default=None, help="weight of the unlabeled loss after ramp-up")
    p.add_argument("--gate", choices=["teacher-dice", "none"], default=None,
                   help="sgrs: scale the unlabeled loss by the teacher's Dice on the step's labeled patches "
                        "(default teacher-dice; none: the paper's)")
    p.add_argument("--region-weighting", choices=["voxels", "terms"], default=None,
                   help="sgrs: voxels (default): every scored voxel weighs the same; terms: the paper's mean of "
                        "the region terms, which gives the small inconsistent region half the weight")
    p.add_argument("--pseudo-views", choices=["mix", "both"], default=None,
                   help="sgrs: which student views the pseudo labels teach: mix (default), only the mixed view, "
                        "never the view they were made from; both: the plain and the mixed view (the paper's)")
    p.add_argument("--pseudo-anchor", choices=["labels", "off"], default=None,
                   help="sgrs: labels (default): a second network trained on the labeled patches alone is "
                        "averaged with the teacher into the pseudo labels, so the teacher cannot confirm its own "
                        "mistakes unopposed (1.4-1.5x the step time on a CPU); off: the teacher alone (the paper's)")
    p.add_argument("--rampup-fraction", type=float, default=None,
                   help="ramp-up length as a share of --iterations (paper: 6000/15000 = 0.4)")
    p.add_argument("--normalization", choices=["zscore", "ct", "none"], default=None)
    p.add_argument("--ct-window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None)
    p.add_argument("--ignore-index", type=int, default=None,
                   help="label value meaning 'not annotated' (default 255): left out of the supervised loss")
    p.add_argument("--num-classes", type=int, default=None, help="classes incl. background (default: from labels)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of labeled volumes held out for validation (default 0.2; none below 3 labels)")
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 100)")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default=None)
    p.add_argument("--compile", action="store_true", default=None)
    p.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false", default=None,
                   help="on CUDA, use cuDNN's heuristic algorithms instead of timing them for the patch "
                        "shape (slower; repeatable run to run)")
    p.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under torchrun")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes drawing patches (default 0: in the training process, "
                        "bit-identical runs for a seed; 2-8 keep a GPU busy)")
    p.add_argument("--log-every", type=int, default=None, help="steps between progress events (default 10)")
    p.add_argument("--reference-compat", action="store_true", default=None,
                   help="reproduce the published code's defects (double EMA, student decay, CE on C)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


PRESETS = {
    "paper": dict(iterations=15000, patch_size=(80, 112, 112), base_filters=16, batch_size=4,
                  labeled_batch_size=2, lr_schedule="constant", gate="none", region_weighting="terms",
                  pseudo_views="both", pseudo_anchor="off"),
    # measured on 2 CPU cores (benchmarks/preview_benchmark.py): 32^3 and 8 filters train ~3x faster
    # per step than 48^3, and validating every 100 steps keeps validation off the critical path
    "preview": dict(iterations=300, patch_size=(32, 32, 32), base_filters=8, batch_size=4, labeled_batch_size=2,
                    val_every=100),
}


def _config_from_args(args: argparse.Namespace):
    from .core.train import TrainConfig

    cfg = TrainConfig(method=args.method, seed=args.seed, device=args.device)
    if args.preset:
        for k, v in PRESETS[args.preset].items():
            setattr(cfg, k, v)
    mapping = {"iterations": "iterations", "patch_size": "patch_size", "base_filters": "base_filters",
               "batch_size": "batch_size", "labeled_batch_size": "labeled_batch_size", "lr": "lr",
               "lr_schedule": "lr_schedule",
               "unsup_weight": "unsup_weight", "rampup_fraction": "rampup_fraction", "gate": "gate",
               "region_weighting": "region_weighting", "pseudo_views": "pseudo_views",
               "pseudo_anchor": "pseudo_anchor",
               "normalization": "normalization", "ct_window": "ct_window", "ignore_index": "ignore_index",
               "num_classes": "num_classes", "val_fraction": "val_fraction", "val_every": "val_every",
               "checkpoint_every": "checkpoint_every", "amp": "amp", "compile": "compile", "sync_bn": "sync_bn",
               "cudnn_benchmark": "cudnn_benchmark",
               "reference_compat": "reference_compat", "workers": "workers", "log_every": "log_every"}
    for arg, field_name in mapping.items():
        value = getattr(args, arg, None)
        if value is not None:
            setattr(cfg, field_name, tuple(value) if isinstance(value, list) else value)
    if args.method == "mean-teacher" and args.unsup_weight is None:
        cfg.unsup_weight = 0.1  # the UA-MT / SSL4MIS consistency weight for the MSE
    cfg.use_mix = not args.no_mix
    cfg.use_regions = not args.no_regions
    if args.tau is not None:
        if str(args.tau).lower() == "auto":
            cfg.tau_auto = True  # recalibrated at each validation (sgrs.calibrate_tau)
        else:
            try:
                cfg.tau = float(args.tau)
            except ValueError:
                raise ConfigError(f"--tau must be a number or 'auto', got {args.tau!r}") from None
    return cfg


def _cases_from_args(args: argparse.Namespace):
    from .core.io import find_cases, read_h5_benchmark

    if args.h5_root is not None:
        if args.labeled_list is None:
            raise ConfigError("--h5-root needs --labeled-list (and usually --unlabeled-list)")
        labeled = read_h5_benchmark(args.h5_root, args.labeled_list)
        unlabeled = []
        if args.unlabeled_list is not None:
            from dataclasses import replace

            unlabeled = [replace(c, label=None) for c in read_h5_benchmark(args.h5_root, args.unlabeled_list)]
        return labeled + unlabeled
    if args.images is None:
        raise ConfigError("give --images DIR (and --labels DIR) or --h5-root with list files")
    return find_cases(args.images, args.labels)


def cmd_train(args: argparse.Namespace) -> int:
    from .core.outputs import check_not_input
    from .core.runfolder import RunFolder

    run = RunFolder(args.out)
    # every check that needs no engine comes first, so a refusal is quick and writes nothing
    check_not_input(args.out, {"--images": args.images, "--labels": args.labels, "--h5-root": args.h5_root,
                               "--labeled-list": args.labeled_list, "--unlabeled-list": args.unlabeled_list})
    run.check_output(args.resume, holding_lock=os.environ.get("RANK", "0") != "0")  # torchrun: rank 0 locks
    cfg = _config_from_args(args)
    if args.resume:
        _inherit_run_settings(cfg, args)
    cfg.validate()
    from .core.train import train  # the slow import (torch); SIGTERM meanwhile: see main()

    cases = _cases_from_args(args)
    result = train(cfg, cases, args.out, resume=args.resume, progress_bar=not args.quiet,
                   listeners=[_print_notes])
    state = "stopped" if result.stopped else "finished"
    best = "" if result.best_dice is None else f", best validation Dice {result.best_dice:.4f}"
    saved = "no checkpoint yet" if result.last_checkpoint is None else f"checkpoint {result.last_checkpoint}"
    print(f"{state} at step {result.step}{best}; {saved}")
    return 0


def _inherit_run_settings(cfg, args: argparse.Namespace) -> None:
    """On --resume, settings the user did not repeat come from the run's config.json."""
    from .core.runfolder import RunFolder
    from .core.train import TrainConfig, check_resumable

    run = RunFolder(args.out)
    if not run.config.exists():
        return  # the checkpoint holds what must match; the command line gives the rest
    raw = run.read_config()
    check_resumable(raw, run.config)  # a setting removed in 0.2: refused before anything is written
    try:
        saved = TrainConfig.from_json(raw).validate()
    except (ConfigError, TypeError) as exc:
        raise InputError(f"{run.config}: the saved run settings are invalid ({exc}); restore the file or start "
                         f"a new run") from exc
    given = {a.replace("-", "_") for a in _given_options(getattr(args, "argv", sys.argv[1:]))}
    for name in ("patch_size", "base_filters", "batch_size", "labeled_batch_size", "lr", "tau", "normalization",
                 "ct_window", "ignore_index", "num_classes", "val_fraction", "unsup_weight", "rampup_fraction",
                 "use_mix", "use_regions", "iterations", "seed", "checkpoint_every", "reference_compat", "gate",
                 "region_weighting", "pseudo_views", "pseudo_anchor"):
        flag = {"use_mix": "no_mix", "use_regions": "no_regions"}.get(name, name)
        if flag not in given:
            setattr(cfg, name, getattr(saved, name))


def _given_options(argv: list[str]) -> list[str]:
    return [a[2:].split("=")[0] for a in argv if a.startswith("--")]


def cmd_predict(args: argparse.Namespace) -> int:
    from .core.predict import predict_folder  # the slow import (torch): after argparse, as in cmd_train

    predicted = predict_folder(args.run, args.out, images=args.images, labels=args.labels, h5_root=args.h5_root,
                               h5_list=args.list, regions=args.regions, device=args.device,
                               checkpoint=args.checkpoint, model=args.model, overlap=args.overlap,
                               sw_batch_size=args.sw_batch_size, largest_component=args.largest_component,
                               progress=not args.quiet, note=None if args.quiet else _print_note)
    print(f"wrote {len(predicted.files)} label volume(s) to {args.out}"
          + (" with probability/ and regions/" if args.regions else ""))
    return 0


def _print_notes(event) -> None:
    """Events that carry a ``note`` (a setting that will do nothing, say) go to the terminal too."""
    note = event.data.get("note")
    if note:
        print(f"note: {note}", file=sys.stderr)


def _print_note(line: str) -> None:
    print(line, file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .core.metrics import evaluate_folders

    if args.json is not None:
        from .core.outputs import check_json_output

        check_json_output(args.json, {"--pred": args.pred, "--labels": args.labels, "--h5-root": args.h5_root,
                                      "--list": args.list})
    if args.h5_root is not None:
        return _evaluate_h5(args)
    if args.labels is None:
        raise ConfigError("give --labels DIR, or --h5-root ROOT --list FILE")
    report = evaluate_folders(args.pred, args.labels, json_path=args.json, ignore_index=args.ignore_index)
    _print_report(report)
    return 0


def _print_report(report) -> None:
    print(report.format_table())
    if report.ignored_voxels:  # 0/255 masks would otherwise score as empty without a word
        print(f"note: {report.ignored_voxels} voxels hold the ignore index {report.ignore_index} and are left out "
              f"of every metric (--ignore-index sets it)", file=sys.stderr)


def _evaluate_h5(args: argparse.Namespace) -> int:
    """References from the benchmark h5 files, written as NIfTI beside nothing (a temp folder)."""
    import tempfile

    from .core.io import read_h5_benchmark, write_volume
    from .core.metrics import evaluate_folders

    if args.list is None:
        raise ConfigError("--h5-root needs --list (e.g. test.list)")
    with tempfile.TemporaryDirectory(prefix="sgrs-ref-") as tmp:
        for case in read_h5_benchmark(args.h5_root, args.list):
            label = case.read_label()
            write_volume(Path(tmp) / f"{case.name}.nii.gz", label.array.astype("uint8"), label.geometry)
        report = evaluate_folders(args.pred, tmp, json_path=args.json, ignore_index=args.ignore_index)
    _print_report(report)
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .core.demo import make_demo_cohort

    cohort = make_demo_cohort(args.dir, kind=args.kind, n_cases=args.cases, n_labeled=args.labeled,
                              n_test=args.test, shape=tuple(args.shape), seed=args.seed,
                              n_classes=args.classes, overwrite=args.overwrite)
    print(f"wrote {len(cohort.train_names)} training ({len(cohort.labeled_names)} labeled) and "
          f"{len(cohort.test_names)} test volumes to {cohort.root}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The headless main job: demo data -> train -> predict with regions -> evaluate."""
    from .core.demo import make_demo_cohort
    from .core.io import find_cases
    from .core.metrics import evaluate_folders
    from .core.outputs import check_json_output
    from .core.runfolder import RunFolder
    from .core.train import TrainConfig, train

    root = Path(args.dir)
    cfg = TrainConfig(method="sgrs", iterations=args.iterations, patch_size=(32, 32, 32), base_filters=8,
                      seed=args.seed, device=args.device).validate()
    run = RunFolder(root / "run")
    # an earlier demo's run and report are replaced; anything else of that name is left alone
    if run.path.exists() and not run.is_run():
        raise InputError(f"{run.path} exists and is not an sgrs run; move it away or choose another demo "
                         f"folder (nothing was changed)")
    if root.is_dir():
        check_json_output(root / "evaluation.json", {})
    cohort = make_demo_cohort(root / "data", kind="blob", n_cases=8, n_labeled=4, n_test=4,
                              shape=(48, 48, 48), seed=args.seed, overwrite=True)
    if run.path.exists():
        with run.lock(what="sgrs demo"):
            run.clear()
    print(f"training SGRS-Net for {cfg.iterations} steps on {len(cohort.labeled_names)} labeled + "
          f"{len(cohort.unlabeled_names)} unlabeled demo volumes ...")
    train(cfg, find_cases(cohort.images_tr, cohort.labels_tr), run.path, progress_bar=True)
    # Parsed, not built by hand: every predict option gets its command-line default.
    ns = build_parser().parse_args(["predict", "--run", str(run.path), "--images", str(cohort.images_ts),
                                    "--out", str(root / "pred_test"), "--device", args.device])
    cmd_predict(ns)
    ns_unl = argparse.Namespace(**{**vars(ns), "images": cohort.images_tr, "labels": cohort.labels_tr,
                                   "out": root / "pseudo", "regions": True})
    cmd_predict(ns_unl)
    report = evaluate_folders(root / "pred_test", cohort.labels_ts, json_path=root / "evaluation.json")
    print("\nHeld-out demo test volumes (last checkpoint):")
    print(report.format_table())
    print(f"\npseudo labels and synergy regions of the unlabeled volumes: {root / 'pseudo'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sgrs", description="SGRS-Net semi-supervised 3D segmentation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train SGRS-Net (or mean-teacher / supervised) into a run folder")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="segment volumes with a trained run; --regions adds synergy regions")
    p.add_argument("--run", type=Path, required=True, help="run folder (or a checkpoint file)")
    p.add_argument("--images", type=Path, default=None, help="folder of images to segment")
    p.add_argument("--h5-root", type=Path, default=None, help="benchmark h5 layout instead of --images")
    p.add_argument("--list", type=Path, default=None, help="with --h5-root: the cases to segment (test.list)")
    p.add_argument("--labels", type=Path, default=None,
                   help="optional: images with a label here are labeled, so no regions are written for them")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for the predictions, outside every input; a file keeps its input's name for NIfTI, "
                        ".nrrd and .mha and becomes <case>.nii.gz otherwise (.nhdr, .mhd, h5, DICOM); a file there "
                        "that sgrs predict did not write (listed in OUT/.sgrs-written.json) is never overwritten")
    p.add_argument("--regions", action="store_true",
                   help="also write probability/ (foreground probability) and regions/ (0 none, 1 disregarded, "
                        "2 consistent, 3 inconsistent) for each unlabeled volume")
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="last (default): the run's final checkpoint; best: the best on its validation split")
    p.add_argument("--model", choices=["student", "teacher"], default="student")
    p.add_argument("--overlap", type=_overlap, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument("--sw-batch-size", type=_int_at_least(1), default=4, help="windows per forward pass")
    p.add_argument("--largest-component", choices=["off", "auto", "on"], default="off",
                   help="keep only the largest connected component of a class in the label volume; auto: the "
                        "classes that are one component in every labeled training volume; on: every class")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="Dice, Jaccard, HD95 and ASD (voxels and mm) of predictions")
    p.add_argument("--pred", type=Path, required=True)
    p.add_argument("--labels", type=Path, default=None, help="folder of reference labels")
    p.add_argument("--h5-root", type=Path, default=None, help="references from the benchmark h5 layout")
    p.add_argument("--list", type=Path, default=None, help="with --h5-root: the cases (test.list)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the report here: a new file, or an earlier sgrs evaluation report, outside "
                        "--pred and --labels")
    p.add_argument("--ignore-index", type=int, default=255,
                   help="voxels with this value (unannotated) are left out of every metric (default 255)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo-data", help="write a small procedural cohort with labels")
    p.add_argument("dir", type=Path)
    p.add_argument("--kind", choices=["blob", "vessel"], default="blob")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--labeled", type=int, default=4)
    p.add_argument("--test", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3, default=(48, 48, 48))
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a cohort that sgrs demo-data wrote in DIR (only its own, unchanged files are removed)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo", help="headless demo: demo data, short training, regions, evaluation")
    p.add_argument("dir", type=Path, nargs="?", default=Path("demo"))
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)
    return parser


def _print_input_warnings(message, category, filename, lineno, file=None, line=None, *, _default=None):
    """Our warnings (InputWarning) are one line, ``warning: <message>``; others print as Python's do."""
    if issubclass(category, InputWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # what --resume calls 'given'
    # Until the trainer installs its own handlers (right after it locks the run), SIGTERM is an
    # interrupt like Ctrl-C: one line and exit 130 instead of a silent kill or a traceback.
    on_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_print_input_warnings, _default=warnings.showwarning)
            return int(args.func(args) or 0)
    except SGRSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
