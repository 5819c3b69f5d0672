"""What readers never read and never allocate (issue 19), and NaN voxels outside the field of view.

* Paths from headers stay in the header's folder, checked before ITK opens anything.
* Sizes are checked before allocating: checkpoint weights against a meta-device network, h5
  stored against declared bytes, every volume against the free memory.
* NaN voxels (no data) open for viewing, are ignored in training and are background in
  prediction; values near the float32 maximum give finite probabilities.
* A NIfTI whose sform and qform disagree is refused; library chatter stays off stderr.

Every file here is a few kB; nothing allocates more than a few MB, even with a guard removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from napari_sgrs.cli import main
from napari_sgrs.core import memory
from napari_sgrs.core.checkpoint import load_checkpoint
from napari_sgrs.core.data import normalise
from napari_sgrs.core.errors import CheckpointError, ConfigError, InputError, InputWarning, ResourceError
from napari_sgrs.core.infer import Predictor
from napari_sgrs.core.io import Case, read_volume, write_volume
from napari_sgrs.core.vnet import MAX_BASE_FILTERS, VNet

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import test_malformed as M  # noqa: E402
from tiny import TINY_ARGS, tiny_config  # noqa: E402

REPO = Path(__file__).parents[2]
ESCAPES = [p for p in M.CORPUS
           if p.id.startswith(("nhdr-", "mhd-", "mha-")) and p.id.endswith(("-absolute", "-dotdot", "-link-out"))]


# ----------------------------------------------------------------------------- paths that escape


@pytest.mark.parametrize("build", [pytest.param(p.values[0], id=p.id) for p in ESCAPES])
def test_escaping_data_file_is_refused_before_itk_opens_anything(build, tmp_path, monkeypatch):
    path = build(tmp_path)
    opened = []

    class Spy:
        def __init__(self, *args):
            opened.append(args)
            raise AssertionError("ITK was asked to open the file")

    monkeypatch.setattr(sitk, "ImageFileReader", Spy)
    with pytest.raises(InputError) as info:
        read_volume(path)
    message = str(info.value)
    assert path.name in message and "outside the header's folder" in message, message
    assert "put the data file in that folder" in message
    assert not opened


@pytest.mark.parametrize(
    "data_file, following",
    [
        ("d.raw", ()),
        ("sub/d.raw", ()),
        ("LIST", ("s0.raw", "s1.raw")),
        ("s%d.raw 0 1 1", ()),
        ("inner.raw", ()),  # a link that stays in the folder
    ],
    ids=["plain", "subfolder", "list", "pattern", "link-inside"],
)
@pytest.mark.parametrize("kind", ["nhdr", "mhd"])
def test_data_files_inside_the_folder_still_read(kind, data_file, following, tmp_path):
    (tmp_path / "sub").mkdir()
    M._slices(tmp_path)
    shutil.copy(tmp_path / "d.raw", tmp_path / "sub" / "d.raw")
    os.symlink("d.raw", tmp_path / "inner.raw")
    path = (M._nhdr if kind == "nhdr" else M._mhd)(tmp_path, data_file, *following)
    volume = read_volume(path)
    assert volume.array.shape == (2, 3, 4)
    assert volume.array.ravel().tolist() == list(range(24))


def test_escaping_list_entry_without_final_newline_is_still_checked(tmp_path):
    """The last line of a list need not end in a newline; ITK reads it, so it is checked too."""
    path = M._nhdr(tmp_path, "LIST", "s0.raw")
    path.write_bytes(path.read_bytes() + f"../{tmp_path.name}/s1.raw".encode())
    with pytest.raises(InputError, match="outside the header's folder"):
        read_volume(path)


# ----------------------------------------------------------------------------- sizes: checkpoints


def _refused(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and path.name in message
    return message


def test_checkpoint_asking_for_1024_filters_is_refused_by_the_bound(tmp_path):
    path = M._checkpoint(tmp_path, M._head(1024), meta={"base_filters": 1024})
    assert path.stat().st_size < 300_000  # the was 14 MB; the size of the file does not matter
    assert f"base_filters 1024 is not an integer in 1..{MAX_BASE_FILTERS}" in _refused(path)


def test_checkpoint_weights_are_compared_with_a_network_built_on_the_meta_device(tmp_path, monkeypatch):
    """24 filters in the metadata, 1-filter weights: refused, and no network is built for real
    (predict would have built a 21 M-parameter V-Net before the weights failed to load)."""
    import napari_sgrs.core.checkpoint as C
    import napari_sgrs.core.infer as I
    from napari_sgrs.core.network import build_model as real

    built = []

    def spy(config, num_classes):
        net = real(config, num_classes)
        built.append(next(net.parameters()).device.type)
        return net

    for module in (C, I):  # the checkpoint's check, and the predictor that would build it for real
        monkeypatch.setattr(module, "build_model", spy)
    path = M._checkpoint(tmp_path, M._head(24), meta={"base_filters": 24})
    message = _refused(path)
    assert "24 base filters, 21,253,298 parameters" in message and "needs [" in message, message
    with pytest.raises(CheckpointError):
        Predictor.from_run(path, device="cpu")
    assert built and set(built) == {"meta"}


def test_vnet_refuses_more_filters_than_the_bound():
    with torch.device("meta"), pytest.raises(ConfigError, match=str(MAX_BASE_FILTERS)):
        VNet(1, 2, MAX_BASE_FILTERS + 1)


def test_valid_tiny_checkpoint_loads_and_predicts(tmp_path):
    path = M._checkpoint(tmp_path)
    assert load_checkpoint(path).meta["num_classes"] == 2
    predictor = Predictor.from_run(path, device="cpu")
    pred = predictor.predict(np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32))
    assert pred.label.shape == (16, 16, 16) and np.isfinite(pred.probability).all()


def test_checkpoint_larger_than_free_memory_is_refused_before_reading(tmp_path, monkeypatch):
    path = M._checkpoint(tmp_path)
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 10_000)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read"))
    with pytest.raises(ResourceError) as info:
        load_checkpoint(path)
    assert path.name in str(info.value) and "free" in str(info.value)


# ----------------------------------------------------------------------------- sizes: volumes


def test_h5_of_1400_bytes_declaring_2GiB_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "claims.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("image", shape=(1024, 1024, 512), dtype="f4", chunks=(64, 64, 64),
                         compression="gzip")
    assert path.stat().st_size < 2000
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda *a: pytest.fail("the dataset was read"))
    with pytest.raises(InputError) as info:
        read_volume(path)
    assert "claims.h5" in str(info.value) and f"{2**31} bytes" in str(info.value)


def test_h5_written_whole_still_reads(tmp_path):
    array = np.zeros((32, 32, 32), np.uint8)  # deflates ~1000-fold: the bound must allow it
    path = write_volume(tmp_path / "zeros.h5", array, M.GEOMETRY)
    assert np.array_equal(read_volume(path).array, array)


def _forbid_reading(monkeypatch) -> None:
    """Every way a reader gets voxels fails the test: a refusal must come before them."""
    import nibabel.arrayproxy

    def fail(*args, **kwargs):
        pytest.fail("voxels were read")

    monkeypatch.setattr(nibabel.arrayproxy.ArrayProxy, "__array__", fail)
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", fail)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", fail)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".h5"])
def test_volume_larger_than_free_memory_is_refused_before_reading(suffix, tmp_path, monkeypatch):
    path = write_volume(tmp_path / f"big{suffix}", np.zeros((32, 32, 32), np.float32), M.GEOMETRY)
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 64 * 1024)
    _forbid_reading(monkeypatch)
    with pytest.raises(ResourceError) as info:
        read_volume(path)
    message = str(info.value)
    assert path.name in message and "32x32x32" in message and "crop or resample" in message, message


def test_cli_names_the_volume_that_does_not_fit(tiny_cohort, tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    shutil.copytree(tiny_cohort.images_tr, images)
    big = write_volume(images / "huge.nii.gz", np.zeros((64, 64, 64), np.uint8), M.GEOMETRY)
    # room for the 24^3 cohort volumes, not for the 64^3 one
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 2 * 2**20)
    code = main(["train", "--images", str(images), "--labels", str(tiny_cohort.labels_tr), "--out",
                 str(tmp_path / "run"), *TINY_ARGS])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert big.name in err and "64x64x64" in err and "free" in err


# ----------------------------------------------------------------------------- NaN outside the field of view


def _outside_view(path: Path) -> np.ndarray:
    """Make ``path`` look resampled: NaN outside a sphere (30 % of a cube), like nibabel's own
    ``resampled_anat_moved.nii``. Returns where the NaN voxels are."""
    volume = read_volume(path)
    array = volume.array.astype(np.float32)
    centre = (np.array(array.shape) - 1) / 2
    outside = np.sum((np.indices(array.shape).T - centre) ** 2, axis=-1).T > (0.55 * array.shape[0]) ** 2
    array[outside] = np.nan
    write_volume(path, array, volume.geometry)
    return outside


def test_nan_voxels_are_refused_by_default_and_kept_on_request(tmp_path):
    path = write_volume(tmp_path / "moved.nii.gz", np.ones((24, 24, 24), np.float32), M.GEOMETRY)
    outside = _outside_view(path)
    assert 0.2 < outside.mean() < 0.4
    with pytest.raises(InputError, match="NaN"):
        read_volume(path)
    volume = read_volume(path, nan="keep")
    assert np.array_equal(np.isnan(volume.array), outside)


@pytest.mark.parametrize(("value", "message"), [(np.inf, "Inf"), (np.nan, "every voxel is NaN")])
def test_inf_and_all_nan_are_refused_even_when_keeping_nan(value, message, tmp_path):
    array = np.full((4, 5, 6), value, np.float32)
    if value == np.inf:
        array[0] = 1.0
    path = write_volume(tmp_path / "bad.nrrd", array, M.GEOMETRY)
    with pytest.raises(InputError, match=message):
        read_volume(path, nan="keep")


def test_normalise_leaves_nan_out_and_fills_the_lowest_value():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, size=(12, 12, 12)).astype(np.float32)
    with_nan = image.copy()
    with_nan[:3] = np.nan
    out = normalise(with_nan)
    assert np.isfinite(out).all()
    inside = image[3:].astype(np.float64)
    expected = (inside - inside.mean()) / inside.std()
    np.testing.assert_allclose(out[3:], expected, rtol=0, atol=1e-5)
    assert np.all(out[:3] == out[3:].min())
    ct = normalise(with_nan, "ct", (50.0, 150.0))
    assert np.all(ct[:3] == -1.0) and np.isfinite(ct).all()


def test_normalise_is_finite_near_the_float32_maximum():
    """Values near 3e38 overflow float32 in (x - mean)**2: statistics are taken in float64."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(16, 16, 16))
    image = (3.0e38 + 1.0e37 * np.clip(base, -3, 3)).astype(np.float32)
    assert np.isfinite(image).all()
    out = normalise(image)
    assert np.isfinite(out).all()
    reference = image.astype(np.float64)
    np.testing.assert_allclose(out, (reference - reference.mean()) / reference.std(), atol=1e-4)


