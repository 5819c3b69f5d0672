"""A real napari viewer with the SGRS panel, run as its own process so a test can SIGKILL it.

    python viewer_process.py paint PROJECT LOG [--slow-after K]
        Makes a project with one case, opens it in the panel and paints one voxel of the
        case's label layer every PAINT_S seconds with the brush (edit k gives voxel k the value
        k); each edit is logged as "edit k <unix time>" once it is in the layer, and each of the
        panel's autosaves as "autosaved <cases> <unix time>" once it returned. With --slow-after K,
        every atomic write after the K-th autosave that wrote is held open
        (SGRS_TEST_SLOW_CHECKPOINT), so the next one stays in progress until the process is killed.
    python viewer_process.py train PROJECT LOG IMAGES LABELS
        Loads the folders as layers and presses Start (tiny CPU settings, a checkpoint every
        CHECKPOINT_EVERY steps, far more steps than the test waits for); logs "started <pid>".

The panel's own timers (autosave, polling) run in the Qt event loop, exactly as in napari.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

SHAPE = (8, 16, 16)
PAINT_S = 0.2
CHECKPOINT_EVERY = 10


def edit_voxel(k: int) -> tuple[int, int, int]:
    """The voxel edit k paints (k >= 1): distinct for every k up to 254, inside SHAPE."""
    z, rest = divmod(k, 64)
    y, x = divmod(rest, 8)
    return (1 + z, 2 * y, 2 * x)


def _log(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["paint", "train"])
    parser.add_argument("project")
    parser.add_argument("log")
    parser.add_argument("images", nargs="?")
    parser.add_argument("labels", nargs="?")
    parser.add_argument("--slow-after", type=int, default=0)
    args = parser.parse_args()

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_sgrs._napari._widget import SGRSTrainWidget
    from napari_sgrs.core.io import Geometry
    from napari_sgrs.project.folder import Project

    viewer = napari.Viewer(show=False)
    widget = SGRSTrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="SGRS: train")
    timers = []

    if args.mode == "paint":
        project = Project.create(args.project)
        rng = np.random.default_rng(0)
        project.add_image("c0", rng.normal(size=SHAPE).astype(np.float32), Geometry.identity())
        project.set_label("c0", np.zeros(SHAPE, np.uint8), Geometry.identity())
        project.close()
        widget.open_project(args.project, recover=False)
        layer = widget.layer_for("c0", "label")
        layer.brush_size = 1
        state = {"k": 0, "saves": 0}

        def autosave() -> None:  # the panel's own autosave, logged when it has returned
            saved = widget.autosave()
            _log(args.log, f"autosaved {','.join(saved)} {time.time():.3f}")
            state["saves"] += bool(saved)
            if args.slow_after and state["saves"] >= args.slow_after:
                os.environ["SGRS_TEST_SLOW_CHECKPOINT"] = "600"

        widget.autosave_timer.timeout.disconnect()
        widget.autosave_timer.timeout.connect(autosave)

        def paint() -> None:
            state["k"] += 1
            k = state["k"]
            layer.selected_label = k
            layer.paint(edit_voxel(k), k)
            assert layer.data[edit_voxel(k)] == k, "the brush did not paint the voxel"
            _log(args.log, f"edit {k} {time.time():.3f}")

        timer = QTimer()
        timer.setInterval(int(PAINT_S * 1000))
        timer.timeout.connect(paint)
        timer.start()
        timers.append(timer)
    else:
        widget.open_project(args.project) if os.path.exists(os.path.join(args.project, "project.json")) \
            else widget.set_project(Project.create(args.project))
        widget.load_folder(args.images, args.labels)
        widget.iterations_spin.setValue(100_000)
        for spin in widget.patch_spins:
            spin.setValue(32)
        widget.filters_spin.setValue(2)
        widget.device_combo.setCurrentText("cpu")
        chosen = widget.settings
        widget.settings = lambda: dataclasses.replace(chosen(), checkpoint_every=CHECKPOINT_EVERY)
        widget.start_training()
        _log(args.log, f"started {widget.train_job.pid}")

    _log(args.log, "ready")
    return QApplication.instance().exec_()


if __name__ == "__main__":
    sys.exit(main())
