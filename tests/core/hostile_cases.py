"""The hostile and mistaken command lines of issue 19, as data: each case builds its scenario
(the user's files) under a temporary folder and says what `sgrs` must do with it.

test_hostile_cli.py runs every case as a real `sgrs` process. The families are the issue's:

- data-loss: an output that is, or is inside, an input; a non-empty folder that is not a run;
  a cohort.json that names files outside its folder.
- escape: a header (NRRD ``data file``, MHD ``ElementDataFile``, h5 external storage, links) or
  a list/config file naming a file outside its folder.
- resources: sizes that must be checked before anything is allocated.
- traceback: malformed settings and option values that must give one line, not a traceback.
- silent: inputs that trained or evaluated to a wrong result with exit 0.
- rough: half-made outputs and leaking warnings.
- mistyped: argparse usage errors (the two cases marked USAGE: a short usage line and the error
  with a suggestion; issue 22 item 9).

The file-level corpus of test_malformed.py (truncated, lying, NaN... files) is not repeated here.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_sgrs.core.io import read_volume, write_volume

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import TINY_ARGS

SHAPE = (24, 24, 24)  # the tiny cohort's volume shape (D, H, W)


@dataclass
class Ctx:
    """What a builder gets: its own empty folder and read-only sources to copy from."""

    tmp: Path
    cohort: object  # napari_sgrs.core.demo.DemoCohort of the tiny_cohort fixture (never modified)
    run_source: Path | None  # a trained tiny run (never modified; copy it with run())

    def images(self, name: str = "images") -> Path:
        """A copy of the tiny cohort's training images (6 volumes)."""
        return Path(shutil.copytree(self.cohort.images_tr, self.tmp / name))

    def labels(self, name: str = "labels") -> Path:
        """A copy of the tiny cohort's training labels (3 volumes, binary)."""
        return Path(shutil.copytree(self.cohort.labels_tr, self.tmp / name))

    def test_images(self, name: str = "test_images") -> Path:
        return Path(shutil.copytree(self.cohort.images_ts, self.tmp / name))

    def test_labels(self, name: str = "test_labels") -> Path:
        return Path(shutil.copytree(self.cohort.labels_ts, self.tmp / name))

    def run(self, name: str = "run") -> Path:
        assert self.run_source is not None, "this case needs needs_run=True"
        return Path(shutil.copytree(self.run_source, self.tmp / name))

    def file(self, name: str, text: str = "the user's own notes\n") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


@dataclass
class Scenario:
    """One command line and the files it must respect.

    user: the user's files and folders; every file's bytes and the set of files under each must
        be the same after the command (whatever its exit code).
    outputs: what the command would create; after an exit 2 each must be absent, or, if it
        existed before, unchanged.
    keep: sgrs-owned folders (a run being resumed) whose files must survive unchanged; new
        files there are allowed.
    needle: on exit 2 the error line must contain this (the bad file or option), case-insensitive.
    check: extra assertions on an exit 0 (the case's legitimate result), given the process.
    """

    argv: list[str]
    user: list[Path]
    outputs: list[Path] = field(default_factory=list)
    keep: list[Path] = field(default_factory=list)
    needle: str | None = None
    check: Callable[[object], None] | None = None


@dataclass(frozen=True)
class HostileCase:
    id: str
    family: str
    build: Callable[[Ctx], Scenario]
    expect: tuple[int, ...] = (2,)
    needs_run: bool = False
    #: USAGE cases (argparse errors): at most 2 lines on stderr, one of them "...error: ...",
    #: and this suggestion in them. None for every other case: exactly one line "error: ...".
    usage_suggests: str | None = None
    why: str = ""


# ----------------------------------------------------------------------------- helpers


def s(p: Path) -> str:
    return str(p)


def train_argv(images: Path, labels: Path | None, out: Path, *extra: str) -> list[str]:
    argv = ["train", "--images", s(images)]
    if labels is not None:
        argv += ["--labels", s(labels)]
    # later flags win in argparse: a case's own value overrides TINY_ARGS
    return argv + ["--out", s(out), *TINY_ARGS, *extra]


def predict_argv(run: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--run", s(run), "--images", s(images), "--out", s(out), "--device", "cpu", "--quiet",
            *extra]


def first(folder: Path) -> Path:
    return min(p for p in folder.iterdir() if not p.name.startswith("."))


def rewrite_labels(labels: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    for p in sorted(labels.iterdir()):
        vol = read_volume(p)
        write_volume(p, change(vol.array.copy()), vol.geometry)


def secret_raw(ctx: Ctx, name: str = "vol.raw") -> Path:
    """A valid float32 volume's voxels, outside every input folder: what an escape would read."""
    folder = ctx.tmp / "secret"
    folder.mkdir(exist_ok=True)
    path = folder / name
    read_volume(first(ctx.cohort.images_tr)).array.astype("<f4").tofile(path)
    return path


def secret_slices(ctx: Ctx) -> list[Path]:
    """The same voxels as one raw file per slice (for LIST and %d data file layouts)."""
    folder = ctx.tmp / "secret"
    folder.mkdir(exist_ok=True)
    array = read_volume(first(ctx.cohort.images_tr)).array.astype("<f4")
    paths = []
    for k in range(array.shape[0]):
        path = folder / f"s{k:03d}.raw"
        array[k].tofile(path)
        paths.append(path)
    return paths


def nrrd_header(data_file: str, extra_lines: str = "") -> str:
    d, h, w = SHAPE
    return ("NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\n"
            f"sizes: {w} {h} {d}\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\n"
            f"encoding: raw\nendian: little\ndata file: {data_file}\n{extra_lines}")


def mhd_header(data_file: str, extra_lines: str = "") -> str:
    d, h, w = SHAPE
    return ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
            "CompressedData = False\nTransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\n"
            f"ElementSpacing = 1 1 1\nDimSize = {w} {h} {d}\nElementType = MET_FLOAT\n"
            f"ElementDataFile = {data_file}\n{extra_lines}")


# kind -> (suffix, header(data_file, lines after the header)): the escaping headers and their twins
# with the data inside the folder, which must be read (the refusal is for the escape alone).
HEADERS = {"nrrd": (".nrrd", nrrd_header), "nhdr": (".nhdr", nrrd_header), "mhd": (".mhd", mhd_header)}


