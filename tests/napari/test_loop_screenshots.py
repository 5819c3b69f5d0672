"""The loop a clinician walks, load -> train -> review -> correct -> export, on a 1280 x 800
window, with a screenshot of the viewer at each step for a person to look at:
``1-load.png`` ... ``5-export.png`` in ``$SGRS_SCREENSHOTS`` (default ``build/screenshots/``),
and the review step as seen with protanopia, deuteranopia and tritanopia (``3-review-<kind>.png``).

Small settings (32^3 volumes, 30 steps, 4 base filters): seconds of training on one thread.
Run under ``xvfb-run -a``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from cvd import MACHADO_2009, simulate_image
from qtpy.QtWidgets import QApplication

from napari_sgrs._napari._layers import LABEL_COLOURS, case_of
from napari_sgrs._napari._widget import SGRSTrainWidget
from napari_sgrs.project.folder import Project
from napari_sgrs.project.review import largest_region

WAIT_MS = 180_000
SIZE = (1280, 800)
ITERATIONS, FILTERS = 30, 4  # enough for a blob-shaped pseudo label to look at; the run takes seconds


def screenshot_dir() -> Path:
    folder = Path(os.environ.get("SGRS_SCREENSHOTS") or Path(__file__).parents[2] / "build" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _close_toasts(viewer) -> None:
    """napari's notices would cover the canvas in the screenshot (they are shown, and tested, elsewhere)."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()


def _shoot(viewer, qtbot, name: str) -> np.ndarray:
    qtbot.wait(300)
    _close_toasts(viewer)
    QApplication.processEvents()
    path = screenshot_dir() / name
    image = viewer.screenshot(str(path), canvas_only=False)
    assert path.exists() and image.shape[1] >= SIZE[0] - 20
    return image


def _pixels_near(image: np.ndarray, colour: str, tol: int = 40) -> int:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int(np.count_nonzero(np.abs(image[..., :3].astype(int) - rgb).max(-1) <= tol))


def test_the_loop_in_screenshots(make_napari_viewer, qtbot, tmp_path, cohort):
    viewer = make_napari_viewer(show=True)
    widget = SGRSTrainWidget(viewer, project=Project.create(tmp_path / "project"))
    viewer.window.add_dock_widget(widget, name="SGRS: train", area="right")
    viewer.window._qt_window.resize(*SIZE)
    try:
        # 1. load: four volumes, two labeled; the first is shown alone, with its label
        widget.load_folder(cohort.images_tr, cohort.labels_tr)
        _shoot(viewer, qtbot, "1-load.png")

        # 2. train: a tiny CPU run; its pseudo labels arrive and the worst case is shown
        widget.iterations_spin.setValue(ITERATIONS)
        for spin in widget.patch_spins:
            spin.setValue(32)
        widget.filters_spin.setValue(FILTERS)
        widget.device_combo.setCurrentText("cpu")
        widget.start_training()
        unlabeled = cohort.unlabeled_names
        qtbot.waitUntil(lambda: len(widget.queue.items) == len(unlabeled) and not widget.busy, timeout=WAIT_MS)
        worst = widget.queue.items[0].name
        shown = {case_of(ly) for ly in widget._case_layers() if ly.visible}
        assert shown == {widget.current_case}  # the new pseudo labels of other cases arrive hidden
        assert widget.next_step_label.text().startswith(f"Review: {len(unlabeled)} volumes, worst first. "
                                                        f"Next opens {worst}.")
        _shoot(viewer, qtbot, "2-train.png")

        # 3. review: Next centres the worst case on its largest region to review
        assert widget.next_case() == worst
        image = _shoot(viewer, qtbot, "3-review.png")
        pseudo = widget.layer_for(worst, "pseudo")
        assert widget.canvas_note.text.startswith(worst) and pseudo.visible
        import imageio.v3 as iio

        for kind in MACHADO_2009:
            iio.imwrite(screenshot_dir() / f"3-review-{kind}.png", simulate_image(image, kind))
        # the queue says each volume's estimated Dice and flagged share, the header how far to trust
        # the colours; the reliability layer is there on request, for the case shown only
        assert all(it.estimated_dice is not None for it in widget.queue.items)
        assert "est. Dice" in widget.queue_list.item(0).text() and "flagged" in widget.queue_list.item(0).text()
        assert widget.trust_label.text().startswith("No validation split")  # 2 labeled volumes: no split
        widget.reliability_check.setChecked(True)
        reliability = widget.layer_for(worst, "reliability")
        assert reliability is not None and reliability.visible
        assert 0 <= reliability.data.min() <= reliability.data.max() <= 1
        assert [case_of(ly) for ly in viewer.layers if widget._role(ly) == "reliability"] == [worst]
        _shoot(viewer, qtbot, "3-review-reliability.png")
        widget.reliability_check.setChecked(False)
        assert widget.layer_for(worst, "reliability") is None
        widget.show_case(worst, focus=True)

        # 4. correct: a stroke of foreground across the region Next centred on, on the slice shown
        focus = largest_region(widget.regions[worst])
        z, y, x = (round(c) for c in focus.center)
        pseudo.selected_label = 1
        pseudo.brush_size = 3
        before = np.array(pseudo.data)
        for dx in range(-4, 5):
            pseudo.paint((z, y, min(max(x + dx, 0), pseudo.data.shape[2] - 1)), 1)
        assert np.any(pseudo.data != before)
        assert viewer.dims.current_step[0] == z  # the stroke is on the slice the screenshot shows
        _shoot(viewer, qtbot, "4-correct.png")
        canvas = viewer.screenshot(canvas_only=True)
        assert _pixels_near(canvas, LABEL_COLOURS[0]) > 20  # the outline is drawn, in the legend's colour
        widget.accept_current()
        assert widget.project.label_path(worst).exists()

        # 5. export: every label and pseudo label, with provenance sidecars
        written = widget.export(tmp_path / "export")
        assert any(p.name == f"{worst}.nii.gz" for p in written)
        assert widget.next_step_label.text().startswith(f"Exported {len(cohort.train_names)} volumes")
        _shoot(viewer, qtbot, "5-export.png")
    finally:
        widget.shutdown()
