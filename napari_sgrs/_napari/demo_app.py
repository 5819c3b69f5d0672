"""Open napari with the demo cohort and the "SGRS: train" panel docked.

    python -m napari_sgrs._napari.demo_app                      # a person drives it
    xvfb-run -a python -m napari_sgrs._napari.demo_app --headless-screenshot shot.png

With ``--headless-screenshot`` the same loop runs without a person: a CPU training with the
panel's ``preview`` setting (settings.PRESETS) in the background, pseudo labels and synergy regions for the unlabeled volumes, "Next" to the
worst volume, then a screenshot of the whole viewer window (and, with ``--panel-screenshot``,
of the panel alone). Exit code 0 on success, 1 if the loop did not finish in ``--timeout``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path


def prefer_qt6() -> None:
    """Run on PyQt6 where it is installed beside PyQt5 (an environment made before the napari extra
    moved to PyQt6): qtpy would pick PyQt5, which napari deprecates. An explicit QT_API wins."""
    if "QT_API" not in os.environ and importlib.util.find_spec("PyQt6") is not None:
        os.environ["QT_API"] = "pyqt6"


def build_viewer(project_dir: Path | None, shape: int, n_cases: int, n_labeled: int, show: bool = True):
    import napari

    from napari_sgrs.project.folder import Project

    from ._sample_data import make_demo_data
    from ._widget import SGRSTrainWidget

    viewer = napari.Viewer(title="napari-sgrs demo", show=show)
    for data, kwargs, kind in make_demo_data(shape=(shape,) * 3, n_cases=n_cases, n_labeled=n_labeled):
        (viewer.add_image if kind == "image" else viewer.add_labels)(data, **kwargs)
    project = Project.create(project_dir) if project_dir is not None else None
    widget = SGRSTrainWidget(viewer, project=project)
    # the demo trains with the panel's CPU setting (settings.PRESETS["preview"]), GPU or not: minutes
    widget.choose_preset("preview")
    viewer.window.add_dock_widget(widget, name="SGRS: train", area="right")
    return viewer, widget


def run_headless(args) -> int:
    from qtpy.QtWidgets import QApplication, QScrollArea

    project_dir = Path(args.project or tempfile.mkdtemp(prefix="sgrs-demo-project-"))
    viewer, widget = build_viewer(project_dir, args.shape, args.cases, args.labeled)
    viewer.window._qt_window.resize(1500, 1000)
    widget.device_combo.setCurrentText(args.device)
    if args.iterations is not None:
        widget.iterations_spin.setValue(args.iterations)
    if args.base_filters is not None:
        widget.filters_spin.setValue(args.base_filters)
    for spin in widget.patch_spins:  # a patch no larger than a small demo volume, in multiples of 16
        spin.setValue(min(spin.value(), args.shape // 16 * 16))
    s = widget.settings()
    print(f"training in the panel: {s.iterations} steps, patch {'x'.join(map(str, s.patch_size))}, "
          f"{s.base_filters} filters on {args.device} (the preview setting); project {project_dir}", flush=True)
    widget.start_training()
    app = QApplication.instance()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and (widget.busy or not widget.regions):
        app.processEvents()
        time.sleep(0.02)
    if widget.busy or not widget.regions:
        print(f"error: the demo loop did not finish within {args.timeout} s", file=sys.stderr)
        widget.shutdown()
        return 1
    viewer.dims.ndisplay = 2
    widget.next_case()
    viewer.reset_view()
    widget.focus_on_region(widget.current_case)
    image = widget.layer_for(widget.current_case, "image")
    if image is not None:
        image.visible = True
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    try:  # toasts (napari's notices) would cover the canvas
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()
    except Exception:  # noqa: BLE001 - private napari API; the screenshot is still useful
        pass
    app.processEvents()
    out = Path(args.headless_screenshot)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False)
    if args.panel_screenshot:
        Path(args.panel_screenshot).parent.mkdir(parents=True, exist_ok=True)
        panel = widget.findChild(QScrollArea).widget()  # the whole panel, not the scrolled view
        panel.grab().save(str(args.panel_screenshot))
    print(f"screenshot: {out} (project {project_dir})")
    widget.shutdown()
    viewer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="napari-sgrs-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--headless-screenshot", metavar="PATH",
                        help="run the loop without a person and save a screenshot of the viewer")
    parser.add_argument("--panel-screenshot", metavar="PATH", help="with --headless-screenshot: also the panel alone")
    parser.add_argument("--project", help="project folder (default: a new temporary one)")
    parser.add_argument("--shape", type=int, default=48, help="demo volume edge (voxels)")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--labeled", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=None, help="default: the preview setting's")
    parser.add_argument("--base-filters", type=int, default=None, help="default: the preview setting's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds the headless loop may take (about 2 min on 2 quiet CPU cores)")
    args = parser.parse_args(argv)
    prefer_qt6()
    if args.headless_screenshot:
        return run_headless(args)
    import napari

    build_viewer(Path(args.project) if args.project else None, args.shape, args.cases, args.labeled)
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
