"""The ``sgrs`` command line: a thin argparse layer over :mod:`napari_sgrs.core`.

User errors (``SGRSError``) print ``error: <one line>`` and exit with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import signal
import sys
import textwrap
import threading
import warnings
from pathlib import Path

from .core import settings as S  # torch-free: the parser is built without the engine
from .core.errors import ConfigError, InputError, InputWarning, SGRSError

EXIT_USAGE = 2
PRESETS = S.PRESETS  # importable from here, as before settings.py


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error form: one line, ``error: ...``, exit code 2 (no usage block).
    No abbreviations (``--iter`` is not taken for ``--iterations``); a mistyped option is answered
    with the closest real one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:  # a subcommand's parser: no other parser takes them
            self.error(self._unrecognized(extras))
        return namespace, extras

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")

    def _unrecognized(self, extras: list[str]) -> str:
        options = [a.split("=", 1)[0] for a in extras if re.match(r"--?[A-Za-z]", a)]
        if not options:
            return f"unrecognized argument{'s' if len(extras) > 1 else ''} {' '.join(extras)}"
        notes = [self._note(option) for option in options]
        if len(options) == 1:
            return f"unrecognized option {options[0]}" + (f"; {notes[0]}" if notes[0] else "")
        return "unrecognized options " + ", ".join(o + (f" ({n})" if n else "") for o, n in zip(options, notes))

    def _note(self, option: str) -> str | None:
        if option in S.REMOVED_OPTIONS:
            return "removed in 0.2 (CHANGELOG.md)"
        near = S.suggest(option, [o for action in self._actions for o in action.option_strings])
        return f"did you mean {near}?" if near else None


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
    """The options of ``sgrs train``: the inputs and the run by hand, every setting generated from
    :mod:`.core.settings`, grouped as there."""
    groups = {"data": p.add_argument_group(S.GROUPS["data"]),
              "run": p.add_argument_group("run: where it goes and what it starts from")}
    groups.update({g: p.add_argument_group(title) for g, title in S.GROUPS.items() if g not in groups})
    data, run = groups["data"], groups["run"]
    data.add_argument("--images", type=Path, metavar="DIR",
                      help="folder of images (NIfTI, NRRD, MHA/MHD, DICOM series folders)")
    data.add_argument("--labels", type=Path, metavar="DIR",
                      help="folder of labels, paired with images by file name; an image without a label file is "
                           "unlabeled")
    data.add_argument("--h5-root", type=Path, metavar="DIR",
                      help="benchmark h5 layout (LA, Pancreas-CT, BraTS2019) instead of --images/--labels")
    data.add_argument("--labeled-list", type=Path, metavar="FILE", help="with --h5-root: list of the labeled cases")
    data.add_argument("--unlabeled-list", type=Path, metavar="FILE",
                      help="with --h5-root: list of the unlabeled cases")
    run.add_argument("--out", type=Path, required=True, metavar="DIR",
                     help="run folder (checkpoints, events.jsonl, config.json): absent, empty, or an earlier sgrs "
                          "run; one trainer at a time (a second one is refused, naming the first)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint, with its saved settings except "
                          "those given again")
    run.add_argument("--preset", choices=list(S.PRESETS),
                     help="; ".join(f"{name}: {text}" for name, text in S.PRESET_HELP.items()))
    run.add_argument("--config", type=Path, metavar="FILE",
                     help="settings from a JSON object (TrainConfig's fields, flat or a run's config.json); "
                          "options given too win")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    for setting in S.SETTINGS.values():
        if setting.flag is not None:
            _add_setting_option(groups[setting.group], setting)
    p.epilog = _train_epilog()


def _add_setting_option(group, setting) -> None:
    """One generated option. Its default is left out of the namespace (SUPPRESS), so the options
    a user gave are exactly the settings in it."""
    kwargs = dict(dest=setting.name, default=argparse.SUPPRESS,
                  help=argparse.SUPPRESS if setting.expert else f"{setting.help} (default: {_default_text(setting)})")
    if setting.base_type is bool:  # --mix / --no-mix, whichever the default, so either can undo a preset
        group.add_argument(_bool_flag(setting), action=argparse.BooleanOptionalAction, **kwargs)
        return
    item = setting.item_type
    if setting.parse is not None:
        kwargs["type"] = _option_type(setting.parse)
    elif item is not None:
        kwargs.update(type=item[0], nargs=item[1])
    else:
        kwargs["type"] = setting.base_type
    if setting.choices:
        kwargs["choices"] = setting.choices
    metavar = setting.metavar or {int: "N", float: "X"}.get(item[0] if item else setting.base_type)
    if metavar is not None:
        kwargs["metavar"] = metavar
    group.add_argument(setting.flag, **kwargs)


def _bool_flag(setting) -> str:
    return "--" + setting.flag.removeprefix("--").removeprefix("no-")


def _default_text(setting) -> str:
    if setting.default_text is not None:
        return setting.default_text
    value = setting.default
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _option_type(parse):
    """A settings parser as an argparse type: its ValueError's message becomes argparse's."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _train_epilog() -> str:
    expert: dict[str, list[str]] = {group: [] for group in S.GROUPS}
    for setting in S.SETTINGS.values():
        if setting.flag is not None and setting.expert:
            flag = setting.flag if setting.base_type is not bool else "--[no-]" + _bool_flag(setting)[2:]
            expert[setting.group].append(flag)
    width = min(100, shutil.get_terminal_size().columns - 2)
    paragraphs = [
        "Expert options, not listed above: " + "; ".join(f"{group} {', '.join(flags)}"
                                                          for group, flags in expert.items() if flags) + ".",
        "Only in a --config FILE: " + ", ".join(s.name for s in S.SETTINGS.values() if s.flag is None)
        + " (tau_auto: --tau auto).",
        "Precedence: defaults < --preset < --config FILE < options. --resume keeps the run's saved settings "
        "except those given again (by --preset, --config or an option). Every setting, its default and its "
        "meaning: napari_sgrs/core/settings.py.",
    ]
    return "\n\n".join(textwrap.fill(text, width, break_on_hyphens=False) for text in paragraphs)


