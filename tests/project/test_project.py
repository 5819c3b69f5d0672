"""Headless tests of the panel's project: ranking, focus, provenance, journal, export, settings, jobs."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from napari_sgrs.core.errors import InputError, LockedError
from napari_sgrs.core.io import Geometry, read_volume, write_volume
from napari_sgrs.core.runfolder import RunFolder
from napari_sgrs.core.settings import METHOD_DEFAULTS, SETTINGS, TrainConfig, read_config_file
from napari_sgrs.project.folder import (IGNORE_INDEX, PANEL_SETTINGS, Project, case_name, mark_unpainted_slices,
                                        panel_config, panel_preset, panel_values, provenance_counts,
                                        provenance_for_accept)
from napari_sgrs.project.jobs import TrainerProcess, train_command
from napari_sgrs.project.review import ReviewQueue, largest_region, rank_for_review

GEOM = Geometry(spacing=(2.0, 0.5, 0.75), origin=(10.0, -5.0, 3.0), direction=tuple(np.eye(3).ravel()))


def test_the_project_imports_neither_torch_nor_qt():
    """The panel's project package runs the engine as subprocesses: loading it loads no torch
    (nor Qt/napari, so it is testable headless). In a fresh interpreter, as the panel starts."""
    import subprocess
    from pathlib import Path

    code = ("import sys, napari_sgrs.project.folder, napari_sgrs.project.review, napari_sgrs.project.jobs\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', "
            "'PySide6', 'napari', 'magicgui', 'superqt'})\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("text, expected", [
    ("case_003.nii.gz", "case_003"), ("a b/c d.nrrd", "c_d"), ("blob_001", "blob_001"), ("???", "case"),
])
def test_case_name(text, expected):
    assert case_name(text) == expected


def test_ranking_worst_first_and_ties_by_name():
    a = np.full((4, 4, 4), 2, np.uint8)
    b = a.copy(); b[0, 0, :2] = 3                     # 2 inconsistent
    c = a.copy(); c[0, 0, :2] = 1; c[1, 1, 1] = 3     # 2 disregarded + 1 inconsistent
    d = b.copy()                                       # ties with b
    ranked = rank_for_review({"a": a, "b": b, "c": c, "d": d})
    assert [r.name for r in ranked] == ["c", "b", "d", "a"]
    assert ranked[0].score == pytest.approx(3 / 64)
    q = ReviewQueue({"a": a, "c": c})
    assert [q.next().name, q.next().name, q.next().name] == ["c", "a", "c"]
    q.remove("c")
    assert q.next().name == "a"


def test_estimated_dice_ranks_before_the_flagged_share():
    a = np.full((4, 4, 4), 2, np.uint8)
    b = a.copy(); b[0, 0, :2] = 3                     # flags more, but estimated better
    est = {"a": {"estimated_dice": 0.61, "dice_low": 0.55, "dice_high": 0.67}, "b": {"estimated_dice": 0.9}}
    ranked = rank_for_review({"a": a, "b": b, "c": b.copy()}, est)
    assert [r.name for r in ranked] == ["a", "b", "c"]  # c has no estimate: after those that have one
    assert ranked[0].describe() == "a   est. Dice 0.61 (0.55-0.67) · flagged 0.0%"
    assert ranked[2].describe() == "c   flagged 3.1%"


def test_largest_inconsistent_region_and_fallback():
    r = np.full((10, 10, 10), 2, np.uint8)
    r[1, 1, 1] = 3                     # small component
    r[5:8, 2:5, 6:9] = 3               # big one (27 voxels)
    focus = largest_region(r)
    assert focus.size == 27 and focus.region == 3
    assert focus.center == (6.0, 3.0, 7.0)
    assert focus.bbox == ((5, 8), (2, 5), (6, 9))
    only_disregarded = np.full((5, 5, 5), 2, np.uint8)
    only_disregarded[0, 0, 0:2] = 1
    assert largest_region(only_disregarded).region == 1
    assert largest_region(np.zeros((3, 3, 3), np.uint8)) is None
    # one cluster of likely errors may hold both flagged codes: it outweighs a bigger pure one
    mixed = np.full((12, 12, 12), 2, np.uint8)
    mixed[0:3, 0:3, 0:2] = 3                           # 18 inconsistent ...
    mixed[0:3, 0:3, 2:4] = 1                           # ... touching 18 disregarded
    mixed[8:11, 8:11, 8:11] = 3                        # 27 inconsistent, alone
    focus = largest_region(mixed)
    assert focus.size == 36 and focus.region == 3 and focus.bbox == ((0, 3), (0, 3), (0, 4))


def test_mark_unpainted_slices():
    label = np.zeros((5, 4, 4), np.uint8)
    label[1, 0, 0] = 1
    label[3] = 0                        # an unpainted slice
    out = mark_unpainted_slices(label)
    assert (out[1] != IGNORE_INDEX).all() and out[1, 0, 0] == 1
    for z in (0, 2, 3, 4):
        assert (out[z] == IGNORE_INDEX).all()
    with pytest.raises(InputError):
        mark_unpainted_slices(np.full((2, 2, 2), 300))


def test_provenance():
    model = np.zeros((4, 4, 4), np.uint8); model[1] = 1
    label = model.copy(); label[2, 0, 0] = 1; label[1, 0, 0] = 0   # two voxels changed
    label[3, 3, 3] = IGNORE_INDEX
    prov = provenance_for_accept(label, model)
    assert provenance_counts(prov) == {"model_only": 1, "accepted_pseudo_label": 61, "human_drawn": 2}
    # a voxel drawn by a person stays human-drawn when a later accept agrees with the model there
    again = provenance_for_accept(model, model, previous=prov)
    assert again[2, 0, 0] == 2 and again[1, 0, 0] == 2
    assert provenance_counts(provenance_for_accept(label, None))["human_drawn"] == 63


def _project_with_cases(tmp_path):
    project = Project.create(tmp_path / "proj")
    rng = np.random.default_rng(0)
    for name in ("c0", "c1"):
        project.add_image(name, rng.normal(size=(8, 8, 8)).astype(np.float32), GEOM, source=f"/data/{name}.nrrd",
                          source_format="nrrd")
    label = np.zeros((8, 8, 8), np.uint8); label[2:5, 2:5, 2:5] = 1
    project.set_label("c0", label, GEOM)
    return project


def test_project_roundtrip_and_accept(tmp_path):
    project = _project_with_cases(tmp_path)
    assert project.labeled_cases() == ["c0"] and project.unlabeled_cases() == ["c1"]
    project.close()
    reopened = Project.open(tmp_path / "proj")
    assert reopened.case_names() == ["c0", "c1"] and reopened.images[0].source == "/data/c0.nrrd"
    model = np.zeros((8, 8, 8), np.uint8); model[3:6, 3:6, 3:6] = 1
    edited = model.copy(); edited[0, 0, 0] = 1
    prov = reopened.accept("c1", edited, GEOM, model)
    assert reopened.label_path("c1").exists() and int((prov == 2).sum()) == 1
    saved = read_volume(reopened.label_path("c1"))
    assert np.array_equal(saved.array, edited) and saved.geometry.close_to(GEOM)
    reopened.close()
    with Project.open(tmp_path / "proj") as again:
        assert again.data["corrections"][-1]["provenance"]["human_drawn"] == 1
    with pytest.raises(InputError):
        Project.open(tmp_path / "nothing")


def test_journal_recovery(tmp_path):
    project = _project_with_cases(tmp_path)
    edit = np.zeros((8, 8, 8), np.uint8); edit[1, 2, 3] = 1
    project.save_journal("c1", edit)
    # a "killed viewer": only the folder remains; a new Project object finds the edit
    project.close()
    again = Project.open(project.root)
    pending = again.pending_journal()
    assert [e.name for e in pending] == ["c1"]
    assert np.array_equal(again.load_journal("c1"), edit)
    again.accept("c1", edit, GEOM, None)       # accepting clears the journal
    assert again.pending_journal() == []
    # a tampered journal file is refused, never unpickled (the current one-file form and an
    # older version's .npy)
    again.journal_dir.mkdir(exist_ok=True)
    np.savez(again.journal_dir / "evil.npz", label=np.array([object()], dtype=object))
    np.save(again.journal_dir / "old.npy", np.array([object()], dtype=object), allow_pickle=True)
    assert {e.name for e in again.pending_journal()} == {"evil", "old"}  # listed, so it can be named
    for name in ("evil", "old"):
        with pytest.raises(InputError, match=name):
            again.load_journal(name)


def test_journal_from_an_older_version_is_offered_back(tmp_path):
    project = _project_with_cases(tmp_path)
    edit = np.zeros((8, 8, 8), np.uint8); edit[4, 4, 4] = 1
    project.journal_dir.mkdir()
    np.save(project.journal_dir / "c1.npy", edit)
    (project.journal_dir / "c1.json").write_text(json.dumps({"case": "c1", "time": 5.0}))
    assert [(e.name, e.time) for e in project.pending_journal()] == [("c1", 5.0)]
    assert np.array_equal(project.load_journal("c1"), edit)
    project.save_journal("c1", edit + 1)           # the new form supersedes the old pair
    assert sorted(p.name for p in project.journal_dir.iterdir()) == ["c1.npz"]
    assert np.array_equal(project.load_journal("c1"), edit + 1)


_SAVE_JOURNAL = """
import sys, numpy as np
from napari_sgrs.project.folder import Project
project = Project.open(sys.argv[1])
edit = np.zeros((8, 8, 8), np.uint8); edit[:, 0, 0] = 2
project.save_journal("c1", edit)
"""


def test_journal_survives_a_kill_during_an_autosave(tmp_path):
    """The autosave journal is written as the panel writes it, by a process that is SIGKILLed
    while the new file is complete but not yet renamed into place: the previous autosave is
    read back whole, with its own case and time (one file, never a half pair)."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    project = _project_with_cases(tmp_path)
    first = np.zeros((8, 8, 8), np.uint8); first[1, 2, 3] = 1
    project.save_journal("c1", first)
    saved_at = project.pending_journal()[0].time
    project.close()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]), SGRS_TEST_SLOW_CHECKPOINT="60")
    child = subprocess.Popen([sys.executable, "-c", _SAVE_JOURNAL, str(project.root)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(project.journal_dir.glob(".c1.npz.*.tmp")):
            assert child.poll() is None and time.monotonic() < deadline, "the second autosave never started"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert list(project.journal_dir.glob(".c1.npz.*.tmp"))  # what the kill left behind
    again = Project.open(project.root)
    pending = again.pending_journal()
    assert [(e.name, e.time) for e in pending] == [("c1", saved_at)]
    assert np.array_equal(again.load_journal("c1"), first)
    assert sorted(p.name for p in again.journal_dir.iterdir()) == ["c1.npz"]  # the torn temp is gone


def test_export_with_sidecar(tmp_path):
    project = _project_with_cases(tmp_path)
    pred_dir = project.root / "predictions" / "p"
    pred_dir.mkdir(parents=True)
    pred = np.zeros((8, 8, 8), np.uint8); pred[4, 4, 4] = 1
    write_volume(pred_dir / "c1.nii.gz", pred, GEOM)
    project.set_prediction(pred_dir, step=7)
    written = project.export(out_dir=tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == ["c0.json", "c0.nii.gz", "c0.nrrd", "c1.json", "c1.nii.gz", "c1.nrrd"]
    for name in ("c0.nii.gz", "c1.nrrd"):
        assert read_volume(tmp_path / "out" / name).geometry.close_to(GEOM)
    side = json.loads((tmp_path / "out" / "c1.json").read_text())
    assert side["provenance"] == {"model_only": 512, "accepted_pseudo_label": 0, "human_drawn": 0}
    assert json.loads((tmp_path / "out" / "c0.json").read_text())["provenance"]["human_drawn"] == 512
    with pytest.raises(InputError):
        project.export(["nope"], tmp_path / "out")


def _sgrs(cmd):
    import os
    import subprocess
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=600)  # progress bars are not ASCII; the locale may be
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_the_panel_starts_sgrs_train_with_a_settings_file_not_options(tiny_cohort, tmp_path):
    """The panel's settings reach a real ``sgrs train`` through ``--config FILE``: the command names
    folders only, the file lies beside the run (whose folder stays empty, so sgrs takes it as a new
    run), and the run trains with the panel's values and TrainConfig's defaults for the rest. A
    retrain (resume with more steps) rewrites the file and the run goes on to the new total."""
    from napari_sgrs.core.events import EventKind, read_events

    project = Project.create(tmp_path / "proj")
    settings = panel_config(dict(iterations=2, patch_size=(16, 16, 16), base_filters=2, device="cpu",
                                 checkpoint_every=1, seed=5))
    run = RunFolder(project.new_run(settings))
    path = project.write_settings_file(run.path, settings)
    assert path.parent == project.runs_dir and list(run.path.iterdir()) == []
    run.check_output(resume=False)
    cmd = train_command(tiny_cohort.images_tr, tiny_cohort.labels_tr, run.path, path)
    assert cmd[cmd.index("--config") + 1] == str(path)
    assert not {s.flag for s in SETTINGS.values()} & set(cmd), "a setting spelt out as an option"
    _sgrs(cmd)
    saved = run.read_config()
    assert {k: saved[k] for k in PANEL_SETTINGS if k not in ("batch_size", "labeled_batch_size")} == \
        dict(method="sgrs-plus", iterations=2, patch_size=[16, 16, 16], base_filters=2, device="cpu", seed=5,
             ignore_index=IGNORE_INDEX, checkpoint_every=1, val_every=None)
    ours = METHOD_DEFAULTS["sgrs-plus"]  # the method's, as the engine's defaults
    assert (saved["lr"], saved["region_weighting"], saved["pseudo_views"]) == \
        (TrainConfig.lr, ours["region_weighting"], ours["pseudo_views"])

    settings.iterations = project.last_step(run.path) + 2     # as the panel's Retrain does
    path = project.write_settings_file(run.path, settings)
    _sgrs(train_command(tiny_cohort.images_tr, tiny_cohort.labels_tr, run.path, path, resume=True))
    assert run.read_config()["iterations"] == 4
    assert read_events(run.events)[-1].kind is EventKind.FINISHED and project.last_step(run.path) == 4


def test_a_project_of_an_earlier_version_opens_with_its_settings(tmp_path):
    """project.json as earlier versions wrote it (the panel's TrainSettings: None for the engine's
    default, and keys this version may not know) opens with the same settings, and its settings
    file gives sgrs exactly the values set."""
    project = _project_with_cases(tmp_path)
    project.data["settings"] = {"method": "mean-teacher", "iterations": 500, "patch_size": [32, 32, 32],
                                "base_filters": 8, "batch_size": None, "labeled_batch_size": None,
                                "device": "cpu", "seed": 7, "ignore_index": 255, "checkpoint_every": None,
                                "junk": 1}
    project.save()
    project.close()
    with Project.open(project.root) as again:
        settings = again.settings()
        assert (settings.method, settings.iterations, settings.patch_size, settings.base_filters, settings.device,
                settings.seed) == ("mean-teacher", 500, (32, 32, 32), 8, "cpu", 7)
        assert settings.batch_size is None and settings.checkpoint_every == TrainConfig.checkpoint_every
        path = again.write_settings_file(again.runs_dir / "run-001", settings)
        assert read_config_file(path) == dict(method="mean-teacher", iterations=500, patch_size=(32, 32, 32),
                                              base_filters=8, device="cpu", seed=7, ignore_index=255,
                                              checkpoint_every=TrainConfig.checkpoint_every)


def test_update_label_keeps_provenance_of_unchanged_voxels(tmp_path):
    project = _project_with_cases(tmp_path)
    model = np.zeros((8, 8, 8), np.uint8)
    edited = model.copy(); edited[0, 0, 0] = 1
    project.accept("c1", edited, GEOM, model)
    assert project.update_label("c1", edited, GEOM) is False       # unchanged: nothing written
    again = edited.copy(); again[7, 7, 7] = 1
    assert project.update_label("c1", again, GEOM) is True
    prov = project.read_provenance("c1")
    assert provenance_counts(prov) == {"model_only": 0, "accepted_pseudo_label": 510, "human_drawn": 2}


# --------------------------------------------------------------------------- one writer per folder
_HOLD_PROJECT = """
import sys, time
from napari_sgrs.project.folder import Project
project = Project.open(sys.argv[1])
print("holding", flush=True)
time.sleep(600)
"""


def _child(code, *args, **env):
    import os
    import subprocess
    from pathlib import Path

    full_env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]), **env)
    child = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=full_env,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "holding", "the child did not start"
    return child


def _kill(child):
    import signal

    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()


def test_a_second_project_object_on_a_folder_is_refused_naming_the_holder(tmp_path):
    import os

    first = _project_with_cases(tmp_path)
    with pytest.raises(LockedError) as info:
        Project.open(first.root)
    message = str(info.value)
    assert str(first.root) in message and f"pid {os.getpid()}" in message and "napari-sgrs project" in message
    assert "\n" not in message
    with pytest.raises(LockedError):
        Project.create(first.root)
    first.close()
    with Project.open(first.root) as second:     # closed: free for the next one
        assert second.case_names() == ["c0", "c1"]


def test_a_project_open_in_another_process_is_refused_until_that_process_dies(tmp_path):
    project = _project_with_cases(tmp_path)
    project.close()
    child = _child(_HOLD_PROJECT, project.root)
    try:
        with pytest.raises(LockedError, match=f"pid {child.pid}"):
            Project.open(project.root)
    finally:
        _kill(child)   # a viewer killed with SIGKILL: its lock goes with it
    with Project.open(project.root) as again:
        again.save_journal("c1", np.ones((8, 8, 8), np.uint8))
        assert [e.name for e in again.pending_journal()] == ["c1"]


def test_new_run_never_trains_into_an_existing_folder(tmp_path):
    project = _project_with_cases(tmp_path)
    (project.runs_dir / "run-001").mkdir(parents=True)     # e.g. `sgrs train --out runs/run-001` by hand
    (project.runs_dir / "run-001" / "mine.txt").write_text("not sgrs's")
    run = project.new_run(panel_config())
    assert run.name == "run-002" and list(run.iterdir()) == []
    assert project.current_run == run


