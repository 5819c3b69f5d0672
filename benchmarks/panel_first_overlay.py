"""Time from the panel's Start to its first overlay (pseudo label and regions), on a CPU.

What a user of the napari panel waits for, in the panel itself (run under ``xvfb-run -a``): the
demo cohort of ``preview_benchmark.py`` (8 x 48^3, 4 labeled) loaded as layers, the panel's
settings as it starts them without a GPU (the ``preview`` preset, project/folder.py panel_preset),
Start pressed, and the wall time until every unlabeled volume shows a ``regions`` layer: the
first checkpoint's (the panel predicts at each checkpoint while training goes on).

    xvfb-run -a python benchmarks/panel_first_overlay.py --workdir /tmp/panel_bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("panel_bench"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    os.environ.setdefault("QT_API", "pyqt6")  # the binding the napari extra installs (tests/napari/conftest.py)
    import napari
    from qtpy.QtWidgets import QApplication

    from _machine import cpu_name  # benchmarks/ is on sys.path when a script there runs
    from napari_sgrs._napari import _widget
    from napari_sgrs.core.demo import make_demo_cohort
    from napari_sgrs.project.folder import Project

    _widget.detect_gpu = lambda: ""  # the CPU panel, whatever this machine has
    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    cohort = make_demo_cohort(work / "data", kind="blob", n_cases=8, n_labeled=4, n_test=4, shape=(48, 48, 48),
                              seed=args.seed)
    viewer = napari.Viewer(show=False)
    widget = _widget.SGRSTrainWidget(viewer, project=Project.create(work / "project"))
    viewer.window.add_dock_widget(widget, name="SGRS: train")
    widget.load_folder(cohort.images_tr, cohort.labels_tr)
    settings = widget.settings()
    load_before = os.getloadavg()
    t0 = time.time()
    widget.start_training()
    unlabeled = widget.project.unlabeled_cases()
    app = QApplication.instance()
    first_step = None
    while time.time() - t0 < args.timeout:
        app.processEvents()
        if first_step is None and widget._step_s is not None:
            first_step = time.time() - t0
        if unlabeled and all(widget.layer_for(n, "regions") is not None for n in unlabeled):
            break
        time.sleep(0.05)
    else:
        print("timed out", file=sys.stderr)
        return 1
    elapsed = time.time() - t0
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()], "preset": widget.preset,
              "settings": {k: getattr(settings, k) for k in ("iterations", "patch_size", "base_filters",
                                                             "checkpoint_every")},
              "start_to_first_eta_s": None if first_step is None else round(first_step, 1),
              "start_to_first_overlay_s": round(elapsed, 1), "overlay_step": widget._predict_step}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    widget.shutdown(timeout=5)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
