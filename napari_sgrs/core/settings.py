"""Every training setting once: its default, group, help, choices and command-line flag.

``TrainConfig`` is one flat dataclass, so the code reads ``config.lr``; each field's metadata
names its group (data, budget, optimiser, method, validation, performance). From it come the
``sgrs train`` options (generated in cli.py), the checks of :meth:`TrainConfig.validate`, the
named :data:`PRESETS` shared by the CLI, the napari panel and the Python API, ``--config FILE``
(:func:`read_config_file`) and what a resumed run keeps (:func:`resume_config`). A setting that
depends on the method (:data:`METHOD_DEFAULTS`: SGRS-Net's choices for ``sgrs``, ours for
``sgrs-plus``) has the default None, filled in by validate() from the method where not given.

Torch-free: the CLI builds its parser, and the panel its defaults, without importing the engine.
"""

from __future__ import annotations

import difflib
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .codes import IGNORE_INDEX
from .errors import CheckpointError, ConfigError, InputError
from .outputs import read_json

#: The methods, the default first. ``sgrs`` is SGRS-Net as published (the paper's step with the
#: defects of ../shared/SGRS.md fixed); ``sgrs-plus`` is our recipe built on it (docs/METHOD.md).
METHODS = ("sgrs-plus", "sgrs", "mean-teacher", "supervised")
#: How the CLI's messages, the napari panel and the docs name each method.
METHOD_LABELS = {"sgrs-plus": "SGRS+ (ours)", "sgrs": "SGRS-Net (paper)", "mean-teacher": "Mean Teacher",
                 "supervised": "Supervised (labels only)"}
#: Method names of earlier versions, as saved runs and --config files may hold them: this recipe was
#: "anchored-sgrs" while it trained a label-only anchor network (0.2 development; the anchor was
#: removed by the controls of docs/experiments/2026-11-30-controls.md).
FORMER_METHOD_NAMES = {"anchored-sgrs": "sgrs-plus"}
#: The methods whose step is steps.sgrs_step: they differ only in their settings (METHOD_DEFAULTS).
SGRS_METHODS = ("sgrs-plus", "sgrs")
#: The paper's 2 labeled + 2 unlabeled patches per step. The labeled share is the same for every
#: method, so supervised training sees the labeled stream the semi-supervised methods see. (4 + 2
#: until the controls of #20: its step was 1.5-1.7x the published one; docs/experiments/2026-11-30-controls.md)
DEFAULT_LABELED_BATCH = 2    # labeled patches per step, for every method
DEFAULT_UNLABELED_BATCH = 2  # unlabeled patches per step added by the semi-supervised methods
#: The paper's threshold on the entropy (log10 units) of a binary prediction.
PAPER_TAU = 0.296
#: The authors' code disregards a binary voxel whose foreground probability lies in (0.425, 0.575);
#: that interval's edge has entropy 0.29611 (log10 units), not 0.296, so ``--preset paper`` uses this.
PAPER_CODE_TAU = -(0.425 * math.log10(0.425) + 0.575 * math.log10(0.575))
#: mean-teacher's weight of the MSE after ramp-up (UA-MT / SSL4MIS); the other methods' L_u weighs 1.
MEAN_TEACHER_UNSUP_WEIGHT = 0.1

#: Our engine's choices, shared by sgrs-plus and the baselines it is compared with.
_OURS = dict(lr_schedule="poly", tau=PAPER_TAU, unsup_weight=1.0, rampup_stair=1, dice_form="foreground",
             teacher_mode="eval", region_weighting="voxels", pseudo_views="mix",
             foreground_fraction=0.33, flips="all", volume_draw="random")
#: The default of each setting that depends on the method (its field's default is None: "the
#: method's"). validate() fills in those not given, so ``--method sgrs`` alone trains the paper's step
#: and ``--method sgrs-plus`` ours; a setting given explicitly (option, --config, preset, a
#: resumed run's config.json) wins. docs/METHOD.md says why each of ours differs from the paper's.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # the paper's constant lr: with poly our recipe learned the vessel cohort of issue 20's controls
    # in 1 seed of 3, with a constant lr in 3 of 3 (docs/experiments/2026-11-30-controls.md)
    "sgrs-plus": {**_OURS, "lr_schedule": "constant"},
    # the authors' code, detail by detail (../shared/SGRS.md; tests/core/test_paper_parity.py)
    "sgrs": dict(lr_schedule="constant", tau=PAPER_CODE_TAU, unsup_weight=1.0, rampup_stair=150, dice_form="paper",
                 teacher_mode="train", region_weighting="all-voxels", pseudo_views="both",
                 foreground_fraction=0.0, flips="one-in-plane", volume_draw="permutation"),
    "mean-teacher": {**_OURS, "unsup_weight": MEAN_TEACHER_UNSUP_WEIGHT},
    "supervised": _OURS,
}

