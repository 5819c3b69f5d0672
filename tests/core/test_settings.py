"""The settings module (issue 21, must-have 1): one default per setting, the presets, `sgrs train`'s
options generated from it, `--config FILE`, no abbreviations, and a resumed run that keeps every
saved setting not given again."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from napari_sgrs.cli import _config_from_args, build_parser, main
from napari_sgrs.core import settings as S
from napari_sgrs.core.errors import CheckpointError, ConfigError, InputError
from napari_sgrs.core.settings import PRESETS, SETTINGS, TrainConfig, read_config_file, resume_config

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import TINY_ARGS  # noqa: E402

ROOT = Path(__file__).parents[2]

#: Every setting's default before settings.py (TrainConfig in train.py, with the CLI's rule for
#: mean-teacher's weight): a default may change only on purpose, here and in the CHANGELOG. Issue
#: 20 renamed the default method (our recipe) from sgrs to sgrs-plus; its settings are those of before
#: but the constant lr its controls chose (and the batch, gate and anchor: test_the_defaults_of_issue_20).
DEFAULTS_BEFORE = dict(
    method="sgrs-plus", iterations=15000, patch_size=None, base_filters=16, batch_size=None,
    labeled_batch_size=None,
    seed=1337, device="auto", lr=0.01, lr_schedule="constant", momentum=0.9, weight_decay=1e-4, tau=0.296,
    tau_auto=False, tau_error_rate=0.45, mix_alpha=0.75, unsup_weight=None, rampup_fraction=0.4, ema_decay=0.99,
    use_mix=True, use_regions=True, normalization="zscore", ct_window=(-160.0, 240.0), ignore_index=255,
    num_classes=None, val_fraction=0.2, val_every=None, checkpoint_every=100, log_every=10, reference_compat=False,
    amp="auto", compile=False, cudnn_benchmark=True, sync_bn=False, workers=0, foreground_fraction=0.33,
    dropout=0.5, region_weighting="voxels", pseudo_views="mix",
    # issue 20: the authors' step as settings, off by default (the default recipe is unchanged)
    dice_form="foreground", teacher_mode="eval", rampup_stair=1, flips="all", volume_draw="random")

#: A valid value other than the default for every setting (the resume test goes through all).
OTHER = dict(
    method="mean-teacher", iterations=7, patch_size=(32, 16, 16), base_filters=4, batch_size=8, labeled_batch_size=3,
    seed=5, device="cpu", lr=0.02, lr_schedule="poly", momentum=0.8, weight_decay=1e-3, tau=0.2,
    tau_auto=True, tau_error_rate=0.4, mix_alpha=0.5, unsup_weight=0.3, rampup_fraction=0.2, ema_decay=0.9,
    use_mix=False, use_regions=False, normalization="ct", ct_window=(-100.0, 100.0), ignore_index=200,
    num_classes=3, val_fraction=0.3, val_every=3, checkpoint_every=5, log_every=2, reference_compat=True,
    amp="off", compile=True, cudnn_benchmark=False, sync_bn=True, workers=1, foreground_fraction=0.5,
    dropout=0.1, region_weighting="terms", pseudo_views="both",
    dice_form="paper", teacher_mode="train", rampup_stair=150, flips="one-in-plane", volume_draw="permutation")

FIELDS = [f.name for f in fields(TrainConfig)]


def _parse(*argv: str, out: Path | str = "R"):
    return build_parser().parse_args(["train", "--images", "I", "--out", str(out), *argv])


def _config(*argv: str, out: Path | str = "R") -> TrainConfig:
    return _config_from_args(_parse(*argv, out=out))


def _sgrs(*argv) -> tuple[int, str]:
    """``sgrs *argv`` in-process: exit code and stderr (argparse refusals included)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


# ----------------------------------------------------------------------------- one default each


def test_the_tables_cover_every_setting():
    assert set(DEFAULTS_BEFORE) == set(FIELDS) == set(OTHER) == set(SETTINGS)