def escaping_header(ctx: Ctx, folder: Path, kind: str, how: str, stem: str = "zz_escape") -> Path:
    """Write ``folder/<stem><suffix>`` whose voxel data lies outside ``folder`` (``how``):
    absolute, dotdot, symlink, list or pattern. Returns the header."""
    suffix, header = HEADERS[kind]
    path = folder / f"{stem}{suffix}"
    if how == "absolute":
        text = header(s(secret_raw(ctx)))
    elif how == "dotdot":
        secret_raw(ctx)
        text = header("../secret/vol.raw")
    elif how == "symlink":
        (folder / f"{stem}.raw").symlink_to(secret_raw(ctx))
        text = header(f"{stem}.raw")
    elif how == "list":
        files = "\n".join(f"../secret/{p.name}" for p in secret_slices(ctx)) + "\n"
        text = header("LIST 2", files) if kind != "mhd" else header("LIST 2D", files)
    elif how == "pattern":
        secret_slices(ctx)
        last = SHAPE[0] - 1
        text = header(f"../secret/s%03d.raw 0 {last} 1 2") if kind != "mhd" else header(
            f"../secret/s%03d.raw 0 {last} 1")
    else:
        raise ValueError(how)
    path.write_text(text)
    return path


def inside_twin(folder: Path, kind: str, array: np.ndarray) -> Path:
    """The same header with its data beside it: a reader must accept it (see the test)."""
    suffix, header = HEADERS[kind]
    array.astype("<f4").tofile(folder / "twin.raw")
    path = folder / f"twin{suffix}"
    path.write_text(header("twin.raw"))
    return path


def escaping_label(ctx: Ctx, labels: Path) -> Path:
    """Replace the first label by a .mhd on its image's grid whose voxels are in ../secret/: a
    correct label in every way but where its data lies."""
    source = first(labels)
    stem = source.name[: -len(".nii.gz")]
    (ctx.tmp / "secret").mkdir(exist_ok=True)
    header = write_volume(ctx.tmp / "secret" / f"{stem}.mhd", read_volume(source).array,
                          read_volume(source).geometry)
    source.unlink()
    text = header.read_text().replace(f"ElementDataFile = {stem}.raw", f"ElementDataFile = ../secret/{stem}.raw")
    assert "../secret/" in text
    header.unlink()
    bad = labels / f"{stem}.mhd"
    bad.write_text(text)
    return bad


def h5_external(ctx: Ctx, path: Path, how: str) -> Path:
    """An h5 file whose dataset 'image' is stored outside it: raw external storage, an external
    link or a virtual dataset pointing at another h5 file outside the folder."""
    import h5py

    array = read_volume(first(ctx.cohort.images_tr)).array.astype("<f4")
    if how == "storage":
        raw = secret_raw(ctx)
        with h5py.File(path, "w") as f:
            f.create_dataset("image", shape=array.shape, dtype="<f4", external=[(s(raw), 0, array.nbytes)])
        return path
    other = ctx.tmp / "secret" / "other.h5"
    other.parent.mkdir(exist_ok=True)
    with h5py.File(other, "w") as f:
        f["image"] = array
    with h5py.File(path, "w") as f:
        if how == "link":
            f["image"] = h5py.ExternalLink(s(other), "image")
        else:
            layout = h5py.VirtualLayout(shape=array.shape, dtype="<f4")
            layout[:] = h5py.VirtualSource(s(other), "image", shape=array.shape)
            f.create_virtual_dataset("image", layout)
    return path


def unlabeled_train(ctx: Ctx, add: Callable[[Path], Path], *extra: str) -> Scenario:
    """Train on the tiny cohort with one more (unlabeled) image made by ``add(images)``."""
    images, labels = ctx.images(), ctx.labels()
    bad = add(images)
    out = ctx.tmp / "run"
    return Scenario(train_argv(images, labels, out, *extra), user=_user_and_secret(ctx, images, labels),
                    outputs=[out], needle=bad.name)


def _user_and_secret(ctx: Ctx, *paths: Path) -> list[Path]:
    return [*paths] + ([ctx.tmp / "secret"] if (ctx.tmp / "secret").exists() else [])


# ----------------------------------------------------------------------------- data loss


def predict_out_is(where: str) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        run, images, labels = ctx.run(), ctx.images(), ctx.labels()
        out = {"images": images, "labels": labels, "run": run, "in-images": images / "pred",
               "in-labels": labels / "pred", "in-run": run / "pred", "dotdot-images": labels / ".." / "images"}[where]
        extra = ["--labels", s(labels)] if where in ("labels", "in-labels") else []
        return Scenario(predict_argv(run, images, out, *extra), user=[run, images, labels], outputs=[out])
    return build


def predict_out_symlink_to_images(ctx: Ctx) -> Scenario:
    run, images = ctx.run(), ctx.images()
    link = ctx.tmp / "pred"
    link.symlink_to(images, target_is_directory=True)
    return Scenario(predict_argv(run, images, link), user=[run, images, link])


def predict_out_holds_user_volume(ctx: Ctx) -> Scenario:
    run, images = ctx.run(), ctx.test_images()
    out = ctx.tmp / "pred"
    out.mkdir()
    # the user's own segmentation of a test case, named as predict would name its output
    shutil.copy(first(ctx.cohort.labels_ts), out / first(images).name)
    return Scenario(predict_argv(run, images, out), user=[run, images, out], outputs=[out],
                    needle=first(images).name)


def predict_probability_holds_user_volume(ctx: Ctx) -> Scenario:
    run, images = ctx.run(), ctx.test_images()
    out = ctx.tmp / "pred"
    (out / "probability").mkdir(parents=True)
    shutil.copy(first(ctx.cohort.labels_ts), out / "probability" / first(images).name)
    return Scenario(predict_argv(run, images, out, "--regions"), user=[run, images, out], outputs=[out])


def predict_out_is_user_file(ctx: Ctx) -> Scenario:
    run, images = ctx.run(), ctx.test_images()
    out = ctx.file("results.txt")
    return Scenario(predict_argv(run, images, out), user=[run, images, out], needle="results.txt")


def user_run_folder(ctx: Ctx, files: dict[str, str]) -> Path:
    folder = ctx.tmp / "mywork"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


USER_RUN_LOOKALIKE = {
    "config.json": '{"experiment": "mine", "notes": "not an sgrs run"}\n',
    "events.jsonl": '{"my": "log"}\n',
    "STOP": "a file of mine named STOP\n",
    ".x.tmp": "my scratch file\n",
    "notes.txt": "hello\n",
}


