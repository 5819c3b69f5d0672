"""The trainer's shape (issue 21): small functions, training and inference that do not import each
other, no import cycle in the core, one step function per method chosen by name, RunFolder alone
spelling the run's files, and predict_folder as the one folder loop of prediction."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_sgrs.core.io import find_cases, read_volume
from napari_sgrs.core.runfolder import RunFolder

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "napari_sgrs" / "core"
#: train.py and the modules it was split into (and predict.py, the folder loop out of the CLI)
TRAINER_MODULES = ("train", "steps", "validation", "device", "network", "distributed", "predict")
MAX_FUNCTION_LINES = 80


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_of_the_trainer_is_longer_than_80_lines():
    long = [f"{name}.py:{line} {fn}() is {n} lines" for name in TRAINER_MODULES
            for fn, line, n in _functions(CORE / f"{name}.py") if n > MAX_FUNCTION_LINES]
    assert not long, long


def _imported_core_modules(path: Path) -> set[str]:
    """The napari_sgrs.core modules that ``path`` imports anywhere (module level and inside
    functions), relative and absolute imports alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.level == 0 and node.module == "napari_sgrs.core":
                found |= {a.name for a in node.names}
            elif node.level == 0 and (node.module or "").startswith("napari_sgrs.core."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("napari_sgrs.core.")}
    return found - {path.stem}


def test_train_and_infer_do_not_import_each_other():
    """In a fresh interpreter: importing infer loads nothing of training, and neither module's
    source imports the other, at module level or inside a function."""
    code = ("import sys, json; import napari_sgrs.core.infer as I; alone = 'napari_sgrs.core.train' in sys.modules; "
            "import napari_sgrs.core.train as T; print(json.dumps([alone, I.__file__, T.__file__]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    infer_loaded_train, infer_file, train_file = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(infer_file).parent == CORE == Path(train_file).parent  # the code under test
    assert not infer_loaded_train
    assert "train" not in _imported_core_modules(Path(infer_file))
    assert "infer" not in _imported_core_modules(Path(train_file))


def test_the_core_has_no_import_cycle():
    graph = {p.stem: _imported_core_modules(p) for p in CORE.glob("*.py")}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in graph if m in reachable(m))
    assert not cycles, {m: sorted(graph[m]) for m in cycles}


def test_every_method_trains_with_its_own_step_function(tiny_cohort, tmp_path, monkeypatch):
    from napari_sgrs.core import steps
    from napari_sgrs.core.settings import METHODS
    from napari_sgrs.core.train import train

    assert set(steps.STEPS) == set(METHODS)
    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    for method in METHODS:
        calls = []
        real = steps.STEPS[method]

        def recording(*args, _real=real, **kwargs):
            calls.append(_real.__name__)
            return _real(*args, **kwargs)

        monkeypatch.setitem(steps.STEPS, method, recording)
        train(tiny_config(method=method, iterations=2), cases, tmp_path / method)
        assert calls == [real.__name__] * 2, method


def _string_constants(path: Path):
    """String literals of a module, docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_only_runfolder_spells_the_run_layout():
    """No code but runfolder.py builds a path from the run's file names (in messages too)."""
    names = {RunFolder.CONFIG, RunFolder.EVENTS, RunFolder.CHECKPOINTS, RunFolder.STOP, RunFolder.LOG,
             ".safetensors", "last.json"}
    inside = (f"{RunFolder.CHECKPOINTS}/", "last.safetensors", "best.safetensors", "last.json")
    files = [*(ROOT / "napari_sgrs").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    spelled = [f"{p.relative_to(ROOT)}:{line} {text!r}" for p in files if p.name != "runfolder.py"
               for line, text in _string_constants(p) if text in names or any(s in text for s in inside)]
    assert not spelled, spelled
    assert re.search(r"checkpoints/last\.safetensors", RunFolder.relative("last"))


def test_last_step_is_the_last_checkpoints_own_step(tiny_cohort, tmp_path):
    """The panel's step of a run comes from the checkpoint's header (there is no last.json)."""
    from napari_sgrs.project.folder import Project
    from napari_sgrs.core.train import train

    project = Project.create(tmp_path / "project")
    try:
        run = tmp_path / "run"
        train(tiny_config(iterations=4, checkpoint_every=2), find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr),
              run)
        # neither a stray last.json (never written by sgrs) nor events of a later checkpoint that is
        # not on disk (a killed run's best, say) make the step
        (run / "checkpoints" / "last.json").write_text('{"step": 77}')
        with open(run / "events.jsonl", "a") as fh:
            fh.write(json.dumps({"kind": "checkpoint", "step": 99, "time": 0, "best": True}) + "\n")
        assert project.last_step(run) == 4 == RunFolder(run).checkpoint_step()
        assert project.last_checkpoint(run) == RunFolder(run).last
        assert project.last_step(tmp_path) == 0 and project.last_checkpoint(tmp_path) is None
    finally:
        project.close()


