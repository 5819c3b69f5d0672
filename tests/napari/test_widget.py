"""The train panel end to end: demo data -> CPU training in a subprocess -> regions -> accept -> export.

Tiny settings (32^3 volumes, 4 steps, 2 base filters) so a run takes seconds on one CPU thread.
"""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
from qtpy.QtCore import QTimer

from napari_sgrs._napari._widget import SGRSTrainWidget
from napari_sgrs.core.events import Event, EventKind
from napari_sgrs.core.io import read_volume
from napari_sgrs.core.project import Project

WAIT_MS = 180_000


def _tiny(widget, iterations=4):
    widget.iterations_spin.setValue(iterations)
    for spin in widget.patch_spins:
        spin.setValue(32)
    widget.filters_spin.setValue(2)
    widget.device_combo.setCurrentText("cpu")


@pytest.fixture
def panel(make_napari_viewer, tmp_path, cohort):
    viewer = make_napari_viewer()
    widget = SGRSTrainWidget(viewer, project=Project.create(tmp_path / "project"))
    viewer.window.add_dock_widget(widget, name="SGRS: train")
    widget.load_folder(cohort.images_tr, cohort.labels_tr)
    _tiny(widget)
    yield viewer, widget
    widget.shutdown()


def test_layout_and_table(panel, cohort):
    viewer, widget = panel
    rows = widget.table_selection()
    assert set(rows) == set(cohort.train_names)
    assert rows[cohort.labeled_names[0]][1] == f"{cohort.labeled_names[0]} label"
    assert rows[cohort.unlabeled_names[0]][1] == "(unlabeled)"
    assert widget.gpu_label.text()  # names the GPU, or says that there is none
    assert {w.objectName() for w in widget.findChildren(type(widget.gpu_label))} >= {
        "legend_disregarded", "legend_consistent", "legend_inconsistent"}
    layer = viewer.layers[cohort.train_names[0]]
    assert np.allclose(layer.scale, cohort.spacing)


def test_full_loop(panel, qtbot, cohort, tmp_path):
    viewer, widget = panel
    project = widget.project
    unlabeled = cohort.unlabeled_names
    widget.start_training()
    qtbot.waitUntil(lambda: all(widget.layer_for(n, "regions") is not None for n in unlabeled), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: len(widget.queue.items) == len(unlabeled), timeout=WAIT_MS)
    regions = widget.layer_for(unlabeled[0], "regions")
    assert regions.colormap.map(np.array([2]))[0][:3] == pytest.approx([0, 0x9E / 255, 0x73 / 255], abs=0.01)
    assert set(np.unique(regions.data)) <= {0, 1, 2, 3}
    # the live plot carries loss and the per-step region shares from the event stream
    assert widget.plot.loss and widget.plot.region_steps
    assert all(0.0 <= v <= 1.0 for v in widget.plot.disregarded + widget.plot.inconsistent)
    assert [it.name for it in widget.queue.items] and len(widget.queue.items) == len(unlabeled)

    # Next: the worst case, centred on its largest inconsistent (or disregarded) region
    worst = widget.queue.items[0].name
    assert widget.next_case() == worst
    pseudo = widget.layer_for(worst, "pseudo")
    assert viewer.layers.selection.active is pseudo and pseudo.visible
    assert not viewer.layers[unlabeled[-1] if unlabeled[-1] != worst else unlabeled[0]].visible

    # paint (as napari's brush does) -> autosave journal -> Accept
    pseudo.selected_label = 1
    pseudo.brush_size = 3
    pseudo.paint((16, 16, 16), 1)
    pseudo.paint((2, 2, 2), 0)
    assert widget.autosave() == [worst]
    assert [e.name for e in project.pending_journal()] == [worst]
    label_path = widget.accept_current()
    assert label_path.exists() and project.pending_journal() == []
    saved = read_volume(label_path)
    assert np.array_equal(saved.array, pseudo.data)
    assert saved.geometry.close_to(read_volume(cohort.images_tr / f"{worst}.nii.gz").geometry)
    prov = project.read_provenance(worst)
    changed = pseudo.data != widget.model_predictions[worst]
    assert np.array_equal(prov == 2, changed) and changed.any()

    # Retrain from the last checkpoint with the new label
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    before = project.last_step()
    widget.retrain()
    qtbot.waitUntil(lambda: widget.train_job is None, timeout=WAIT_MS)
    assert project.last_step() > before

    # Export all and read back with the source geometry
    written = widget.export(tmp_path / "export")
    for name in cohort.train_names:
        back = read_volume(tmp_path / "export" / f"{name}.nii.gz")
        assert back.geometry.close_to(read_volume(cohort.images_tr / f"{name}.nii.gz").geometry)
    import json

    side = json.loads((tmp_path / "export" / f"{worst}.json").read_text())
    assert side["provenance"]["human_drawn"] == int(changed.sum())
    assert len(side["checkpoint"]["sha256"]) == 64 and side["training_settings"]
    assert any(p.name.endswith(".json") for p in written)