def train_out_user_folder(files: dict[str, str]) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        images, labels = ctx.images(), ctx.labels()
        out = user_run_folder(ctx, files)
        return Scenario(train_argv(images, labels, out), user=[images, labels, out], outputs=[out],
                        needle="mywork")
    return build


def train_out_is(where: str) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        images, labels = ctx.images(), ctx.labels()
        out = {"images": images, "labels": labels, "in-images": images / "run",
               "parent": ctx.tmp, "file": None}[where]
        if where == "file":
            out = ctx.file("plan.txt")
        user = [ctx.tmp] if where == "parent" else [images, labels, *([out] if where == "file" else [])]
        return Scenario(train_argv(images, labels, out), user=user, outputs=[out])
    return build


def train_resume_user_folder(ctx: Ctx) -> Scenario:
    images, labels = ctx.images(), ctx.labels()
    out = user_run_folder(ctx, {"config.json": '{"config": {}}\n', "notes.txt": "mine\n"})
    return Scenario(train_argv(images, labels, out, "--resume"), user=[images, labels, out], outputs=[out])


def evaluate_setup(ctx: Ctx) -> tuple[Path, Path]:
    """Predictions (copies of the test labels) and references: evaluation works on them."""
    return ctx.test_labels("pred"), ctx.test_labels("ref")


def evaluate_json_onto(where: str) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        pred, ref = evaluate_setup(ctx)
        target: Path
        if where == "label":
            target = first(ref)
        elif where == "pred":
            target = first(pred)
        elif where == "user-file":
            target = ctx.file("notes.json", '{"mine": true}\n')
        elif where == "symlink-to-label":
            target = ctx.tmp / "metrics.json"
            target.symlink_to(first(ref))
        else:
            raise ValueError(where)
        return Scenario(["evaluate", "--pred", s(pred), "--labels", s(ref), "--json", s(target)],
                        user=[pred, ref, target], needle=target.name)
    return build


def evaluate_json_folder(ctx: Ctx) -> Scenario:
    pred, ref = evaluate_setup(ctx)
    folder = ctx.tmp / "reports"
    folder.mkdir()
    return Scenario(["evaluate", "--pred", s(pred), "--labels", s(ref), "--json", s(folder)],
                    user=[pred, ref, folder], needle="reports")


def evaluate_json_missing_folder(ctx: Ctx) -> Scenario:
    pred, ref = evaluate_setup(ctx)
    target = ctx.tmp / "missing" / "m.json"
    return Scenario(["evaluate", "--pred", s(pred), "--labels", s(ref), "--json", s(target)],
                    user=[pred, ref], outputs=[target.parent], needle="missing")


