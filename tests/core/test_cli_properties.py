"""Property (issue 19, must-have 5): whatever value a numeric or text option of `sgrs train` or
`sgrs predict` is given, the command exits 0, or exits 2 with one line "error: ...", never an
uncaught exception.

Values are drawn per option: zero, negatives, huge ints, nan, inf, -0.0, junk text. Training
options that would make a run long (iterations, workers) are drawn only from small values, and
every train example runs at most 2 steps on the tiny cohort. Runs in-process (no interpreter
start-up per example); derandomized, so CI sees the same examples every time.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_sgrs.cli import main

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import TINY_ARGS

HUGE_INTS = [2**31, 2**63, 10**30]
FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-308, 1e308, -1e308, 3e38]),
    st.sampled_from(["nan", "inf", "-inf", "-nan"]),
    st.floats(allow_nan=True, allow_infinity=True),
)
JUNK = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


def ints(low: int, high: int, *extra: int):
    return st.one_of(st.integers(low, high), st.sampled_from([0, -1, *extra]))


#: option -> strategy of its value (a str or a number; lists are nargs values).
TRAIN_OPTIONS = {
    "--iterations": st.integers(-10**9, 2),
    "--base-filters": ints(-4, 3, *HUGE_INTS, 10**6),
    "--batch-size": ints(-3, 6, *HUGE_INTS),
    "--labeled-batch-size": ints(-3, 6, *HUGE_INTS),
    "--seed": st.one_of(st.integers(-2**70, 2**70), st.sampled_from([-1, 0, 2**32, 2**64])),
    "--checkpoint-every": ints(-10, 10, *HUGE_INTS),
    "--val-every": ints(-10, 10, *HUGE_INTS),
    "--log-every": ints(-10, 10, *HUGE_INTS),
    "--workers": st.integers(-5, 1),  # each worker is a process: never many on a shared machine
    "--num-classes": ints(-3, 300, 2**40),
    "--ignore-index": ints(-3, 300, 2**40, -2**40),
    "--patch-size": st.lists(st.sampled_from(["-16", "0", "8", "16", "17", "32", str(2**40)]), min_size=3,
                             max_size=3),
    "--lr": FLOATS,
    "--unsup-weight": FLOATS,
    "--rampup-fraction": FLOATS,
    "--val-fraction": FLOATS,
    "--tau": st.one_of(FLOATS, st.sampled_from(["auto", "AUTO", "", "0x10", "1e3", "abc"]), JUNK),
    # argparse takes "-inf" in nargs for an option name, so only plain numbers here
    "--ct-window": st.lists(st.sampled_from(["-100", "200", "0", "-0.5", "nan", "inf", "1e30"]), min_size=2,
                            max_size=2),
    "--device": st.one_of(st.sampled_from(["cpu", "CPU", "", "cpu:0", "cuda:x", "cuda:-1", "meta", "mps",
                                           "auto", " cpu"]), JUNK),
}
PREDICT_OPTIONS = {
    "--overlap": FLOATS,
    "--sw-batch-size": ints(-5, 8, *HUGE_INTS, -2**63),
    "--device": TRAIN_OPTIONS["--device"],
}


def tokens(option: str, value) -> list[str]:
    if isinstance(value, list):
        return [option, *value]
    return [f"{option}={value}"]  # "=": a value like "-inf" or "-x" is not taken for an option


def drawn(options: dict):
    return st.dictionaries(st.sampled_from(sorted(options)), st.none(), min_size=1, max_size=2).flatmap(
        lambda keys: st.fixed_dictionaries({k: options[k] for k in keys}))


def assert_exit_0_or_one_line(argv: list[str]) -> None:
    """Run ``sgrs *argv`` in-process: exit 0, or exit 2 with one line "error: ..."; an argparse
    refusal (SystemExit) may be the short usage form: at most 2 lines, the last one the error."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            lines = err.getvalue().strip().splitlines()
            assert exc.code == 2 and lines and len(lines) <= 2 and "error:" in lines[-1], \
                f"argparse: {argv}: {err.getvalue()[-1500:]}"
            return
    text = err.getvalue()
    assert code in (0, 2), f"exit {code} for {argv}: {text[-1500:]}"
    if code == 2:
        lines = text.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{argv}: {text[-1500:]}"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_properties")


@pytest.fixture(scope="module")
def trained(tiny_cohort, work) -> Path:
    run = work / "run"
    assert main(["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
                 "--out", str(run), *TINY_ARGS]) == 0
    return run


SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@given(options=drawn(TRAIN_OPTIONS))
def test_train_option_values_exit_0_or_one_line(options, tiny_cohort, work):
    out = Path(tempfile.mkdtemp(dir=work)) / "run"
    argv = ["train", "--images", str(tiny_cohort.images_tr), "--labels", str(tiny_cohort.labels_tr),
            "--out", str(out), *TINY_ARGS, "--iterations", "2"]  # later flags win: a drawn one overrides
    for option, value in options.items():
        argv += tokens(option, value)
    assert_exit_0_or_one_line(argv)


@SETTINGS
@given(options=drawn(PREDICT_OPTIONS), regions=st.booleans())
def test_predict_option_values_exit_0_or_one_line(options, regions, trained, tiny_cohort, work):
    out = Path(tempfile.mkdtemp(dir=work)) / "pred"
    argv = ["predict", "--run", str(trained), "--images", str(tiny_cohort.images_ts), "--out", str(out),
            "--device", "cpu", "--quiet", *(["--regions"] if regions else [])]
    for option, value in options.items():
        argv += tokens(option, value)
    assert_exit_0_or_one_line(argv)
