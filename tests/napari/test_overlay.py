"""The overlay reads at a glance, also with a colour-vision deficiency: the pseudo label's colour
stays far from the three region colours under protan, deutan and tritan simulation; consistent
regions are not painted on predicted background, nor drawn in 3D. Run under ``xvfb-run -a``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cvd import MACHADO_2009, delta_e, simulate

from napari_sgrs._napari._layers import (PSEUDO_CONTOUR, labels_colormap, regions_colormap,
                                         regions_for_display)
from napari_sgrs.core.codes import Region

#: CIE76 Delta E. The pseudo label must stand apart from every region colour for every viewer:
#: 25 is "clearly another colour" (a just-noticeable difference is about 2.3). The three region
#: colours are Okabe-Ito and fixed (core/codes.py); their closest pair, with reddish purple for
#: disregarded (grey was 11.9 from green under deuteranopia, and invisible on a greyscale image),
#: is about 18 apart, and consistent is drawn faint besides.
PSEUDO_MIN_DE = 25.0
REGION_MIN_DE = 15.0
VIEWERS = ["normal", *MACHADO_2009]


def _rgb(colormap, value: int) -> np.ndarray:
    return np.asarray(colormap.map(np.array([value]))[0][:3], dtype=float)


def _seen(rgb: np.ndarray, viewer: str) -> np.ndarray:
    return rgb if viewer == "normal" else simulate(rgb, viewer)


@pytest.mark.parametrize("viewer", VIEWERS)
def test_pseudo_label_and_region_colours_stay_apart_with_colour_blindness(viewer):
    regions, labels = regions_colormap(), labels_colormap()
    region_rgb = {r.key: _rgb(regions, int(r)) for r in Region.shown()}
    pseudo = _rgb(labels, 1)  # class 1: the binary task's foreground, the colour in the legend
    for key, rgb in region_rgb.items():
        distance = delta_e(_seen(pseudo, viewer), _seen(rgb, viewer))
        assert distance >= PSEUDO_MIN_DE, f"{viewer}: pseudo label vs {key}: Delta E {distance:.1f}"
    for (a, ra), (b, rb) in itertools.combinations(region_rgb.items(), 2):
        distance = delta_e(_seen(ra, viewer), _seen(rb, viewer))
        assert distance >= REGION_MIN_DE, f"{viewer}: {a} vs {b}: Delta E {distance:.1f}"


def test_the_simulation_is_machados():
    """Pure red seen with protanopia is a dark olive (the published matrix's first column)."""
    assert simulate(np.array([1.0, 0, 0]), "protanopia") == pytest.approx([0.4264, 0.3724, 0.0], abs=2e-3)
    grey = np.array([0.6, 0.6, 0.6])  # every row sums to ~1: greys stay grey
    for kind in MACHADO_2009:
        assert simulate(grey, kind) == pytest.approx(grey, abs=2e-3)


def test_consistent_is_not_painted_on_predicted_background():
    regions = np.full((4, 4, 4), int(Region.CONSISTENT), np.uint8)
    regions[0, 0, 0] = Region.INCONSISTENT   # in the background: kept, the model may have missed it
    regions[0, 0, 1] = Region.DISREGARDED
    prediction = np.zeros((4, 4, 4), np.uint8)
    prediction[2:, 2:, 2:] = 1
    shown = regions_for_display(regions, prediction)
    assert np.all(shown[prediction == 1] == Region.CONSISTENT)
    background = prediction == 0
    background[0, 0, :2] = False
    assert np.all(shown[background] == Region.NONE)
    assert (shown[0, 0, 0], shown[0, 0, 1]) == (Region.INCONSISTENT, Region.DISREGARDED)
    assert np.all(regions != Region.NONE)  # the caller's map (the one on disk) is untouched


def test_in_3d_only_the_regions_to_review_are_drawn():
    """napari draws the first voxel with a colour along each ray in 3D: consistent must be
    transparent there, the regions to review not."""
    two, three = regions_colormap(2), regions_colormap(3)

    def alpha(cmap, r):
        return float(cmap.map(np.array([int(r)]))[0][3])

    assert 0 < alpha(two, Region.CONSISTENT) < 0.5
    assert alpha(three, Region.CONSISTENT) == 0
    for region in (Region.INCONSISTENT, Region.DISREGARDED):
        assert alpha(three, region) == 1 and alpha(two, region) == 1
    assert alpha(two, Region.NONE) == 0 and PSEUDO_CONTOUR > 0