def demo_cohort_dir(ctx: Ctx, meta: object | str) -> Path:
    """A demo-data folder whose cohort.json is ``meta`` (JSON-encoded unless a str)."""
    from napari_sgrs.core.demo import make_demo_cohort

    root = ctx.tmp / "cohort"
    make_demo_cohort(root, n_cases=2, n_labeled=1, n_test=0, shape=(16, 16, 16))
    (root / "cohort.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return root


def demo_data_argv(root: Path, *extra: str) -> list[str]:
    return ["demo-data", s(root), "--cases", "2", "--labeled", "1", "--test", "0", "--shape", "16", "16", "16",
            *extra]


def demo_data_cohort_names(kind: str) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        victim = ctx.file("victim.nii.gz", "the user's volume\n")
        name = {"dotdot": "../../victim", "absolute": s(victim)[: -len(".nii.gz")],
                "nested-dotdot": "../imagesTr/../../victim"}[kind]
        root = demo_cohort_dir(ctx, {"train_names": [name], "test_names": []})
        return Scenario(demo_data_argv(root, "--overwrite"), user=[victim, root], needle="cohort.json")
    return build


def demo_data_cohort_json(text: str) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        root = demo_cohort_dir(ctx, text)
        return Scenario(demo_data_argv(root, "--overwrite"), user=[root], needle="cohort.json")
    return build


def demo_data_user_volumes(ctx: Ctx) -> Scenario:
    """No cohort.json: the volumes there are the user's, --overwrite or not."""
    root = ctx.tmp / "cohort"
    (root / "imagesTr").mkdir(parents=True)
    shutil.copy(first(ctx.cohort.images_tr), root / "imagesTr" / "blob_000.nii.gz")
    return Scenario(demo_data_argv(root, "--overwrite"), user=[root], needle="blob_000")


def demo_data_dir_is_file(ctx: Ctx) -> Scenario:
    target = ctx.file("cohort")
    return Scenario(demo_data_argv(target), user=[target], needle="cohort")


def demo_data_huge_shape(ctx: Ctx) -> Scenario:
    root = ctx.tmp / "cohort"
    return Scenario(["demo-data", s(root), "--shape", "2048", "2048", "2048", "--cases", "1", "--labeled", "1",
                     "--test", "0"],
                    user=[], outputs=[root], needle="2048")


def demo_argv(root: Path, *extra: str) -> list[str]:
    return ["demo", s(root), "--iterations", "1", "--device", "cpu", *extra]


DEMO_OUTPUTS = ("data", "run", "pred_test", "pseudo", "evaluation.json")


def demo_with_user(sub: str) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        root = ctx.tmp / "demo"
        if sub == "run":
            (root / "run").mkdir(parents=True)
            (root / "run" / "thesis.txt").write_text("months of work\n")
            (root / "run" / "config.json").write_text('{"mine": 1}\n')
        elif sub == "data":
            (root / "data" / "imagesTr").mkdir(parents=True)
            shutil.copy(first(ctx.cohort.images_tr), root / "data" / "imagesTr" / "blob_000.nii.gz")
        elif sub == "pred_test":
            (root / "pred_test").mkdir(parents=True)
            # predict names its output after the first demo test case (blob_008)
            shutil.copy(first(ctx.cohort.labels_ts), root / "pred_test" / "blob_008.nii.gz")
        else:
            raise ValueError(sub)
        outputs = [root / o for o in DEMO_OUTPUTS if o != sub]
        return Scenario(demo_argv(root), user=[root / sub], outputs=outputs, needle=sub)
    return build


def demo_dir_is_file(ctx: Ctx) -> Scenario:
    target = ctx.file("demo")
    return Scenario(demo_argv(target), user=[target], needle="demo")


def demo_iterations_zero(ctx: Ctx) -> Scenario:
    root = ctx.tmp / "demo"
    return Scenario(["demo", s(root), "--iterations", "0", "--device", "cpu"], user=[], outputs=[root],
                    needle="iterations")


# ----------------------------------------------------------------------------- escapes


def escape_train(kind: str, how: str, as_label: bool = False) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        images, labels = ctx.images(), ctx.labels()
        if as_label:
            bad = escaping_label(ctx, labels)
        else:
            bad = escaping_header(ctx, images, kind, how)
        out = ctx.tmp / "run"
        return Scenario(train_argv(images, labels, out), user=_user_and_secret(ctx, images, labels),
                        outputs=[out], needle=bad.name)
    return build


def escape_predict(kind: str, how: str) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        run, images = ctx.run(), ctx.test_images()
        bad = escaping_header(ctx, images, kind, how)
        out = ctx.tmp / "pred"
        return Scenario(predict_argv(run, images, out), user=_user_and_secret(ctx, run, images), outputs=[out],
                        needle=bad.name)
    return build


def escape_h5(how: str) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        images, labels = ctx.images(), ctx.labels()
        bad = h5_external(ctx, images / "zz_escape.h5", how)
        out = ctx.tmp / "run"
        return Scenario(train_argv(images, labels, out), user=_user_and_secret(ctx, images, labels),
                        outputs=[out], needle=bad.name)
    return build


def h5_benchmark_root(ctx: Ctx) -> Path:
    """An LA-style h5 root with two labeled and one unlabeled case, all inside it."""
    import h5py

    root = ctx.tmp / "la"
    for i, (img, lab) in enumerate(zip(sorted(ctx.cohort.images_tr.iterdir())[:3],
                                       sorted(ctx.cohort.labels_tr.iterdir())[:3])):
        (root / f"case{i}").mkdir(parents=True)
        with h5py.File(root / f"case{i}" / "mri_norm2.h5", "w") as f:
            f["image"] = read_volume(img).array.astype("f4")
            f["label"] = read_volume(lab).array
    return root


def h5_list_escapes(how: str) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        import h5py

        root = h5_benchmark_root(ctx)
        outside = ctx.tmp / "secret" / "case9"
        outside.mkdir(parents=True)
        with h5py.File(outside / "mri_norm2.h5", "w") as f:
            f["image"] = read_volume(first(ctx.cohort.images_tr)).array.astype("f4")
            f["label"] = read_volume(first(ctx.cohort.labels_tr)).array
        name = {"dotdot": "../secret/case9", "absolute": s(outside)}[how]
        labeled = ctx.file("train.list", f"case0\ncase1\n{name}\n")
        unlabeled = ctx.file("unlabeled.list", "case2\n")
        out = ctx.tmp / "run"
        argv = ["train", "--h5-root", s(root), "--labeled-list", s(labeled), "--unlabeled-list", s(unlabeled),
                "--out", s(out), *TINY_ARGS]
        return Scenario(argv, user=[root, labeled, unlabeled, ctx.tmp / "secret"], outputs=[out],
                        needle="case9")
    return build


def predict_config_select_escapes(ctx: Ctx) -> Scenario:
    """config.json's "select" names the checkpoint file: it must not lead out of the run."""
    run, images = ctx.run(), ctx.test_images()
    evil = ctx.tmp / "evil.safetensors"
    shutil.copy(run / "checkpoints" / "last.safetensors", evil)
    meta = json.loads((run / "config.json").read_text())
    meta["config"]["select"] = "../../evil"
    (run / "config.json").write_text(json.dumps(meta))
    out = ctx.tmp / "pred"
    return Scenario(predict_argv(run, images, out), user=[run, images, evil], outputs=[out], needle="config.json")


# ----------------------------------------------------------------------------- resources


def lying_checkpoint(ctx: Ctx, change: Callable[[dict, dict], None], keep_tensors: bool) -> Path:
    """A copy of the tiny run's checkpoint whose metadata (and tensors) ``change`` rewrites."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = ctx.run_source / "checkpoints" / "last.safetensors"
    with safe_open(s(source), framework="pt") as fh:
        meta = json.loads(fh.metadata()["sgrs"])
    tensors = load_file(s(source)) if keep_tensors else {}
    change(meta, tensors)
    path = ctx.tmp / "lying.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()} or {"x": torch.zeros(1)}, s(path),
              metadata={"sgrs": json.dumps(meta)})
    return path


def ckpt_1024_filters(ctx: Ctx) -> Scenario:
    """14 kB, but its metadata asks for a ~38-billion-parameter network."""
    import torch

    def change(meta: dict, tensors: dict) -> None:
        meta["config"]["base_filters"] = 1024
        tensors["student.head.weight"] = torch.zeros(meta["num_classes"], 1024, 1, 1, 1)
        tensors["student.head.bias"] = torch.zeros(meta["num_classes"])

    ckpt = lying_checkpoint(ctx, change, keep_tensors=False)
    images, out = ctx.test_images(), ctx.tmp / "pred"
    return Scenario(predict_argv(ckpt, images, out), user=[ckpt, images], outputs=[out], needle=ckpt.name)


def ckpt_patch_4096(ctx: Ctx) -> Scenario:
    def change(meta: dict, tensors: dict) -> None:
        meta["config"]["patch_size"] = meta["patch_size"] = [4096, 4096, 4096]

    ckpt = lying_checkpoint(ctx, change, keep_tensors=True)
    images, out = ctx.test_images(), ctx.tmp / "pred"
    return Scenario(predict_argv(ckpt, images, out), user=[ckpt, images], outputs=[out])


def h5_declares_gib(ctx: Ctx) -> Scenario:
    """A few kB on disk: chunks never written, so h5 would expand 2 GiB of fill values."""
    import h5py

    def add(images: Path) -> Path:
        path = images / "zz_bomb.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("image", shape=(512, 1024, 1024), dtype="f4", chunks=(64, 64, 64),
                             compression="gzip", fillvalue=1.0)
        assert path.stat().st_size < 100_000
        return path

    return unlabeled_train(ctx, add)


def train_with(*extra: str, needle: str | None = None) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        images, labels = ctx.images(), ctx.labels()
        out = ctx.tmp / "run"
        return Scenario(train_argv(images, labels, out, *extra), user=[images, labels], outputs=[out],
                        needle=needle)
    return build


def predict_with(*extra: str, needle: str | None = None, check=None) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        run, images = ctx.run(), ctx.test_images()
        out = ctx.tmp / "pred"
        sc = Scenario(predict_argv(run, images, out, *extra), user=[run, images], outputs=[out], needle=needle)
        if check is not None:
            sc.check = lambda proc: check(out, images)
        return sc
    return build


def outputs_read_back(out: Path, images: Path) -> None:
    """Every input got a label volume on its grid, readable by sgrs, with class values."""
    for image in sorted(images.iterdir()):
        label = read_volume(out / image.name)
        assert label.array.shape == read_volume(image).array.shape, image.name
        assert label.array.min() >= 0 and label.array.max() < 255, image.name


# ----------------------------------------------------------------------------- tracebacks


def predict_config(text: str) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        run, images = ctx.run(), ctx.test_images()
        (run / "config.json").write_text(text)
        out = ctx.tmp / "pred"
        return Scenario(predict_argv(run, images, out), user=[run, images], outputs=[out], needle="config.json")
    return build


def resume_config(change: Callable[[dict], object] | str) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        run, images, labels = ctx.run(), ctx.images(), ctx.labels()
        if isinstance(change, str):
            text = change
        else:
            meta = json.loads((run / "config.json").read_text())
            text = json.dumps(change(meta))
        (run / "config.json").write_text(text)
        # only what a user repeats: the rest comes from config.json (TINY_ARGS would override it)
        argv = ["train", "--images", s(images), "--labels", s(labels), "--out", s(run), "--resume",
                "--iterations", "6", "--device", "cpu", "--quiet"]
        return Scenario(argv, user=[images, labels], keep=[run], needle="config.json")
    return build


def _set_config(**values) -> Callable[[dict], dict]:
    def change(meta: dict) -> dict:
        meta["config"].update(values)
        return meta
    return change


# ----------------------------------------------------------------------------- silent results


def labels_changed(change: Callable[[np.ndarray], np.ndarray], *extra: str,
                   needle: str | None = None) -> Callable[[Ctx], Scenario]:
    def build(ctx: Ctx) -> Scenario:
        images, labels = ctx.images(), ctx.labels()
        rewrite_labels(labels, change)
        out = ctx.tmp / "run"
        return Scenario(train_argv(images, labels, out, *extra), user=[images, labels], outputs=[out],
                        needle=needle)
    return build


def _all_255(a: np.ndarray) -> np.ndarray:
    return np.full_like(a, 255)


def _all_background(a: np.ndarray) -> np.ndarray:
    return np.zeros_like(a)


def _many_classes(a: np.ndarray) -> np.ndarray:
    out = a.astype(np.int16)
    out[a > 0] = 300  # 301 classes: 0..300
    out[0, 0, 0] = 299
    return out


def labels_equal_images(ctx: Ctx) -> Scenario:
    images = ctx.images()  # int16 intensities 1..~1200: read as labels, a ~1200-class model
    out = ctx.tmp / "run"
    return Scenario(train_argv(images, images, out), user=[images], outputs=[out])


def label_folder_named_like_file(ctx: Ctx) -> Scenario:
    images, labels = ctx.images(), ctx.labels()
    victim = first(labels)
    victim.unlink()
    victim.mkdir()  # labels/blob_000.nii.gz/ : a folder, the case silently unlabeled
    (victim / "readme.txt").write_text("exported to the wrong place\n")
    out = ctx.tmp / "run"
    return Scenario(train_argv(images, labels, out), user=[images, labels], outputs=[out], needle=victim.name)


def sform_qform_disagree(path: Path, source: Path) -> Path:
    import nibabel as nib

    vol = read_volume(source)
    img = nib.Nifti1Image(np.asarray(vol.array.transpose(2, 1, 0)), None)
    q = np.diag([0.8, 0.8, 1.5, 1.0])
    sf = np.diag([1.6, 1.6, 3.0, 1.0])  # twice the spacing: ITK readers use the qform
    img.set_qform(q, code=1)
    img.set_sform(sf, code=1)
    nib.save(img, s(path))
    return path


def sform_qform_train(ctx: Ctx) -> Scenario:
    def add(images: Path) -> Path:
        return sform_qform_disagree(images / "zz_twoaffines.nii.gz", first(ctx.cohort.images_tr))
    return unlabeled_train(ctx, add)


def sform_qform_predict(ctx: Ctx) -> Scenario:
    run, images = ctx.run(), ctx.test_images()
    bad = sform_qform_disagree(images / "zz_twoaffines.nii.gz", first(ctx.cohort.images_ts))
    out = ctx.tmp / "pred"
    return Scenario(predict_argv(run, images, out), user=[run, images], outputs=[out], needle=bad.name)


def near_float_max(path: Path, source: Path) -> Path:
    vol = read_volume(source)
    a = vol.array.astype(np.float32)
    a[a > np.median(a)] = 3.0e38  # finite, but its square and its sum overflow float32
    write_volume(path, a, vol.geometry)
    return path


def near_max_train(ctx: Ctx) -> Scenario:
    sc = unlabeled_train(ctx, lambda images: near_float_max(images / "zz_huge.nii.gz",
                                                           first(ctx.cohort.images_tr)))
    run = sc.outputs[0]
    sc.check = lambda proc: _run_is_finite(run)
    return sc


def _run_is_finite(run: Path) -> None:
    """A run that finished: its checkpoint's weights are all finite."""
    from safetensors.torch import load_file

    tensors = load_file(s(run / "checkpoints" / "last.safetensors"))
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    assert not bad, f"non-finite weights: {bad[:3]}"


def near_max_predict(ctx: Ctx) -> Scenario:
    run, images = ctx.run(), ctx.test_images()
    near_float_max(images / "zz_huge.nii.gz", first(ctx.cohort.images_ts))
    out = ctx.tmp / "pred"
    return Scenario(predict_argv(run, images, out, "--regions"), user=[run, images], outputs=[out],
                    check=lambda proc: _all_outputs_readable(out))


def _no_constant(name: str):
    raise AssertionError(f"{name} in a JSON output")


def _all_outputs_readable(out: Path) -> None:
    import json

    files = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]  # not the manifest
    assert files
    for p in files:
        if p.suffix == ".json":  # the review queue: strict JSON, no NaN estimate
            json.loads(p.read_text(), parse_constant=_no_constant)
            continue
        read_volume(p)  # refuses NaN/Inf: what sgrs writes, sgrs must read


