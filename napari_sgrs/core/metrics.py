"""Segmentation metrics: Dice, Jaccard, HD95 and ASD per foreground class, per case and per folder.

Arrays are label volumes in axis order (D, H, W) holding integer class ids (0 = background).
Spacing is in millimetres per voxel, in the same (D, H, W) order.

Definitions (all per foreground class ``c``, on the binary masks ``P = pred == c`` and
``R = ref == c``):

- ``dice = 2|P∩R| / (|P| + |R|)``, ``jaccard = |P∩R| / |P∪R|``.
- Surface of a mask: its foreground voxels that have at least one background 6-neighbour
  (``mask & ~binary_erosion(mask, 3D cross)``). Voxels outside the volume count as
  background, so a mask touching the volume border has a surface there.
- Directed surface distances ``d(P→R)``: for every surface voxel of P, the Euclidean
  distance to the nearest surface voxel of R (exact, via ``distance_transform_edt``).
- ``hd95 = max(percentile95(d(P→R)), percentile95(d(R→P)))``: the MedPy
  ``medpy.metric.binary.hd95`` definition used by the LA / Pancreas tables (UA-MT, SASSNet,
  MC-Net, SGRS-Net). It is *not* the 95th percentile of the pooled distances.
- ``asd = (mean(d(P→R)) + mean(d(R→P))) / 2``: the average symmetric surface distance, as
  MedPy's ``assd``. (The LA table scripts report MedPy's directed ``asd(pred, ref)``, i.e.
  ``mean(d(P→R))``; values are close but not identical.)
- ``*_vox`` distances are in voxels (unit spacing); ``*_mm`` use the given spacing.

Ignored voxels: a voxel holding the ignore index (255 by default, the value that marks
unannotated voxels in a training label) in the reference or the prediction is left out of every
metric: it is background in both masks, so it is neither a hit, a miss nor a false alarm, and the
ignore index is never a class.

Empty-mask conventions (never reported as 0):

- P and R both empty: ``dice = jaccard = 1.0``; distances are ``nan`` ("undefined").
- exactly one of P, R empty: ``dice = jaccard = 0.0``; distances are ``inf``.

Summaries average each metric over the cases where it is finite and report, next to every
mean, how many cases were undefined (nan) and infinite, so no case is dropped silently.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from napari_sgrs.core.errors import InputError
from napari_sgrs.core.codes import IGNORE_INDEX  # unannotated voxels; never a class

__all__ = [
    "CaseMetrics",
    "ClassSummary",
    "EvaluationReport",
    "METRIC_NAMES",
    "case_metrics",
    "evaluate_folders",
    "summarize",
    "surface_distances",
]

#: Metric fields of :class:`CaseMetrics`, in table order.
METRIC_NAMES: tuple[str, ...] = ("dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm")



@dataclass(frozen=True)
class CaseMetrics:
    """Metrics of one foreground class in one case (one record per (case, class)).

    Attributes:
        name: case name (file name without extension for :func:`evaluate_folders`).
        label: the foreground class id (1 .. num_classes-1).
        dice, jaccard: overlap in [0, 1].
        hd95_vox, asd_vox: surface distances in voxels; ``nan`` if both masks are empty,
            ``inf`` if exactly one is.
        hd95_mm, asd_mm: the same distances in millimetres (using the spacing).
        pred_voxels, ref_voxels: foreground voxel counts of the prediction and reference.
    """

    name: str
    label: int
    dice: float
    jaccard: float
    hd95_vox: float
    asd_vox: float
    hd95_mm: float
    asd_mm: float
    pred_voxels: int
    ref_voxels: int


@dataclass(frozen=True)
class ClassSummary:
    """Per-class summary over cases of one metric set.

    ``mean`` and ``std`` (population std, ddof=0) of each metric are taken over the cases
    where the value is finite; ``n_undefined`` (nan: both masks empty) and ``n_infinite``
    (one mask empty) count the cases left out of that metric's mean. A metric with no
    finite case has mean and std ``nan``.
    """

    label: int
    n_cases: int
    mean: dict[str, float]
    std: dict[str, float]
    n_undefined: dict[str, int]
    n_infinite: dict[str, int]


@dataclass
class EvaluationReport:
    """Per-case rows and per-class summaries of a folder evaluation."""

    cases: list[CaseMetrics]
    summary: dict[int, ClassSummary]
    pred_dir: str = ""
    label_dir: str = ""
    num_classes: int = 2
    ignore_index: int | None = IGNORE_INDEX
    ignored_voxels: int = 0  # voxels left out of every metric because they hold ignore_index
    definitions: dict[str, str] = field(
        default_factory=lambda: {
            "hd95": "max of the two directed 95th percentiles of surface distances (MedPy hd95)",
            "asd": "mean of the two directed mean surface distances (MedPy assd)",
            "surface": "foreground voxels with a background 6-neighbour",
            "ignored": "voxels holding ignore_index in the reference or prediction are left out of "
                       "every metric (background in both masks)",
            "both_empty": "dice=jaccard=1, distances null (undefined)",
            "one_empty": "dice=jaccard=0, distances 'inf'",
            "json": "nan is written as null and inf as the string 'inf'",
        }
    )

    def to_dict(self) -> dict:
        """A JSON-ready dict; nan becomes None and inf becomes the string ``"inf"``."""
        return _json_safe(
            {
                "pred_dir": self.pred_dir,
                "label_dir": self.label_dir,
                "num_classes": self.num_classes,
                "ignore_index": self.ignore_index,
                "ignored_voxels": self.ignored_voxels,
                "definitions": self.definitions,
                "summary": {str(k): asdict(v) for k, v in self.summary.items()},
                "cases": [asdict(c) for c in self.cases],
            }
        )

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 2) -> str:
        """Return the report as strict JSON text; also write it to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def format_table(self) -> str:
        """A plain-text table: one row per case and class, then mean ± std per class."""
        headers = ["case", "class", *METRIC_NAMES]
        rows = [
            [c.name, str(c.label), *(_fmt(getattr(c, m)) for m in METRIC_NAMES)]
            for c in self.cases
        ]
        summary_rows = []
        for label, s in sorted(self.summary.items()):
            cells = []
            for m in METRIC_NAMES:
                cell = f"{_fmt(s.mean[m])}±{_fmt(s.std[m])}"
                left_out = s.n_undefined[m] + s.n_infinite[m]
                if left_out:
                    cell += f" ({left_out} n/a)"
                cells.append(cell)
            summary_rows.append([f"mean (n={s.n_cases})", str(label), *cells])
        widths = [
            max(len(r[i]) for r in [headers, *rows, *summary_rows]) for i in range(len(headers))
        ]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        rule = "  ".join("-" * w for w in widths)
        out = [line(headers), rule, *(line(r) for r in rows), rule]
        out += [line(r) for r in summary_rows]
        out.append("n/a: cases left out of the mean (nan: both empty, inf: one empty)")
        return "\n".join(out)


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances between two non-empty boolean masks.

    Args:
        a, b: boolean masks of equal shape (D, H, W), each with at least one voxel.
        spacing: voxel size per axis (D, H, W) in mm; ``None`` gives distances in voxels.

    Returns:
        ``(d_ab, d_ba)``: for each surface voxel of ``a`` the distance to the nearest surface
        voxel of ``b``, and vice versa (1-D float64 arrays, in mm or voxels).
    """
    a, b = _crop_to_union(a.astype(bool), b.astype(bool))
    surf_a = _surface(a)
    surf_b = _surface(b)
    sampling = None if spacing is None else tuple(float(s) for s in spacing)
    d_ab = ndimage.distance_transform_edt(~surf_b, sampling=sampling)[surf_a]
    d_ba = ndimage.distance_transform_edt(~surf_a, sampling=sampling)[surf_b]
    return np.asarray(d_ab, dtype=np.float64), np.asarray(d_ba, dtype=np.float64)


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    num_classes: int | None = None,
    name: str = "",
    ignore_index: int | None = IGNORE_INDEX,
) -> list[CaseMetrics]:
    """Metrics of every foreground class of one case.

    Args:
        pred: predicted label volume (D, H, W), integer class ids.
        ref: reference label volume, same shape.
        spacing: voxel size (D, H, W) in mm, for the ``*_mm`` distances.
        num_classes: number of classes including background; ``None`` infers
            ``max(pred.max(), ref.max()) + 1`` (at least 2), ignored voxels left out.
        name: case name stored in each record.
        ignore_index: voxels holding this value in ``ref`` or ``pred`` are left out of every
            metric; ``None``: every value is a class.

    Returns:
        One :class:`CaseMetrics` per class 1 .. num_classes-1, in class order.

    Raises:
        InputError: shapes differ, spacing does not match the dimensions, values are not
            integer class ids, a value is >= num_classes, the ignore index is a class, or
            every reference voxel is ignored.
    """
    pred = _as_label_array(pred, f"prediction {name!r}" if name else "prediction")
    ref = _as_label_array(ref, f"reference {name!r}" if name else "reference")
    if pred.shape != ref.shape:
        raise InputError(
            f"prediction shape {pred.shape} differs from reference shape {ref.shape}"
            f"{' for case ' + repr(name) if name else ''}; predict on the matching image"
        )
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise InputError(
            f"spacing {spacing} must hold {pred.ndim} positive values (mm, axis order D,H,W)"
        )
    pred_what = f"prediction {name!r}" if name else "prediction"
    ref_what = f"reference {name!r}" if name else "reference"
    pred, ref, _ = _drop_ignored(pred, ref, ignore_index, pred_what, ref_what)
    top = int(max(pred.max(initial=0), ref.max(initial=0)))
    if num_classes is None:
        num_classes = max(2, top + 1)
    _check_ignore_is_no_class(ignore_index, num_classes)
    if top >= num_classes:
        raise InputError(
            f"label value {top} found{' in case ' + repr(name) if name else ''} but "
            f"num_classes={num_classes}; pass num_classes>={top + 1}"
        )
    records = []
    for label in range(1, num_classes):
        records.append(_class_metrics(pred == label, ref == label, spacing, label, name))
    return records


def evaluate_folders(
    pred_dir: str | os.PathLike,
    label_dir: str | os.PathLike,
    *,
    json_path: str | os.PathLike | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = IGNORE_INDEX,
) -> EvaluationReport:
    """Evaluate every prediction in ``pred_dir`` against the same-named file in ``label_dir``.

    Files are paired by case name, the file name without its volume suffix (as
    :func:`napari_sgrs.core.io.find_cases` does), so ``case_001.nii.gz`` pairs with
    ``case_001.nii.gz`` or ``case_001.nrrd``. Sub-folders of ``pred_dir`` (``probability/``,
    ``regions/``) and hidden files are not read; h5 files are read from dataset ``label``.
    Distances in mm use the reference's spacing.

    Args:
        pred_dir: folder of predicted label volumes.
        label_dir: folder of reference label volumes.
        json_path: if given, the report is also written there as JSON.
        num_classes: classes including background; ``None`` infers it from all files.
        ignore_index: voxels holding this value (in the reference or the prediction) are left
            out of every metric; ``None``: every value is a class.

    Raises:
        InputError: a folder is missing or has no volumes, a prediction has no reference,
            a reference has no prediction, a pair differs in shape or spacing, a reference
            is ignored everywhere, or the ignore index is one of the classes.
    """
    from napari_sgrs.core.io import _list_volumes, read_volume

    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    if pred_dir.is_dir() and label_dir.is_dir() and pred_dir.resolve() == label_dir.resolve():
        raise InputError(f"--pred and --labels are the same folder ({pred_dir}): every case would score a "
                         f"perfect 1.0 against itself; point --pred at the predictions")
    # the case listing of training and prediction: a folder or broken link named like a volume is
    # refused there rather than skipped, so no case drops out of the evaluation unseen
    preds = _list_volumes(pred_dir, with_series=False)
    refs = _list_volumes(label_dir, with_series=False)
    missing_ref = sorted(set(preds) - set(refs))
    if missing_ref:
        raise InputError(
            f"prediction {preds[missing_ref[0]]} has no reference in {label_dir}"
            f" ({len(missing_ref)} unmatched); add its label or remove the prediction"
        )
    missing_pred = sorted(set(refs) - set(preds))
    if missing_pred:
        raise InputError(
            f"reference {refs[missing_pred[0]]} has no prediction in {pred_dir}"
            f" ({len(missing_pred)} unmatched); predict that image or remove the label"
        )

    if ignore_index is not None and not 0 <= ignore_index <= 255:
        raise InputError(
            f"--ignore-index must be in 0..255 (the value of unannotated voxels),"
            f" got {ignore_index}"
        )
    _check_ignore_is_no_class(ignore_index, num_classes or 2)  # 0 and 1 always are classes
    loaded = []
    ignored = 0
    for case in sorted(preds):
        pred_vol = read_volume(preds[case], dataset="label")
        ref_vol = read_volume(refs[case], dataset="label")
        pred = _as_label_array(pred_vol.array, f"prediction {preds[case]}")
        ref = _as_label_array(ref_vol.array, f"reference {refs[case]}")
        if pred.shape != ref.shape:
            raise InputError(
                f"prediction {preds[case]} has shape {pred.shape} but reference {refs[case]} "
                f"has {ref.shape}; predict on the matching image"
            )
        p_sp = tuple(float(s) for s in pred_vol.geometry.spacing)
        r_sp = tuple(float(s) for s in ref_vol.geometry.spacing)
        if not np.allclose(p_sp, r_sp, rtol=1e-3, atol=1e-5):
            raise InputError(
                f"prediction {preds[case]} has spacing {p_sp} but reference {refs[case]} has "
                f"{r_sp}; write predictions with the input image geometry"
            )
        pred, ref, n_ignored = _drop_ignored(pred, ref, ignore_index, f"prediction {preds[case]}",
                                             f"reference {refs[case]}")
        ignored += n_ignored
        loaded.append((case, pred, ref, r_sp))

    if num_classes is None:
        top = max(int(max(p.max(initial=0), r.max(initial=0))) for _, p, r, _ in loaded)
        num_classes = max(2, top + 1)
    _check_ignore_is_no_class(ignore_index, num_classes)
    cases: list[CaseMetrics] = []
    for case, pred, ref, spacing in loaded:
        cases.extend(
            case_metrics(pred, ref, spacing, num_classes=num_classes, name=case, ignore_index=None)
        )
    report = EvaluationReport(
        cases=cases,
        summary=summarize(cases),
        pred_dir=str(pred_dir),
        label_dir=str(label_dir),
        num_classes=num_classes,
        ignore_index=ignore_index,
        ignored_voxels=ignored,
    )
    if json_path is not None:
        report.to_json(json_path)
    return report


def summarize(cases: Iterable[CaseMetrics]) -> dict[int, ClassSummary]:
    """Mean/std of each metric per class over finite values, with counts of nan and inf."""
    by_label: dict[int, list[CaseMetrics]] = {}
    for c in cases:
        by_label.setdefault(c.label, []).append(c)
    out = {}
    for label, recs in sorted(by_label.items()):
        mean, std, n_nan, n_inf = {}, {}, {}, {}
        for m in METRIC_NAMES:
            values = np.array([getattr(r, m) for r in recs], dtype=np.float64)
            finite = values[np.isfinite(values)]
            mean[m] = float(finite.mean()) if finite.size else math.nan
            std[m] = float(finite.std()) if finite.size else math.nan
            n_nan[m] = int(np.isnan(values).sum())
            n_inf[m] = int(np.isinf(values).sum())
        out[label] = ClassSummary(label, len(recs), mean, std, n_nan, n_inf)
    return out


# --- helpers -------------------------------------------------------------------------


def _class_metrics(
    p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...], label: int, name: str
) -> CaseMetrics:
    n_p, n_r = int(p.sum()), int(r.sum())
    if n_p == 0 and n_r == 0:
        return CaseMetrics(name, label, 1.0, 1.0, *([math.nan] * 4), 0, 0)
    if n_p == 0 or n_r == 0:
        return CaseMetrics(name, label, 0.0, 0.0, *([math.inf] * 4), n_p, n_r)
    inter = int(np.logical_and(p, r).sum())
    dice = 2.0 * inter / (n_p + n_r)
    jaccard = inter / (n_p + n_r - inter)
    dist = {}
    for unit, sampling in (("vox", None), ("mm", spacing)):
        d_pr, d_rp = surface_distances(p, r, sampling)
        dist[f"hd95_{unit}"] = float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
        dist[f"asd_{unit}"] = float((d_pr.mean() + d_rp.mean()) / 2.0)
    return CaseMetrics(
        name,
        label,
        dice,
        jaccard,
        dist["hd95_vox"],
        dist["asd_vox"],
        dist["hd95_mm"],
        dist["asd_mm"],
        n_p,
        n_r,
    )


def _drop_ignored(
    pred: np.ndarray, ref: np.ndarray, ignore_index: int | None, pred_what: str, ref_what: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Make voxels holding ``ignore_index`` in either volume background in both.

    Returns the two arrays (copies where something was ignored) and the ignored voxel count.
    The training loop's validation drops ignored voxels the same way.
    """
    if ignore_index is None or pred.shape != ref.shape:
        return pred, ref, 0  # no ignore index, or a shape error the caller reports
    ignored = (ref == ignore_index) | (pred == ignore_index)
    n = int(ignored.sum())
    if n == 0:
        return pred, ref, 0
    if n == ignored.size:
        what = ref_what if bool((ref == ignore_index).all()) else f"{pred_what} with {ref_what}"
        raise InputError(
            f"{what}: every voxel holds the ignore index {ignore_index}, so nothing is left to"
            " evaluate - give the annotated labels, or set --ignore-index"
        )
    return np.where(ignored, 0, pred), np.where(ignored, 0, ref), n


