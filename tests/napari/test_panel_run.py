"""The Training box on a laptop: a CPU's preset, an ETA warning, Stop with slow steps, and what the
plot shows without a validation split. Run under ``xvfb-run -a``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from napari_sgrs._napari import _widget
from napari_sgrs._napari._widget import NO_VALIDATION_NOTE, SGRSTrainWidget
from napari_sgrs.core.events import Event, EventKind
from napari_sgrs.core.settings import PRESETS
from napari_sgrs.project.folder import Project

sys.path.insert(0, str(Path(__file__).parents[1] / "project"))
from test_stop import slow_sgrs_command  # noqa: E402

WAIT_MS = 180_000


def _boxes(widget):
    return (widget.iterations_spin.value(), tuple(s.value() for s in widget.patch_spins), widget.filters_spin.value())


@pytest.mark.parametrize("gpu, preset", [("", "preview"), ("Test GPU (80 GiB)", "plugin")])
def test_the_panel_starts_from_the_devices_preset(make_napari_viewer, monkeypatch, gpu, preset):
    monkeypatch.setattr(_widget, "detect_gpu", lambda: gpu)
    widget = SGRSTrainWidget(make_napari_viewer())
    p = PRESETS[preset]
    assert _boxes(widget) == (p["iterations"], p["patch_size"], p["base_filters"])
    assert widget.preset_combo.currentText() == preset
    settings = widget.settings()  # the rest of the settings follow the preset too
    assert (settings.batch_size, settings.val_every) == (p.get("batch_size"), p.get("val_every"))
    if not gpu:
        assert "preview setting" in widget.gpu_label.text()
    # the methods by name; the default is ours, and the paper preset sets SGRS-Net
    assert (widget.method_combo.currentText(), settings.method) == ("SGRS+ (ours)", "sgrs-plus")
    widget.choose_preset("paper")
    assert _boxes(widget) == (PRESETS["paper"]["iterations"], PRESETS["paper"]["patch_size"],
                              PRESETS["paper"]["base_filters"])
    assert (widget.method_combo.currentText(), widget.settings().method) == ("SGRS-Net (paper)", "sgrs")
    widget.shutdown()


def test_a_run_projected_over_an_hour_is_warned_once_naming_the_preview(make_napari_viewer, monkeypatch):
    monkeypatch.setattr(_widget, "detect_gpu", lambda: "")
    warned = []
    monkeypatch.setattr(_widget, "show_warning", warned.append)
    widget = SGRSTrainWidget(make_napari_viewer())
    widget.choose_preset("plugin")
    widget.handle_event(Event(EventKind.PROGRESS, 1, {"loss": 1.0, "total": 2000, "steps_per_s": 1 / 87,
                                                      "eta_s": 1999 * 87.0}))
    assert len(warned) == 1 and "48h" in warned[0] and "'preview'" in warned[0]
    assert widget._step_s == pytest.approx(87.0)
    widget.handle_event(Event(EventKind.PROGRESS, 2, {"loss": 1.0, "total": 2000, "eta_s": 1998 * 87.0}))
    assert len(warned) == 1  # once a run
    widget._long_run_warned = False
    widget.handle_event(Event(EventKind.PROGRESS, 3, {"loss": 1.0, "total": 2000, "eta_s": 600.0}))
    assert len(warned) == 1  # ten minutes: no warning
    widget.choose_preset("preview")  # already the small setting (a slow machine): fewer steps, then
    widget.handle_event(Event(EventKind.PROGRESS, 4, {"loss": 1.0, "total": 300, "eta_s": 7200.0}))
    assert len(warned) == 2 and "2h00m" in warned[1] and "lower the iterations" in warned[1]
    widget.shutdown()


def test_without_a_validation_split_the_panel_says_so_and_the_plot_has_no_dice_entry(make_napari_viewer):
    widget = SGRSTrainWidget(make_napari_viewer())
    widget.handle_event(Event(EventKind.STARTED, 0, {"total": 10, "device": "cpu", "validation": 0}))
    assert not widget.validation_label.isHidden() and widget.validation_label.text() == NO_VALIDATION_NOTE
    widget.handle_event(Event(EventKind.PROGRESS, 1, {"loss": 0.7, "total": 10}))
    widget.handle_event(Event(EventKind.REGIONS, 1, {"scope": "batch", "disregarded": 0.2, "inconsistent": 0.1}))
    widget.plot.refresh()
    labels = [t.get_text() for t in widget.plot.ax_dice.get_legend().get_texts()]
    assert "val Dice" not in labels and "loss" in labels
    assert widget.plot.ax_dice.get_ylabel() == "share"
    # a run with a split: no note, and the Dice joins the legend with its first point
    widget.handle_event(Event(EventKind.STARTED, 0, {"total": 10, "device": "cpu", "validation": 1}))
    assert widget.validation_label.isHidden()
    widget.handle_event(Event(EventKind.VALIDATION, 2, {"dice": 0.5}))
    widget.plot.refresh()
    assert "val Dice" in [t.get_text() for t in widget.plot.ax_dice.get_legend().get_texts()]
    widget.shutdown()


def test_stop_during_slow_steps_is_reported_as_a_stop(make_napari_viewer, qtbot, monkeypatch, tmp_path, cohort):
    """Each step takes 3 s and the fixed part of the grace is 1 s: the panel waits for the step
    (its grace follows the measured step time) and reports a stop, never a failure."""
    monkeypatch.setattr("napari_sgrs.project.jobs.sgrs_command", slow_sgrs_command)
    monkeypatch.setattr("napari_sgrs.project.jobs.STOP_GRACE_S", 1.0)
    monkeypatch.setenv("SLOW_STEP_S", "3")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[2]))
    errors, warnings = [], []
    monkeypatch.setattr(_widget, "show_error", errors.append)
    monkeypatch.setattr(_widget, "show_warning", warnings.append)
    viewer = make_napari_viewer()
    widget = SGRSTrainWidget(viewer, project=Project.create(tmp_path / "project"))
    widget.load_folder(cohort.images_tr, cohort.labels_tr)
    widget.iterations_spin.setValue(50)
    for spin in widget.patch_spins:
        spin.setValue(32)
    widget.filters_spin.setValue(2)
    widget.device_combo.setCurrentText("cpu")
    widget.start_training()
    qtbot.waitUntil(lambda: widget._step_s is not None or widget.train_job is None, timeout=WAIT_MS)
    assert widget.train_job is not None, errors
    widget.stop_training()
    qtbot.waitUntil(lambda: widget.train_job is None, timeout=WAIT_MS)
    assert errors == [] and warnings == []
    assert widget.status_label.text() == "stopped at step 2, checkpoint saved, Resume continues"
    assert widget.project.last_step() == 2 and widget.resume_button.isEnabled()
    widget.shutdown()


def test_a_trainer_ended_by_the_signals_after_stop_is_a_stop_not_a_failure(make_napari_viewer, qtbot, monkeypatch,
                                                                            tmp_path):
    """A trainer that the grace's SIGTERM/SIGKILL ends before it could save: the panel says it
    stopped and where Resume continues from, as a warning; the same exit without Stop is a failure."""
    from napari_sgrs.project.jobs import Job

    errors, warnings = [], []
    monkeypatch.setattr(_widget, "show_error", errors.append)
    monkeypatch.setattr(_widget, "show_warning", warnings.append)
    widget = SGRSTrainWidget(make_napari_viewer(), project=Project.create(tmp_path / "project"))
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]  # dies of SIGTERM, saving nothing
    widget.train_job = Job(sleeper, tmp_path / "a.log")
    widget.stop_training()  # no STOP file: SIGTERM at once
    qtbot.waitUntil(lambda: (widget._check_train_job(), widget.train_job is None)[1], timeout=WAIT_MS)
    assert errors == [] and len(warnings) == 1 and "Start begins again" in warnings[0]
    assert widget.status_label.text().startswith("stopped")
    widget.train_job = Job(sleeper, tmp_path / "b.log")
    widget.train_job.terminate()  # not through Stop
    qtbot.waitUntil(lambda: (widget._check_train_job(), widget.train_job is None)[1], timeout=WAIT_MS)
    assert len(errors) == 1 and errors[0].startswith("training failed")
    widget.shutdown()