def evaluate_reference_255(ctx: Ctx) -> Scenario:
    """Partial annotations: 255 marks voxels nobody labeled. They are not a class."""
    pred, ref = evaluate_setup(ctx)
    for p in sorted(ref.iterdir()):
        vol = read_volume(p)
        a = vol.array.copy()
        a[:4] = 255
        write_volume(p, a, vol.geometry)
    report = ctx.tmp / "report" / "m.json"
    report.parent.mkdir()

    def check(proc) -> None:
        data = json.loads(report.read_text())
        classes = {str(c.get("label")) for c in data.get("cases", [])} | set(map(str, data.get("summary", {})))
        assert "255" not in classes, f"255 evaluated as a class ({len(classes)} classes in the report)"

    return Scenario(["evaluate", "--pred", s(pred), "--labels", s(ref), "--json", s(report)], user=[pred, ref],
                    check=check)


def evaluate_pred_is_labels(ctx: Ctx) -> Scenario:
    ref = ctx.test_labels("ref")
    return Scenario(["evaluate", "--pred", s(ref), "--labels", s(ref)], user=[ref])


def predict_labels_equal_images(ctx: Ctx) -> Scenario:
    run, images = ctx.run(), ctx.images()
    out = ctx.tmp / "pred"
    return Scenario(predict_argv(run, images, out, "--regions", "--labels", s(images)), user=[run, images],
                    outputs=[out])