def _nan_cohort(tiny_cohort, tmp_path: Path) -> tuple[Path, Path, Path, np.ndarray]:
    images, labels, tests = tmp_path / "images", tmp_path / "labels", tmp_path / "tests"
    shutil.copytree(tiny_cohort.images_tr, images)
    shutil.copytree(tiny_cohort.labels_tr, labels)
    shutil.copytree(tiny_cohort.images_ts, tests)
    _outside_view(images / f"{tiny_cohort.labeled_names[0]}.nii.gz")
    outside = _outside_view(tests / f"{tiny_cohort.test_names[0]}.nii.gz")
    return images, labels, tests, outside


def test_training_ignores_nan_voxels_with_one_warning(tiny_cohort, tmp_path):
    from napari_sgrs.core.train import load_cases

    name = tiny_cohort.labeled_names[0]
    image, label = tmp_path / f"{name}.nii.gz", tiny_cohort.labels_tr / f"{name}.nii.gz"
    shutil.copy(tiny_cohort.images_tr / image.name, image)
    outside = _outside_view(image)
    with pytest.warns(InputWarning, match=f"{image.name}: {outside.sum()} voxels .* NaN") as record:
        (case,), _ = load_cases([Case(name, image, label)], tiny_config())
    assert len([w for w in record if issubclass(w.category, InputWarning)]) == 1
    assert np.all(case.label[outside] == 255)
    assert np.array_equal(case.label[~outside], read_volume(label).array[~outside])


@pytest.fixture(scope="module")
def nan_run(tiny_cohort, tmp_path_factory):
    """A tiny run trained on a cohort with one NaN-cornered labeled image; the CLI's stderr."""
    tmp = tmp_path_factory.mktemp("nan_run")
    images, labels, tests, outside = _nan_cohort(tiny_cohort, tmp)
    proc = subprocess.run(
        [sys.executable, "-m", "napari_sgrs.cli", "train", "--images", str(images), "--labels", str(labels),
         "--out", str(tmp / "run"), *TINY_ARGS],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    return tmp / "run", tests, outside, proc


def test_cli_trains_on_nan_voxels_with_one_warning_line(nan_run, tiny_cohort):
    _, _, _, proc = nan_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    warned = [line for line in lines if line.startswith("warning: ")]
    assert len(warned) == 1 and f"{tiny_cohort.labeled_names[0]}.nii.gz" in warned[0], proc.stderr
    assert "Traceback" not in proc.stderr and "UserWarning" not in proc.stderr


def test_prediction_on_nan_voxels_is_finite_background(nan_run, tiny_cohort, tmp_path, capsys):
    run, tests, outside, _ = nan_run
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--images", str(tests), "--out", str(out), "--regions",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    name = f"{tiny_cohort.test_names[0]}.nii.gz"
    assert f"warning: {tests / name}: {outside.sum()} voxels are NaN" in err, err
    label = read_volume(out / name).array
    probability = read_volume(out / "probability" / name).array  # refuses NaN: re-reading is the test
    regions = read_volume(out / "regions" / name).array
    assert np.all(label[outside] == 0) and np.all(probability[outside] == 0) and np.all(regions[outside] == 0)


def test_prediction_near_the_float32_maximum_rereads(nan_run, tiny_cohort, tmp_path):
    run = nan_run[0]
    images, out = tmp_path / "images", tmp_path / "pred"
    images.mkdir()
    source = read_volume(tiny_cohort.images_ts / f"{tiny_cohort.test_names[1]}.nii.gz")
    scaled = source.array.astype(np.float64)
    scaled = 3.0e38 + 3.0e37 * (scaled - scaled.mean()) / (np.abs(scaled - scaled.mean()).max() + 1e-12)
    write_volume(images / "bright.nii.gz", scaled.astype(np.float32), source.geometry)
    assert main(["predict", "--run", str(run), "--images", str(images), "--out", str(out), "--regions",
                 "--quiet"]) == 0
    probability = read_volume(out / "probability" / "bright.nii.gz").array
    assert np.isfinite(probability).all() and 0.0 <= probability.min() and probability.max() <= 1.0


def test_prediction_refuses_non_finite_probabilities():
    class Overflow(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, x * 1e30], 1)  # inf - inf = NaN in the softmax

    meta = {"config": {"patch_size": [16, 16, 16], "normalization": "none"}, "num_classes": 2}
    predictor = Predictor(Overflow(), meta, torch.device("cpu"))
    with pytest.raises(InputError, match="bright.nii: the network's probabilities are not finite"):
        predictor.predict(np.full((16, 16, 16), 3e38, np.float32), name="bright.nii")


# ----------------------------------------------------------------------------- sform and qform


def test_disagreeing_sform_and_qform_are_refused_with_both_and_the_fix(tmp_path):
    path = M._xforms(tmp_path, "moved.nii.gz", (5.0, -6.0, 7.0), 2.0)
    with pytest.raises(InputError) as info:
        read_volume(path)
    message = str(info.value)
    assert "moved.nii.gz" in message and "\n" not in message
    assert "voxel size (1.0, 1.0, 1.0)" in message and "voxel size (2.0, 2.0, 2.0)" in message
    assert "origin (5.0, -6.0, 7.0)" in message and "img.set_qform(img.get_sform())" in message


def test_itk_and_nibabel_read_such_a_file_differently(tmp_path):
    """Why the refusal: nibabel places the voxels by the sform, ITK by pixdim and either form."""
    path = M._xforms(tmp_path, "moved.nii", (5.0, -6.0, 7.0), 2.0)
    itk = sitk.ReadImage(str(path))
    assert np.allclose(nib.load(path).header.get_zooms(), 2.0)  # pixdim follows the qform
    assert np.allclose(nib.load(path).affine, np.eye(4))  # nibabel: the sform, 1 mm
    assert np.allclose(itk.GetSpacing(), 2.0)  # ITK: another voxel size


def test_matching_sform_and_qform_still_read(tmp_path):
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    image = nib.Nifti1Image(M._image(), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, tmp_path / "fine.nii.gz")
    assert np.allclose(read_volume(tmp_path / "fine.nii.gz").geometry.spacing, (2.5, 0.9, 0.8))


# ----------------------------------------------------------------------------- stderr


CHATTY = ("truncated-compressed.mha", "nii-unknown-datatype", "folder-without-dicom")


def test_library_messages_stay_off_stderr(tmp_path):
    """MetaIO, nibabel and GDCM print their own complaints; only our error may reach the user."""
    paths = []
    for case in CHATTY:
        build = next(p.values[0] for p in M.CORPUS if p.id == case)
        folder = tmp_path / case
        folder.mkdir()
        paths.append(str(build(folder)))
    script = textwrap.dedent("""
        import sys
        from napari_sgrs.core.errors import InputError
        from napari_sgrs.core.io import read_volume
        for path in sys.argv[1:]:
            try:
                read_volume(path)
            except InputError:
                pass
            else:
                raise SystemExit(f"{path} was read")
    """)
    proc = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("case", ["nhdr-data-file-link-out", "mhd-data-file-absolute"])
def test_cli_refuses_an_escaping_header_in_a_real_process(case, tiny_cohort, tmp_path):
    """The issue's `sgrs train` on /etc/passwd: exit 2, one line, nothing from ITK, no run."""
    images = tmp_path / "images"
    shutil.copytree(tiny_cohort.images_tr, images)
    header = next(p.values[0] for p in M.CORPUS if p.id == case)(images)
    proc = subprocess.run(
        [sys.executable, "-m", "napari_sgrs.cli", "train", "--images", str(images), "--labels",
         str(tiny_cohort.labels_tr), "--out", str(tmp_path / "run"), *TINY_ARGS],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert header.name in proc.stderr and "outside the header's folder" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
