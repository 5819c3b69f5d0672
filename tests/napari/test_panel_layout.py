"""The panel on a laptop's screen, one case at a time: it fits 1280 x 800 without horizontal
scrolling, shows only the chosen case's layers (table, review list, Next, right after loading and
right after pseudo labels arrive), lays cases side by side on request, and says the next step.
Run under ``xvfb-run -a``; no training (predictions are made up, shown as the panel shows them)."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtWidgets import QApplication, QComboBox

from napari_sgrs._napari._layers import case_of
from napari_sgrs._napari._widget import SGRSTrainWidget
from napari_sgrs.core.codes import Region
from napari_sgrs.core.io import Volume, read_volume
from napari_sgrs.project.folder import Project


def _settle(qtbot, ms=200):
    qtbot.wait(ms)
    QApplication.processEvents()


def _shown_cases(widget) -> set[str]:
    return {case_of(ly) for ly in widget._case_layers() if ly.visible}


def _predictions(cohort) -> dict[str, tuple]:
    """Made-up pseudo labels and region maps for the unlabeled cases: a cube of foreground,
    consistent everywhere (as the engine writes it, background included), inconsistent on a
    shell, disregarded at a corner; the worst case first by its larger inconsistent shell."""
    out = {}
    for i, name in enumerate(cohort.unlabeled_names):
        image = read_volume(cohort.images_tr / f"{name}.nii.gz")
        pred = np.zeros(image.array.shape, np.uint8)
        pred[8:24, 8:24, 8:24] = 1
        regions = np.full(image.array.shape, int(Region.CONSISTENT), np.uint8)
        regions[8:24, 8:24, 8 + i:10 + 2 * i] = Region.INCONSISTENT
        regions[:2, :2, :2] = Region.DISREGARDED
        out[name] = (Volume(pred, image.geometry), Volume(regions, image.geometry))
    return out


@pytest.fixture
def docked(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer(show=True)
    widget = SGRSTrainWidget(viewer, project=Project.create(tmp_path / "project"))
    viewer.window.add_dock_widget(widget, name="SGRS: train", area="right")
    viewer.window._qt_window.resize(1280, 800)
    yield viewer, widget
    widget.shutdown()


def test_the_panel_fits_a_1280x800_screen_without_horizontal_scrolling(docked, qtbot, cohort):
    viewer, widget = docked
    widget.load_folder(cohort.images_tr, cohort.labels_tr)
    # one label dropdown per row, at once: a replaced row's widgets, which Qt deletes only back in
    # its event loop, are not drawn under the new ones meanwhile (a second arrow in each row)
    combos = [c for c in widget.table.findChildren(QComboBox) if c.isVisible()]
    assert len(combos) == widget.table.rowCount() == len(cohort.train_names)
    _settle(qtbot)
    content = widget.scroll.widget()
    assert content.minimumSizeHint().width() <= widget.scroll.viewport().width()
    assert not widget.scroll.horizontalScrollBar().isVisible()
    # the canvas keeps most of the screen: the panel takes under a third of 1280 px
    assert widget.width() <= 1280 // 3 and viewer.window._qt_viewer.canvas.native.width() >= 500
    # the review actions and the next step are on top, visible without scrolling
    for button in (widget.next_button, widget.accept_button, widget.retrain_button, widget.export_button):
        assert button.isVisible() and not widget.scroll.isAncestorOf(button)
        assert button.visibleRegion().boundingRect().width() == button.width()  # not clipped
    assert widget.next_step_label.isVisible() and "Start" in widget.next_step_label.text()
    legend = {w.objectName() for w in widget.findChildren(type(widget.next_step_label)) if w.isVisible()}
    assert {"legend_disregarded", "legend_consistent", "legend_inconsistent", "legend_pseudo"} <= legend
    assert not any(widget.scroll.isAncestorOf(w) for w in widget.findChildren(type(widget.next_step_label))
                   if w.objectName().startswith("legend_"))


# napari warns once, on the switch to 3D, before the panel can turn the outline off (its callbacks come first)
@pytest.mark.filterwarnings("ignore:Contours are not displayed during 3D rendering")
def test_one_case_at_a_time_from_loading_to_review(docked, qtbot, cohort):
    viewer, widget = docked
    first, second = cohort.train_names[:2]
    widget.load_folder(cohort.images_tr, cohort.labels_tr)
    assert _shown_cases(widget) == {first}  # loading several cases shows the first alone
    assert widget.layer_for(first, "label").visible
    # a volume opened from napari's menu (its reader adds the layer) starts hidden too
    extra = read_volume(cohort.images_tr / f"{first}.nii.gz").array
    viewer.add_image(extra, name="another case")
    assert not viewer.layers["another case"].visible and _shown_cases(widget) == {first}
    viewer.layers.remove("another case")
    widget._show_table_row(1)  # a click on the table's second row
    assert _shown_cases(widget) == {second}
    assert widget.canvas_note.visible and widget.canvas_note.text.startswith(second)

    # pseudo labels arrive after training: the case to review first is shown, alone
    widget.show_predictions(_predictions(cohort))
    qtbot.waitUntil(lambda: not widget._ui_steps, timeout=10_000)
    worst = widget.queue.items[0].name
    assert _shown_cases(widget) == {second}  # the case the user chose stays
    n = len(widget.queue.items)
    assert widget.next_step_label.text() == f"Review: {n} volumes, worst first. Next opens {worst}."
    assert widget.next_case() == worst
    assert _shown_cases(widget) == {worst}
    shown = {widget._role(ly) for ly in widget._case_layers() if ly.visible}
    assert shown == {"image", "pseudo", "regions"}
    following = widget.queue.items[1].name
    assert widget.next_step_label.text().endswith(f"Next opens {following}.")
    assert widget.next_step_label.text().startswith(f"Reviewing {worst} (1 of {n})")
    widget.queue_list.itemClicked.emit(widget.queue_list.item(1))  # a click in the review list
    assert _shown_cases(widget) == {following}

    # the pseudo label is an outline above the regions; consistent is not painted on background
    pseudo, regions = widget.layer_for(following, "pseudo"), widget.layer_for(following, "regions")
    assert pseudo.contour > 0
    assert viewer.layers.index(regions) < viewer.layers.index(pseudo)
    background = widget.model_predictions[following] == 0
    assert not np.any(regions.data[background] == Region.CONSISTENT)
    assert np.any(regions.data[~background] == Region.CONSISTENT)
    assert np.any(widget.regions[following][background] == Region.CONSISTENT)  # the map itself keeps them
    viewer.dims.ndisplay = 3  # regions: only what to review; the pseudo label: a surface
    assert float(regions.colormap.map(np.array([int(Region.CONSISTENT)]))[0][3]) == 0 and pseudo.contour == 0
    viewer.dims.ndisplay = 2
    assert float(regions.colormap.map(np.array([int(Region.CONSISTENT)]))[0][3]) > 0 and pseudo.contour > 0

    # accepting the last one leaves nothing to review; Next then opens the one after it
    widget.accept_current(following)
    assert widget.queue.peek().name != following
    assert _shown_cases(widget) == {following}


def test_grid_shows_every_case_side_by_side_each_with_its_own_layers(docked, qtbot, cohort):
    viewer, widget = docked
    widget.load_folder(cohort.images_tr, cohort.labels_tr)
    widget.show_predictions(_predictions(cohort))
    qtbot.waitUntil(lambda: not widget._ui_steps, timeout=10_000)
    widget.grid_check.setChecked(True)  # the checkbox, as a click does
    layers = list(viewer.layers)
    assert widget.grid.enabled and _shown_cases(widget) == set(cohort.train_names)
    positions: dict[str, set] = {}
    for i, layer in enumerate(layers):
        if layer.visible:
            positions.setdefault(case_of(layer), set()).add(widget.grid.position(i, layers))
    assert all(len(p) == 1 for p in positions.values()), positions  # a case's layers share one view
    assert len({next(iter(p)) for p in positions.values()}) == len(cohort.train_names)  # one view per case
    widget.grid_check.setChecked(False)
    assert not widget.grid.enabled and len(_shown_cases(widget)) == 1
    assert not [ly for ly in viewer.layers if widget._role(ly) == "spacer"]


def test_after_accept_next_opens_the_case_after_the_accepted_one():
    """The review queue behind Next and the next-step line: accepting the case under review
    must not skip the one after it."""
    from napari_sgrs.project.review import ReviewQueue

    maps = {}
    for name, n_inconsistent in (("a", 3), ("b", 2), ("c", 1)):
        regions = np.full((4, 4, 4), int(Region.CONSISTENT), np.uint8)
        regions.flat[:n_inconsistent] = Region.INCONSISTENT
        maps[name] = regions
    queue = ReviewQueue(maps)
    assert queue.peek().name == "a" and queue.next().name == "a"
    queue.remove("a")  # accepted
    assert queue.peek().name == "b" and queue.next().name == "b"
    queue.remove("c")  # another one, after the cursor, accepted from the list
    assert queue.next().name == "b" and queue.peek().name == "b"