def test_defaults_are_those_of_before_on_every_path():
    by_method = S.METHOD_DEFAULTS[S.METHODS[0]]
    # a method-dependent setting's default is None ("the method's"), resolved by validate()
    assert {f.name: f.default for f in fields(TrainConfig)} == {**DEFAULTS_BEFORE, **dict.fromkeys(by_method)}
    resolved = TrainConfig().validate()
    assert {name: getattr(resolved, name) for name in FIELDS} == \
        {**DEFAULTS_BEFORE, "batch_size": 4, "labeled_batch_size": 2, "unsup_weight": 1.0}
    cli = _config()
    assert cli == TrainConfig().validate() == TrainConfig.from_preset(None).validate()
    assert (cli.batch_size, cli.labeled_batch_size, cli.unsup_weight) == (4, 2, 1.0)  # the paper's 2 + 2


def test_the_defaults_of_issue_20():
    """What the controls of issue 20 decided (docs/experiments/2026-11-30-controls.md): the paper's
    2 + 2 batch, no gate and no anchor (settings that no longer exist), the paper's constant lr; the
    mixed view only, voxel-weighted regions and our engine's details stay. The baselines keep poly."""
    ours = TrainConfig().validate()
    assert ours.method == "sgrs-plus" and (ours.labeled_batch_size, ours.batch_size) == (2, 4)
    assert ours.lr_schedule == "constant"
    assert (ours.pseudo_views, ours.region_weighting, ours.teacher_mode, ours.dice_form, ours.foreground_fraction,
            ours.flips, ours.volume_draw, ours.rampup_stair) == ("mix", "voxels", "eval", "foreground", 0.33, "all",
                                                               "random", 1)
    assert "gate" not in SETTINGS and "pseudo_anchor" not in SETTINGS
    assert TrainConfig(method="supervised").validate().lr_schedule == "poly"


def test_mean_teachers_weight_is_the_same_from_the_cli_and_the_python_api():
    """Before, only the CLI gave mean-teacher 0.1 (the Python API trained it at 1); now validate() does."""
    assert TrainConfig(method="mean-teacher").validate().unsup_weight == 0.1
    assert _config("--method", "mean-teacher").unsup_weight == 0.1
    assert _config("--method", "mean-teacher", "--unsup-weight", "0.5").unsup_weight == 0.5
    assert TrainConfig(method="supervised").validate().unsup_weight == 1.0


def test_every_setting_has_a_group_help_valid_choices_and_its_own_flag():
    flags = [s.flag for s in SETTINGS.values() if s.flag is not None]
    assert len(flags) == len(set(flags))
    for s in SETTINGS.values():
        assert s.group in S.GROUPS and s.help, s.name
        assert s.flag is None or s.flag.startswith("--"), s.name
        defaults = [m[s.name] for m in S.METHOD_DEFAULTS.values()] if s.name in S.METHOD_DEFAULTS["sgrs"] \
            else [s.default]
        assert not s.choices or all(d in s.choices for d in defaults), s.name
        assert all(s.problem(d) is None for d in [s.default, *defaults, OTHER[s.name]]), s.name
    # the CLI's own arguments never share a namespace name with a setting
    cli_only = {a.dest for a in _train_parser()._actions if a.default is not argparse.SUPPRESS}
    assert not cli_only & set(SETTINGS)


def test_choices_are_checked_in_one_place_with_the_option_named():
    with pytest.raises(ConfigError, match="--pseudo-views must be mix or both, got 'off'"):
        TrainConfig(pseudo_views="off").validate()
    with pytest.raises(ConfigError, match="--method must be sgrs-plus, sgrs, mean-teacher or supervised, "
                                          "got 'mt'"):
        TrainConfig(method="mt").validate()
    with pytest.raises(ConfigError, match="momentum must be a finite number, got 'x'"):  # no flag: its key
        TrainConfig(momentum="x").validate()


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_names_real_settings_and_validates(name):
    assert set(PRESETS[name]) <= set(SETTINGS)
    cfg = TrainConfig.from_preset(name).validate()
    assert all(getattr(cfg, k) == v for k, v in PRESETS[name].items())
    assert _config("--preset", name) == cfg
    assert set(S.PRESET_HELP) == set(PRESETS)