MAX_SEED = 2**32 - 1          # numpy's and torch's seeds both take it
MAX_BASE_FILTERS = 1024       # what a checkpoint may declare (checkpoint._check_meta)
MAX_WORKERS = 256
#: Prediction volumes are uint8 and checkpoints hold 2..255 classes (checkpoint.py), so no run
#: trains more: the classes are 0..254 and 255 stays free for the ignore index.
MAX_CLASSES = 255
_MAX_CONFIG_FILE_BYTES = 1 << 20

#: The groups of settings, in the order ``sgrs train --help`` shows them, with their titles.
GROUPS = {
    "data": "data: the volumes and how they are read",
    "budget": "budget: steps, patch and network size",
    "optimiser": "optimiser: SGD, learning rate and the random seed",
    "method": "method: the semi-supervised loss",
    "validation": "validation and checkpoints",
    "performance": "performance: where and how fast",
}


@dataclass(frozen=True)
class Setting:
    """What the code knows about one field of TrainConfig besides its type and default."""
    name: str
    group: str
    help: str
    #: the ``sgrs train`` option; None: only in a ``--config`` file. A bool's flag is the form
    #: that sets the value opposite to the default (``--no-mix`` for use_mix=True).
    flag: str | None
    choices: tuple = ()
    #: accepted on the command line but not listed by ``sgrs train --help`` (named in its epilog)
    expert: bool = False
    metavar: tuple[str, ...] | str | None = None
    #: how --help states the default, where the value alone would not say it (None: automatic)
    default_text: str | None = None
    #: the option's text -> value (ValueError with a message on a bad one); None: the field's type
    parse: Callable[[str], Any] | None = None
    #: the option's value -> the fields it sets; None: this field alone
    assign: Callable[[Any], dict[str, Any]] | None = None

    #: the field's annotation and default
    hint: Any = None
    default: Any = None

    @property
    def label(self) -> str:
        """How messages name the setting: its option, else (no option, or a switch such as
        --no-mix, which takes no value) its key in a config file."""
        return self.flag if self.flag is not None and self.base_type is not bool else self.name

    @property
    def base_type(self) -> type:
        """The value's type, None left out: bool, int, float, str or tuple."""
        hint = _without_none(self.hint)
        return typing.get_origin(hint) or hint

    @property
    def item_type(self) -> tuple[type, int] | None:
        """A tuple field's item type and length; None for the other fields."""
        hint = _without_none(self.hint)
        args = typing.get_args(hint)
        return (args[0], len(args)) if typing.get_origin(hint) is tuple else None

    def problem(self, value) -> str | None:
        """What ``value`` should be, in words (its type, then its choices); None when it fits."""
        expected = _describe_type(self.hint, value)
        if expected is None and self.choices and value is not None and value not in self.choices:
            return _either(self.choices)
        return expected

    def assignments(self, value) -> dict[str, Any]:
        """The fields an option's value sets."""
        return self.assign(value) if self.assign is not None else {self.name: value}


_FLAG = "derived"  # the flag is "--" + the field name with dashes


def _setting(default, group: str, help: str, *, flag: str | None = _FLAG, **meta) -> Any:
    return field(default=default, metadata={"setting": dict(group=group, help=help, flag=flag, **meta)})


def _parse_tau(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"must be a number or 'auto', got {text!r}") from None


def _assign_tau(value: float | str) -> dict[str, Any]:
    # --tau auto recalibrates at each validation (sgrs.calibrate_tau); a number fixes it again
    return {"tau_auto": True} if value == "auto" else {"tau": value, "tau_auto": False}


