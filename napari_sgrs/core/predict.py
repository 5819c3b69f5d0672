"""Predict a folder of volumes with a trained run: the one folder loop behind ``sgrs predict``
(so behind the napari panel, which runs it in a subprocess) and the benchmarks.

Every output path is known and checked before anything is predicted or written: the output
folder is never an input (:func:`~.outputs.check_not_input`), and a file there is replaced only
when ``sgrs predict`` wrote it and nobody changed it since (:class:`~.outputs.WrittenFiles`).
Each volume's memory need is checked before it is predicted.

Layout of ``out`` (docs/ARCHITECTURE.md): ``<name>`` the label volume (uint8); with ``regions``,
for each unlabeled volume ``probability/<name>`` (foreground probability), ``regions/<name>``
(region codes), ``reliability/<name>`` (0-1: how far to trust each voxel's label,
:mod:`.reliability`), and ``review.json``: each volume's estimated Dice with its interval and
flagged share, worst first. ``<name>`` is the input's own name for NIfTI, .nrrd and .mha, and
``<case>.nii.gz`` otherwise.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from .errors import ConfigError, InputWarning, ResourceError, SGRSError
from .infer import Predictor, window_starts
from .io import Case, find_cases, read_h5_benchmark, read_volume, write_volume
from .memory import check_inference_memory
from .outputs import WrittenFiles, atomic_write_bytes, check_not_input
from .postprocess import resolve_largest_component
from .reliability import ReviewCalibration
from .runfolder import RunFolder

#: Input formats whose predictions keep the input's file name; every other input (.nhdr, .mhd,
#: h5, DICOM) gets ``<case>.nii.gz``, a single file with the input's geometry, so no header
#: companion (.raw, a detached NRRD payload) is ever written or overwritten.
KEEP_NAME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Who writes a prediction folder, as its manifest (.sgrs-written.json) records it.
WRITER = "sgrs predict"
PROBABILITY_DIR, REGIONS_DIR, RELIABILITY_DIR = "probability", "regions", "reliability"
#: The review queue of a prediction folder: {"volumes": [{"name", "estimated_dice", ...}], ...}
REVIEW_FILE = "review.json"


@dataclass
class PredictedFolder:
    """What :func:`predict_folder` wrote: for each case name, its label file, then (with regions)
    its probability and regions files."""

    out: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    review: list[dict] = field(default_factory=list)  # volumes with regions, worst estimated Dice first

    def label(self, name: str) -> Path:
        return self.files[name][0]


def output_name(case: Case) -> str:
    """The file name of a case's prediction: the input's own name for NIfTI, .nrrd and .mha, else
    ``<case>.nii.gz``."""
    p = Path(case.image)
    if p.is_file() and p.name.lower().endswith(KEEP_NAME_SUFFIXES):
        return p.name
    return f"{case.name}.nii.gz"


def largest_component_note(mode: str, meta: dict, num_classes: int) -> str | None:
    """One line on which classes ``--largest-component`` reduces, and why none where auto finds
    none; None with ``off``."""
    classes = resolve_largest_component(mode, meta, num_classes)
    if mode == "off":
        return None
    if classes:
        return (f"largest-component ({mode}): keeping one connected component of class(es) "
                f"{', '.join(map(str, classes))}")
    if "single_component_classes" not in meta:
        return ("largest-component (auto): this run was trained before the check was recorded, so nothing is "
                "post-processed; pass --largest-component on to apply it to every class")
    return ("largest-component (auto): no class is one connected component in every labeled volume, so "
            "nothing is post-processed")


def predict_folder(run: str | os.PathLike, out: str | os.PathLike, *, images: str | os.PathLike | None = None,
                   labels: str | os.PathLike | None = None, h5_root: str | os.PathLike | None = None,
                   h5_list: str | os.PathLike | None = None, cases: Sequence[Case] | None = None,
                   regions: bool = False, device: str = "auto", checkpoint: str = "last", model: str = "student",
                   overlap: float = 0.5, sw_batch_size: int = 4, largest_component: str = "off",
                   progress: bool = False, note: Callable[[str], None] | None = None,
                   skip_bad: bool = False) -> PredictedFolder:
    """Segment volumes with the run folder (or checkpoint file) ``run`` into the folder ``out``.

    The volumes: ``images`` (a folder), the benchmark layout ``h5_root`` with its ``h5_list``, or
    ``cases`` (io.Case list; those with a label count as labeled). With ``labels`` beside ``images``,
    images that have a label there are labeled. ``regions`` adds probability and regions files for
    each unlabeled volume. ``note`` receives one-line notices (the largest-component rule);
    ``progress`` shows a progress bar. Raises SGRSError subclasses, one line each, before anything
    is written when an input, an output path or the run is wrong: every volume is read and its
    memory need checked before the first one is predicted (a batch never stops half way on a bad
    file). With ``skip_bad``, an unreadable volume is left out with a one-line InputWarning
    instead, and the others are predicted.
    """
    out = Path(out)
    subfolders = [out] + ([out / PROBABILITY_DIR, out / REGIONS_DIR, out / RELIABILITY_DIR] if regions else [])
    inputs = {"--images": images, "--labels": labels, "--run": run, "--h5-root": h5_root, "--list": h5_list}
    if cases is not None:  # the folders the given volumes are in
        parents = sorted({Path(c.image).parent for c in cases})
        inputs.update({"image folder" + (f" {i + 1}" if len(parents) > 1 else ""): p for i, p in enumerate(parents)})
    for folder in subfolders:  # the subfolders too: one may be a link into an input
        check_not_input(folder, inputs)
    folder = RunFolder(run)
    if folder.path.is_dir() and folder.config.exists():
        folder.read_config()  # a damaged config.json is one line here too, as on --resume
    cases, labeled = _cases(images, labels, h5_root, h5_list, cases)
    # every output path is known, and checked, before anything is predicted or written
    targets = {c.name: _targets(out, output_name(c), regions and c.name not in labeled) for c in cases}
    review_file = [out / REVIEW_FILE] if regions else []
    written = WrittenFiles(out, by=WRITER)
    written.check([t for paths in targets.values() for t in paths] + review_file)
    predictor = Predictor.from_run(run, device=device, checkpoint=checkpoint, model=model)
    said = largest_component_note(largest_component, predictor.meta, predictor.num_classes)
    if said and note is not None:
        note(said)
    cases = _readable(predictor, cases, targets, regions, labeled, overlap, sw_batch_size, skip_bad)
    for sub in subfolders:
        try:
            sub.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResourceError(f"cannot create output folder {sub}: {exc.strerror}; choose a writable --out") from exc
    written.expect([t for paths in targets.values() for t in paths] + review_file)
    review = []
    for case in tqdm(cases, desc="predict", unit="volume", disable=not progress):
        line = _predict_case(predictor, case, targets[case.name], regions and case.name not in labeled, overlap,
                             sw_batch_size, largest_component)
        written.record(targets[case.name])
        if line is not None:
            review.append({"name": case.name, "file": output_name(case), **line})
    review.sort(key=lambda r: (r["estimated_dice"], -r["flagged_share"], r["name"]))
    if review_file:
        calibration = ReviewCalibration.from_meta(predictor.meta).as_meta()  # volumes 0: no validation split
        doc = {"volumes": review, "calibration": calibration,
               "note": "estimated Dice: expected under the model's own probabilities, shifted by its error on the "
                       "validation split; flagged_share: share of the volume in the disregarded or inconsistent region"}
        atomic_write_bytes(review_file[0], json.dumps(doc, indent=1).encode())
        written.record(review_file)
    return PredictedFolder(out, targets, review)


def _readable(predictor: Predictor, cases: list[Case], targets: dict, regions: bool, labeled: set[str],
              overlap: float, sw_batch_size: int, skip_bad: bool) -> list[Case]:
    """The cases whose volume reads and fits in memory; the first that does not raises (one
    line), or with ``skip_bad`` is left out with a warning. Reads each volume once more than the
    prediction does: the price of never leaving a half-predicted folder."""
    good = []
    for case in cases:
        try:
            vol = read_volume(case.image, nan="keep")
            _check_memory(predictor, vol.array.shape, regions and case.name not in labeled, overlap, sw_batch_size,
                          str(case.image))
        except SGRSError as exc:
            if not skip_bad:
                raise
            warnings.warn(f"skipped: {exc}", InputWarning, stacklevel=2)
            del targets[case.name]
            continue
        good.append(case)
    if not good:
        raise ConfigError("no volume could be read (each was skipped with a warning); fix the inputs")
    return good


def _windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """How many sliding windows cover a volume of ``shape`` (padded to the patch where smaller)."""
    return math.prod(len(window_starts(max(s, p), p, overlap)) for s, p in zip(shape, patch))


def _batch(predictor: Predictor, shape: Sequence[int], overlap: float, sw_batch_size: int) -> int:
    """Windows per forward pass: never more than the volume has (a huge --sw-batch-size is capped)."""
    return max(1, min(sw_batch_size, _windows(shape, predictor.patch, overlap)))


def _check_memory(predictor: Predictor, shape: Sequence[int], want_regions: bool, overlap: float,
                  sw_batch_size: int, name: str) -> None:
    check_inference_memory(tuple(shape), predictor.patch, predictor.num_classes, predictor.device,
                           regions=want_regions, base_filters=getattr(predictor.model, "base_filters", 16),
                           sw_batch_size=_batch(predictor, shape, overlap, sw_batch_size), name=name)


def _cases(images, labels, h5_root, h5_list, cases) -> tuple[list[Case], set[str]]:
    """The volumes to predict and the names of the labeled ones (no regions for those)."""
    if cases is not None:
        return list(cases), {c.name for c in cases if c.label is not None}
    if h5_root is not None:
        if h5_list is None:
            raise ConfigError("--h5-root needs --list (e.g. test.list)")
        found = read_h5_benchmark(h5_root, h5_list)
    elif images is None:
        raise ConfigError("give --images DIR, or --h5-root ROOT --list FILE")
    else:
        found = find_cases(images, None)
    labeled = set()
    if labels is not None and images is not None:
        labeled = {c.name for c in find_cases(images, labels) if c.label is not None}
    return found, labeled


def _targets(out: Path, name: str, with_regions: bool) -> list[Path]:
    return [out / name] + ([out / PROBABILITY_DIR / name, out / REGIONS_DIR / name, out / RELIABILITY_DIR / name]
                           if with_regions else [])


def _predict_case(predictor: Predictor, case: Case, targets: list[Path], want_regions: bool, overlap: float,
                  sw_batch_size: int, largest_component: str) -> dict | None:
    """Read, check memory, predict and write one volume (label, then probability, regions and
    reliability); returns its review line (with regions)."""
    vol = read_volume(case.image, nan="keep")  # NaN: no data; predicted as background, with a warning
    _check_memory(predictor, vol.array.shape, want_regions, overlap, sw_batch_size, str(case.image))
    pred = predictor.predict(vol.array, regions=want_regions, overlap=overlap,
                             batch_size=_batch(predictor, vol.array.shape, overlap, sw_batch_size),
                             largest_component=largest_component, name=str(case.image))
    arrays = [pred.label] + ([pred.probability, pred.regions, pred.reliability] if want_regions else [])
    for path, array in zip(targets, arrays):
        write_volume(path, array, vol.geometry)
    return pred.review