def test_the_presets_values():
    # the published LA recipe (docs/METHOD.md, "Switches")
    paper = TrainConfig.from_preset("paper").validate()
    assert (paper.iterations, paper.patch_size, paper.base_filters, paper.batch_size, paper.labeled_batch_size) == \
        (15000, (80, 112, 112), 16, 4, 2)
    assert (paper.lr_schedule, paper.region_weighting, paper.pseudo_views) == ("constant", "all-voxels", "both")
    # the authors' code, detail by detail (tests/core/test_paper_parity.py checks the step they make)
    assert (paper.dice_form, paper.teacher_mode, paper.rampup_stair, paper.val_fraction, paper.foreground_fraction,
            paper.flips, paper.volume_draw, round(paper.tau, 5)) == \
        ("paper", "train", 150, 0.0, 0.0, "one-in-plane", "permutation", 0.29613)
    assert PRESETS["preview"] == dict(iterations=300, patch_size=(32, 32, 32), base_filters=8, batch_size=4,
                                      labeled_batch_size=2, val_every=100)
    # the napari panel's starting values when the preset was made (_widget.py's boxes, project.TrainSettings)
    plugin = TrainConfig.from_preset("plugin").validate()
    assert (plugin.method, plugin.iterations, plugin.patch_size, plugin.base_filters, plugin.device, plugin.seed,
            plugin.ignore_index) == ("sgrs-plus", 2000, (96, 96, 96), 16, "auto", 1337, 255)
    tiny = TrainConfig.from_preset("tiny", seed=3)
    assert (tiny.iterations, tiny.patch_size, tiny.base_filters, tiny.device, tiny.seed) == \
        (4, (16, 16, 16), 2, "cpu", 3)
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        TrainConfig.from_preset("fast")


# ----------------------------------------------------------------------------- the method's defaults


def _method_fields(cfg: TrainConfig) -> dict:
    return {name: getattr(cfg, name) for name in S.METHOD_DEFAULTS["sgrs"]}


def test_method_sgrs_alone_is_the_papers_step_and_sgrs_plus_ours():
    """`--method sgrs` with no other option: every method-dependent setting as the paper preset has
    it (the step test_paper_parity.py checks against the authors' code); `--method sgrs-plus`,
    and no option at all, our recipe as before issue 20."""
    paper = TrainConfig.from_preset("paper").validate()
    sgrs = _config("--method", "sgrs")
    assert _method_fields(sgrs) == _method_fields(paper)
    assert (sgrs.dice_form, sgrs.teacher_mode, sgrs.region_weighting, sgrs.pseudo_views,
            sgrs.lr_schedule, sgrs.rampup_stair) == ("paper", "train", "all-voxels", "both", "constant", 150)
    ours = _config("--method", "sgrs-plus")
    assert ours == _config() == TrainConfig().validate()
    assert _method_fields(ours) == {k: DEFAULTS_BEFORE[k] if k != "unsup_weight" else 1.0
                                    for k in S.METHOD_DEFAULTS["sgrs"]}
    # the same from the Python API and a --config file
    assert _method_fields(TrainConfig(method="sgrs").validate()) == _method_fields(paper)


def test_the_paper_preset_is_method_sgrs_at_the_papers_budget():
    """One definition of the paper's step: the preset names the method and sets only the budget,
    the batch and the protocol (every label trains), never a setting the method decides."""
    assert PRESETS["paper"]["method"] == "sgrs"
    assert not set(PRESETS["paper"]) & set(S.METHOD_DEFAULTS["sgrs"])
    paper = _config("--preset", "paper")
    assert paper == _config("--method", "sgrs", "--iterations", "15000", "--patch-size", "80", "112", "112",
                            "--batch-size", "4", "--labeled-batch-size", "2", "--val-fraction", "0")


