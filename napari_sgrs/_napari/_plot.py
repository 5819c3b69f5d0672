"""A small live plot of training loss, validation Dice and region shares (matplotlib in Qt)."""

from __future__ import annotations

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure

from napari_sgrs.core.codes import Region


class TrainingPlot(FigureCanvasQTAgg):
    """Loss (left axis) and, on the right axis (0..1), validation Dice and the shares of
    disregarded and inconsistent voxels in the unlabeled training patches, against step."""

    def __init__(self, parent=None):
        self.figure = Figure(figsize=(3.6, 2.2), tight_layout=True)
        super().__init__(self.figure)
        self.setParent(parent)
        self.setMinimumHeight(170)
        self.loss_steps: list[int] = []
        self.loss: list[float] = []
        self.dice_steps: list[int] = []
        self.dice: list[float] = []
        self.region_steps: list[int] = []
        self.disregarded: list[float] = []
        self.inconsistent: list[float] = []
        self.ax = self.figure.add_subplot(111)
        self.ax_dice = self.ax.twinx()
        (self._loss_line,) = self.ax.plot([], [], color="#0072B2", lw=1.2, label="loss")
        (self._dice_line,) = self.ax_dice.plot([], [], color="#E69F00", marker="o", ms=3, lw=1.2,
                                               label="val Dice")
        (self._dis_line,) = self.ax_dice.plot([], [], color=Region.DISREGARDED.colour, lw=1, ls="--",
                                              label=Region.DISREGARDED.key)
        (self._inc_line,) = self.ax_dice.plot([], [], color=Region.INCONSISTENT.colour, lw=1, ls="--",
                                              label=Region.INCONSISTENT.key)
        self.ax.set_xlabel("step", fontsize=8)
        self.ax.set_ylabel("loss", fontsize=8, color="#0072B2")
        self.ax_dice.set_ylim(0, 1)
        for a in (self.ax, self.ax_dice):
            a.tick_params(labelsize=7)
        self._dirty = False

    def _legend(self) -> None:
        """A legend of the lines that have data: no entry without a line (a run without a
        validation split has no Dice; the panel says why), and the right axis named after what it shows."""
        lines = [ln for ln in (self._loss_line, self._dice_line, self._dis_line, self._inc_line)
                 if len(ln.get_xdata())]
        old = self.ax_dice.get_legend()
        if old is not None:
            old.remove()
        if lines:
            self.ax_dice.legend(lines, [ln.get_label() for ln in lines], fontsize=6, loc="upper right",
                                frameon=False)
        self.ax_dice.set_ylabel("Dice, share" if len(self._dice_line.get_xdata()) else "share", fontsize=8)

    def clear_data(self) -> None:
        self.loss_steps, self.loss, self.dice_steps, self.dice = [], [], [], []
        self.region_steps, self.disregarded, self.inconsistent = [], [], []
        self._dirty = True
        self.refresh()

    def add_loss(self, step: int, loss: float) -> None:
        self.loss_steps.append(int(step))
        self.loss.append(float(loss))
        self._dirty = True

    def add_dice(self, step: int, dice: float) -> None:
        self.dice_steps.append(int(step))
        self.dice.append(float(dice))
        self._dirty = True

    def add_regions(self, step: int, disregarded: float, inconsistent: float) -> None:
        self.region_steps.append(int(step))
        self.disregarded.append(float(disregarded))
        self.inconsistent.append(float(inconsistent))
        self._dirty = True

    def refresh(self) -> None:
        """Redraw if data arrived since the last redraw (``draw_idle``: never blocks the caller)."""
        if not self._dirty:
            return
        self._dirty = False
        self._loss_line.set_data(self.loss_steps, self.loss)
        self._dice_line.set_data(self.dice_steps, self.dice)
        self._dis_line.set_data(self.region_steps, self.disregarded)
        self._inc_line.set_data(self.region_steps, self.inconsistent)
        self._legend()
        if self.loss_steps:
            self.ax.set_xlim(0, max(self.loss_steps + self.dice_steps + [1]))
            lo, hi = min(self.loss), max(self.loss)
            pad = 0.05 * (hi - lo) + 1e-6
            self.ax.set_ylim(lo - pad, hi + pad)
        self.draw_idle()