def _given_settings(args: argparse.Namespace) -> dict:
    """The settings the user gave: --preset's, then a --config file's, then the options'."""
    given = dict(S.PRESETS[args.preset]) if args.preset else {}
    if args.config is not None:
        given.update(S.read_config_file(args.config))
    for setting in S.SETTINGS.values():
        if hasattr(args, setting.name):  # given: generated options leave no default in the namespace
            value = getattr(args, setting.name)
            given.update(setting.assignments(tuple(value) if isinstance(value, list) else value))
    return given


def _config_from_args(args: argparse.Namespace) -> S.TrainConfig:
    """The run's settings, validated: defaults < --preset < --config FILE < options; on --resume
    the run's saved settings replace the defaults."""
    from .core.runfolder import RunFolder

    given = _given_settings(args)
    run = RunFolder(args.out)
    if args.resume and run.config.exists():  # else the checkpoint holds what must match
        return S.resume_config(run.read_config(), given, run.config)
    return S.TrainConfig(**given).validate()


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
    from .core.train import train  # the slow import (torch); SIGTERM meanwhile: see main()

    cases = _cases_from_args(args)
    result = train(cfg, cases, args.out, resume=args.resume, progress_bar=not args.quiet,
                   listeners=[_print_notes])
    state = "stopped" if result.stopped else "finished"
    best = "" if result.best_dice is None else f", best validation Dice {result.best_dice:.4f}"
    saved = "no checkpoint yet" if result.last_checkpoint is None else f"checkpoint {result.last_checkpoint}"
    print(f"{state} at step {result.step}{best}; {saved}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .core.predict import predict_folder  # the slow import (torch): after argparse, as in cmd_train

    predicted = predict_folder(args.run, args.out, images=args.images, labels=args.labels, h5_root=args.h5_root,
                               h5_list=args.list, regions=args.regions, device=args.device,
                               checkpoint=args.checkpoint, model=args.model, overlap=args.overlap,
                               sw_batch_size=args.sw_batch_size, largest_component=args.largest_component,
                               progress=not args.quiet, note=None if args.quiet else _print_note,
                               skip_bad=args.skip_bad)
    print(f"wrote {len(predicted.files)} label volume(s) to {args.out}"
          + (" with probability/, regions/, reliability/ and review.json (worst estimated Dice first)"
             if args.regions else ""))
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
    from .core.train import TrainConfig, split_validation, train

    root = Path(args.dir)
    # the panel's CPU setting (settings.PRESETS["preview"]), so the two demos train alike
    steps = {} if args.iterations is None else {"iterations": args.iterations}
    cfg = TrainConfig.from_preset("preview", method=args.method, seed=args.seed, device=args.device,
                                  **steps).validate()
    run = RunFolder(root / "run")
    # an earlier demo's run and report are replaced; anything else of that name is left alone
    if run.path.exists() and not run.is_run():
        raise InputError(f"{run.path} exists and is not an sgrs run; move it away or choose another demo "
                         f"folder (nothing was changed)")
    if root.is_dir():
        check_json_output(root / "evaluation.json", {})
        for out in (root / "pred_test", root / "pseudo"):  # checked before anything is made
            _check_only_sgrs_files(out, "another demo folder")
    cohort = make_demo_cohort(root / "data", kind="blob", n_cases=8, n_labeled=4, n_test=4,
                              shape=(48, 48, 48), seed=args.seed, overwrite=True)
    if run.path.exists():
        with run.lock(what="sgrs demo"):
            run.clear()
    # what the trainer will do with the labeled volumes: the same split, so the line says what trains
    fit, val = split_validation(list(cohort.labeled_names), cfg.val_fraction, cfg.seed)
    print(f"training {S.METHOD_LABELS[cfg.method]} for {cfg.iterations} steps (the preview setting: patch "
          f"{'x'.join(map(str, cfg.patch_size))}, {cfg.base_filters} filters) on {len(cohort.labeled_names)} labeled "
          f"({len(fit)} train, {len(val)} validation) + {len(cohort.unlabeled_names)} unlabeled demo volumes ...")
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
    print(f"\nin {root}: data/ (the demo cohort), run/ (checkpoints, log), pred_test/ and evaluation.json "
          f"(the table above), pseudo/ (a label for every training volume; probability/ and regions/ for the "
          f"unlabeled ones; open them in napari over data/imagesTr)")
    return 0


def _check_only_sgrs_files(folder: Path, choose: str) -> None:
    """Refuse a prediction folder holding a file that sgrs predict did not write (or that was
    edited since), before a long job that would end by refusing to replace it."""
    from .core.outputs import MANIFEST_NAME, WrittenFiles

    if not folder.is_dir():
        return
    written = WrittenFiles(folder, "sgrs predict")
    for path in sorted(folder.rglob("*")):
        if path.name != MANIFEST_NAME and (path.is_file() or path.is_symlink()) and not written.owns(path):
            raise InputError(f"{path} is not a file sgrs wrote (or was changed since); move it away or choose "
                             f"{choose} (nothing was changed)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sgrs", description="semi-supervised 3D segmentation: SGRS-Net (the paper's method) "
                                              "and SGRS+ (ours, the default)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a network into a run folder: SGRS+ (the default), SGRS-Net "
                                     "(--method sgrs), mean-teacher or supervised",
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # the epilog's paragraphs
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
                   help="also write, for each unlabeled volume, probability/ (foreground probability), regions/ "
                        "(0 none, 1 disregarded, 2 consistent, 3 inconsistent), reliability/ (0-1, how far to trust "
                        "each voxel's label) and review.json (estimated Dice, worst first); about 4x the time")
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="last (default): the run's final checkpoint; best: the best on its validation split")
    p.add_argument("--model", choices=["student", "teacher"], default="student")
    p.add_argument("--overlap", type=_overlap, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument("--sw-batch-size", type=_int_at_least(1), default=4,
                   help="windows per forward pass (at most the volume's window count)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out a volume that cannot be read, with a warning, instead of refusing the batch "
                        "(every volume is checked before any output is written)")
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
    p.add_argument("--iterations", type=int, default=None,
                   help=f"training steps (default: the preview setting's, {PRESETS['preview']['iterations']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--method", choices=S.METHODS, default=S.SETTINGS["method"].default,
                   help="; ".join(f"{m}: {S.METHOD_LABELS[m]}" for m in S.METHODS)
                        + f" (default: {S.SETTINGS['method'].default})")
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