def test_a_setting_given_beats_its_methods_default(tmp_path):
    one = _config("--method", "sgrs", "--pseudo-views", "mix")
    assert (one.pseudo_views, one.dice_form) == ("mix", "paper")
    # our recipe at the paper's budget
    ours = _config("--preset", "paper", "--method", "sgrs-plus")
    assert (ours.iterations, ours.batch_size, ours.labeled_batch_size, ours.val_fraction) == (15000, 4, 2, 0.0)
    assert _method_fields(ours) == _method_fields(TrainConfig().validate())
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"method": "sgrs", "pseudo_views": "mix"}))
    cfg = _config("--config", str(f))
    assert (cfg.pseudo_views, cfg.region_weighting) == ("mix", "all-voxels")


def test_help_states_each_methods_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside hyphenated words
    text = _train_parser().format_help()
    assert "(default: sgrs-plus)" in text
    assert "(default: 0.296; sgrs: 0.29613)" in text  # --tau
    assert S.SETTINGS["pseudo_views"].default_text == "mix; sgrs: both"
    assert S.SETTINGS["unsup_weight"].default_text == "1; mean-teacher: 0.1"


# ----------------------------------------------------------------------------- generated options


def _train_parser():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices["train"]


def test_every_setting_with_a_flag_is_an_option_that_sets_it():
    for name in FIELDS:
        s = SETTINGS[name]
        if s.flag is None:
            continue
        value = OTHER[name]
        if s.base_type is bool:
            argv = [s.flag] if value != s.default else []  # --no-mix sets use_mix False, --compile True
            assert argv, name
        elif isinstance(value, tuple):
            argv = [s.flag, *map(str, value)]
        else:
            argv = [s.flag, str(value)]
        given = _parse(*argv)
        assert getattr(given, name) == (list(value) if isinstance(value, tuple) else value), name
        assert [k for k in vars(given) if k in SETTINGS] == [name]  # only what was given


def test_a_bool_option_has_both_forms_so_either_undoes_a_config_file(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"use_mix": False, "compile": True}))
    assert (_config("--config", str(f)).use_mix, _config("--config", str(f)).compile) == (False, True)
    back = _config("--config", str(f), "--mix", "--no-compile")
    assert (back.use_mix, back.compile) == (True, False)


def test_tau_auto_and_a_number():
    assert (_config("--tau", "auto").tau_auto, _config("--tau", "AUTO").tau_auto) == (True, True)
    fixed = _config("--tau", "0.25")
    assert (fixed.tau, fixed.tau_auto) == (0.25, False)
    code, err = _sgrs("train", "--images", "I", "--out", "R", "--tau", "abc")
    assert code == 2 and err.count("\n") == 1 and "--tau: must be a number or 'auto', got 'abc'" in err, err