def _check_ignore_is_no_class(ignore_index: int | None, num_classes: int) -> None:
    if ignore_index is not None and ignore_index < num_classes:
        raise InputError(
            f"--ignore-index {ignore_index} is one of the {num_classes} classes (0.."
            f"{num_classes - 1}), so that class would not be scored - set it to the value of"
            " unannotated voxels (default 255)"
        )


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background 6-neighbour (outside the array is background)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their joint bounding box plus one voxel.

    Exact for the distances: every surface voxel (the only EDT seeds and query points) lies
    in the box, and the one-voxel margin keeps the erosion identical (where the box meets
    the volume border, the border is background in both cases).
    """
    union = a | b
    slices = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        idx = np.flatnonzero(union.any(axis=other))
        lo, hi = max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[axis])
        slices.append(slice(lo, hi))
    box = tuple(slices)
    return a[box], b[box]


def _as_label_array(array: np.ndarray, what: str) -> np.ndarray:
    """Integer label array; rejects floats with fractional parts and negative values."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise InputError(f"{what} has shape {array.shape}; expected a 3-D label volume (D, H, W)")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise InputError(
                f"{what} holds non-integer values (dtype {array.dtype}); "
                "pass a label volume, not probabilities"
            )
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise InputError(f"{what} holds negative label {int(array.min())}; labels must be >= 0")
    return array


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}"


def _json_safe(obj):
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj
