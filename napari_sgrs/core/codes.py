"""The values sgrs writes into volumes, and what they mean: one definition for every reader.

These numbers are on disk in users' folders (``sgrs predict --regions`` outputs, project
provenance maps, training labels), so they never change: a test holds them.

- :class:`Region`: a synergy-region map (``OUT/regions/<image>``, the panel's regions layer).
- :class:`Provenance`: who made each voxel of a training label (``PROJECT/provenance/<case>``).
- :data:`IGNORE_INDEX`: the label value of unannotated voxels.

Plain Python (no Qt, no torch): the panel, the project folder and the engine all import it.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["IGNORE_INDEX", "Provenance", "Region"]

#: Label value of unannotated voxels: left out of the supervised loss and of every metric.
IGNORE_INDEX = 255


class Region(IntEnum):
    """Synergy-region codes of a region map (uint8)."""

    NONE = 0           # no region: outside the prediction (a voxel the network did not see)
    DISREGARDED = 1
    CONSISTENT = 2
    INCONSISTENT = 3

    @property
    def key(self) -> str:
        """The name in files and statistics: ``none``, ``disregarded``, ``consistent``, ``inconsistent``."""
        return self.name.lower()

    @property
    def colour(self) -> str:
        """Okabe-Ito colours (colour-blind safe); disregarded is reddish purple, not grey, so it shows
        on a greyscale image."""
        return _REGION_COLOURS[self]

    @property
    def legend(self) -> str:
        """One line for a legend or tooltip: what the region says about a voxel."""
        return _REGION_LEGENDS[self]

    @classmethod
    def shown(cls) -> tuple["Region", ...]:
        """The regions a legend lists (NONE is drawn transparent)."""
        return cls.DISREGARDED, cls.CONSISTENT, cls.INCONSISTENT

    @classmethod
    def flagged(cls) -> tuple["Region", ...]:
        """The regions a reviewer is sent to: the overlay's likely errors."""
        return cls.DISREGARDED, cls.INCONSISTENT


_REGION_COLOURS = {Region.NONE: "transparent", Region.DISREGARDED: "#CC79A7",
                   Region.CONSISTENT: "#009E73", Region.INCONSISTENT: "#D55E00"}
_REGION_LEGENDS = {
    Region.NONE: "no region: outside the prediction",
    Region.DISREGARDED: "too uncertain to trust: check these voxels",
    Region.CONSISTENT: "the label survives the test views (flips): trust it",
    Region.INCONSISTENT: "the test views outvote the label: likely wrong, review first",
}


class Provenance(IntEnum):
    """Who made each voxel of a training label or exported segmentation (uint8)."""

    MODEL_ONLY = 0             # the model's prediction, never looked at (or unannotated)
    ACCEPTED_PSEUDO_LABEL = 1  # the model's prediction, accepted unchanged by a person
    HUMAN_DRAWN = 2            # painted or corrected by a person

    @property
    def key(self) -> str:
        """The name in ``project.json`` and export sidecars: ``model_only``, ``accepted_pseudo_label``,
        ``human_drawn``."""
        return self.name.lower()