def test_help_is_grouped_and_lists_at_most_25_options_and_names_the_rest():
    text = _train_parser().format_help()
    listed = [line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  -")]
    assert 15 <= len(listed) <= 26, listed  # 25 and -h
    for title in [*S.GROUPS.values(), "run: where it goes"]:
        assert title in text
    epilog = " ".join(text.split("Expert options", 1)[1].split())
    for s in SETTINGS.values():
        if s.flag is None:
            assert s.name in epilog, s.name
        elif s.expert:
            form = s.flag if s.base_type is not bool else "--[no-]" + s.flag.removeprefix("--").removeprefix("no-")
            assert s.flag not in listed and f" {form}" in epilog, s.name
        else:
            assert s.flag in listed, s.name


def test_every_parser_refuses_abbreviations():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    assert parser.allow_abbrev is False and all(p.allow_abbrev is False for p in subs.values())
    code, err = _sgrs("train", "--images", "I", "--out", "R", "--resume", "--iter", "20000")
    assert code == 2 and err == ("error: sgrs train: unrecognized option --iter; did you mean --iterations? "
                                 "(see sgrs train --help)\n"), err
    code, err = _sgrs("predict", "--run", "R", "--images", "I", "--out", "O", "--over", "0.3")
    assert code == 2 and "unrecognized option --over; did you mean --overlap?" in err and err.count("\n") == 1


@pytest.mark.parametrize("typed, meant", [("--iteratons", "--iterations"), ("--label", "--labels"),
                                          ("--pseudo-veiws", "--pseudo-views"), ("--no-regoins", "--no-regions")])
def test_a_mistyped_option_gets_the_closest_real_one_on_one_line(typed, meant):
    code, err = _sgrs("train", "--images", "I", "--out", "R", typed, "x")
    assert code == 2 and err.count("\n") == 1 and f"unrecognized option {typed}; did you mean {meant}?" in err, err


def test_the_parser_is_built_without_the_engine():
    code = ("import sys; from napari_sgrs.cli import build_parser, _config_from_args; "
            "_config_from_args(build_parser().parse_args(['train', '--images', 'I', '--out', 'R', '--preset', "
            "'paper'])); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- --config FILE


def test_config_file_flat_or_a_runs_config_json_with_precedence(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"iterations": 50, "patch_size": [32, 32, 32], "pseudo_views": "both", "lr": 0.05}))
    cfg = _config("--preset", "preview", "--config", str(flat), "--lr", "0.03")
    # defaults < preset < file < options
    assert (cfg.base_filters, cfg.iterations, cfg.patch_size, cfg.pseudo_views, cfg.lr, cfg.seed) == \
        (8, 50, (32, 32, 32), "both", 0.03, 1337)
    run_json = tmp_path / "config.json"
    run_json.write_text(json.dumps({"config": TrainConfig(**{k: OTHER[k] for k in ("method", "seed", "ct_window")})
                                    .validate().to_json(), "num_classes": 2}))
    cfg = _config("--config", str(run_json), "--seed", "9")
    assert (cfg.method, cfg.seed, cfg.ct_window, cfg.batch_size) == ("mean-teacher", 9, (-100.0, 100.0), 4)


@pytest.mark.parametrize("content, words", [
    ({"iteratons": 5}, "unknown setting 'iteratons' (did you mean 'iterations'?)"),
    ({"patch-size": [32, 32, 32], "colour": 1}, "unknown settings 'patch-size' (did you mean 'patch_size'?), 'colour'"),
    ({"iterations": "many"}, '"iterations" must be an integer, got \'many\''),
    ({"pseudo_views": "off"}, '"pseudo_views" must be mix or both'),
    ({"gate": "teacher-dice"}, '"gate": \'teacher-dice\' was removed in 0.2'),
    ({"patch_size": [32, 32]}, '"patch_size" must be 3 numbers'),
    ({"pseudo_islands": "background"}, '"pseudo_islands": \'background\' was removed in 0.2'),
    ([1, 2], "needs a JSON object of settings, found a JSON list"),
    ("{not json", "not valid JSON"),
])
def test_a_bad_config_file_is_one_line_naming_the_file(content, words, tmp_path):
    f = tmp_path / "settings.json"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises((ConfigError, InputError)) as info:
        read_config_file(f)
    assert str(info.value).startswith(f"{f}: ") and words in str(info.value), info.value
    code, err = _sgrs("train", "--images", "I", "--out", tmp_path / "run", "--config", f)
    assert code == 2 and err == f"error: {info.value}\n"
    assert not (tmp_path / "run").exists()


def test_a_config_file_keeps_the_removed_keys_that_did_nothing(tmp_path):
    f = tmp_path / "old.json"
    f.write_text(json.dumps({"config": {"iterations": 9, "channels_last": True, "select": "best",
                                        "pseudo_islands": "keep", "pseudo_cap": "off", "bn_streams": False}}))
    assert read_config_file(f) == {"iterations": 9}


# ----------------------------------------------------------------------------- resume


def _saved_run(folder: Path, cfg: TrainConfig) -> Path:
    """A run folder as train() leaves it for the CLI's resume: config.json with the run's settings."""
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"config": cfg.validate().to_json()}, indent=2))
    return folder


@pytest.mark.parametrize("name", FIELDS)
def test_resume_restores_every_saved_setting_not_given_again(name, tmp_path):
    saved = TrainConfig(**{name: OTHER[name]}).validate()
    assert getattr(saved, name) != getattr(TrainConfig().validate(), name)
    run = _saved_run(tmp_path / "run", saved)
    resumed = _config("--resume", out=run)
    assert getattr(resumed, name) == OTHER[name]
    assert resumed.to_json() == saved.to_json()
    # the same through the function the CLI uses
    assert resume_config(json.loads((run / "config.json").read_text())["config"], {}, run / "config.json") == saved