def nan_outside_fov(ctx: Ctx) -> Scenario:
    """After resampling, voxels outside the field of view are NaN: legitimate; trains, warns."""
    def add(images: Path) -> Path:
        vol = read_volume(first(ctx.cohort.images_tr))
        a = vol.array.astype(np.float32)
        a[:5] = np.nan
        a[:, :, -3:] = np.nan
        return write_volume(images / "zz_resampled.nii.gz", a, vol.geometry)

    sc = unlabeled_train(ctx, add)
    run = sc.outputs[0]

    def check(proc) -> None:
        assert (run / "checkpoints" / "last.safetensors").is_file()
        assert "zz_resampled" in proc.stderr, "no warning names the volume with NaN voxels"
        _run_is_finite(run)

    sc.check = check
    return sc


# ----------------------------------------------------------------------------- rough edges


def predict_nhdr_input(ctx: Ctx) -> Scenario:
    run, images = ctx.run(), ctx.test_images()
    vol = read_volume(first(ctx.cohort.images_ts))
    vol.array.astype("<f4").tofile(images / "zz_detached.raw")
    (images / "zz_detached.nhdr").write_text(nrrd_header("zz_detached.raw"))
    out = ctx.tmp / "pred"

    def check(proc) -> None:  # exit 0: every input, the .nhdr one too, has a readable label map
        written = {p.name.split(".")[0] for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
        assert written == {p.name.split(".")[0] for p in images.iterdir() if not p.name.endswith(".raw")}, written
        for p in out.iterdir():
            if not p.name.startswith("."):  # .sgrs-written.json: the manifest of what predict wrote
                read_volume(p)

    return Scenario(predict_argv(run, images, out), user=[run, images], outputs=[out], needle="zz_detached",
                    check=check)


def jittered_dicom(folder: Path, source: Path) -> Path:
    """A DICOM series of ``source`` whose 11th slice sits 0.01 mm off: within sgrs's 1 % spacing
    tolerance, but ITK prints a multi-line warning on stderr while reading it."""
    import SimpleITK as sitk

    array = read_volume(source).array.astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 1.5))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.19"
    folder.mkdir()
    for i in range(image.GetDepth()):
        item = image[:, :, i]
        z = 1.5 * i + (0.01 if i == 10 else 0.0)
        for tag, value in (("0020|000e", uid), ("0008|0018", f"{uid}.{i + 1}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0032", f"0\\0\\{z:.4f}"), ("0020|0013", str(i + 1)), ("0028|0030", "0.8\\0.8")):
            item.SetMetaData(tag, value)
        writer.SetFileName(s(folder / f"s{i:03d}.dcm"))
        writer.Execute(item)
    return folder