@dataclass
class TrainConfig:
    """Every setting of a run; saved as RUN/config.json and in each checkpoint."""

    method: str = _setting(METHODS[0], "method", "sgrs-plus: SGRS+, our recipe (docs/METHOD.md); sgrs: "
                           "SGRS-Net as published; mean-teacher, supervised: the baselines. The method chooses the "
                           "defaults of the settings that depend on it", choices=METHODS)
    iterations: int = _setting(15000, "budget", "training steps")
    patch_size: tuple[int, int, int] | None = _setting(
        None, "budget", "training patch, multiples of 16", metavar=("D", "H", "W"),
        default_text="the paper's 80 112 112, shrunk to the volumes' size")
    base_filters: int = _setting(16, "budget", "V-Net base filters F")
    # None: resolved in validate(). Every method sees the same labeled patches per step
    # (DEFAULT_LABELED_BATCH); the semi-supervised methods add DEFAULT_UNLABELED_BATCH unlabeled ones.
    batch_size: int | None = _setting(
        None, "budget", "patches per step; alone it splits in half (4: the paper's 2 labeled + 2 unlabeled)",
        default_text=f"{DEFAULT_LABELED_BATCH} labeled + {DEFAULT_UNLABELED_BATCH} unlabeled; supervised "
                     f"{DEFAULT_LABELED_BATCH}")
    labeled_batch_size: int | None = _setting(None, "budget", "labeled patches per step",
                                              default_text=str(DEFAULT_LABELED_BATCH))
    seed: int = _setting(1337, "optimiser", "random seed: the same seed and settings train the same weights")
    device: str = _setting("auto", "performance", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    lr: float = _setting(0.01, "optimiser", "SGD learning rate", expert=True)
    lr_schedule: str | None = _setting(
        None, "optimiser", "poly: lr (1 - t/T)^0.9 (nnU-Net), so the last checkpoint is a settled one; "
        "constant: the paper's", choices=("poly", "constant"), expert=True)
    momentum: float = _setting(0.9, "optimiser", "SGD momentum", flag=None)
    weight_decay: float = _setting(1e-4, "optimiser", "SGD weight decay", flag=None)
    tau: float | None = _setting(None, "method", "entropy threshold of the disregarded region (log10 units), or "
                                 "'auto' to calibrate it on the labeled validation volumes at each validation",
                                 metavar="TAU|auto", parse=_parse_tau, assign=_assign_tau)
    tau_auto: bool = _setting(False, "method", "recalibrate tau at each validation (--tau auto)", flag=None)
    tau_error_rate: float = _setting(0.45, "method", "--tau auto: the error rate above which voxels are "
                                     "disregarded", flag=None)
    mix_alpha: float = _setting(0.75, "method", "Beta(alpha, alpha) of the Mix Augmentation's weight", flag=None)
    unsup_weight: float | None = _setting(
        None, "method", "weight of the unlabeled loss after ramp-up", expert=True)
    rampup_fraction: float = _setting(0.4, "method", "ramp-up length as a share of the iterations (paper: "
                                      "6000/15000)", expert=True)
    ema_decay: float = _setting(0.99, "method", "the teacher's EMA decay", flag=None)
    use_mix: bool = _setting(True, "method", "ablation: no Mix Augmentation", flag="--no-mix", expert=True)
    use_regions: bool = _setting(True, "method", "ablation: one loss on every pseudo-label voxel",
                                 flag="--no-regions", expert=True)
    normalization: str = _setting("zscore", "data", "intensity normalisation: zscore per volume (MRI), ct "
                                  "(the --ct-window in HU mapped to [-1, 1]), none", choices=("zscore", "ct", "none"))
    ct_window: tuple[float, float] = _setting((-160.0, 240.0), "data", "with --normalization ct: the window in HU",
                                              metavar=("LOW", "HIGH"))
    ignore_index: int = _setting(IGNORE_INDEX, "data", "label value meaning 'not annotated': left out of the "
                                 "supervised loss")
    num_classes: int | None = _setting(None, "data", "classes incl. background", expert=True,
                                       default_text="from the labels")
    val_fraction: float = _setting(0.2, "validation", "share of labeled volumes held out for validation (none "
                                   "below 3 labels)")
    val_every: int | None = _setting(None, "validation", "steps between validations", expert=True,
                                     default_text="a tenth of the iterations")
    checkpoint_every: int = _setting(100, "validation", "steps between checkpoints")
    log_every: int = _setting(10, "validation", "steps between progress events", expert=True)
    reference_compat: bool = _setting(False, "method", "reproduce the published code's defects (double EMA, "
                                      "student decay, CE on C)", expert=True)
    amp: str = _setting("auto", "performance", "mixed precision", choices=("auto", "off", "bf16", "fp16"),
                        expert=True)
    compile: bool = _setting(False, "performance", "torch.compile the networks", expert=True)
    # on CUDA, let cuDNN time its algorithms for the fixed patch shape once and keep the fastest
    # (nnU-Net does the same); off: cuDNN's heuristic choice, repeatable run to run on one GPU
    cudnn_benchmark: bool = _setting(True, "performance", "on CUDA, use cuDNN's heuristic algorithms instead "
                                     "of timing them for the patch shape (slower; repeatable run to run)",
                                     flag="--no-cudnn-benchmark", expert=True)
    sync_bn: bool = _setting(False, "performance", "SyncBatchNorm under torchrun", expert=True)
    workers: int = _setting(0, "performance", "DataLoader worker processes drawing patches (0: in the training "
                            "process, bit-identical runs for a seed; 2-8 keep a GPU busy)")
    foreground_fraction: float | None = _setting(None, "data", "share of labeled patches centred on foreground "
                                                 "(the paper's: 0, uniform crops)", flag=None)
    dropout: float = _setting(0.5, "method", "the V-Net's dropout", flag=None)
    region_weighting: str | None = _setting(
        None, "method", "voxels: every scored voxel weighs the same; terms: a mean of per-region means, "
        "which gives the small inconsistent region half the weight (our earlier reading of the paper); "
        "all-voxels: the authors' code, each view's CE summed over the regions and divided by all its voxels",
        choices=("voxels", "terms", "all-voxels"), expert=True)
    # foreground: soft Dice over the foreground classes, 2 sum(pt) / (sum p + sum t), pooled over the
    # batch. paper: the authors' code (../shared/SGRS.md): supervised Dice of every class incl.
    # background, 1 - sum(pt) / (sum p^2 + sum t^2) (a perfect prediction scores 0.5); region Dice
    # nnU-Net-style per sample, background included, masked to the region
    dice_form: str | None = _setting(None, "method", "foreground: our soft Dice; paper: the authors' Dice forms",
                                     choices=("foreground", "paper"), flag=None)
    # eval: the teacher predicts with its EMA BatchNorm statistics and no dropout; train: as the
    # authors' code, which never switches it to eval mode (dropout on, the batch's statistics)
    teacher_mode: str | None = _setting(None, "method", "the teacher's mode when it makes pseudo labels: eval, or "
                                        "train (the paper's code: dropout on, batch statistics)",
                                        choices=("eval", "train"), flag=None)
    # the authors ramp with iter // 150 (a staircase of 40 stairs over 6000 steps); 1: continuous
    rampup_stair: int | None = _setting(None, "method", "steps per stair of the ramp-up (1: continuous; paper: "
                                        "150)", flag=None)
    # all: a flip of each axis with probability 1/2; one-in-plane: the authors' RandomRotFlip, which
    # always flips one of the two in-plane axes
    flips: str | None = _setting(None, "data", "patch flips: all (each axis, p 0.5) or one-in-plane (the "
                                 "paper's)", choices=("all", "one-in-plane"), flag=None)
    # random: volumes drawn with replacement; permutation: the authors' batch sampler, which walks
    # through a fresh permutation of each stream's volumes
    volume_draw: str | None = _setting(None, "data", "how volumes are drawn: random (with replacement) or "
                                       "permutation (the paper's)", choices=("random", "permutation"), flag=None)
    # mix (ours): L_u teaches only the mixed view P_mix, never the view P of the patch the pseudo
    # label came from (FixMatch's weak/strong split); both: L_u on P and P_mix (the paper)
    pseudo_views: str | None = _setting(
        None, "method", "which student views the pseudo labels teach: mix, only the mixed view; both: the "
        "plain and the mixed view (the paper's)", choices=("mix", "both"), expert=True)

    def validate(self) -> "TrainConfig":
        """Check every setting (the one place that does; the CLI, the panel and config.json on
        --resume all come through here). ConfigError, one line naming the option and the value.
        Idempotent: train() calls it again once an automatic patch size is known."""
        for f in fields(self):
            value = getattr(self, f.name)
            problem = SETTINGS[f.name].problem(value)
            if problem is not None:
                raise ConfigError(f"{SETTINGS[f.name].label} must be {problem}, got {value!r}")
        for name, value in METHOD_DEFAULTS[self.method].items():  # the method's, where none was given
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("iterations", "checkpoint_every", "log_every", "val_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.patch_size is not None:
            self.patch_size = check_patch(tuple(self.patch_size))
        for name in ("batch_size", "labeled_batch_size"):  # as given, before one is derived from the other
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        self._resolve_batch()
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.unsup_weight < 0:
            raise ConfigError(f"--unsup-weight must be >= 0, got {self.unsup_weight}")
        if self.rampup_stair < 1:
            raise ConfigError(f"rampup_stair must be >= 1, got {self.rampup_stair}")
        if not 0 <= self.rampup_fraction <= 1:
            raise ConfigError(f"--rampup-fraction must be in [0, 1], got {self.rampup_fraction}")
        if not self.ct_window[0] < self.ct_window[1]:
            raise ConfigError(f"--ct-window needs LOW < HIGH, got {self.ct_window[0]} {self.ct_window[1]}")
        if type(self.ignore_index) is not int or not 0 <= self.ignore_index <= 255:
            raise ConfigError(f"--ignore-index must be a whole number in 0..255 (label files are uint8 and 255, the "
                              f"default, marks unannotated voxels), got {self.ignore_index!r}")
        if self.num_classes is not None:
            if type(self.num_classes) is not int or not 2 <= self.num_classes <= MAX_CLASSES:
                raise ConfigError(f"--num-classes must be a whole number in 2..{MAX_CLASSES} (background included; "
                                  f"prediction volumes are uint8), got {self.num_classes!r}")
            _check_ignore_is_no_class(self.ignore_index, self.num_classes, [])
        if self.method != "supervised" and self.batch_size < 2:
            raise ConfigError(f"--batch-size must be >= 2 for {self.method} (labeled and unlabeled patches), got "
                              f"{self.batch_size}")
        if self.method != "supervised" and not 1 <= self.labeled_batch_size < self.batch_size:
            raise ConfigError(f"--labeled-batch-size must be between 1 and batch size - 1 "
                              f"({self.batch_size - 1}) so the batch holds unlabeled patches too, "
                              f"got {self.labeled_batch_size}")
        if not 0 < self.tau:
            raise ConfigError(f"--tau must be > 0, got {self.tau}")
        if not 1 <= self.base_filters <= MAX_BASE_FILTERS:
            raise ConfigError(f"--base-filters must be between 1 and {MAX_BASE_FILTERS}, got {self.base_filters}")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"--workers must be between 0 (load batches in the training process) and "
                              f"{MAX_WORKERS}, got {self.workers}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.patch_size is not None:
            self._check_batch_norm(self.patch_size)
        return self

    def _check_batch_norm(self, patch: tuple[int, int, int]) -> None:
        """Batch normalisation needs 2+ values per channel at the V-Net's deepest level (the patch
        / 16 in each axis, times the patches). Supervised training sees the labeled patches alone,
        so it fails with one 16^3 patch per step."""
        deepest = math.prod(p // 16 for p in patch)
        if self.method == "supervised" and self.labeled_batch_size * deepest < 2:
            raise ConfigError(f"--batch-size {self.labeled_batch_size} with patch {list(patch)} leaves batch "
                              f"normalisation one value per channel at the network's deepest level; use --batch-size "
                              f"2 or more, a patch of 32 in one axis")
        unlabeled = self.batch_size - self.labeled_batch_size
        if self.method in SGRS_METHODS and self.teacher_mode == "train" and unlabeled * deepest < 2:
            # the teacher in train mode normalises the unlabeled patches with their own statistics
            raise ConfigError(f"teacher_mode train with {unlabeled} unlabeled patch of {list(patch)} leaves batch "
                              f"normalisation one value per channel at the teacher's deepest level; use 2 or more "
                              f"unlabeled patches (--batch-size), a patch of 32 in one axis or teacher_mode eval")

    def _resolve_batch(self) -> None:
        """Fill in the batch sizes left unset (None).

        supervised: ``batch_size`` labeled patches (default 2; ``--labeled-batch-size`` alone
        also sets it). The semi-supervised methods: ``labeled_batch_size`` labeled (default 2, the same
        labeled stream as supervised training) plus ``batch_size - labeled_batch_size``
        unlabeled (default 2 more); ``--batch-size B`` alone splits B in half, as the paper's
        2 + 2. A semi-supervised run therefore never trains on fewer labeled patches per step
        than the supervised baseline it is compared with (benchmarks/RESULTS.md).
        """
        if self.method == "supervised":
            n = self.batch_size if self.batch_size is not None else self.labeled_batch_size
            n = DEFAULT_LABELED_BATCH if n is None else int(n)
            self.batch_size = self.labeled_batch_size = n
            return
        if self.labeled_batch_size is None:
            self.labeled_batch_size = (DEFAULT_LABELED_BATCH if self.batch_size is None
                                       else max(1, int(self.batch_size) // 2))
        if self.batch_size is None:
            self.batch_size = int(self.labeled_batch_size) + DEFAULT_UNLABELED_BATCH

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """The settings saved in a run (config.json, a checkpoint). Keys this version does not
        know (settings removed since, see check_resumable) are dropped, so every earlier run loads."""
        # a run saved before a setting existed was trained with its old behaviour: a resumed run
        # keeps what it started with instead of switching to its method's default of today
        d = {**{k: v for k, v in _TRAINED_BEFORE_THE_FIELD.items() if k not in d}, **d}
        d["method"] = current_method_name(d.get("method", METHODS[0]))
        return cls(**{k: _as_tuple(k, v) for k, v in d.items() if k in SETTINGS})

    @classmethod
    def from_preset(cls, name: str | None = None, **values: Any) -> "TrainConfig":
        """Today's defaults, then the preset's values (none for ``name`` None), then ``values``."""
        if name is not None and name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS.get(name, {}), **values})


def _without_none(hint):
    """``X | None`` -> X; any other annotation as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _describe_type(hint, value) -> str | None:
    """None when ``value`` fits the annotation ``hint`` (bool, int, float, str, tuples, X | None),
    else what was expected, in words. A bool is no number; a float must be finite."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = _without_none(hint)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        words = f"{len(args)} numbers"
        if not isinstance(value, (tuple, list)) or len(value) != len(args):
            return words
        return words if any(_describe_type(a, v) for a, v in zip(args, value)) else None
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    return None


def _either(choices: tuple) -> str:
    return " or ".join([", ".join(map(str, choices[:-1])), str(choices[-1])]) if len(choices) > 1 else str(choices[0])


def _by_method(name: str) -> str:
    """How --help states a method-dependent default: the default method's value, then each method
    that differs (``poly; sgrs: constant``)."""
    def text(value):
        return f"{value:.5g}" if isinstance(value, float) else str(value)
    first = METHOD_DEFAULTS[METHODS[0]][name]
    others = [f"{m}: {text(METHOD_DEFAULTS[m][name])}" for m in METHODS[1:] if METHOD_DEFAULTS[m][name] != first]
    return "; ".join([text(first), *others])


def _settings() -> dict[str, Setting]:
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in fields(TrainConfig):
        meta = dict(f.metadata["setting"])
        if meta["flag"] == _FLAG:
            meta["flag"] = "--" + f.name.replace("_", "-")
        if f.name in METHOD_DEFAULTS[METHODS[0]] and meta.get("default_text") is None:
            meta["default_text"] = _by_method(f.name)
        out[f.name] = Setting(name=f.name, hint=hints[f.name], default=f.default, **meta)
    return out


#: Each field's setting, in TrainConfig's order.
SETTINGS: dict[str, Setting] = _settings()


def _as_tuple(name: str, value):
    """JSON has no tuples: a saved patch size or CT window comes back as a list."""
    return tuple(value) if isinstance(value, list) and SETTINGS[name].item_type is not None else value


#: Named starting points: defaults < preset < config file < explicit options.
PRESETS: dict[str, dict[str, Any]] = {
    # the published LA recipe: SGRS-Net (--method sgrs: the authors' step, METHOD_DEFAULTS) at their
    # budget, batch and protocol, every labeled volume training (they select on the test set, which
    # we do not copy; docs/METHOD.md lists what still differs). The patch is (z, y, x) = their
    # 112 x 112 x 80 (x, y, z): h5 benchmark files are read into (z, y, x) (io._read_h5)
    "paper": dict(method="sgrs", iterations=15000, patch_size=(80, 112, 112), base_filters=16, batch_size=4,
                  labeled_batch_size=2, val_fraction=0.0),
    # measured on 2 CPU cores (benchmarks/preview_benchmark.py): 32^3 and 8 filters train ~3x faster
    # per step than 48^3, and validating every 100 steps keeps validation off the critical path
    "preview": dict(iterations=300, patch_size=(32, 32, 32), base_filters=8, batch_size=4, labeled_batch_size=2,
                    val_every=100),
    # what the napari panel starts with on a GPU (on a CPU: preview; project/folder.py panel_preset)
    "plugin": dict(iterations=2000, patch_size=(96, 96, 96), base_filters=16),
    # the test suite's runs (tests/tiny.py): a few seconds on a CPU core
    "tiny": dict(iterations=4, patch_size=(16, 16, 16), base_filters=2, batch_size=4, labeled_batch_size=2, seed=0,
                 device="cpu", checkpoint_every=2, val_every=2, log_every=1),
}
PRESET_HELP = {
    "paper": "SGRS-Net as published, at the LA recipe's budget (--method sgrs, 15000 steps, patch 80 112 112, 16 "
             "filters, 2 + 2 patches, no validation split)",
    "preview": "small and fast for a CPU (300 steps, patch 32^3, 8 filters)",
    "plugin": "what the napari panel starts with on a GPU (2000 steps, patch 96^3)",
    "tiny": "a few steps on 16^3 patches, for tests",
}


def suggest(word: str, known) -> str | None:
    """The closest of ``known`` (option names or setting keys) to a mistyped ``word``, else the
    first that starts with it, else None. Leading dashes are left out of the likeness."""
    known = list(known)
    bare = {k.lstrip("-"): k for k in known}
    close = difflib.get_close_matches(word.lstrip("-"), list(bare), n=1, cutoff=0.6)
    if close:
        return bare[close[0]]
    if len(word.lstrip("-")) < 3:
        return None
    return next((k for k in known if k.startswith(word)), None)


# ----------------------------------------------------------------------------- config files, resume

#: What a run whose config.json lacks a method-dependent setting trained with: the code's behaviour
#: before the setting existed (every run saved since holds each of them). The method's default of
#: today would be wrong here: a run saved as "sgrs" before 0.2 trained neither the paper's Dice forms
#: nor its staircase. unsup_weight is not here: a saved run always holds it.
_TRAINED_BEFORE_THE_FIELD = {"region_weighting": "terms", "pseudo_views": "both",
                             "dice_form": "foreground", "teacher_mode": "eval",
                             "rampup_stair": 1, "flips": "all", "volume_draw": "random", "lr_schedule": "constant",
                             "tau": PAPER_TAU, "foreground_fraction": 0.33}

#: Settings removed in 0.2 (CHANGELOG.md) that changed training, each with its name in messages and
#: the value under which a run trained as it does now. from_json drops them (and the other removed
#: keys, REMOVED_NO_EFFECT), so every earlier run still predicts; one that used another value
#: does not resume (check_resumable).
_REMOVED_SETTINGS = {"pseudo_islands": ("--pseudo-islands", "keep"), "pseudo_cap": ("--pseudo-cap", "off"),
                     "bn_streams": ("bn_streams", False),
                     # the teacher-Dice gate on L_u: no measured effect at the cost of a teacher forward
                     # over the labeled patches (docs/experiments/2026-11-30-controls.md)
                     "gate": ("--gate", "none"),
                     # the label-only anchor: no measured gain over training without it or over a second
                     # supervised network (docs/experiments/2026-11-30-controls.md)
                     "pseudo_anchor": ("--pseudo-anchor", "off")}
#: Settings removed in 0.2 that never changed training, with their options.
REMOVED_NO_EFFECT = {"channels_last": "--channels-last", "select": "--select"}
#: Every option of ``sgrs train`` removed in 0.2 (the CLI says so for each instead of guessing).
REMOVED_OPTIONS = tuple(n for n, _ in _REMOVED_SETTINGS.values() if n.startswith("--")) + \
    tuple(REMOVED_NO_EFFECT.values())


def current_method_name(name):
    """Today's name of a method saved under an earlier name (FORMER_METHOD_NAMES); others unchanged."""
    return FORMER_METHOD_NAMES.get(name, name) if isinstance(name, str) else name


def check_resumable(saved: Mapping[str, Any], where: str | os.PathLike) -> None:
    """CheckpointError, one line naming ``where`` (the file the settings came from) and the option,
    when a run's saved settings used a removed setting with a value other than the one that
    behaves as the code does now."""
    for key, (name, same) in _REMOVED_SETTINGS.items():
        value = saved.get(key, same)
        if value != same:
            raise CheckpointError(f"{where}: cannot resume: the run was trained with {name} {value}, which was "
                                  f"removed in 0.2 (see CHANGELOG.md); sgrs predict still reads the run, or start "
                                  f"a new run")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a ``--config`` JSON file: a flat object of TrainConfig's fields, or a
    run's config.json (``{"config": {...}, ...}``). A subset is fine; an unknown key, or a value
    of the wrong type or outside its choices, is a one-line error naming the file and the key.
    A key removed in 0.2 is dropped where its value trained as the code does now."""
    path = Path(path)
    data = read_json(path, _MAX_CONFIG_FILE_BYTES, "the --config file of settings",
                     "--config needs a JSON object of settings")
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # a run's config.json
    if not isinstance(data, dict):
        raise InputError(f"{path}: --config needs a JSON object of settings, found a JSON {type(data).__name__}")
    if "method" in data:
        data = {**data, "method": current_method_name(data["method"])}
    for key, (_, same) in _REMOVED_SETTINGS.items():
        if data.get(key, same) != same:
            raise ConfigError(f"{path}: \"{key}\": {data[key]!r} was removed in 0.2 (see CHANGELOG.md); delete "
                              f"the key")
    data = {k: v for k, v in data.items() if k not in _REMOVED_SETTINGS and k not in REMOVED_NO_EFFECT}
    unknown = [k for k in data if k not in SETTINGS]
    if unknown:
        hints = [f"{k!r} (did you mean {s!r}?)" if (s := suggest(k, SETTINGS)) else repr(k) for k in unknown]
        raise ConfigError(f"{path}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; the "
                          f"settings are TrainConfig's fields (napari_sgrs/core/settings.py)")
    values = {k: _as_tuple(k, v) for k, v in data.items()}
    for key, value in values.items():
        problem = SETTINGS[key].problem(value)
        if problem is not None:
            raise ConfigError(f"{path}: \"{key}\" must be {problem}, got {value!r}")
    return values


def resume_config(saved: Mapping[str, Any], given: Mapping[str, Any], where: str | os.PathLike) -> TrainConfig:
    """The settings a resumed run trains with: every setting saved in the run (config.json's
    ``config``, named ``where`` in messages), except those given again (``given``: field ->
    value, from the command line or a --config file). Validated."""
    check_resumable(saved, where)  # a setting removed in 0.2: refused before anything is written
    try:
        cfg = TrainConfig.from_json(saved).validate()
    except (ConfigError, TypeError) as exc:
        raise InputError(f"{where}: the saved run settings are invalid ({exc}); restore the file or start "
                         f"a new run") from exc
    return replace(cfg, **given).validate()


def check_patch(patch: tuple[int, ...]) -> tuple[int, int, int]:
    if len(patch) != 3:
        raise ConfigError(f"patch size needs 3 numbers (D H W), got {list(patch)}")
    bad = [p for p in patch if p <= 0 or p % 16]
    if bad:
        raise ConfigError(f"patch size must be positive multiples of 16 in every axis (V-Net downsamples "
                          f"4 times), got {list(patch)}; try {[max(16, round(p / 16) * 16) for p in patch]}")
    return tuple(int(p) for p in patch)


def _check_ignore_is_no_class(ignore: int, k: int, found) -> None:
    """The ignore index must not be one of the classes 0..k-1: its voxels would never be taught."""
    if ignore >= k:
        return
    if ignore == 0:
        what = "0 is background"
    elif len(found) and int(max(found)) < ignore:
        what = f"{ignore} is the only foreground class in the labels"
    else:
        what = f"{ignore} is one of the {k} classes (0..{k - 1})"
    raise ConfigError(f"--ignore-index {ignore}: {what}, so its voxels would never be trained - set "
                      f"--ignore-index to the value that marks unannotated voxels (default {IGNORE_INDEX})")