@pytest.fixture(scope="module")
def tiny_run(tiny_cohort, tmp_path_factory):
    from napari_sgrs.core.train import train

    run = tmp_path_factory.mktemp("predict_folder") / "run"
    train(tiny_config(iterations=2), find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr), run)
    return run


def test_predict_folder_is_what_sgrs_predict_writes(tiny_cohort, tiny_run, tmp_path):
    from napari_sgrs.cli import main
    from napari_sgrs.core.predict import predict_folder

    assert main(["predict", "--run", str(tiny_run), "--images", str(tiny_cohort.images_tr), "--labels",
                 str(tiny_cohort.labels_tr), "--out", str(tmp_path / "cli"), "--regions", "--device", "cpu",
                 "--quiet"]) == 0
    got = predict_folder(tiny_run, tmp_path / "api", images=tiny_cohort.images_tr, labels=tiny_cohort.labels_tr,
                         regions=True, device="cpu")
    files = sorted(p.relative_to(tmp_path / "api") for p in (tmp_path / "api").rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*.nii.gz"))
    # probability, regions and reliability for the unlabeled volumes only, and their review queue
    assert len(files) == len(tiny_cohort.labeled_names) + 4 * len(tiny_cohort.unlabeled_names)
    assert (tmp_path / "api" / "review.json").is_file() and (tmp_path / "cli" / "review.json").is_file()
    assert sorted(got.files) == sorted(tiny_cohort.train_names)
    for f in files:
        np.testing.assert_array_equal(read_volume(tmp_path / "api" / f).array, read_volume(tmp_path / "cli" / f).array)


def test_predict_folder_of_given_cases_writes_those_and_never_into_their_folder(tiny_cohort, tiny_run, tmp_path):
    from napari_sgrs.core.errors import InputError
    from napari_sgrs.core.predict import predict_folder

    unlabeled = [c for c in find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr) if c.label is None]
    got = predict_folder(tiny_run, tmp_path / "pseudo", cases=unlabeled, regions=True, device="cpu")
    assert sorted(got.files) == sorted(c.name for c in unlabeled) == sorted(tiny_cohort.unlabeled_names)
    assert all(len(paths) == 4 and all(p.is_file() for p in paths) for paths in got.files.values())
    assert read_volume(got.label(unlabeled[0].name)).array.shape == read_volume(unlabeled[0].image).array.shape
    with pytest.raises(InputError, match="is inside the input image folder"):
        predict_folder(tiny_run, tiny_cohort.images_tr / "pred", cases=unlabeled, device="cpu")
    assert not (tiny_cohort.images_tr / "pred").exists()


@pytest.mark.parametrize("window", [5, None, "ab", [1.0], [0, float("nan")]])
def test_a_checkpoint_whose_ct_window_is_no_pair_is_refused_on_loading(tmp_path, window):
    """The network is built from the saved settings without TrainConfig (so infer needs nothing of
    train): a header whose ct_window is not 2 numbers is still refused when the checkpoint loads."""
    from napari_sgrs.core.checkpoint import load_checkpoint, save_checkpoint
    from napari_sgrs.core.errors import CheckpointError
    from napari_sgrs.core.network import build_model

    config = {"base_filters": 1, "patch_size": [16, 16, 16], "ct_window": [-160.0, 240.0]}
    tensors = {f"student.{k}": v for k, v in build_model(config, 2).state_dict().items()}
    save_checkpoint(tmp_path / "good.safetensors", tensors, {"config": config, "num_classes": 2})
    assert load_checkpoint(tmp_path / "good.safetensors").meta["config"]["ct_window"] == [-160.0, 240.0]
    save_checkpoint(tmp_path / "bad.safetensors", tensors,
                    {"config": {**config, "ct_window": window}, "num_classes": 2})
    with pytest.raises(CheckpointError, match="ct_window .* is not 2 numbers"):
        load_checkpoint(tmp_path / "bad.safetensors")