# A stand-in for `sgrs train`: holds the run folder's lock as the trainer does, stops on STOP.
_FAKE_TRAINER = """
import json, sys, time
from pathlib import Path
from napari_sgrs.core.runfolder import RunFolder
run = Path(sys.argv[1])
lock = RunFolder(run).lock()
events = open(run / "events.jsonl", "a")
events.write(json.dumps({"kind": "started", "step": 0, "time": time.time()}) + "\\n"); events.flush()
print("holding", flush=True)
while not (run / "STOP").exists():
    time.sleep(0.05)
events.write(json.dumps({"kind": "stopped", "step": 3, "time": time.time()}) + "\\n"); events.flush()
"""


def test_a_run_held_by_another_process_is_followed_and_stopped(tmp_path):
    project = _project_with_cases(tmp_path)
    run = RunFolder(project.new_run(panel_config()))
    child = _child(_FAKE_TRAINER, run.path)
    try:
        trainer = TrainerProcess(run.path, run.holder())
        assert trainer.pid == child.pid and trainer.running and trainer.poll() is None
        trainer.request_stop()                       # as the panel's Stop does
        child.wait(timeout=60)
        assert trainer.poll() == 0                   # its last event says it stopped
    finally:
        _kill(child)
    assert run.holder() is None


def test_a_trainer_killed_without_a_word_is_reported_as_failed(tmp_path):
    project = _project_with_cases(tmp_path)
    run = RunFolder(project.new_run(panel_config()))
    child = _child(_FAKE_TRAINER, run.path)
    try:
        trainer = TrainerProcess(run.path, run.holder())
        assert trainer.running
    finally:
        _kill(child)
    assert trainer.poll() == 1 and "killed" in trainer.error_message() and "Resume" in trainer.error_message()


