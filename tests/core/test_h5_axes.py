"""The benchmark h5 files (LA, Pancreas-CT, BraTS2019 as UA-MT / SSL4MIS ship them) store
arrays (x, y, z), z the slice axis; the authors' patch (LA: 112 x 112 x 80) and their 90-degree
rotation and flip are given in that order, in the x-y plane. We read them into (D, H, W) =
(z, y, x), so the paper preset's patch (80, 112, 112) and the sampler's H-W plane are theirs.

Synthetic files of each benchmark's shape: the image encodes each voxel's (x, y) and the label its
z, so a patch shows which stored axis each of its axes came from.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from napari_sgrs.core.data import PatchSampler, make_sample
from napari_sgrs.core.io import Geometry, read_h5_benchmark, read_volume, write_volume
from napari_sgrs.core.settings import PRESETS, TrainConfig

# (x, y, z) as stored, and the authors' patch in the same order. LA: 112-144 in-plane, 88 slices
# (../shared/SGRS.md). Pancreas-CT and BraTS2019: their patch is 96^3; the exact shapes of their
# cropped volumes are not in our notes, so these are stand-ins of that kind (z the shortest axis).
BENCHMARKS = {
    "LA": ((120, 136, 88), (112, 112, 80)),
    "Pancreas-CT": ((144, 128, 104), (96, 96, 96)),
    "BraTS2019": ((160, 192, 144), (96, 96, 96)),
}


def _write_benchmark(root, name: str, shape) -> None:
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    folder = root / name
    folder.mkdir(parents=True)
    with h5py.File(folder / "mri_norm2.h5", "w") as f:
        f["image"] = (x + 1000 * y).astype(np.float32)   # exact in float32 for x, y < 1000
        f["label"] = z.astype(np.uint8)                  # the slice index
    (root / "train.list").write_text(name + "\n")


@pytest.mark.parametrize("benchmark", list(BENCHMARKS))
def test_benchmark_axes_patch_and_rotation(benchmark, tmp_path):
    stored, their_patch = BENCHMARKS[benchmark]
    _write_benchmark(tmp_path, benchmark, stored)
    case = read_h5_benchmark(tmp_path, "train.list")[0]
    image, label = case.read_image().array, case.read_label().array
    sx, sy, sz = stored
    assert image.shape == label.shape == (sz, sy, sx)  # (D, H, W) = (z, y, x)
    assert image[5, 7, 3] == 3 + 1000 * 7 and label[5, 7, 3] == 5

    patch = tuple(reversed(their_patch))  # their (x, y, z) patch in our (D, H, W)
    if benchmark == "LA":
        assert PRESETS["paper"]["patch_size"] == patch
    sample = make_sample(benchmark, image, label, patch, ignore_index=255)
    paper = TrainConfig.from_preset("paper").validate()
    sampler = PatchSampler(patch, np.random.default_rng(0), flips=paper.flips,
                           foreground_fraction=paper.foreground_fraction)
    turned = 0
    for _ in range(12):
        img, lab = sampler.draw(sample, labeled=True)
        assert img.shape == lab.shape == patch
        assert (lab != 255).all()  # no padding: each axis of the patch fits its stored axis
        # D is z: each slice holds one z, consecutive and in order, and the image does not change along D
        zs = lab[:, 0, 0]
        assert (lab == zs[:, None, None]).all() and (np.diff(zs) == 1).all()
        assert (img == img[:1]).all()
        # H and W are x and y in one order or the other (the 90-degree turn), each a run of the patch's width
        xs, ys = img[0] % 1000, img[0] // 1000
        x_along_w = bool((np.diff(xs, axis=0) == 0).all())  # x constant down H: x runs along W
        h_axis_var = ys if x_along_w else xs
        w_axis_var = xs if x_along_w else ys
        assert (np.diff(h_axis_var, axis=1) == 0).all() and (np.abs(np.diff(h_axis_var[:, 0])) == 1).all()
        assert (np.diff(w_axis_var, axis=0) == 0).all() and (np.abs(np.diff(w_axis_var[0])) == 1).all()
        turned += not x_along_w
    assert 0 < turned < 12  # the turn happens, in the x-y plane, and not always


def test_our_own_h5_files_are_read_as_written(tmp_path):
    """A file written by sgrs (geometry attributes) is already (D, H, W): no transpose."""
    array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    write_volume(tmp_path / "ours.h5", array, Geometry.identity())
    assert np.array_equal(read_volume(tmp_path / "ours.h5").array, array)
