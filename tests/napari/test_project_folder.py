"""Start and the project folder (issue 22, item 10): the user chooses or confirms where the project
goes, and nothing is written anywhere before the chosen layers make a valid training set.

The training subprocess itself is left out (``_launch`` is replaced): what is checked here is
what Start writes on disk before it launches anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication, QMessageBox

from napari_sgrs._napari._widget import SGRSTrainWidget


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty home folder: the default suggestion lives there, so anything written shows."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert Path.home() == home
    return home


@pytest.fixture
def panel(make_napari_viewer, monkeypatch, home):
    """A panel with no project; the folder question and the launch are recorded."""
    viewer = make_napari_viewer()
    widget = SGRSTrainWidget(viewer)
    asked, launched, shown = [], [], []
    widget.answer = None  # what the "user" answers: a folder, or None (cancel)

    def ask(suggestion):
        asked.append(suggestion)
        return widget.answer

    monkeypatch.setattr(widget, "ask_project_folder", ask)
    monkeypatch.setattr(widget, "_launch", lambda run, resume, settings: launched.append(run) or run)
    monkeypatch.setattr("napari_sgrs._napari._widget.show_error", shown.append)
    yield viewer, widget, asked, launched, shown
    widget.shutdown()


def _files(home: Path) -> list[Path]:
    """What is in the home folder, less the caches and settings (dot folders) Qt and matplotlib keep."""
    return sorted(p for p in home.iterdir() if not p.name.startswith("."))


def test_start_without_an_image_layer_writes_nothing(panel, home, tmp_path):
    _viewer, widget, asked, launched, shown = panel
    widget.answer = tmp_path / "chosen"
    widget.start_button.click()  # as the user does: the error is a notification
    assert shown == ["no image layer chosen: open images (or the demo data) and tick 'use'"]
    assert asked == [] and launched == [] and widget.project is None
    assert _files(home) == [] and not (tmp_path / "chosen").exists()


def test_start_with_invalid_labels_writes_nothing(panel, home, cohort, tmp_path):
    viewer, widget, asked, launched, shown = panel
    widget.answer = tmp_path / "chosen"
    widget.load_folder(cohort.images_tr)  # images only: no labeled volume
    widget.start_button.click()
    assert shown == ["no labeled volume: choose a Labels layer for at least one image"]
    image = cohort.train_names[0]
    viewer.add_labels(viewer.layers[image].data[:-1].astype("uint8"), name="wrong label")
    widget.refresh_table()
    widget.set_label_for(image, "wrong label")
    widget.start_button.click()
    assert shown[-1].startswith("label layer 'wrong label' has shape") and "choose the matching label" in shown[-1]
    assert asked == [] and launched == [] and widget.project is None
    assert _files(home) == [] and not (tmp_path / "chosen").exists()


def test_start_with_valid_inputs_asks_and_creates_the_project_there(panel, home, cohort, tmp_path):
    _viewer, widget, asked, launched, shown = panel
    widget.load_folder(cohort.images_tr, cohort.labels_tr)
    chosen = tmp_path / "chosen"
    widget.answer = None  # cancelled: nothing written, no error
    assert widget.start_training() is None
    assert len(asked) == 1 and launched == [] and shown == [] and widget.project is None
    assert _files(home) == [] and not chosen.exists()
    # the suggestion is a new folder of its own under the home folder, for the user to confirm
    assert asked[0].parent == home / "napari-sgrs-projects" and not asked[0].exists()

    widget.answer = chosen
    run = widget.start_training()
    assert len(asked) == 2 and launched == [run] and shown == []
    assert widget.project.root == chosen and (chosen / "project.json").exists()
    assert run.is_relative_to(chosen)
    assert sorted(widget.project.case_names()) == sorted(cohort.train_names)
    assert sorted(widget.project.labeled_cases()) == sorted(cohort.labeled_names)
    assert _files(home) == []
    # the project is the panel's now: a second Start asks no more
    widget.start_training()
    assert len(asked) == 2


def test_the_folder_dialog_confirms_the_suggestion_or_cancels(make_napari_viewer, tmp_path):
    """The real dialog, answered by clicking its buttons."""
    widget = SGRSTrainWidget(make_napari_viewer())
    suggestion = tmp_path / "napari-sgrs-projects" / "project-1"
    seen = []

    def click(text):
        def answer():
            box = QApplication.activeModalWidget()
            if not isinstance(box, QMessageBox):
                QTimer.singleShot(20, answer)  # not shown yet
                return
            seen.append(box.text())
            next(b for b in box.buttons() if b.text() == text).click()
        QTimer.singleShot(20, answer)

    click("Create here")
    assert widget.ask_project_folder(suggestion) == suggestion
    assert str(suggestion) in seen[0]
    click("Cancel")
    assert widget.ask_project_folder(suggestion) is None
    assert not suggestion.exists()  # asking writes nothing
    widget.shutdown()
