"""The "SGRS: train" panel: train in the background, review pseudo labels by synergy region, correct.

Thin by design: the project folder, provenance, review ranking, commands and the background
process live in :mod:`napari_sgrs.project`. Training and prediction run as ``sgrs``
subprocesses; a QTimer polls their ``events.jsonl`` and exit codes, and prediction outputs
are read in a worker thread, so nothing slow runs on the UI thread.

A viewer killed at any moment loses at most one autosave interval of label edits (the journal,
see :meth:`SGRSTrainWidget.autosave`), and its training run goes on: reopening the project
follows it, or offers Resume when it is gone (``TrainerProcess`` in ``project/jobs.py``). A
project is open in one viewer at a time (its folder lock); a second one is refused, naming the
first.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QFileDialog, QFormLayout,
                            QGridLayout, QGroupBox, QHBoxLayout, QHeaderView, QLabel, QListWidget,
                            QListWidgetItem, QMessageBox, QProgressBar, QPushButton, QScrollArea, QSizePolicy, QSpinBox,
                            QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from napari_sgrs.core.codes import IGNORE_INDEX, Region
from napari_sgrs.core.errors import SGRSError
from napari_sgrs.core.events import Event, EventFollower, EventKind
from napari_sgrs.core.runfolder import RunFolder
from napari_sgrs.core.settings import METHOD_LABELS, METHODS, PRESET_HELP, PRESETS, TrainConfig
from napari_sgrs.project.folder import PANEL_PRESETS, Project, mark_unpainted_slices, panel_config, panel_preset
from napari_sgrs.project.jobs import Job, TrainerProcess, predict_command, stop_grace_s, train_command
from napari_sgrs.project.review import ReviewQueue, largest_region

from ._layers import (LABEL_COLOURS, LABEL_OPACITY, LABEL_SUFFIX, PSEUDO_CONTOUR, PSEUDO_SUFFIX, REGIONS_OPACITY,
                      REGIONS_SUFFIX, RELIABILITY_SUFFIX, case_of, geometry_of, layer_data_from_volume, layer_meta,
                      regions_colormap, regions_for_display, sgrs_meta)

POLL_MS = 250          # how often the panel reads events.jsonl and checks the processes
AUTOSAVE_MS = 3000     # label edits since the last Accept are journaled this often
REGIONS_OPACITY_3D = 0.8  # regions are surfaces in 3D, seen through the pseudo label: stronger than in 2D
PSEUDO_OPACITY_3D = 0.4  # a pseudo label's surface in 3D: the regions inside it show through
PANEL_WIDTH = 380      # px the panel asks its dock for (it fits down to its minimum width)
LONG_RUN_S = 3600.0    # a run projected to take longer gets a warning naming a smaller setting
NO_VALIDATION_NOTE = ("no validation split (fewer than 3 labeled volumes): the plot shows the training loss "
                      "and the region shares, no validation Dice")
NO_LABEL = "(unlabeled)"
#: The data table's columns, by index: a new column goes at the end, with its own constant.
TABLE_COLUMNS = ["use", "image", "label layer"]
COL_USE, COL_IMAGE, COL_LABEL = range(3)
PSEUDO_LEGEND = "the model's segmentation, an outline (a surface in 3D): paint to correct it"
CASE_KINDS = ("image", "labels")  # the layer types that belong to a case and are shown one case at a time

PARTIAL_HELP = (f"Partly labeled volumes: voxels with value {IGNORE_INDEX} are unannotated and "
                "ignored by training (not taken as background). Label a few slices and tick the "
                f"box to mark every axial slice without a painted voxel as {IGNORE_INDEX}.")


def detect_gpu() -> str:
    """A short description of the CUDA device, or '' without one (torch imported lazily)."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    except Exception:  # noqa: BLE001 - a broken CUDA install must not break the panel
        pass
    return ""