@pytest.mark.parametrize("name", [n for n, s in SETTINGS.items() if s.flag is not None and s.base_type is not bool])
def test_an_option_given_again_on_resume_wins(name, tmp_path):
    run = _saved_run(tmp_path / "run", TrainConfig(**{name: OTHER[name]}))
    value = DEFAULTS_BEFORE[name]
    if value is None:  # an automatic default cannot be given: another explicit value
        value = {"patch_size": (16, 16, 32), "batch_size": 10, "labeled_batch_size": 2, "num_classes": 4,
                 "val_every": 9, "unsup_weight": 0.7}[name]
    argv = [SETTINGS[name].flag, *map(str, value)] if isinstance(value, tuple) else [SETTINGS[name].flag, str(value)]
    assert getattr(_config("--resume", *argv, out=run), name) == value


def test_resume_takes_a_preset_or_config_file_given_again_over_the_saved_settings(tmp_path):
    run = _saved_run(tmp_path / "run", TrainConfig(iterations=30, base_filters=4, seed=8))
    cfg = _config("--resume", "--preset", "preview", out=run)
    assert (cfg.iterations, cfg.base_filters, cfg.seed) == (300, 8, 8)
    f = tmp_path / "more.json"
    f.write_text(json.dumps({"iterations": 60}))
    cfg = _config("--resume", "--config", str(f), out=run)
    assert (cfg.iterations, cfg.base_filters) == (60, 4)


@pytest.mark.parametrize("method", ["sgrs", "mean-teacher"])
def test_resume_keeps_the_loss_a_run_started_with(method, tmp_path):
    """A run saved before a method-dependent setting existed resumes with what it was trained with
    then, neither today's default nor its method's (an "sgrs" run of 0.1 trained none of the
    authors' details that --method sgrs now sets)."""
    old = TrainConfig(method=method, iterations=50).validate().to_json()
    for key in S.METHOD_DEFAULTS[method]:
        if key != "unsup_weight":  # every run saved it
            del old[key]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": old}))
    cfg = _config("--resume", out=run)
    assert (cfg.region_weighting, cfg.pseudo_views, cfg.iterations) == ("terms", "both", 50)
    assert (cfg.method, cfg.dice_form, cfg.teacher_mode, cfg.rampup_stair, cfg.flips, cfg.volume_draw,
            cfg.lr_schedule, cfg.tau, cfg.foreground_fraction) == \
        (method, "foreground", "eval", 1, "all", "random", "constant", 0.296, 0.33)


#: config.json's "config" as 0.2 wrote it for a run of its default method, then named "sgrs" (our
#: recipe; issue 20 renamed it sgrs-plus and gave "sgrs" to the paper's method). Every field explicit.
CONFIG_0_2 = {
    "method": "sgrs", "iterations": 50, "patch_size": [16, 16, 16], "base_filters": 2, "batch_size": 6,
    "labeled_batch_size": 4, "seed": 1337, "device": "cpu", "lr": 0.01, "lr_schedule": "poly", "momentum": 0.9,
    "weight_decay": 0.0001, "tau": 0.296, "tau_auto": False, "tau_error_rate": 0.45, "mix_alpha": 0.75,
    "unsup_weight": 1.0, "rampup_fraction": 0.4, "ema_decay": 0.99, "use_mix": True, "use_regions": True,
    "normalization": "zscore", "ct_window": [-160.0, 240.0], "ignore_index": 255, "num_classes": None,
    "val_fraction": 0.2, "val_every": None, "checkpoint_every": 100, "log_every": 10, "reference_compat": False,
    "amp": "auto", "compile": False, "cudnn_benchmark": True, "sync_bn": False, "workers": 0,
    "foreground_fraction": 0.33, "dropout": 0.5, "gate": "teacher-dice", "region_weighting": "voxels",
    "dice_form": "foreground", "teacher_mode": "eval", "rampup_stair": 1, "flips": "all", "volume_draw": "random",
    "pseudo_views": "mix", "pseudo_anchor": "labels"}