def test_reopen_restores_and_recovers(panel, qtbot, make_napari_viewer, cohort):
    viewer, widget = panel
    widget.start_training()
    unlabeled = cohort.unlabeled_names[0]
    qtbot.waitUntil(lambda: widget.layer_for(unlabeled, "regions") is not None, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    pseudo = widget.layer_for(unlabeled, "pseudo")
    pseudo.paint((10, 10, 10), 1)
    pseudo.paint((11, 11, 11), 1)
    widget.autosave()
    edited = np.array(pseudo.data)
    root = widget.project.root
    # "kill" the viewer: a fresh viewer and panel open the project folder (the lock of a killed
    # viewer goes with its process; tests/napari/test_viewer_killed.py kills a real one)
    widget.project.close()
    viewer2 = make_napari_viewer()
    widget2 = SGRSTrainWidget(viewer2)
    widget2.open_project(root, recover=True)
    assert {layer.name for layer in viewer2.layers} >= {f"{n}" for n in cohort.train_names}
    assert widget2.layer_for(unlabeled, "regions") is not None
    assert np.array_equal(widget2.layer_for(unlabeled, "pseudo").data, edited)
    assert widget2.plot.loss and widget2.resume_button.isEnabled()
    widget2.shutdown()


def test_trainer_error_is_notified(panel, qtbot, monkeypatch):
    viewer, widget = panel
    shown = []
    monkeypatch.setattr("napari_sgrs._napari._widget.show_error", shown.append)
    for spin in widget.patch_spins:
        spin.setValue(40)  # not a multiple of 16: the engine refuses it (exit 2, one line)
    widget.start_training()
    qtbot.waitUntil(lambda: bool(shown), timeout=WAIT_MS)
    assert shown[0].startswith("training failed:") and "\n" not in shown[0]
    assert "16" in shown[0]


def test_the_panel_follows_typed_events_and_takes_unknown_ones_in_its_stride(panel, monkeypatch):
    viewer, widget = panel
    shown = []
    monkeypatch.setattr("napari_sgrs._napari._widget.show_error", shown.append)
    widget.handle_event(Event(EventKind.PROGRESS, 3, {"loss": 0.5, "total": 6, "grad_norm": 1.0}))
    assert widget.progress.value() == 50 and widget.plot.loss == [0.5]
    assert widget.status_label.text().startswith("step 3/6 · loss 0.5000")
    widget.handle_event(Event(EventKind.REGIONS, 3, {"scope": "batch", "disregarded": 0.25, "inconsistent": 0.125}))
    assert (widget.plot.disregarded, widget.plot.inconsistent) == ([0.25], [0.125])
    widget.handle_event(Event(EventKind.UNKNOWN, 4, {"kind": "epoch"}))  # from a newer trainer
    assert widget.last_event.step == 4 and widget.status_label.text().startswith("step 3/6")
    widget.handle_event(Event(EventKind.ERROR, 5, {"message": "disk full"}), replay=True)  # an old run's
    assert shown == []
    widget.handle_event(Event(EventKind.ERROR, 5, {"message": "disk full"}))
    assert shown == ["training failed: disk full"]


def test_unsafe_checkpoint_is_refused(panel, qtbot, monkeypatch, tmp_path):
    viewer, widget = panel
    shown = []
    monkeypatch.setattr("napari_sgrs._napari._widget.show_error", shown.append)
    widget.write_training_data()
    run = widget.project.new_run(widget.settings())
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.safetensors").write_bytes(pickle.dumps(Evil()))
    widget.request_predict(1)
    qtbot.waitUntil(lambda: bool(shown), timeout=WAIT_MS)
    assert shown[0].startswith("prediction failed:") and not marker.exists()


def test_event_loop_stays_responsive_while_training(panel, qtbot):
    """A 10 ms QTimer keeps firing while training, prediction and layer refreshes happen.

    Bound: 1 s worst gap (and p99 under 100 ms). Training and prediction run in other processes and predictions are read in
    a thread, so what is left on the UI thread is napari itself: creating one Labels layer's
    vispy visuals takes ~0.3 s here (software OpenGL under Xvfb, 2 shared cores), and the panel
    adds one layer per event-loop turn. So the worst gap is one layer creation plus noise from
    the neighbours' processes; training on the UI thread would block for the whole run (>10 s),
    and showing all four new layers in one turn measured ~1.4 s, both of which this catches.
    Measured with one layer per turn: worst ~0.6 s (the first Labels layer with the regions
    colormap, shader compilation included), p99 ~16 ms. 1 s is the usual limit for keeping a
    user's flow; 100 ms the limit for feeling instant, which the p99 must meet.
    """
    viewer, widget = panel
    _tiny(widget, iterations=12)
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    widget.start_training()
    qtbot.waitUntil(lambda: not widget.busy and bool(widget.regions), timeout=WAIT_MS)
    timer.stop()
    gaps = np.diff(ticks)
    print(f"ticks {len(ticks)}, worst gap {1000 * gaps.max():.0f} ms, p99 {1000 * np.percentile(gaps, 99):.0f} ms")
    assert len(ticks) > 100
    assert gaps.max() < 1.0
    assert np.percentile(gaps, 99) < 0.1