def itk_warning_then_bad_file(ctx: Ctx) -> Scenario:
    """predict on a folder: a series ITK warns about, then a truncated volume. One line, and the
    first case's output is not left behind."""
    run, images = ctx.run(), ctx.tmp / "images"
    images.mkdir()
    jittered_dicom(images / "a_series", first(ctx.cohort.images_ts))
    data = first(ctx.cohort.images_ts).read_bytes()
    (images / "b_cut.nii.gz").write_bytes(data[: len(data) // 2])
    out = ctx.tmp / "pred"
    return Scenario(predict_argv(run, images, out), user=[run, images], outputs=[out], needle="b_cut")


def itk_warning_on_success(ctx: Ctx) -> Scenario:
    """A series that sgrs accepts trains with exit 0; ITK's own warning lines stay off stderr."""
    sc = unlabeled_train(ctx, lambda images: jittered_dicom(images / "zz_series", first(ctx.cohort.images_tr)))

    def check(proc) -> None:
        leaked = [line for line in proc.stderr.splitlines() if "WARNING: In" in line or ".hxx" in line]
        assert not leaked, f"ITK lines on stderr: {leaked[:2]}"

    sc.check = check
    return sc


def skewed_direction(ctx: Ctx) -> Scenario:
    """A MetaImage whose direction is not a rotation (a shear): no spacing or NIfTI affine can
    say where its voxels are, and predictions would be written on another grid."""
    def add(images: Path) -> Path:
        array = read_volume(first(ctx.cohort.images_tr)).array.astype("<f4")
        array.tofile(images / "zz_skew.raw")
        path = images / "zz_skew.mhd"
        path.write_text(mhd_header("zz_skew.raw").replace("TransformMatrix = 1 0 0 0 1 0 0 0 1",
                                                          "TransformMatrix = 1 0 0 1 1 0 0 0 1"))
        return path
    return unlabeled_train(ctx, add)


# ----------------------------------------------------------------------------- the corpus


def C(id: str, family: str, build, expect=(2,), needs_run=False, usage_suggests=None, why="") -> HostileCase:
    return HostileCase(id, family, build, tuple(expect), needs_run, usage_suggests, why)


CASES: list[HostileCase] = [
    # --- data loss: outputs onto or into inputs
    C("predict-out-is-images", "data-loss", predict_out_is("images"), needs_run=True),
    C("predict-out-is-labels", "data-loss", predict_out_is("labels"), needs_run=True),
    C("predict-out-is-run", "data-loss", predict_out_is("run"), needs_run=True),
    C("predict-out-inside-images", "data-loss", predict_out_is("in-images"), needs_run=True,
      why="the next find_cases would read the predictions as a DICOM series of the images folder"),
    C("predict-out-inside-labels", "data-loss", predict_out_is("in-labels"), needs_run=True),
    C("predict-out-inside-run", "data-loss", predict_out_is("in-run"), needs_run=True),
    C("predict-out-dotdot-is-images", "data-loss", predict_out_is("dotdot-images"), needs_run=True),
    C("predict-out-symlink-to-images", "data-loss", predict_out_symlink_to_images, needs_run=True),
    C("predict-out-holds-user-volume", "data-loss", predict_out_holds_user_volume, needs_run=True,
      why="a file named like an output that sgrs did not write"),
    C("predict-probability-holds-user-volume", "data-loss", predict_probability_holds_user_volume,
      needs_run=True),
    C("predict-out-is-user-file", "data-loss", predict_out_is_user_file, needs_run=True),
    C("train-out-user-folder", "data-loss", train_out_user_folder(USER_RUN_LOOKALIKE),
      why="config.json, events.jsonl, STOP and .x.tmp of the user's: overwritten, appended, deleted"),
    C("train-out-user-folder-stop-only", "data-loss", train_out_user_folder({"STOP": "mine\n"})),
    C("train-out-user-folder-tmp-only", "data-loss", train_out_user_folder({".draft.tmp": "mine\n"})),
    C("train-out-user-folder-config-only", "data-loss", train_out_user_folder({"config.json": "{}\n"})),
    C("train-out-is-images", "data-loss", train_out_is("images")),
    C("train-out-is-labels", "data-loss", train_out_is("labels")),
    C("train-out-inside-images", "data-loss", train_out_is("in-images")),
    C("train-out-is-parent-of-inputs", "data-loss", train_out_is("parent")),
    C("train-out-is-user-file", "data-loss", train_out_is("file")),
    C("train-resume-user-folder", "data-loss", train_resume_user_folder),
    C("evaluate-json-is-label-input", "data-loss", evaluate_json_onto("label")),
    C("evaluate-json-is-pred-input", "data-loss", evaluate_json_onto("pred")),
    C("evaluate-json-is-user-file", "data-loss", evaluate_json_onto("user-file"),
      why="never overwrite a file that sgrs did not write"),
    C("evaluate-json-symlink-to-label", "data-loss", evaluate_json_onto("symlink-to-label")),
    C("demo-data-cohort-names-dotdot", "data-loss", demo_data_cohort_names("dotdot")),
    C("demo-data-cohort-names-absolute", "data-loss", demo_data_cohort_names("absolute")),
    C("demo-data-cohort-names-nested-dotdot", "data-loss", demo_data_cohort_names("nested-dotdot")),
    C("demo-data-overwrite-user-volumes", "data-loss", demo_data_user_volumes,
      why="without cohort.json the volumes are not sgrs's; --overwrite still replaced them"),
    C("demo-run-is-user-folder", "data-loss", demo_with_user("run"), why="demo used to rmtree DIR/run"),
    C("demo-data-is-user-folder", "data-loss", demo_with_user("data")),
    C("demo-pred-test-holds-user-volume", "data-loss", demo_with_user("pred_test")),
    C("demo-iterations-zero", "data-loss", demo_iterations_zero,
      why="refused after the demo data was written: a half-made output"),
    # --- paths that escape their folder
    *[C(f"{kind}-data-file-{how}", "escape", escape_train(kind, how))
      for kind, how in [("nrrd", "absolute"), ("nhdr", "dotdot"), ("nrrd", "symlink"), ("nhdr", "list"),
                        ("nhdr", "pattern"), ("mhd", "absolute"), ("mhd", "dotdot"), ("mhd", "symlink"),
                        ("mhd", "list"), ("mhd", "pattern")]],
    C("label-mhd-data-file-dotdot", "escape", escape_train("mhd", "dotdot", as_label=True)),
    C("predict-nrrd-data-file-dotdot", "escape", escape_predict("nrrd", "dotdot"), needs_run=True),
    C("predict-mhd-data-file-absolute", "escape", escape_predict("mhd", "absolute"), needs_run=True),
    C("h5-external-storage", "escape", escape_h5("storage")),
    C("h5-external-link", "escape", escape_h5("link")),
    C("h5-virtual-dataset", "escape", escape_h5("virtual")),
    C("h5-list-names-dotdot", "escape", h5_list_escapes("dotdot")),
    C("h5-list-names-absolute", "escape", h5_list_escapes("absolute")),
    C("predict-config-select-escapes", "escape", predict_config_select_escapes, expect=(0,), needs_run=True,
      why="'select' is no setting since 0.2 (CHANGELOG): ignored, so it names no file to load"),
    # --- resources: checked before allocating
    C("ckpt-meta-1024-filters", "resources", ckpt_1024_filters, needs_run=True),
    C("ckpt-meta-patch-4096", "resources", ckpt_patch_4096, needs_run=True),
    C("h5-chunked-declares-2gib", "resources", h5_declares_gib),
    C("demo-data-huge-shape", "resources", demo_data_huge_shape),
    C("train-patch-4096", "resources", train_with("--patch-size", "4096", "4096", "4096")),
    C("train-base-filters-huge", "resources", train_with("--base-filters", "100000")),
    C("train-batch-size-huge", "resources", train_with("--batch-size", "10000000", "--labeled-batch-size", "2")),
    C("predict-sw-batch-size-huge", "resources",
      predict_with("--sw-batch-size", "1000000", check=outputs_read_back), expect=(0,), needs_run=True,
      why="more windows per pass than the volume has: legitimate, capped"),
    # --- tracebacks instead of one line
    C("predict-config-json-malformed", "traceback", predict_config("{oops"), needs_run=True),
    C("predict-config-json-list", "traceback", predict_config("[1, 2]"), needs_run=True),
    C("predict-config-json-config-not-object", "traceback", predict_config('{"config": "x"}'), needs_run=True),
    C("predict-config-json-select-number", "traceback", predict_config('{"config": {"select": 5}}'),
      expect=(0,), needs_run=True, why="'select' is no setting since 0.2: ignored"),
    C("resume-config-json-malformed", "traceback", resume_config("{oops"), needs_run=True),
    C("resume-config-json-config-list", "traceback", resume_config('{"config": []}'), needs_run=True),
    C("resume-config-json-patch-text", "traceback", resume_config(_set_config(patch_size="abc")), needs_run=True),
    C("resume-config-json-ct-window-null", "traceback", resume_config(_set_config(ct_window=None)),
      needs_run=True),
    C("resume-config-json-filters-text", "traceback", resume_config(_set_config(base_filters="16")),
      needs_run=True),
    C("train-checkpoint-every-0", "traceback", train_with("--checkpoint-every", "0", needle="checkpoint")),
    C("train-checkpoint-every-negative", "traceback", train_with("--checkpoint-every", "-3", needle="checkpoint")),
    C("train-log-every-0", "traceback", train_with("--log-every", "0", needle="log")),
    C("train-val-every-0", "traceback", train_with("--val-every", "0", needle="val")),
    C("train-seed-negative", "traceback", train_with("--seed", "-1", needle="seed")),
    C("train-seed-huge", "traceback", train_with("--seed", str(2**70), needle="seed")),
    C("train-supervised-batch-size-1", "traceback", train_with("--method", "supervised", "--batch-size", "1"),
      expect=(0, 2), why="either trains (batch norm copes) or refuses with one line; never a traceback"),
    C("train-lr-negative", "traceback", train_with("--lr", "-0.5", needle="lr")),
    C("train-lr-nan", "traceback", train_with("--lr", "nan", needle="lr")),
    C("train-unsup-weight-nan", "traceback", train_with("--unsup-weight", "nan", needle="unsup")),
    C("train-rampup-fraction-negative", "traceback", train_with("--rampup-fraction", "-1", needle="rampup")),
    C("train-ct-window-reversed", "traceback",
      train_with("--normalization", "ct", "--ct-window", "200", "-100", needle="ct")),
    C("train-num-classes-1", "traceback", train_with("--num-classes", "1", needle="classes")),
    C("train-num-classes-300", "silent", train_with("--num-classes", "300", needle="classes"),
      why="train accepted more than 255 classes that predict then refuses"),
    C("train-device-cuda-junk", "traceback", train_with("--device", "cuda:x", needle="cuda:x")),
    C("predict-sw-batch-size-0", "traceback", predict_with("--sw-batch-size", "0", needle="sw-batch"),
      needs_run=True),
    C("predict-sw-batch-size-negative", "silent", predict_with("--sw-batch-size", "-1", needle="sw-batch"),
      needs_run=True, why="predicted all background, exit 0"),
    C("predict-overlap-1.5", "traceback", predict_with("--overlap", "1.5", needle="overlap"), needs_run=True),
    C("predict-overlap-1", "traceback", predict_with("--overlap", "1", needle="overlap"), needs_run=True),
    C("predict-overlap-negative", "traceback", predict_with("--overlap=-0.5", needle="overlap"), needs_run=True),
    C("predict-overlap-nan", "traceback", predict_with("--overlap", "nan", needle="overlap"), needs_run=True),
    C("evaluate-json-is-folder", "traceback", evaluate_json_folder),
    C("evaluate-json-missing-folder", "traceback", evaluate_json_missing_folder),
    C("demo-data-dir-is-file", "traceback", demo_data_dir_is_file),
    C("demo-data-cohort-json-malformed", "traceback", demo_data_cohort_json("{not json")),
    C("demo-data-cohort-json-names-not-list", "traceback", demo_data_cohort_json('{"train_names": 5}')),
    C("demo-data-cohort-json-is-list", "traceback", demo_data_cohort_json("[1, 2]")),
    C("demo-dir-is-file", "traceback", demo_dir_is_file),
    # --- silent wrong results (exit 0 before)
    C("labels-all-255", "silent", labels_changed(_all_255)),
    C("labels-equal-images", "silent", labels_equal_images, why="an int16 image folder as labels: ~1200 classes"),
    C("ignore-index-only-foreground", "silent", labels_changed(lambda a: a, "--ignore-index", "1",
                                                             needle="ignore")),
    C("ignore-index-background", "silent", labels_changed(lambda a: a, "--ignore-index", "0", needle="ignore"),
      why="no background class left to learn"),
    C("no-foreground-anywhere", "silent", labels_changed(_all_background)),
    C("labels-more-than-255-classes", "silent", labels_changed(_many_classes)),
    C("label-folder-named-like-file", "silent", label_folder_named_like_file,
      why="skipped, so the case trained as unlabeled"),
    C("sform-qform-disagree-train", "silent", sform_qform_train),
    C("sform-qform-disagree-predict", "silent", sform_qform_predict, needs_run=True),
    C("values-near-float-max-train", "silent", near_max_train, expect=(0, 2),
      why="either refused with one line or trained to finite weights"),
    C("values-near-float-max-predict", "silent", near_max_predict, expect=(0, 2), needs_run=True,
      why="either refused with one line or every output is readable (no NaN probabilities)"),
    C("mhd-direction-not-a-rotation", "silent", skewed_direction, why="a shear read as a direction"),
    C("evaluate-reference-255-not-a-class", "silent", evaluate_reference_255, expect=(0,)),
    C("evaluate-pred-is-labels", "silent", evaluate_pred_is_labels, why="a perfect score from one folder twice"),
    C("predict-labels-equal-images", "silent", predict_labels_equal_images, needs_run=True,
      why="every image counted as labeled: no regions written, exit 0"),
    C("nan-outside-fov-unlabeled", "silent", nan_outside_fov, expect=(0,),
      why="legitimate after resampling: masked as ignored, with a warning naming the file"),
    # --- rough edges
    C("predict-nhdr-input", "rough", predict_nhdr_input, expect=(0, 2), needs_run=True,
      why="read, then refused at write time after the prediction: either write it or refuse first"),
    C("predict-itk-warning-then-bad-file", "rough", itk_warning_then_bad_file, needs_run=True,
      why="ITK's warning lines before our error, and the first case's output already written"),
    C("train-itk-warning-on-success", "rough", itk_warning_on_success, expect=(0,)),
    # --- mistyped options (USAGE: short usage line + error with a suggestion; issue 22 item 9)
    C("USAGE-train-iteratons", "mistyped", lambda ctx: Scenario(
        train_argv(ctx.images(), ctx.labels(), ctx.tmp / "run", "--iteratons", "5"),
        user=[ctx.tmp / "images", ctx.tmp / "labels"], outputs=[ctx.tmp / "run"]),
      usage_suggests="--iterations"),
    C("USAGE-train-label-ambiguous", "mistyped", lambda ctx: Scenario(
        ["train", "--images", s(ctx.images()), "--label", s(ctx.labels()), "--out", s(ctx.tmp / "run")],
        user=[ctx.tmp / "images", ctx.tmp / "labels"], outputs=[ctx.tmp / "run"]),
      usage_suggests="--labels"),
]

CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "duplicate case ids"
