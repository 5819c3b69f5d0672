"""Tiny training settings shared by the tests (a module, not conftest, so imports are unambiguous)."""

from __future__ import annotations


def tiny_config(**overrides):
    """The "tiny" preset (napari_sgrs/core/settings.py), with ``overrides``."""
    from napari_sgrs.core.settings import TrainConfig

    return TrainConfig.from_preset("tiny", **overrides)


#: The command-line counterpart, given as options (not --preset tiny): options are explicit, so a
#: test that repeats them on --resume overrides the run's saved values, and the engine's own
#: defaults for everything else (batch, seed, validation) stay what these tests were written for.
TINY_ARGS = ["--iterations", "4", "--patch-size", "16", "16", "16", "--base-filters", "2", "--device", "cpu",
             "--checkpoint-every", "2", "--quiet"]


def split_label_cohort(tiny_cohort, folder):
    """The tiny cohort's images (linked) with its labels copied, the first label given a far corner
    island so that class 1 is two connected pieces there. Returns (images dir, labels dir)."""
    from napari_sgrs.core.io import read_volume, write_volume
    from napari_sgrs.core.postprocess import count_components

    images, labels = folder / "img", folder / "lab"
    images.mkdir()
    labels.mkdir()
    for f in tiny_cohort.images_tr.iterdir():
        (images / f.name).symlink_to(f)
    for i, f in enumerate(sorted(tiny_cohort.labels_tr.iterdir())):
        vol = read_volume(f)
        arr = vol.array.copy()
        if i == 0:
            arr[0:2, 0:2, 0:2] = 1
            assert count_components(arr == 1) == 2
        write_volume(labels / f.name, arr, vol.geometry)
    return images, labels


def threshold_net():
    """A stand-in network for inference tests: class 1 wherever its (normalised) input is positive."""
    import torch

    class ThresholdNet(torch.nn.Module):
        def forward(self, x):
            return torch.cat([-x, x], 1)

    return ThresholdNet()