class SGRSTrainWidget(QWidget):
    """Dock widget; every button has a method of the same meaning, which tests call directly."""

    def __init__(self, napari_viewer, project: Project | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.project: Project | None = project
        self.train_job: Job | TrainerProcess | None = None
        self.predict_job: Job | None = None
        self._predict_step = 0
        self._pending_predict_step: int | None = None
        self._events: EventFollower | None = None  # the current run's events.jsonl
        self._error_shown = False
        self._total = 0
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sgrs-load")
        self._load_future: Future | None = None
        self.model_predictions: dict[str, np.ndarray] = {}  # case -> the prediction shown for editing
        self.regions: dict[str, np.ndarray] = {}
        self.estimates: dict[str, dict] = {}  # each case's line of the latest review.json
        self.queue = ReviewQueue()
        self.current_case: str | None = None
        self._dirty: set[str] = set()        # cases with edits not yet accepted
        self._journaled: dict[str, np.ndarray] = {}  # case -> the data its last autosave wrote
        self._watched: set[int] = set()
        self.last_event: Event | None = None
        self._label_choice: dict[str, str] = {}
        self._ui_steps: list = []  # layer updates waiting for their event-loop turn  # image layer -> Labels layer the user picked
        self.gpu = detect_gpu()
        self.preset = panel_preset(bool(self.gpu))  # the boxes' starting point, and the rest of the settings
        self._step_s: float | None = None    # the run's measured seconds a step (progress events)
        self._long_run_warned = False
        self._stopped_event: Event | None = None
        self._exported = ""  # what the last export wrote, for the next-step line
        self._build_ui()

        self.poll_timer = QTimer(self)
        self.poll_timer.setInterval(POLL_MS)
        self.poll_timer.timeout.connect(self.poll)
        self.autosave_timer = QTimer(self)
        self.autosave_timer.setInterval(AUTOSAVE_MS)
        self.autosave_timer.timeout.connect(self.autosave)
        self.autosave_timer.start()
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        # napari's own callbacks run first (a plugin's cannot precede them), so the switch to 3D
        # warns once that outlines are not drawn in 3D; the outline is then off until back in 2D
        self.viewer.dims.events.ndisplay.connect(self._on_ndisplay)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self.viewer.layers.events.inserted.connect(self._watch_layer)
        for layer in self.viewer.layers:
            self._watch_layer(layer=layer)
        self.refresh_table()
        images = self._layers("image")
        if images:  # layers opened before the panel: one case at a time from the start
            self.show_case(case_of(images[0]))
        if project is not None:
            self.set_project(project)
        self._update_buttons()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        # Everything sits in a scroll area so the plot and lists keep a usable size in a short dock.
        # What to do next, the review actions and the legend stay on top, outside the scrolling part:
        # after training they are the whole task, and the legend explains the canvas at any scroll.
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self._build_header())
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        content = QWidget()
        scroll.setWidget(content)
        outer.addWidget(scroll, 1)
        self.scroll = scroll
        root = QVBoxLayout(content)

        box = QGroupBox("Project")
        lay = QHBoxLayout(box)
        self.project_label = QLabel("no project yet: Start asks where to create it")
        self.project_label.setWordWrap(True)
        # a long folder path cannot wrap: it is cut at the dock's edge (the tooltip has it whole)
        # rather than widening the panel past a laptop's screen
        self.project_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.project_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.new_button = QPushButton("New…")
        self.open_button = QPushButton("Open project…")
        self.new_button.clicked.connect(self._ask_new_project)
        self.open_button.clicked.connect(self._ask_open_project)
        lay.addWidget(self.project_label, 1)
        for b in (self.new_button, self.open_button):
            b.setMinimumWidth(0)
            lay.addWidget(b)
        root.addWidget(box)

        box = QGroupBox("Data: image layers and their labels")
        lay = QVBoxLayout(box)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(TABLE_COLUMNS)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Stretch)  # the columns share the width there is
        header.setSectionResizeMode(COL_USE, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setMinimumHeight(120)
        self.table.setToolTip("click a row to show that volume alone")
        self.table.cellClicked.connect(lambda row, _col: self._show_table_row(row))
        lay.addWidget(self.table)
        row = QHBoxLayout()
        self.folder_button = QPushButton("Load folder…")
        self.folder_button.setToolTip("Open an images folder (and a labels folder) as layers")
        self.folder_button.clicked.connect(self._ask_load_folder)
        row.addWidget(self.folder_button)
        row.addStretch(1)
        self.grid_check = QCheckBox("all side by side")
        self.grid_check.setToolTip("a grid of every volume, each with its label or pseudo label and regions "
                                   "(off: one volume at a time)")
        self.grid_check.toggled.connect(self.set_grid)
        row.addWidget(self.grid_check)
        lay.addLayout(row)
        self.partial_check = QCheckBox(f"unpainted slices are unannotated ({IGNORE_INDEX})")
        self.partial_check.setToolTip(PARTIAL_HELP)
        lay.addWidget(self.partial_check)
        help_label = QLabel(PARTIAL_HELP)
        help_label.setWordWrap(True)
        help_label.setStyleSheet("font-size: 10px; color: #aaa;")
        lay.addWidget(help_label)
        root.addWidget(box)

        box = QGroupBox("Training")
        form = QFormLayout(box)
        self.method_combo = QComboBox()
        for key in METHODS:  # shown by name, kept as the method key (TrainConfig.method)
            self.method_combo.addItem(METHOD_LABELS[key], key)
        self.iterations_spin = QSpinBox()
        self.iterations_spin.setRange(1, 1_000_000)
        patch = QHBoxLayout()
        self.patch_spins = []
        for _ in range(3):
            spin = QSpinBox()
            # napari's theme gives a spin box wide -/+ buttons: three in a row would not fit a laptop's dock
            spin.setButtonSymbols(QSpinBox.ButtonSymbols.NoButtons)
            spin.setStyleSheet("QSpinBox { min-width: 30px; }")
            spin.setRange(16, 512)
            spin.setSingleStep(16)
            self.patch_spins.append(spin)
            patch.addWidget(spin)
        self.filters_spin = QSpinBox()
        self.filters_spin.setRange(2, 64)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu"] + (["cuda"] if self.gpu else []))
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(PANEL_PRESETS)
        for i, name in enumerate(PANEL_PRESETS):
            self.preset_combo.setItemData(i, PRESET_HELP[name], Qt.ItemDataRole.ToolTipRole)
        self.preset_combo.setCurrentText(self.preset)
        self.preset_combo.setToolTip("fills the boxes below with a named setting")
        self.preset_combo.textActivated.connect(self.choose_preset)
        self.gpu_label = QLabel(f"GPU: {self.gpu}" if self.gpu else
                                f"no GPU detected: training runs on the CPU, so the boxes start from the "
                                f"{self.preset} setting: {PRESET_HELP[self.preset]}")
        self.gpu_label.setWordWrap(True)
        self.apply_settings(panel_config(preset=self.preset))  # the device's preset (project/folder.py)
        form.addRow("setting", self.preset_combo)
        form.addRow("method", self.method_combo)
        form.addRow("iterations", self.iterations_spin)
        form.addRow("patch D H W", patch)
        form.addRow("base filters", self.filters_spin)
        form.addRow("device", self.device_combo)
        form.addRow("", self.gpu_label)
        buttons = QHBoxLayout()
        self.start_button = QPushButton("Start")
        self.stop_button = QPushButton("Stop")
        self.resume_button = QPushButton("Resume")
        self.start_button.clicked.connect(lambda: self._guard(self.start_training))
        self.stop_button.clicked.connect(lambda: self._guard(self.stop_training))
        self.resume_button.clicked.connect(lambda: self._guard(self.resume_training))
        for b in (self.start_button, self.stop_button, self.resume_button):
            b.setMinimumWidth(0)  # napari's theme asks 120 px a button: three would not fit a laptop's dock
            buttons.addWidget(b)
        form.addRow(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        form.addRow(self.progress)
        self.status_label = QLabel("idle")
        self.status_label.setWordWrap(True)
        form.addRow(self.status_label)
        self.validation_label = QLabel("")  # why the plot has no validation Dice, when it has none
        self.validation_label.setWordWrap(True)
        self.validation_label.setVisible(False)
        form.addRow(self.validation_label)
        from ._plot import TrainingPlot

        self.plot = TrainingPlot(self)
        form.addRow(self.plot)
        root.addWidget(box)

        box = QGroupBox("Review pseudo labels")
        lay = QVBoxLayout(box)
        self.queue_list = QListWidget()
        self.queue_list.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.queue_list.setMinimumHeight(90)
        self.queue_list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.queue_list.setWordWrap(True)
        self.queue_list.itemClicked.connect(
            lambda item: self.show_case(item.data(Qt.ItemDataRole.UserRole), focus=True))
        note = QLabel("worst first (lowest estimated Dice, with its interval; flagged: share of the volume "
                      "in the disregarded or inconsistent region); click one to show it:")
        note.setWordWrap(True)
        lay.addWidget(note)
        lay.addWidget(self.queue_list)
        self.reliability_check = QCheckBox("reliability layer")
        self.reliability_check.setToolTip("for the case shown: the test views' probability (0-1) of its label; "
                                          "dark where the label is likely wrong")
        self.reliability_check.toggled.connect(lambda _on: self._guard(self._sync_reliability))
        lay.addWidget(self.reliability_check)
        self.export_selected_check = QCheckBox("export only the cases selected above")
        lay.addWidget(self.export_selected_check)
        root.addWidget(box)
        root.addStretch(1)
        # Wide enough for the content at its smallest (texts wrap, the table's columns share the
        # width), so the scroll area only ever scrolls vertically; and no wider, so the panel fits
        # beside a usable canvas on a 1280 px screen (tests/napari/test_panel_layout.py).
        self.setMinimumWidth(content.minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width() + 4)

    def sizeHint(self):  # noqa: N802 - Qt name
        """The width napari docks the panel at: enough for every box without wrapping much, and
        narrow enough to leave the canvas most of a 1280 px screen (the minimum is smaller still)."""
        hint = super().sizeHint()
        hint.setWidth(max(self.minimumWidth(), PANEL_WIDTH))
        return hint

    def _build_header(self) -> QWidget:
        """The next step in one line, the review actions, and the legend of the canvas."""
        header = QWidget()
        lay = QVBoxLayout(header)
        lay.setContentsMargins(6, 4, 6, 4)
        lay.setSpacing(3)
        self.next_step_label = _wrapped("", "font-weight: bold;")
        lay.addWidget(self.next_step_label)
        row = QHBoxLayout()
        self.next_button = QPushButton("Next")
        self.next_button.setToolTip("show the next volume to review, worst first, at its largest cluster of flagged "
                                    "(purple or orange) voxels")
        self.accept_button = QPushButton("Accept")
        self.accept_button.setToolTip("save the shown pseudo label, with your corrections, as a training label")
        self.retrain_button = QPushButton("Retrain")
        self.retrain_button.setToolTip("continue training from the last checkpoint with the accepted labels")
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip("write every label and pseudo label, with provenance, to a folder")
        self.next_button.clicked.connect(lambda: self._guard(self.next_case))
        self.accept_button.clicked.connect(lambda: self._guard(self.accept_current))
        self.retrain_button.clicked.connect(lambda: self._guard(self.retrain))
        self.export_button.clicked.connect(lambda: self._guard(self._ask_export))
        for b in (self.next_button, self.accept_button, self.retrain_button, self.export_button):
            b.setMinimumWidth(0)
            row.addWidget(b)
        lay.addLayout(row)
        lay.addWidget(self._build_legend())
        self.trust_label = _wrapped("")  # how far to trust the colours: the run's own validation figures
        lay.addWidget(self.trust_label)
        return header

    def _build_legend(self) -> QWidget:
        """One line per thing drawn over the image: its colour, its name, what it says."""
        legend = QWidget()
        grid = QGridLayout(legend)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setHorizontalSpacing(6)
        grid.setVerticalSpacing(1)
        entries = [(f"legend_{r.key}", r.colour, r.key, r.legend) for r in Region.shown()]
        entries.append(("legend_pseudo", LABEL_COLOURS[0], "pseudo label", PSEUDO_LEGEND))
        for row, (object_name, colour, key, text) in enumerate(entries):
            swatch = QLabel(f"■ {key}")
            swatch.setStyleSheet(f"color: {colour}; font-weight: bold;")
            swatch.setObjectName(object_name)
            swatch.setToolTip(text)
            what = _wrapped(text)
            grid.addWidget(swatch, row, 0, Qt.AlignmentFlag.AlignTop)
            grid.addWidget(what, row, 1)
        grid.setColumnStretch(1, 1)
        return legend

    def _guard(self, fn, *args):
        """Run a button's action; a user error becomes a notification with its one-line message."""
        try:
            return fn(*args)
        except SGRSError as exc:
            show_error(str(exc))
        return None

    def _update_buttons(self) -> None:
        training = self.train_job is not None and self.train_job.running
        has_run = self.project is not None and self.project.last_checkpoint() is not None
        self.start_button.setEnabled(not training)
        self.stop_button.setEnabled(training)
        self.resume_button.setEnabled(not training and has_run)
        self.retrain_button.setEnabled(not training and has_run)
        self.next_button.setEnabled(bool(self.queue.items))
        self.accept_button.setEnabled(self.current_case is not None
                                      and self.layer_for(self.current_case, "pseudo") is not None)
        self.export_button.setEnabled(has_run or (self.project is not None and bool(self.project.labeled_cases())))
        self._update_next_step()

    # ------------------------------------------------------------------ layers <-> cases
    def _layers(self, kind: str) -> list:
        return [ly for ly in self.viewer.layers if ly._type_string == kind]

    def _role(self, layer) -> str:
        role = layer_meta(layer).get("role")
        if role:
            return role
        name = str(layer.name)
        if name.endswith(PSEUDO_SUFFIX):
            return "pseudo"
        if name.endswith(REGIONS_SUFFIX):
            return "regions"
        return "image" if layer._type_string == "image" else "label"

    def layer_for(self, case: str, role: str):
        for layer in self.viewer.layers:
            if case_of(layer) == case and self._role(layer) == role:
                return layer
        return None

    def _on_layers_changed(self, event=None) -> None:
        self.refresh_table()
        if self.current_case is not None and not any(case_of(ly) == self.current_case for ly in self._case_layers()):
            images = self._layers("image")  # the shown case's layers were deleted: show another
            self.current_case = None
            if images:
                self.show_case(case_of(images[0]))

    def refresh_table(self) -> None:
        """One row per image layer; the label combo pre-selects the matching Labels layer."""
        images = [ly for ly in self._layers("image")]
        labels = [ly for ly in self._layers("labels") if self._role(ly) == "label"]
        previous = self.table_selection()
        self._clear_table()
        self.table.setRowCount(len(images))
        for row, image in enumerate(images):
            use = QCheckBox()
            use.setChecked(previous.get(image.name, (True, None))[0])
            self.table.setCellWidget(row, COL_USE, use)
            name = QTableWidgetItem(image.name)
            name.setToolTip(image.name)
            self.table.setItem(row, COL_IMAGE, name)
            combo = QComboBox()
            # a long layer name is elided, never widening the table past its dock
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(6)
            combo.addItems([NO_LABEL] + [ly.name for ly in labels])
            chosen = self._label_choice.get(image.name)
            if chosen is None or (chosen != NO_LABEL and chosen not in [ly.name for ly in labels]):
                match = [ly.name for ly in labels if case_of(ly) == case_of(image)]
                chosen = match[0] if match else NO_LABEL
            combo.setCurrentText(chosen)
            # only a choice the user made sticks; the rest follows the layers as they come and go
            combo.activated.connect(lambda _i, n=image.name, c=combo: self._label_choice.__setitem__(n, c.currentText()))
            self.table.setCellWidget(row, COL_LABEL, combo)
        self._update_next_step()

    def _clear_table(self) -> None:
        """Drop the old rows' widgets now: Qt deletes a replaced cell widget only once control is
        back in the event loop, and until then it is drawn over the new row (a second arrow)."""
        for row in range(self.table.rowCount()):
            for col in range(self.table.columnCount()):
                widget = self.table.cellWidget(row, col)
                if widget is not None:
                    self.table.removeCellWidget(row, col)
                    widget.hide()
                    widget.deleteLater()
        self.table.setRowCount(0)

    def _row_name(self, row: int) -> str | None:
        item = self.table.item(row, COL_IMAGE)
        return item.text() if item is not None else None

    def table_selection(self) -> dict[str, tuple[bool, str | None]]:
        out = {}
        for row in range(self.table.rowCount()):
            name, use, combo = self._row_name(row), self.table.cellWidget(row, COL_USE), \
                self.table.cellWidget(row, COL_LABEL)
            if name is not None and use is not None and combo is not None:
                out[name] = (use.isChecked(), combo.currentText())
        return out

    def _show_table_row(self, row: int) -> None:
        name = self._row_name(row)
        layer = next((ly for ly in self._layers("image") if ly.name == name), None)
        if layer is not None:
            self.show_case(case_of(layer), focus=True)

    def set_label_for(self, image_name: str, label_name: str | None) -> None:
        """Choose the Labels layer of an image row (None: unlabeled)."""
        self._label_choice[image_name] = label_name or NO_LABEL
        for row in range(self.table.rowCount()):
            if self._row_name(row) == image_name:
                self.table.cellWidget(row, COL_LABEL).setCurrentText(label_name or NO_LABEL)

    def show_case(self, case: str, focus: bool = False) -> None:
        """Show only ``case``'s image, label or pseudo label and regions, hide every other case's
        (cases share world coordinates: drawn together, one's label would sit on another's
        image), and select its pseudo label. In the grid every case stays shown."""
        self.current_case = case
        self._sync_reliability()
        self._apply_visibility()
        self._select_shown()
        if focus and case in self.regions and not self.grid_check.isChecked():
            self.focus_on_region(case)
        self._update_buttons()  # Accept follows the case shown; the next-step line too

    def _sync_reliability(self) -> None:
        """The optional reliability layer: only the shown case's, only while its box is ticked."""
        case, on = self.current_case, self.reliability_check.isChecked()
        for layer in [ly for ly in self.viewer.layers if self._role(ly) == "reliability"]:
            if not on or case_of(layer) != case:
                self.viewer.layers.remove(layer)
        if not on or case is None or self.project is None or self.layer_for(case, "reliability") is not None:
            return
        path = self.project.prediction_files(case).get("reliability")
        if path is None:
            return
        from napari_sgrs.core.io import read_volume  # (the engine's reader is imported where used)

        vol = read_volume(path)
        data, kwargs, _ = layer_data_from_volume(vol, "reliability", case + RELIABILITY_SUFFIX)
        kwargs["metadata"] = sgrs_meta(vol.geometry, case, "reliability", vol.path, vol.format)
        self.viewer.add_image(data, **kwargs)
        self._select_shown()

    def trust_text(self) -> str:
        """How far to trust the colours, in one line: the run's validation figures."""
        cal = next((e["calibration"] for e in self.estimates.values() if isinstance(e.get("calibration"), dict)), None)
        if cal is None:
            return ""
        if not cal.get("volumes"):
            return ("No validation split: purple + orange are sized by our benchmarks' default, not on your "
                    "data, and the estimated Dice has no interval.")
        n = cal["volumes"]
        return (f"On your {n} validation volume{'s' if n != 1 else ''}, purple + orange flagged "
                f"{100 * cal.get('val_flagged', 0):.1f} % of the voxels and held {100 * cal.get('val_recall', 0):.0f} % "
                f"of the model's wrong ones.")

    def _update_trust_line(self) -> None:
        self.trust_label.setText(self.trust_text())

    def _select_shown(self) -> None:
        """Make the shown case's pseudo label (or label) the active layer: the one the brush paints."""
        case = self.current_case
        target = (self.layer_for(case, "pseudo") or self.layer_for(case, "label")) if case else None
        if target is not None:
            self.viewer.layers.selection.active = target

    def _case_layers(self) -> list:
        """The layers that belong to a case: images and labels (a user's points or shapes stay as they are)."""
        return [ly for ly in self.viewer.layers if ly._type_string in CASE_KINDS and self._role(ly) != "spacer"]

    def _apply_visibility(self) -> None:
        grid = self.grid_check.isChecked()
        for layer in self._case_layers():
            layer.visible = grid or case_of(layer) == self.current_case
        self._update_canvas_note()

    def _on_layer_inserted(self, event) -> None:
        """A new layer of another case than the one shown starts hidden (loading several images,
        pseudo labels arriving); the first case to arrive is the one shown."""
        layer = event.value
        if layer._type_string not in CASE_KINDS or self._role(layer) == "spacer":
            return
        if self.current_case is None:
            self.current_case = case_of(layer)
        if self.grid_check.isChecked():
            QTimer.singleShot(0, self._layout_grid)  # not while napari is still inserting it
        else:
            layer.visible = case_of(layer) == self.current_case
        self._update_canvas_note()

    def set_grid(self, on: bool) -> None:
        """Show every case side by side (napari's grid, one view per case: its image under its
        regions and its label or pseudo label), or one case at a time (off, the default)."""
        if self.grid_check.isChecked() != bool(on):
            self.grid_check.setChecked(bool(on))  # toggled: comes back here
            return
        if on:
            self._layout_grid()
        else:
            self._remove_spacers()
            self.grid.enabled = False
            QTimer.singleShot(0, self.viewer.reset_view)
            self._apply_visibility()

    def _remove_spacers(self) -> None:
        for layer in [ly for ly in self.viewer.layers if self._role(ly) == "spacer"]:
            self.viewer.layers.remove(layer)

    def _layout_grid(self) -> None:
        """napari's grid puts ``stride`` consecutive layers in one view. Cases have 1 to 3 layers
        (image; label or pseudo label; regions), so each case's layers are moved together, image
        first, and a case with fewer is padded with hidden empty "spacer" layers (a hidden layer
        takes its place in a view but draws nothing)."""
        if not self.grid_check.isChecked():
            return
        self._remove_spacers()
        order = {"image": 0, "regions": 1, "label": 2, "pseudo": 2}
        blocks: dict[str, list] = {}
        for layer in self._case_layers():
            blocks.setdefault(case_of(layer), []).append(layer)
        if not blocks:
            return
        stride = max(len(b) for b in blocks.values())
        for case, block in blocks.items():
            block.sort(key=lambda ly: order.get(self._role(ly), 3))
            anchor = block[0]
            for _ in range(stride - len(block)):
                spacer = self.viewer.add_labels(
                    np.zeros((1,) * anchor.ndim, np.uint8), name=f"{case} (grid spacer)", visible=False,
                    scale=anchor.scale, translate=anchor.translate,
                    metadata={"sgrs": {"case": case, "role": "spacer"}})
                block.append(spacer)
        ordered = [ly for block in blocks.values() for ly in block]
        for target, layer in enumerate(ordered):  # the layers before ``target`` are in place already
            current = self.viewer.layers.index(layer)
            if current != target:
                self.viewer.layers.move(current, target)
        self.grid.stride = stride
        if not self.grid.enabled:
            self.grid.enabled = True
            # one view's zoom would crop every view of the grid; after the canvas has made its views
            QTimer.singleShot(0, self.viewer.reset_view)
        self._apply_visibility()
        self._select_shown()  # a spacer, added last, would be the active layer

    def _on_ndisplay(self, event=None) -> None:
        """In 3D regions leave out the consistent bulk (see ``regions_colormap``) and a pseudo
        label is a translucent surface (napari has no outline in 3D); back in 2D, the outline again."""
        ndisplay = self.viewer.dims.ndisplay
        for layer in self._case_layers():
            if self._role(layer) == "regions":
                layer.colormap = regions_colormap(ndisplay)
                # in 2D they lie over the image; in 3D they are surfaces seen through the pseudo label
                layer.opacity = REGIONS_OPACITY if ndisplay == 2 else REGIONS_OPACITY_3D
            elif self._role(layer) == "pseudo":
                layer.contour = PSEUDO_CONTOUR if ndisplay == 2 else 0
                # an opaque surface would hide the regions to review inside it
                layer.opacity = 1.0 if ndisplay == 2 else PSEUDO_OPACITY_3D

    @property
    def grid(self):
        """napari's grid settings (``viewer.canvas.grid`` from 0.9, ``viewer.grid`` before)."""
        canvas = getattr(self.viewer, "canvas", None)
        return canvas.grid if canvas is not None and hasattr(canvas, "grid") else self.viewer.grid

    @property
    def canvas_note(self):
        """napari's text overlay on the canvas (``viewer.canvas.overlays`` from 0.9, ``text_overlay`` before)."""
        canvas = getattr(self.viewer, "canvas", None)
        if canvas is not None and hasattr(canvas, "overlays"):
            return canvas.overlays["text"]
        return getattr(self.viewer, "text_overlay", None)

    def _update_canvas_note(self) -> None:
        """A line on the canvas: which volume is shown, and what the colours over it say."""
        overlay = self.canvas_note
        if overlay is None:
            return
        if self.grid_check.isChecked() or self.current_case is None:
            overlay.visible = self.grid_check.isChecked()
            overlay.text = "all volumes side by side"
            return
        case = self.current_case
        if self.layer_for(case, "pseudo") is not None:
            what = f"pseudo label, step {self._predict_step}"
        else:
            what = "label" if self.layer_for(case, "label") is not None else "no label"
        overlay.text = f"{case}  ·  {what}"
        overlay.font_size = 11
        overlay.color = "white"
        overlay.position = "top_left"
        overlay.visible = True

    def focus_on_region(self, case: str) -> tuple[float, ...] | None:
        """Move the viewer to the largest inconsistent region of ``case``; returns its world centre."""
        focus = largest_region(self.regions[case])
        layer = self.layer_for(case, "regions") or self.layer_for(case, "image")
        if focus is None or layer is None:
            return None
        # the layer's own transform: a rotated volume's region centre is not origin + index * spacing
        world = tuple(float(v) for v in layer.data_to_world(focus.center))
        for axis in range(min(len(world), self.viewer.dims.ndim)):
            if axis not in self.viewer.dims.displayed:
                self.viewer.dims.set_point(axis, world[axis])
        scene = getattr(self.viewer, "scene", None)  # napari >= 0.9; viewer.camera before
        (scene.camera if scene is not None else self.viewer.camera).center = world
        return world

    # ------------------------------------------------------------------ project
    def _ask_new_project(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "New project folder (empty)")
        if folder:
            self._guard(lambda: (self._check_can_switch(), self.set_project(Project.create(folder))))

    def _check_can_switch(self) -> None:
        """Another project may not replace this one while its processes would write into it."""
        if self.project is not None and (self.busy or self.train_job is not None):
            raise SGRSError(f"{self.project.root} is training or predicting: Stop it (or wait) before "
                            f"opening another project")

    def _ask_open_project(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a napari-sgrs project folder")
        if folder:
            self._guard(self.open_project, folder)

    def set_project(self, project: Project) -> None:
        """Make ``project`` the panel's; the previous one's folder lock is released."""
        if self.project is not None and self.project is not project:
            self.project.close()
            self._journaled.clear()  # what the old project's journal holds says nothing of the new one's
        self.project = project
        # The lock goes with the panel: a viewer closed inside a running Python session (IPython,
        # Jupyter) must not keep its project from being opened again in the next viewer.
        self.destroyed.connect(project.close)
        self.project_label.setText(f"{project.root.name}\n{project.root.parent}")
        self.project_label.setToolTip(str(project.root))
        self._update_buttons()

    def ensure_project(self) -> Project | None:
        """The panel's project; without one, a new one where the user says (None: cancelled).

        Called only once the inputs are valid, so a Start that fails writes nothing anywhere.
        """
        if self.project is None:
            suggestion = Path.home() / "napari-sgrs-projects" / time.strftime("project-%Y%m%d-%H%M%S")
            folder = self.ask_project_folder(suggestion)
            if folder is None:
                return None
            self.set_project(Project.create(folder))
            show_info(f"new project folder: {folder}")
        return self.project

    def ask_project_folder(self, suggestion: Path) -> Path | None:
        """Ask where a new project goes: ``suggestion`` (confirmed) or another empty folder the
        user chooses; None if cancelled. Tests replace this method, as a dialog needs a person."""
        box = QMessageBox(self)
        box.setWindowTitle("New napari-sgrs project")
        box.setIcon(QMessageBox.Icon.Question)
        box.setText("Start writes a project folder: a copy of the chosen images and labels, "
                    f"the training runs and their checkpoints, the pseudo labels.\n\n{suggestion}")
        here = box.addButton("Create here", QMessageBox.ButtonRole.AcceptRole)
        other = box.addButton("Choose another folder…", QMessageBox.ButtonRole.ActionRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(here)
        box.exec()
        if box.clickedButton() is here:
            return suggestion
        if box.clickedButton() is other:
            start = next((str(p) for p in suggestion.parents if p.is_dir()), "")
            folder = QFileDialog.getExistingDirectory(self, "New project folder (empty)", start)
            return Path(folder) if folder else None
        return None

    def open_project(self, folder: str | Path, recover: bool | None = None) -> Project:
        """Reopen a project: images, labels, latest pseudo labels and regions, settings, run.

        Autosaved edits not yet accepted are offered back (``recover`` True/False answers
        without asking)."""
        from napari_sgrs.core.io import read_volume

        self._check_can_switch()
        if self.project is not None and Path(folder).resolve() == self.project.root.resolve():
            self.project.close()  # opening the panel's own project again: its lock is ours to pass on
        project = Project.open(folder)
        self.set_project(project)
        self.last_event = None
        for entry in project.images:
            if self.layer_for(entry.name, "image") is None:
                self._add(layer_data_from_volume(read_volume(project.image_path(entry.name)), "image",
                                                 entry.name))
            label_path = project.label_path(entry.name)
            if label_path.exists() and self.layer_for(entry.name, "label") is None:
                self._add(layer_data_from_volume(read_volume(label_path), "label", entry.name + LABEL_SUFFIX))
        self.apply_settings(project.settings(self.preset))
        if project.current_run is not None:
            self._events = EventFollower(RunFolder(project.current_run).events)
            self.plot.clear_data()
            self._read_new_events(initial=True)
        if project.prediction_dir is not None:
            self._predict_step = int(project.data["prediction"].get("step", 0))
            self._start_loading_predictions(project.prediction_dir)
            self._wait_for_load()
        pending = project.pending_journal()
        if pending:
            if recover is None:
                answer = QMessageBox.question(
                    self, "Recover edits?",
                    f"{len(pending)} volume(s) have label edits that were not accepted: "
                    f"{', '.join(e.name for e in pending)}. Recover them?")
                recover = answer == QMessageBox.StandardButton.Yes
            if recover:
                self.recover_journal()
        self.refresh_table()
        if self.train_job is None and project.current_run is not None:
            self._find_trainer(project.current_run)
        self._update_buttons()
        return project

    def _find_trainer(self, run: Path) -> None:
        """On reopening: follow the run's trainer if it still runs (a viewer closed or killed
        leaves it training, see TrainerProcess), else offer Resume if it ended unfinished."""
        holder = RunFolder(run).holder()
        if holder is not None:
            self.train_job = TrainerProcess(run, holder)
            self.status_label.setText(f"{run.name} is training (pid {holder.get('pid', '?')}, started "
                                      f"{holder.get('started', 'earlier')}): following it; Stop stops it")
            self.poll_timer.start()
            return
        if self.last_event is None or self.last_event.kind is EventKind.FINISHED \
                or self.project.last_checkpoint(run) is None:
            return
        step = self.project.last_step(run)
        message = (f"{run.name} is not running and did not finish; Resume continues it from its last "
                   f"checkpoint (step {step})")
        self.status_label.setText(message)
        show_info(message)

    def recover_journal(self) -> list[str]:
        """Put autosaved edits back into their layers (they stay unaccepted and keep autosaving)."""
        recovered = []
        for entry in self.project.pending_journal():
            layer = self.layer_for(entry.name, "pseudo") or self.layer_for(entry.name, "label")
            if layer is None:
                continue
            try:
                data = self.project.load_journal(entry.name)
            except SGRSError as exc:  # one unreadable autosave must not hide the others
                show_warning(str(exc))
                continue
            if data.shape != layer.data.shape:
                show_warning(f"autosaved edits of {entry.name} have shape {data.shape}, the layer "
                             f"{layer.data.shape}: not recovered")
                continue
            layer.data = data.astype(layer.data.dtype)
            self._dirty.add(entry.name)
            self._journaled[entry.name] = np.array(layer.data)
            recovered.append(entry.name)
        if recovered:
            show_info(f"recovered unaccepted edits of {', '.join(recovered)}")
        return recovered

    def _add(self, layer_data: tuple):
        data, kwargs, kind = layer_data
        return self.viewer.add_image(data, **kwargs) if kind == "image" else self.viewer.add_labels(data, **kwargs)

    def _ask_load_folder(self) -> None:
        images = QFileDialog.getExistingDirectory(self, "Images folder")
        if not images:
            return
        labels = QFileDialog.getExistingDirectory(self, "Labels folder (cancel: none)")
        self._guard(self.load_folder, images, labels or None)

    def load_folder(self, images_dir: str | Path, labels_dir: str | Path | None = None) -> list[str]:
        """Open a folder of images (and labels, paired by case name) as layers."""
        from napari_sgrs.core.io import find_cases

        names = []
        for case in find_cases(images_dir, labels_dir):
            image = case.read_image()
            self._add(layer_data_from_volume(image, "image", case.name))
            if case.label is not None:
                self._add(layer_data_from_volume(case.read_label(), "label", case.name + LABEL_SUFFIX))
            names.append(case.name)
        self.refresh_table()
        if self.current_case is not None:  # napari made the last layer added, likely hidden, the active one
            self.show_case(self.current_case)
        return names

    # ------------------------------------------------------------------ training
    def settings(self) -> TrainConfig:
        """The settings in the panel's boxes (the rest: the chosen preset's, see ``panel_config``)."""
        return panel_config(dict(method=self.method_combo.currentData(), iterations=self.iterations_spin.value(),
                                 patch_size=tuple(s.value() for s in self.patch_spins),
                                 base_filters=self.filters_spin.value(), device=self.device_combo.currentText()),
                            self.preset)

    def choose_preset(self, name: str) -> None:
        """Fill the boxes with a named setting (``preview``: a first result in about a minute on a CPU)."""
        self.preset = name
        self.preset_combo.setCurrentText(name)
        # a preset that names a method (paper: SGRS-Net) sets the method box too
        method = {} if "method" in PRESETS[name] else dict(method=self.method_combo.currentData())
        self.apply_settings(panel_config(dict(**method, device=self.device_combo.currentText()), name))

    def apply_settings(self, s: TrainConfig) -> None:
        self.method_combo.setCurrentIndex(self.method_combo.findData(s.method))
        self.iterations_spin.setValue(int(s.iterations))
        for spin, v in zip(self.patch_spins, s.patch_size):
            spin.setValue(int(v))
        self.filters_spin.setValue(int(s.base_filters))
        if self.device_combo.findText(s.device) >= 0:
            self.device_combo.setCurrentText(s.device)

    def chosen_training_data(self) -> list[tuple[Any, Any]]:
        """The ticked image layers with their Labels layer (or None), checked before anything is
        written: at least one image, labels of the image's shape, at least one labeled volume."""
        by_name = {ly.name: ly for ly in self.viewer.layers}
        pairs = []
        for image_name, (use, label_name) in self.table_selection().items():
            if not use or image_name not in by_name:
                continue
            image = by_name[image_name]
            label = by_name.get(label_name) if label_name and label_name != NO_LABEL else None
            if label is not None and np.shape(label.data) != np.shape(image.data):
                raise SGRSError(f"label layer '{label_name}' has shape {np.shape(label.data)}, image "
                                f"'{image_name}' {np.shape(image.data)}; choose the matching label")
            pairs.append((image, label))
        if not pairs:
            raise SGRSError("no image layer chosen: open images (or the demo data) and tick 'use'")
        if all(label is None for _, label in pairs) and (self.project is None or not self.project.labeled_cases()):
            raise SGRSError("no labeled volume: choose a Labels layer for at least one image")
        return pairs

    def write_training_data(self) -> list[str] | None:
        """Write the chosen image layers and their labels into the project folder (asked for
        first if there is none, once the choice is valid); None if the user cancelled that."""
        pairs = self.chosen_training_data()
        project = self.ensure_project()
        if project is None:
            return None
        cases = []
        for image, label_layer in pairs:
            case = case_of(image)
            meta = layer_meta(image)
            if not project.image_path(case).exists():
                project.add_image(case, np.asarray(image.data), geometry_of(image), meta.get("source"),
                                  meta.get("format"))
            if label_layer is not None:
                label = np.asarray(label_layer.data)
                if self.partial_check.isChecked() and not project.label_path(case).exists():
                    label = mark_unpainted_slices(label, axis=0)
                project.update_label(case, label, geometry_of(label_layer))
            cases.append(case)
        return cases

    def start_training(self) -> Path | None:
        """Start a new run (``sgrs train`` in a subprocess) on the chosen layers; None if the user
        cancelled the choice of a project folder (then nothing was written)."""
        if self.train_job is not None and self.train_job.running:
            raise SGRSError("training is already running; press Stop first")
        self.settings()  # a setting the engine refuses is said before a folder is asked for
        if self.write_training_data() is None:
            show_info("Start cancelled: no project folder chosen, nothing was written")
            return None
        run = self.project.new_run(self.settings())
        return self._launch(run, resume=False, settings=self.settings())

    def resume_training(self) -> Path:
        """Continue the current run from its last checkpoint, to its planned number of steps."""
        run = self._current_run()
        settings = self.project.settings()
        return self._launch(run, resume=True, settings=settings)

    def retrain(self) -> Path:
        """Continue from the last checkpoint with the accepted labels, for ``iterations`` more steps."""
        run = self._current_run()
        self.write_training_data()
        settings = self.settings()
        settings.iterations = self.project.last_step(run) + int(self.iterations_spin.value())
        self.project.data["settings"] = dict(self.project.data.get("settings") or {}, iterations=settings.iterations)
        self.project.save()
        return self._launch(run, resume=True, settings=settings)

    def _current_run(self) -> Path:
        if self.project is None or self.project.current_run is None:
            raise SGRSError("no run to continue: press Start first")
        if self.train_job is not None and self.train_job.running:
            raise SGRSError("training is already running")
        if self.project.last_checkpoint() is None:
            raise SGRSError(f"{self.project.current_run} has no checkpoint yet: press Start")
        return self.project.current_run

    def _launch(self, run: Path, resume: bool, settings: TrainConfig) -> Path:
        project = self.project
        # The trainer's own checks, up front: above all, no second trainer in a run that another
        # process holds (say `sgrs train --resume` from a terminal); the holder is named.
        folder = RunFolder(run)
        folder.check_output(resume=resume)
        settings_file = project.write_settings_file(run, settings)
        cmd = train_command(project.images_dir, project.labels_dir, run, settings_file, resume=resume)
        self._events = EventFollower(folder.events, from_end=resume)
        if not resume:
            self.plot.clear_data()
        self._error_shown = False
        self._step_s, self._long_run_warned, self._stopped_event = None, False, None
        self._total = int(settings.iterations)
        # detached: the run outlives the viewer, and reopening the project finds it (TrainerProcess)
        self.train_job = Job(cmd, folder.log, stop_file=folder.stop_file, detach=True)
        self.status_label.setText(f"starting {'resumed ' if resume else ''}training ({settings.method}) ...")
        self.poll_timer.start()
        self._update_buttons()
        return run

    def stop_training(self) -> None:
        """Ask the trainer to checkpoint and exit; it is terminated if it does not within the grace period."""
        if self.train_job is None or not self.train_job.running:
            return
        self.train_job.request_stop()
        wait = "" if self._step_s is None else f" (up to {_fmt_seconds(self._step_s)}, a step's time)"
        self.status_label.setText(f"stopping at the end of the current step{wait}, then writing a checkpoint ...")

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop every background process (used when the panel closes, and by tests)."""
        for job in (self.train_job, self.predict_job):
            if job is not None and job.running:
                job.request_stop()
        deadline = time.monotonic() + timeout
        for job in (self.train_job, self.predict_job):
            while job is not None and job.running and time.monotonic() < deadline:
                time.sleep(0.1)
            if job is not None and job.running:
                job.kill()
        self.poll_timer.stop()
        self.autosave()
        self._loader.shutdown(wait=True)
        if self.project is not None:
            self.project.close()

    # ------------------------------------------------------------------ polling (QTimer, never blocks)
    def poll(self) -> None:
        self._read_new_events()
        self._check_train_job()
        self._check_predict_job()
        self._check_loader()
        self.plot.refresh()
        if not self.busy:
            self.poll_timer.stop()
        self._update_buttons()

    def _read_new_events(self, initial: bool = False) -> None:
        run = self.project.current_run if self.project else None
        if run is None:
            return
        path = RunFolder(run).events
        if self._events is None or self._events.path != path:
            self._events = EventFollower(path)  # another run than the one followed: read it whole
        for event in self._events.poll():
            self.handle_event(event, replay=initial)

    def handle_event(self, event: Event, replay: bool = False) -> None:
        """Update the panel from one trainer event (see ``core/events.py``); ``replay``: an event
        of the past, read on reopening a project, that starts nothing and shows no error."""
        step, data = event.step, event.data
        self.last_event = event
        match event.kind:
            case EventKind.STARTED:
                self._total = int(data.get("total") or self._total)
                self.status_label.setText(f"training on {data.get('device', '?')} ...")
                # the trainer holds out no volume below 3 labeled ones (core/train.py split_validation)
                no_val = data.get("validation") == 0
                self.validation_label.setText(NO_VALIDATION_NOTE if no_val else "")
                self.validation_label.setVisible(no_val)
            case EventKind.PROGRESS:
                total = int(data.get("total") or self._total or 1)
                self._total = total
                rate = data.get("steps_per_s")
                if rate:
                    self._step_s = 1.0 / float(rate)
                if not replay:
                    self._warn_if_long(step, total, data.get("eta_s"))
                self.progress.setValue(int(100 * min(step, total) / max(total, 1)))
                if "loss" in data:
                    self.plot.add_loss(step, float(data["loss"]))
                mem = data.get("memory_mb")
                self.status_label.setText(
                    f"step {step}/{total} · loss {float(data.get('loss', float('nan'))):.4f} · "
                    f"ETA {_fmt_seconds(data.get('eta_s'))} · {data.get('device', '?')}"
                    + (f" · {float(mem):.0f} MB" if mem is not None else ""))
            case EventKind.VALIDATION if data.get("dice") is not None:
                self.plot.add_dice(step, float(data["dice"]))
            case EventKind.REGIONS if data.get("scope") == "batch":
                self.plot.add_regions(step, float(data.get(Region.DISREGARDED.key, 0.0)),
                                      float(data.get(Region.INCONSISTENT.key, 0.0)))
            case EventKind.CHECKPOINT if not replay:
                self.request_predict(step)
            case EventKind.STOPPED:
                self._stopped_event = event
                if data.get("path"):
                    self.status_label.setText(f"stopped at step {step}, checkpoint saved, Resume continues")
                else:
                    self.status_label.setText(f"stopped at step {step}, before the first checkpoint: Start "
                                              f"begins again")
            case EventKind.FINISHED:
                self.progress.setValue(100)
                self.status_label.setText(f"finished at step {step}")
            case EventKind.ERROR if not replay:
                self._error_shown = True
                show_error(f"training failed: {data.get('message', 'unknown error')}")
                self.status_label.setText(f"error: {data.get('message', '')}")

    def _check_train_job(self) -> None:
        job = self.train_job
        if job is None:
            return
        code = job.poll()
        if code is None:
            # the trainer stops at a step boundary: the wait follows its measured step time (before
            # the first step, at least as long as the run has lasted)
            step_s = self._step_s if self._step_s is not None else time.monotonic() - job.started
            job.enforce_stop(stop_grace_s(step_s))
            return
        self._read_new_events()  # the last lines written before exit
        if code != 0 and not self._error_shown:
            if self._stopped_event is not None:
                pass  # it said it stopped, and saved: ended by a signal after that is still a stop
            elif job.stop_requested_at is not None:  # Stop was pressed
                # ended by the signals that follow Stop before it could checkpoint: a stop, whose
                # last checkpoint on disk Resume continues from
                saved = self.project.last_step() if self.project is not None else 0
                where = f"Resume continues from step {saved}" if saved else "no checkpoint yet: Start begins again"
                self.status_label.setText(f"stopped (ended before it could save its last step); {where}")
                show_warning(f"training was ended after Stop before it could save; {where}")
            else:
                self._error_shown = True
                message = job.error_message()
                show_error(f"training failed: {message}")
                self.status_label.setText(f"error: {message}")
        self.train_job = None

    def _warn_if_long(self, step: int, total: int, eta_s: Any) -> None:
        """Once per run, from the first progress event on (the trainer reports step 1 at once):
        warn when the projected time is over an hour, naming the preview setting."""
        if self._long_run_warned or eta_s is None or float(eta_s) <= LONG_RUN_S:
            return
        self._long_run_warned = True
        show_warning(_long_run_warning(float(eta_s), step, total, self.settings()))

    # ------------------------------------------------------------------ prediction
    def request_predict(self, step: int) -> None:
        """Refresh pseudo labels and regions for a new checkpoint (queued if one is running)."""
        if self.project is None or not self.project.unlabeled_cases():
            return
        if self.predict_job is not None and self.predict_job.running:
            self._pending_predict_step = step
            return
        self._pending_predict_step = None
        project = self.project
        out = project.new_prediction_dir(step)
        for sub in ("", "probability", "regions"):  # the engine's predict expects them to exist
            (out / sub).mkdir(parents=True, exist_ok=True)
        cmd = predict_command(project.current_run, project.prediction_inputs(), out, regions=True)
        self.predict_job = Job(cmd, out.parent / f"{out.name}.log")
        self._predict_out, self._predicting_step = out, step
        self.poll_timer.start()

    def _check_predict_job(self) -> None:
        job = self.predict_job
        if job is not None:
            code = job.poll()
            if code is None:
                return
            self.predict_job = None
            if code == 0:
                self.project.set_prediction(self._predict_out, self._predicting_step)
                self._predict_step = self._predicting_step
                self._start_loading_predictions(self._predict_out)
            else:
                show_error(f"prediction failed: {job.error_message()}")
        if self._pending_predict_step is not None and self.predict_job is None:
            self.request_predict(self._pending_predict_step)

    def _start_loading_predictions(self, out_dir: Path) -> None:
        names = [n for n in self.project.unlabeled_cases()]
        self._load_future = self._loader.submit(_read_predictions, Path(out_dir), names)

    def _wait_for_load(self) -> None:
        """Opening a project: read the predictions and show them before returning."""
        if self._load_future is not None:
            self._load_future.result()
            self._check_loader()
        while self._ui_steps:
            self._drain_ui_steps()

    def _check_loader(self) -> None:
        fut = self._load_future
        if fut is None or not fut.done():
            return
        self._load_future = None
        try:
            loaded = fut.result()
        except SGRSError as exc:
            show_error(f"cannot read predictions: {exc}")
            return
        self.show_predictions(loaded)

    def show_predictions(self, loaded: dict[str, tuple]) -> None:
        """Add or refresh ``<case> pseudo label`` and ``<case> regions`` layers; re-rank the queue.

        napari needs ~0.3 s to create one Labels layer's visuals on a software-rendered display, so
        each layer is its own step, one per event-loop turn: the viewer answers between them.
        """
        steps = []
        for name, (pred, regions, *review) in loaded.items():
            if review and review[0] is not None:
                self.estimates[name] = review[0]
            # regions first, so the pseudo label's outline is drawn above them
            steps.append(lambda n=name, r=regions, p=pred: self._show_regions(n, r, p))
            steps.append(lambda n=name, p=pred: self._show_pseudo(n, p))
        steps.append(self._after_predictions)
        self._ui_steps.extend(steps)
        QTimer.singleShot(0, self._drain_ui_steps)

    def _drain_ui_steps(self) -> None:
        if not self._ui_steps:
            return
        step = self._ui_steps.pop(0)
        step()
        if self._ui_steps:
            QTimer.singleShot(0, self._drain_ui_steps)

    @property
    def busy(self) -> bool:
        """True while a process runs, predictions load, or layers wait to be shown."""
        return any(j is not None and j.running for j in (self.train_job, self.predict_job)) or \
            self._load_future is not None or bool(self._ui_steps) or self._pending_predict_step is not None

    def _show_pseudo(self, name: str, pred) -> None:
        if self.project.label_path(name).exists():
            return  # accepted meanwhile
        pseudo = self.layer_for(name, "pseudo")
        if pseudo is None:
            data, kwargs, _ = layer_data_from_volume(pred, "pseudo", name + PSEUDO_SUFFIX)
            kwargs["metadata"] = sgrs_meta(pred.geometry, name, "pseudo", pred.path, pred.format)
            kwargs["visible"] = name == self.current_case
            layer = self.viewer.add_labels(data, **kwargs)
            layer.contour = PSEUDO_CONTOUR if self.viewer.dims.ndisplay == 2 else 0
            self.model_predictions[name] = np.asarray(pred.array).copy()
        elif name not in self._dirty:  # never overwrite edits the user has not accepted
            pseudo.data = np.asarray(pred.array).astype(pseudo.data.dtype)
            self.model_predictions[name] = np.asarray(pred.array).copy()

    def _show_regions(self, name: str, regions, pred) -> None:
        if self.project.label_path(name).exists():
            return
        self.regions[name] = np.asarray(regions.array)
        shown = regions_for_display(regions.array, pred.array)
        layer = self.layer_for(name, "regions")
        if layer is None:
            _, kwargs, _ = layer_data_from_volume(regions, "regions", name + REGIONS_SUFFIX)
            kwargs["metadata"] = sgrs_meta(regions.geometry, name, "regions", regions.path, regions.format)
            kwargs["visible"] = name == self.current_case
            kwargs["colormap"] = regions_colormap(self.viewer.dims.ndisplay)
            layer = self.viewer.add_labels(shown, **kwargs)
            layer.editable = False
        else:
            layer.data = shown

    def _after_predictions(self) -> None:
        self._exported = ""
        self.queue.update({n: r for n, r in self.regions.items() if not self.project.label_path(n).exists()},
                          self.estimates)
        self._refresh_queue_list()
        self._update_trust_line()
        if self.current_case is None and self.queue.items:
            self.show_case(self.queue.items[0].name)
        elif self.current_case is not None:
            self.show_case(self.current_case)
        self.status_label.setText(self.status_label.text().split(" · pseudo labels")[0]
                                  + f" · pseudo labels from step {self._predict_step}")
        if self.grid_check.isChecked():
            self._layout_grid()
        self._update_next_step()
        self._update_buttons()

    def next_step_text(self) -> str:
        """The one line on top of the panel: what to do now."""
        training = self.train_job is not None and self.train_job.running
        items = self.queue.items
        if items:
            upcoming = self.queue.peek()
            names = [it.name for it in items]
            if self.current_case in names and upcoming.name != self.current_case:
                return (f"Reviewing {self.current_case} ({names.index(self.current_case) + 1} of {len(items)}): "
                        f"paint corrections, then Accept. Next opens {upcoming.name}.")
            plural = "s" if len(items) != 1 else ""
            return f"Review: {len(items)} volume{plural}, worst first. Next opens {upcoming.name}."
        if training:
            return "Training: pseudo labels of the unlabeled volumes appear here at the first checkpoint."
        accepted = self.project is not None and self.project.last_checkpoint() is not None
        if accepted:
            return "Nothing left to review: Retrain with the accepted labels, or Export."
        if not self._layers("image"):
            return "Open images and labels (Load folder… below, or File > Open), then press Start."
        return "Tick the volumes to use, pick their label layers, then press Start (Training, below)."

    def _update_next_step(self) -> None:
        if hasattr(self, "next_step_label"):  # the header is built before the rest of the panel
            # the last export is named until the next accept or pseudo labels
            self.next_step_label.setText(" ".join(t for t in (self._exported, self.next_step_text()) if t))

    def _refresh_queue_list(self) -> None:
        self.queue_list.clear()
        for it in self.queue.items:
            item = QListWidgetItem(it.describe())
            item.setData(Qt.ItemDataRole.UserRole, it.name)
            self.queue_list.addItem(item)

    # ------------------------------------------------------------------ review / correction
    def next_case(self) -> str | None:
        """Show the next worst unlabeled case at its largest cluster of flagged voxels."""
        item = self.queue.next()
        if item is None:
            show_info("no pseudo labels to review yet")
            return None
        for row in range(self.queue_list.count()):
            if self.queue_list.item(row).data(Qt.ItemDataRole.UserRole) == item.name:
                self.queue_list.setCurrentRow(row)
        self.show_case(item.name, focus=True)
        return item.name

    def accept_current(self, case: str | None = None) -> Path:
        """Save the (edited) pseudo label of ``case`` as a training label, with provenance."""
        case = case or self.current_case
        if case is None:
            active = self.viewer.layers.selection.active
            case = case_of(active) if active is not None else None
        layer = self.layer_for(case, "pseudo") if case else None
        if layer is None:
            raise SGRSError("select a pseudo label layer to accept (press Next)")
        prov = self.project.accept(case, np.asarray(layer.data), geometry_of(layer), self.model_predictions.get(case))
        self._dirty.discard(case)
        self._journaled.pop(case, None)
        self._exported = ""
        layer.name = case + LABEL_SUFFIX
        layer.metadata = {**layer.metadata, "sgrs": {**layer_meta(layer), "role": "label"}}
        # now a training label: drawn filled, as the labels opened from disk are
        layer.contour, layer.opacity = 0, LABEL_OPACITY
        regions = self.layer_for(case, "regions")
        if regions is not None:
            self.viewer.layers.remove(regions)
        self.regions.pop(case, None)
        self.queue.remove(case)
        self._refresh_queue_list()
        self.refresh_table()
        self._update_canvas_note()
        if self.grid_check.isChecked():
            self._layout_grid()
        human = int(np.count_nonzero(prov == 2))
        show_info(f"accepted {case}: saved as a training label ({human} voxels drawn by you); press Retrain")
        self._update_buttons()
        return self.project.label_path(case)

    def _ask_export(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export folder")
        if folder:
            self.export(folder)

    def export(self, out_dir: str | Path | None = None, names: list[str] | None = None) -> list[Path]:
        project = self.project
        if project is None:  # never a new, empty project just to export nothing from it
            raise SGRSError("nothing to export yet: press Start (or Open project…) first")
        if names is None and self.export_selected_check.isChecked():
            names = [i.data(Qt.ItemDataRole.UserRole) for i in self.queue_list.selectedItems()] or None
        if names is None:
            names = [n for n in project.case_names()
                     if project.label_path(n).exists() or project.prediction_files(n).get("label")]
        written = project.export(names, Path(out_dir) if out_dir else None)
        where = Path(written[0]).parent if written else out_dir
        show_info(f"exported {len(names)} volume(s) to {where}")
        self._exported = f"Exported {len(names)} volume{'s' if len(names) != 1 else ''} to {where}."
        self._update_next_step()
        return written

    # ------------------------------------------------------------------ autosave journal
    def _watch_layer(self, event=None, layer=None) -> None:
        layer = layer if layer is not None else event.value
        if layer._type_string != "labels" or id(layer) in self._watched:
            return
        self._watched.add(id(layer))
        layer.events.paint.connect(lambda e, ly=layer: self._mark_dirty(ly))

    def _mark_dirty(self, layer) -> None:
        if self._role(layer) in ("pseudo", "label"):
            self._dirty.add(case_of(layer))

    def autosave(self) -> list[str]:
        """Journal every edited label layer whose data changed since its last autosave.

        Runs from a QTimer every ``AUTOSAVE_MS``, so a viewer killed at any moment loses at most
        the edits of one interval (plus the write in progress: each write replaces the case's
        journal file whole, so a kill mid-write keeps the previous autosave). The comparison
        with the last saved copy, not the paint events, decides: undo and redo change the data
        without a paint event.
        """
        if self.project is None or not self._dirty:
            return []
        saved = []
        for case in sorted(self._dirty):
            layer = self.layer_for(case, "pseudo") or self.layer_for(case, "label")
            if layer is None:
                continue
            data = np.asarray(layer.data)
            last = self._journaled.get(case)
            if last is not None and last.shape == data.shape and np.array_equal(last, data):
                continue
            try:
                self.project.save_journal(case, data)
            except SGRSError as exc:
                show_warning(f"autosave failed: {exc}")
                return saved
            self._journaled[case] = data.copy()
            saved.append(case)
        return saved

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt name
        self.autosave()
        super().closeEvent(event)


def _wrapped(text: str, style: str = "font-size: 11px;") -> QLabel:
    """A label whose text wraps to the panel's width (small print by default)."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setStyleSheet(style)
    return label


def _read_predictions(out_dir: Path, names: list[str]) -> dict[str, tuple]:
    """Worker thread: read ``OUT/<case>.nii.gz`` and ``OUT/regions/<case>.nii.gz`` for each case,
    with its line of ``OUT/review.json`` (estimated Dice, flagged share; None where absent)."""
    from napari_sgrs.core.io import read_volume
    from napari_sgrs.core.outputs import read_json
    from napari_sgrs.core.predict import REVIEW_FILE

    review, calibration = {}, {}
    if (out_dir / REVIEW_FILE).exists():
        doc = read_json(out_dir / REVIEW_FILE, 16 << 20, "a review queue", "predict again")
        if isinstance(doc, dict):
            review = {v.get("name"): v for v in doc.get("volumes", []) if isinstance(v, dict)}
            calibration = doc.get("calibration") if isinstance(doc.get("calibration"), dict) else {}
    out = {}
    for name in names:
        pred_path, regions_path = out_dir / f"{name}.nii.gz", out_dir / "regions" / f"{name}.nii.gz"
        if pred_path.exists() and regions_path.exists():
            line = review.get(name)
            out[name] = (read_volume(pred_path), read_volume(regions_path),
                         None if line is None else {**line, "calibration": calibration})
    return out


def _long_run_warning(eta_s: float, step: int, total: int, chosen: TrainConfig) -> str:
    """One line: the projected time of a run, and a smaller setting than ``chosen`` (the boxes')."""
    head = f"this run is projected to take {_fmt_seconds(eta_s)} more ({total - step} steps left)"
    budget = ("iterations", "patch_size", "base_filters")
    preview = panel_config(preset="preview")
    if any(getattr(chosen, k) != getattr(preview, k) for k in budget):
        return f"{head}; for a first result press Stop and choose the setting 'preview' ({PRESET_HELP['preview']})"
    return f"{head}; for a first result press Stop and lower the iterations, patch size or base filters"


def _fmt_seconds(value: Any) -> str:
    if value is None:
        return "?"
    s = int(float(value))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