def test_a_run_saved_by_0_2_as_sgrs_resumes_with_the_recipe_it_saved(tmp_path):
    """Its saved settings win over the method's defaults: it keeps the name "sgrs" (the checkpoint
    must match it on resume) and trains our recipe as it did before the rename. With the teacher
    gate on or the label-only anchor, as 0.2's defaults wrote them, it is refused in one line naming
    the option (both were removed: docs/experiments/2026-11-30-controls.md); with both off it resumes."""
    run = tmp_path / "run"
    run.mkdir()

    def resume(**changed):
        (run / "config.json").write_text(json.dumps({"config": {**CONFIG_0_2, **changed}, "num_classes": 2}))
        return _config("--resume", out=run)

    with pytest.raises(CheckpointError, match=r"trained with --gate teacher-dice, which was removed in 0.2"):
        resume()
    with pytest.raises(CheckpointError) as refused:
        resume(gate="none")
    message = str(refused.value)
    assert "config.json: cannot resume: the run was trained with --pseudo-anchor labels, which was removed" in message
    assert "\n" not in message
    cfg = resume(gate="none", pseudo_anchor="off")
    saved = {k: v for k, v in CONFIG_0_2.items() if k not in ("gate", "pseudo_anchor")}
    assert cfg.to_json() == {**saved, "patch_size": (16, 16, 16), "ct_window": (-160.0, 240.0)}
    assert cfg.method == "sgrs"
    # our recipe of then, as saved: today's but for the poly lr the controls of issue 20 removed
    assert _method_fields(cfg) == {**_method_fields(TrainConfig(method="sgrs-plus").validate()), "lr_schedule": "poly"}
    assert _config("--resume", "--iterations", "80", out=run).iterations == 80


def test_our_recipes_former_name_is_read_as_todays(tmp_path):
    """Runs, --config files and projects saved while our recipe was named "anchored-sgrs" read as
    sgrs-plus; a new setting given under that name is refused with the methods of today."""
    from napari_sgrs.project.folder import panel_config

    assert TrainConfig.from_json({"method": "anchored-sgrs"}).method == "sgrs-plus"
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"method": "anchored-sgrs", "iterations": 5}))
    assert read_config_file(f) == {"method": "sgrs-plus", "iterations": 5}
    assert panel_config({"method": "anchored-sgrs"}).method == "sgrs-plus"
    with pytest.raises(ConfigError, match="--method must be sgrs-plus, sgrs, mean-teacher or supervised"):
        TrainConfig(method="anchored-sgrs").validate()


def test_invalid_saved_settings_are_one_line_naming_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {"iterations": -3}}))
    with pytest.raises(InputError, match=r"config.json: the saved run settings are invalid \(--iterations must be"):
        _config("--resume", out=run)


def test_the_paper_preset_with_tau_auto_resumes_as_it_started(tiny_cohort, tmp_path):
    """The issue's case: `--preset paper --tau auto` resumed with a poly lr and a fixed tau."""
    from napari_sgrs.core.checkpoint import load_checkpoint

    run = tmp_path / "run"
    data = ["--images", tiny_cohort.images_tr, "--labels", tiny_cohort.labels_tr, "--out", run]
    code, err = _sgrs("train", *data, "--preset", "paper", "--tau", "auto", "--val-every", "2", *TINY_ARGS)
    assert code == 0, err
    code, err = _sgrs("train", *data, "--resume", "--iterations", "6", "--quiet")
    assert code == 0, err
    meta = load_checkpoint(run).meta
    resumed = meta["config"]
    assert meta["step"] == 6 and resumed["iterations"] == 6
    assert (resumed["lr_schedule"], resumed["tau_auto"]) == ("constant", True) and "pseudo_anchor" not in resumed
    assert (resumed["patch_size"], resumed["base_filters"], resumed["device"], resumed["val_every"]) == \
        ([16, 16, 16], 2, "cpu", 2)