def test_a_new_project_is_never_made_in_a_folder_of_other_files(tmp_path):
    folder = tmp_path / "my-data"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "c0.nii.gz").write_bytes(b"the user's own image")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    with pytest.raises(InputError, match="not empty") as info:
        Project.create(folder)
    assert str(folder) in str(info.value) and "images" in str(info.value)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before   # nothing written
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        Project.create(tmp_path / "afile")
    with Project.create(tmp_path / "empty") as project:        # absent or empty: fine
        assert project.case_names() == []


def test_the_panel_preset_follows_the_device_and_reaches_the_settings_file(tmp_path):
    """No GPU: the panel starts from ``preview`` (a first result in about a minute on a CPU), and
    what the preset sets beyond the panel's boxes (its validation interval) reaches the trainer."""
    from napari_sgrs.core.settings import PRESETS

    assert (panel_preset(False), panel_preset(True)) == ("preview", "plugin")
    cpu = panel_config(preset=panel_preset(False))
    assert {k: getattr(cpu, k) for k in PRESETS["preview"]} == PRESETS["preview"]
    project = Project.create(tmp_path / "proj")
    assert project.settings("preview") == cpu  # a new project has chosen nothing yet
    path = project.write_settings_file(project.new_run(cpu), cpu)
    assert read_config_file(path)["val_every"] == PRESETS["preview"]["val_every"]
    assert panel_values(project.settings()) == panel_values(cpu)  # the run's choice, kept whatever the device
