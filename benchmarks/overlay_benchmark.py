"""Does the overlay point at the model's mistakes? Error detection of every candidate overlay.

For each run folder (``sgrs train`` output on a demo cohort), predicts the cohort's held-out test
volumes with the LAST checkpoint and computes, per window, every forward pass a candidate needs
(the plain student, today's single fixed-partner mix, two independent draws of mixes with
partners from the labeled training volumes, flips, MC dropout, teacher). The label a
user sees is the plain student's argmax; a wrong voxel is one where it differs from the truth.
Each candidate scores every voxel (higher: more likely wrong); from the scores come:

- recall of wrong voxels at equal flagged count (0.5, 1, 2, 5 % of each volume), and at the
  candidate's own flagged count (score >= s_tau) with its precision, against the probability
  band and the boundary band at the same count;
- the Dice after a perfect correction of the flagged voxels only;
- per volume, the Spearman correlation of the estimated 1 - Dice with the true 1 - Dice;
- for the random-draw candidates, the Jaccard of the inconsistent sets of two draws.

Example (the figures in benchmarks/RESULTS.md; the rule in benchmarks/out/overlay/RULE.md)::

    python benchmarks/overlay_benchmark.py --cohorts /tmp/ov/data --runs /tmp/ov/runs/rep-* \
        --out benchmarks/out/overlay/rep
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage, stats

from napari_sgrs.core.codes import IGNORE_INDEX
from napari_sgrs.core.data import normalise, pad_to
from napari_sgrs.core.infer import Predictor, sliding_window
from napari_sgrs.core.io import find_cases, read_volume
from napari_sgrs.core.reliability import error_score, estimated_dice
from napari_sgrs.core.runfolder import RunFolder

def binary_equivalent_tau(tau: float) -> float:
    """The error score s_tau at which a binary prediction's log10 entropy equals ``tau``.

    The paper disregards a voxel whose entropy exceeds tau; for two classes that is s >= s_tau
    exactly. Using s (not the entropy) for K classes flags ties such as (0.5, 0.5, 0), which a
    normalised entropy calls confident.
    """
    if not 0.0 < tau:
        return 0.5
    if tau >= math.log10(2):
        return 0.5

    def h(p):
        return -(p * math.log10(p) + (1 - p) * math.log10(1 - p))

    lo, hi = 1e-9, 0.5  # h rises on (0, 0.5]
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if h(mid) < tau else (lo, mid)
    return (lo + hi) / 2


def partner_patches(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], patch: Sequence[int],
                    normalization: str, ct_window: tuple[float, float], n: int, seed: int = 0,
                    ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labeled patches (n, d, h, w), normalised as in training, and their labels: the labeled volumes in turn,
    every other one centred on a random foreground voxel (as the trainer's target-centred crops),
    the rest uniform, so the partners look like what the student was mixed with."""
    rng = np.random.default_rng(seed)
    patch = tuple(int(p) for p in patch)
    out = np.empty((n, *patch), np.float32)
    out_lab = np.empty((n, *patch), np.uint8)
    for i in range(n):
        k = i % len(images)
        img, _ = pad_to(normalise(images[k], normalization, ct_window), patch, 0.0)
        lab, _ = pad_to(np.asarray(labels[k]), patch, ignore_index)
        fg = np.argwhere((lab > 0) & (lab != ignore_index)) if i % 2 == 0 else np.empty((0, 3))
        if len(fg):
            centre = fg[rng.integers(len(fg))]
            start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, img.shape)]
        else:
            start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, img.shape)]
        z, y, x = start
        out[i] = img[z:z + patch[0], y:y + patch[1], x:x + patch[2]]
        out_lab[i] = lab[z:z + patch[0], y:y + patch[1], x:x + patch[2]]
    return out, out_lab


@dataclass(frozen=True)
class View:
    """One mixed view of a window: lam * W + (1 - lam) * partners[partner]."""

    partner: int
    lam: float

    def apply(self, windows: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
        x = partners[self.partner].to(windows.device, windows.dtype)
        return self.lam * windows + (1.0 - self.lam) * x

    def undo(self, prob: torch.Tensor) -> torch.Tensor:
        return prob


def draw_views(n: int, n_partners: int, alpha: float, seed: int) -> list[View]:
    """``n`` views: partners in turn from a seeded shuffle, lam ~ Beta(alpha, alpha) folded to
    >= 0.5 as in training (sgrs.sample_mix_lambda)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(max(n, n_partners)) % n_partners
    lam = rng.beta(alpha, alpha, size=n)
    lam = np.maximum(lam, 1.0 - lam)
    return [View(int(order[i]), float(lam[i])) for i in range(n)]



N_MIX = 8
N_MC = 6
SHARES = (0.005, 0.01, 0.02, 0.05)
FLIPS = [tuple(a for a, bit in zip((2, 3, 4), (i & 1, i & 2, i & 4)) if bit) for i in range(1, 8)]


def load_networks(run: Path):
    """The student Predictor plus the teacher network (when the checkpoint has it)."""
    from napari_sgrs.core.checkpoint import load_checkpoint
    from napari_sgrs.core.network import build_model

    pred = Predictor.from_run(run, device="cpu", checkpoint="last")
    ckpt = load_checkpoint(RunFolder(run).checkpoint("last"))
    pred.partner = ckpt.tensors.get("partner.image")  # today's single fixed partner (0.2)
    others = {}
    state = ckpt.state_dict("teacher")
    if state:
        net = build_model(ckpt.meta["config"], ckpt.meta["num_classes"])
        net.load_state_dict(state)
        others["teacher"] = net.eval()
    return pred, others


def all_passes(pred: Predictor, others: dict, image: np.ndarray, views_a, views_b, partners: torch.Tensor,
               partner_labels: torch.Tensor):
    """Probability maps (K, D, H, W) of every pass, by name."""
    x = normalise(image, pred.normalization, pred.ct_window)
    x, region = pad_to(x, pred.patch, 0.0)
    vol = torch.from_numpy(np.ascontiguousarray(x))[None]
    single = pred.partner.float()[None] if pred.partner is not None else None
    names = ["plain"] + (["single"] if single is not None else [])
    names += [f"mixA{i}" for i in range(len(views_a))] + [f"mixB{i}" for i in range(len(views_b))]
    names += [f"awA{i}" for i in range(len(views_a))] + [f"wA{i}" for i in range(len(views_a))]
    names += [f"awB{i}" for i in range(len(views_b))] + [f"wB{i}" for i in range(len(views_b))]
    names += [f"flip{i}" for i in range(len(FLIPS))] + [f"mc{i}" for i in range(N_MC)] + list(others)
    model = pred.model

    def sm(net, w):
        return torch.softmax(net(w).float(), 1)

    def forward(win):
        outs = [sm(model, win)]
        if single is not None:
            outs.append(sm(model, 0.75 * win + 0.25 * single))
        mixed = []
        for views in (views_a, views_b):
            for v in views:
                mixed.append(v.undo(sm(model, v.apply(win, partners))))
        outs += mixed
        # partner-aware: each mix counts only where its partner is background
        for views, part in ((views_a, mixed[:len(views_a)]), (views_b, mixed[len(views_a):])):
            ws = [(partner_labels[v.partner] == 0).float()[None, None].expand_as(outs[0]) for v in views]
            outs += [w * m for w, m in zip(ws, part)] + ws
        for axes in FLIPS:
            outs.append(torch.flip(sm(model, torch.flip(win, axes)), axes))
        drop = [m for m in model.modules() if isinstance(m, torch.nn.Dropout3d)]
        for m in drop:
            m.train()
        for _ in range(N_MC):
            outs.append(sm(model, win))
        for m in drop:
            m.eval()
        for net in others.values():
            outs.append(sm(net, win))
        return outs

    torch.manual_seed(0)
    maps = sliding_window(vol, forward, pred.patch, len(names), pred.num_classes, 0.5, 4)
    crop = (slice(None),) + region
    return {n: m[crop].numpy() for n, m in zip(names, maps)}


def mean_of(p: dict, names) -> np.ndarray:
    return np.mean([p[n] for n in names], axis=0)


def fit_logistic(x: np.ndarray, y: np.ndarray, iters: int = 25, l2: float = 1e-3) -> np.ndarray:
    """Newton-IRLS logistic regression with an intercept; x (n, f), y (n,) bool -> weights (f + 1,)."""
    x = np.c_[np.ones(len(x)), x]
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        z = np.clip(x @ w, -30, 30)
        p = 1 / (1 + np.exp(-z))
        g = x.T @ (p - y) + l2 * w
        h = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(len(w))
        w -= np.linalg.solve(h, g)
    return w


def features(cands: dict, keys) -> np.ndarray:
    cols = []
    for k in keys:
        c = cands[k]
        cols.append(np.log1p(-c) if k.startswith("boundary") else c)  # -dist: log1p(dist)
    return np.stack([c.ravel() for c in cols], 1)


FITS = {"fitted: band + boundary (1)": ["band (1 pass)", "boundary band (0)"],
        "fitted: flip x3 + boundary (4)": ["flip x3 + plain (4)", "boundary band (0)"],
        "fitted: band, flip x3, aware mix x3, boundary (7)": ["band (1 pass)", "flip x3 + plain (4)",
                                                              "aware mix x3 + plain (4)", "boundary band (0)"]}


def aware_mean(p: dict, n: int, draw: str = "A") -> np.ndarray:
    """Mean of the plain pass and the first n mixes, each mix weighted by where its partner is background."""
    num = p["plain"] + sum(p[f"aw{draw}{i}"] for i in range(n))
    return num / (1.0 + sum(p[f"w{draw}{i}"] for i in range(n)))


def candidates(p: dict, label: np.ndarray, spacing, fits=None) -> dict[str, np.ndarray]:
    """Every candidate's per-voxel score (higher: more likely wrong), by name."""
    def score(names):
        return error_score(mean_of(p, names), label)

    mix_a = [n for n in p if n.startswith("mixA")]
    flips = [n for n in p if n.startswith("flip")]
    mc = [n for n in p if n.startswith("mc")]
    nets = ["plain"] + [n for n in ("teacher",) if n in p]
    out = {
        "band (1 pass)": score(["plain"]),
        "mix x8 + plain (9)": score(["plain"] + mix_a),
        "mix x3 + plain (4)": score(["plain"] + mix_a[:3]),
        "mix x8, vote (8)": np.mean([(p[n].argmax(0) != label) for n in mix_a], axis=0) + 1e-3 * score(["plain"]),
        "flip x7 + plain (8)": score(["plain"] + flips),
        "flip x3 + plain (4)": score(["plain", "flip0", "flip1", "flip3"]),  # one axis each
        f"MC dropout x{N_MC} (6)": score(mc),
        "networks: student, teacher (2)": score(nets),
        "mix x8 + flip x7 + plain (16)": score(["plain"] + mix_a + flips),
        "aware mix x8 + plain (9)": error_score(aware_mean(p, 8), label),
        "aware mix x3 + plain (4)": error_score(aware_mean(p, 3), label),
    }
    lab_fg = label > 0
    edge = lab_fg ^ ndimage.binary_erosion(lab_fg) | (ndimage.binary_dilation(lab_fg) ^ lab_fg)
    dist = ndimage.distance_transform_edt(~edge, sampling=spacing) if edge.any() else np.zeros(label.shape)
    out["boundary band (0)"] = -dist
    return candidates_from(out, fits or {})


def candidates_from(cands: dict, fits: dict) -> dict:
    out = dict(cands)
    shape = cands["band (1 pass)"].shape
    for name, w in fits.items():
        z = np.c_[np.ones(int(np.prod(shape))), features(out, FITS[name])] @ w
        out[name] = (1 / (1 + np.exp(-np.clip(z, -30, 30)))).reshape(shape)
    return out


def val_threshold(score: np.ndarray, wrong: np.ndarray, target: float = 0.9, cap: float = 0.05) -> float:
    """The score above which the flagged voxels hold ``target`` of the wrong ones, flagging at most
    ``cap`` of the volume."""
    s = np.sort(score.ravel())[::-1]
    ws = wrong.ravel()[np.argsort(-score.ravel(), kind="stable")]
    caught = np.cumsum(ws)
    n = int(np.searchsorted(caught, target * max(caught[-1], 1))) + 1
    n = min(n, int(cap * s.size), s.size)
    return float(s[max(n - 1, 0)])


def recall_at(score: np.ndarray, wrong: np.ndarray, valid: np.ndarray, n: int) -> tuple[int, np.ndarray]:
    """Flag the ``n`` valid voxels of highest score; (wrong ones caught, flagged mask)."""
    s = np.where(valid, score, -np.inf).ravel()
    n = int(min(n, valid.sum()))
    flagged = np.zeros(s.size, bool)
    if n > 0:
        flagged[np.argpartition(-s, n - 1)[:n]] = True
    flagged = flagged.reshape(score.shape)
    return int((flagged & wrong).sum()), flagged


def dice(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray, k: int) -> float:
    out = []
    for c in range(1, k):
        a, b = (pred == c) & valid, (ref == c) & valid
        s = a.sum() + b.sum()
        out.append(2.0 * (a & b).sum() / s if s else 1.0)
    return float(np.mean(out))


def evaluate(run: Path, cohort: Path) -> dict:
    pred, others = load_networks(run)
    cfg = json.loads(RunFolder(run).config.read_text())
    k = pred.num_classes
    s_tau = binary_equivalent_tau(pred.tau)
    lab_cases = find_cases(cohort / "imagesTr", cohort / "labelsTr")
    lab_cases = [c for c in lab_cases if c.label is not None]
    images = [read_volume(c.image).array for c in lab_cases]
    labels = [read_volume(c.label).array for c in lab_cases]
    partners, partner_labels = partner_patches(images, labels, pred.patch, cfg.get("normalization", "zscore"),
                                               tuple(cfg.get("ct_window", (-160, 240))), N_MIX, seed=0)
    partners, partner_labels = torch.from_numpy(partners), torch.from_numpy(partner_labels)
    views_a = draw_views(N_MIX, len(partners), cfg.get("mix_alpha", 0.75), seed=1)
    views_b = draw_views(N_MIX, len(partners), cfg.get("mix_alpha", 0.75), seed=2)
    # the validation volume(s): fit the combined scores, and each candidate's threshold that
    # flags 90 % of the validation errors (at most 5 % of the volume)
    val_names = set(pred.meta.get("val_cases", []))
    xs, ys, val_scores = [], [], []
    for case in [c for c in lab_cases if c.name in val_names]:
        img, ref = read_volume(case.image), read_volume(case.label).array.astype(np.int64)
        p = all_passes(pred, others, img.array, views_a, views_b, partners, partner_labels)
        label = p["plain"].argmax(0)
        cands = candidates(p, label, img.geometry.spacing)
        wrong = (label != ref) & (ref != IGNORE_INDEX)
        xs.append(cands)
        ys.append(wrong)
    fits = {}
    for name, keys in FITS.items():
        x = np.concatenate([features(c, keys) for c in xs])
        y = np.concatenate([w.ravel() for w in ys]).astype(float)
        fits[name] = fit_logistic(x, y)
    thresholds = {}
    for i, (c, w) in enumerate(zip(xs, ys)):
        full = candidates_from(c, fits)
        for name, sc in full.items():
            thresholds.setdefault(name, []).append(val_threshold(sc, w))
    thresholds = {k: float(np.mean(v)) for k, v in thresholds.items()}
    # the product: sgrs predict --regions with the calibration the trainer makes on this validation split
    from napari_sgrs.core.codes import Region
    from napari_sgrs.core.validation import review_calibration
    val_preds = []
    for case in [c for c in lab_cases if c.name in val_names]:
        img, ref = read_volume(case.image).array, read_volume(case.label).array.astype(np.int64)
        p_val, valid_val = pred.predict(img, regions=True), ref != IGNORE_INDEX
        val_preds.append((p_val, ref, valid_val, dice(p_val.label, ref, valid_val, k)))
    calibration = review_calibration(val_preds)
    pred.meta["review"] = calibration.as_meta()
    vols = []
    for case in find_cases(cohort / "imagesTs", cohort / "labelsTs"):
        img, ref = read_volume(case.image), read_volume(case.label).array.astype(np.int64)
        t0 = time.perf_counter()
        p = all_passes(pred, others, img.array, views_a, views_b, partners, partner_labels)
        secs = time.perf_counter() - t0
        label = p["plain"].argmax(0)
        valid = ref != IGNORE_INDEX
        wrong = (label != ref) & valid
        cands = candidates(p, label, img.geometry.spacing, fits)
        mix_b = [n for n in p if n.startswith("mixB")]
        score_b = error_score(mean_of(p, ["plain"] + mix_b), label)
        score_b3 = error_score(mean_of(p, ["plain"] + mix_b[:3]), label)
        row = {"case": case.name, "voxels": int(valid.sum()), "wrong": int(wrong.sum()), "seconds": secs,
               "dice": dice(label, ref, valid, k), "cands": {}}
        product = pred.predict(img.array, regions=True)
        assert (product.label == label).all()
        own = np.isin(product.regions, Region.flagged()) & valid
        n_own = int(own.sum())
        band_caught, band_flagged = recall_at(-p["plain"].max(0), wrong, valid, n_own)
        row["product"] = {"flagged": n_own, "caught": int((own & wrong).sum()),
                          "dice_after": dice(np.where(own, ref, label), ref, valid, k),
                          "band_caught": band_caught,
                          "band_dice_after": dice(np.where(band_flagged, ref, label), ref, valid, k),
                          "boundary_caught": recall_at(cands["boundary band (0)"], wrong, valid, n_own)[0],
                          "inconsistent": int((product.regions == Region.INCONSISTENT).sum()),
                          "inconsistent_wrong": int(((product.regions == Region.INCONSISTENT) & wrong).sum()),
                          "review": product.review, "calibration": calibration.as_meta(),
                          "hist": _flagged_histogram(1.0 - product.reliability, own, wrong)}
        for name, sc in cands.items():
            c = {"recall_at": {}, "dice_after": {}}
            for share in SHARES:
                caught, flagged = recall_at(sc, wrong, valid, round(share * valid.sum()))
                c["recall_at"][str(share)] = caught
                fixed = np.where(flagged, ref, label)
                c["dice_after"][str(share)] = dice(fixed, ref, valid, k)
            if not name.startswith("boundary") and "vote" not in name:
                own = (sc >= s_tau) & valid
                n_own = int(own.sum())
                val = (sc >= thresholds[name]) & valid
                n_val = int(val.sum())
                c["val90"] = {"flagged": n_val, "caught": int((val & wrong).sum()),
                              "dice_after": dice(np.where(val, ref, label), ref, valid, k),
                              "band_caught": recall_at(cands["band (1 pass)"], wrong, valid, n_val)[0],
                              "band_dice_after": dice(np.where(recall_at(cands["band (1 pass)"], wrong, valid,
                                                                         n_val)[1], ref, label), ref, valid, k)}
                c["own"] = {"flagged": n_own, "caught": int((own & wrong).sum()),
                            "dice_after": dice(np.where(own, ref, label), ref, valid, k),
                            "band_caught": recall_at(cands["band (1 pass)"], wrong, valid, n_own)[0],
                            "boundary_caught": recall_at(cands["boundary band (0)"], wrong, valid, n_own)[0]}
                # the mean over the candidate's passes, for the estimated Dice of the queue
                c["est_dice"] = None
                # curve: recall vs flagged share
                order = np.sort(np.where(valid, sc, -np.inf).ravel())[::-1]
                cut = [order[min(int(f * valid.sum()), order.size - 1)] for f in np.linspace(0.001, 0.2, 40)]
                c["curve"] = [int(((sc >= t) & wrong).sum()) for t in cut]
            row["cands"][name] = c
        # today's single-partner regions: disregarded or inconsistent under tau
        if "single" in p:
            from napari_sgrs.core.sgrs import synergy_regions
            reg = synergy_regions(torch.from_numpy(p["plain"])[None], torch.from_numpy(p["single"])[None], pred.tau)
            own = (reg.disregarded | reg.inconsistent)[0].numpy() & valid
            n_own = int(own.sum())
            row["single"] = {"flagged": n_own, "caught": int((own & wrong).sum()),
                             "dice_after": dice(np.where(own, ref, label), ref, valid, k),
                             "band_caught": recall_at(cands["band (1 pass)"], wrong, valid, n_own)[0],
                             "boundary_caught": recall_at(cands["boundary band (0)"], wrong, valid, n_own)[0]}
        # stability: inconsistent sets (s > 0.5) and flagged sets (s >= s_tau) of two draws
        row["stability"] = {}
        for tag, sa, sb in (("mix x8 + plain (9)", cands["mix x8 + plain (9)"], score_b),
                            ("mix x3 + plain (4)", cands["mix x3 + plain (4)"], score_b3),
                            ("aware mix x8 + plain (9)", cands["aware mix x8 + plain (9)"],
                             error_score(aware_mean(p, 8, "B"), label)),
                            ("aware mix x3 + plain (4)", cands["aware mix x3 + plain (4)"],
                             error_score(aware_mean(p, 3, "B"), label))):
            ja = [_jaccard(sa > 0.5, sb > 0.5), _jaccard(sa >= s_tau, sb >= s_tau)]
            row["stability"][tag] = ja
        # estimated Dice (queue) per candidate
        row["est_dice"] = {
            "band (1 pass)": estimated_dice(p["plain"], label),
            "mix x3 + plain (4)": estimated_dice(mean_of(p, ["plain"] + [n for n in p if n.startswith("mixA")][:3]),
                                                 label),
            "flip x3 + plain (4)": estimated_dice(mean_of(p, ["plain", "flip0", "flip1", "flip3"]), label),
        }
        vols.append(row)
        print(f"  {run.name} {case.name}: dice {row['dice']:.3f}, wrong {row['wrong']}, {secs:.1f} s", flush=True)
    return {"run": run.name, "cohort": cohort.name, "method": cfg.get("method"), "s_tau": s_tau, "volumes": vols}


def _flagged_histogram(score: np.ndarray, flagged: np.ndarray, wrong: np.ndarray, bins: int = 100) -> dict:
    """Flagged voxels and the wrong ones among them, by error score bin (for the probability order)."""
    edges = np.linspace(0, 1, bins + 1)
    return {"all": np.histogram(score[flagged], edges)[0].tolist(),
            "wrong": np.histogram(score[flagged & wrong], edges)[0].tolist()}


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 1.0


# ----------------------------------------------------------------------------- the tables

def _pool(vols, name, share):
    return sum(v["cands"][name]["recall_at"][share] for v in vols) / max(sum(v["wrong"] for v in vols), 1)


def _passes(name: str) -> int:
    return int(name.rsplit("(", 1)[1].split()[0].rstrip(")")) if "(" in name else 1


def select(results: list[dict]) -> tuple[str, list[str]]:
    """The rule of benchmarks/out/overlay/RULE.md on the selection models; (winner, table lines)."""
    names = [n for n in results[0]["volumes"][0]["cands"] if not n.startswith("boundary")]
    lines = ["| candidate | passes | mean recall at 0.5/1/2/5 % | stability (Jaccard, inconsistent) | eligible |",
             "|---|---|---|---|---|"]
    score = {}
    for name in names:
        rec = np.mean([np.mean([_pool(r["volumes"], name, s) for s in map(str, SHARES)]) for r in results])
        stab = [np.mean([v["stability"][name][0] for v in r["volumes"]]) for r in results
                if name in r["volumes"][0]["stability"]]
        random_draws = "mix" in name
        jac = float(np.mean(stab)) if stab else (None if random_draws else 1.0)
        ok = _passes(name) <= 4 and jac is not None and jac >= 0.8
        score[name] = (rec, ok)
        shown = "not measured" if jac is None else f"{jac:.2f}" + ("" if random_draws else " (no draws)")
        lines.append(f"| {name} | {_passes(name)} | {rec:.3f} | {shown} | {'yes' if ok else 'no'} |")
    eligible = sorted((n for n in names if score[n][1]), key=lambda n: (_passes(n), -score[n][0]))
    winner = eligible[0]  # the cheapest, replaced by a costlier one only when it beats it by >= 0.02
    for n in eligible[1:]:
        if score[n][0] >= score[winner][0] + 0.02:
            winner = n
    return winner, lines


def report(results: list[dict]) -> list[str]:
    """Per model: the product's flagged voxels against the bands at the same count."""
    lines = ["| cohort | model | Dice | flagged | recall (precision) | band at same count | boundary band | "
             "Dice after correcting flagged (band) | inconsistent: share, wrong in it |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        vols = r["volumes"]
        w = sum(v["wrong"] for v in vols)
        n = sum(v["voxels"] for v in vols)
        g = {k: sum(v["product"][k] for v in vols) for k in ("flagged", "caught", "band_caught", "boundary_caught",
                                                               "inconsistent", "inconsistent_wrong")}
        lines.append(
            f"| {r['cohort']} | {r['run'].rsplit('-', 1)[1]} | {np.mean([v['dice'] for v in vols]):.3f} | "
            f"{100 * g['flagged'] / n:.1f} % | {g['caught'] / w:.2f} ({g['caught'] / max(g['flagged'], 1):.2f}) | "
            f"{g['band_caught'] / w:.2f} | {g['boundary_caught'] / w:.2f} | "
            f"{np.mean([v['product']['dice_after'] for v in vols]):.3f} "
            f"({np.mean([v['product']['band_dice_after'] for v in vols]):.3f}) | "
            f"{100 * g['inconsistent'] / n:.2f} %, {g['inconsistent_wrong'] / max(g['inconsistent'], 1):.2f} |")
    return lines


def candidates_table(results: list[dict]) -> list[str]:
    """Every candidate at equal flagged count, by cohort: recall at 0.5/1/2/5 % and the Dice after
    correcting the flagged 5 % (mean over the cohort's models)."""
    cohorts = sorted({r["cohort"] for r in results})
    names = list(results[0]["volumes"][0]["cands"])
    lines = ["| candidate (passes) | " + " | ".join(f"{c}: recall 0.5/1/2/5 %, Dice after 5 %" for c in cohorts)
             + " |", "|---|" + "---|" * len(cohorts)]
    for name in names:
        cells = []
        for c in cohorts:
            runs = [r for r in results if r["cohort"] == c]
            rec = [np.mean([_pool(r["volumes"], name, str(sh)) for r in runs]) for sh in SHARES]
            after = np.mean([np.mean([v["cands"][name]["dice_after"]["0.05"] for v in r["volumes"]]) for r in runs])
            cells.append("/".join(f"{x:.2f}" for x in rec) + f", {after:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def single_table(results: list[dict]) -> list[str]:
    """The 0.2 overlay (one fixed partner, lambda 0.75, the paper's tau) at its own count."""
    lines = ["| cohort | model | 0.2 map: flagged | recall (precision) | band at same count | Dice after correcting "
             "flagged |", "|---|---|---|---|---|---|"]
    for r in results:
        vols = [v for v in r["volumes"] if "single" in v]
        if not vols:
            continue
        w = sum(v["wrong"] for v in vols)
        g = {k: sum(v["single"][k] for v in vols) for k in ("flagged", "caught", "band_caught")}
        lines.append(f"| {r['cohort']} | {r['run'].rsplit('-', 1)[1]} | "
                     f"{100 * g['flagged'] / sum(v['voxels'] for v in vols):.1f} % | {g['caught'] / w:.2f} "
                     f"({g['caught'] / max(g['flagged'], 1):.2f}) | {g['band_caught'] / w:.2f} | "
                     f"{np.mean([v['single']['dice_after'] for v in vols]):.3f} |")
    return lines


def _calibration_now(stored: dict):
    """The calibration today's rules make from the validation residual a raw file stored (its runs
    had one validation volume, whose residual is the stored dice_bias of the first rules)."""
    from napari_sgrs.core.reliability import MIN_HALFWIDTH, MIN_VOLUMES_TO_SHIFT, ReviewCalibration

    n, resid = stored["volumes"], stored["dice_bias"]
    bias = resid if n >= MIN_VOLUMES_TO_SHIFT else 0.0
    return ReviewCalibration(threshold=stored["threshold"], dice_bias=bias, volumes=n,
                             dice_halfwidth=max(MIN_HALFWIDTH, abs(resid - bias)) if n else None)


def queue_table(results: list[dict], seed: int = 0) -> list[str]:
    """Per cohort: Spearman of estimated vs true Dice, interval coverage, and wrong voxels found per
    flagged voxel reviewed (area under found-vs-reviewed) in queue, random and probability order."""
    rng = np.random.default_rng(seed)
    lines = ["| cohort | Spearman (estimated, true Dice): pooled, within a model | true Dice inside the interval | "
             "found/reviewed AUC: queue | random | probability order |", "|---|---|---|---|---|---|"]
    by = {}
    for r in results:
        by.setdefault(r["cohort"], []).append(r)
    for cohort, runs in by.items():
        est, true, inside, auc = [], [], [], {"queue": [], "random": [], "probability": []}
        within = []
        for r in runs:
            vols = r["volumes"]
            rho_model = stats.spearmanr([v["product"]["review"]["estimated_dice"] for v in vols],
                                        [v["dice"] for v in vols]).statistic
            if np.isfinite(rho_model):
                within.append(rho_model)
            cal = _calibration_now(vols[0]["product"]["calibration"])
            for v in vols:
                rv = v["product"]["review"]
                # raw files of today's rules carry the interval; the first ones are re-derived
                est_now, low, high = ((rv["estimated_dice"], rv["dice_low"], rv["dice_high"]) if "threshold" in rv
                                      else cal.dice(rv["estimated_raw"]))
                est.append(est_now)
                true.append(v["dice"])
                if low is not None:
                    inside.append(low <= v["dice"] <= high)
            flagged = np.array([v["product"]["flagged"] for v in vols], float)
            caught = np.array([v["product"]["caught"] for v in vols], float)

            def area(order):
                f, c = np.concatenate([[0], np.cumsum(flagged[order])]), np.concatenate([[0], np.cumsum(caught[order])])
                return float(np.trapezoid(c / max(c[-1], 1), f / max(f[-1], 1)))

            auc["queue"].append(area(np.argsort([v["product"]["review"]["estimated_dice"] for v in vols])))
            auc["random"].append(np.mean([area(rng.permutation(len(vols))) for _ in range(200)]))
            if any("hist" not in v["product"] for v in vols):  # (raw files of the first runs)
                continue
            hist_all = np.sum([v["product"]["hist"]["all"] for v in vols], 0)[::-1]
            hist_wrong = np.sum([v["product"]["hist"]["wrong"] for v in vols], 0)[::-1]
            f = np.concatenate([[0], np.cumsum(hist_all)])
            c = np.concatenate([[0], np.cumsum(hist_wrong)])
            auc["probability"].append(float(np.trapezoid(c / max(c[-1], 1), f / max(f[-1], 1))))
        rho = stats.spearmanr(est, true).statistic
        lines.append(f"| {cohort} | {rho:.2f} (n = {len(est)}), {np.mean(within) if within else float('nan'):.2f} | "
                     f"{np.mean(inside) if inside else float('nan'):.2f} | "
                     f"{np.mean(auc['queue']):.2f} | {np.mean(auc['random']):.2f} | {np.mean(auc['probability']):.2f} |")
    return lines


def curves(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohorts = sorted({r["cohort"] for r in results})
    fig, axes = plt.subplots(1, len(cohorts), figsize=(4.2 * len(cohorts), 3.6), squeeze=False)
    shares = np.linspace(0.001, 0.2, 40)
    for ax, cohort in zip(axes[0], cohorts):
        runs = [r for r in results if r["cohort"] == cohort]
        for name in runs[0]["volumes"][0]["cands"]:
            if "curve" not in runs[0]["volumes"][0]["cands"][name]:
                continue
            rec = np.mean([np.sum([v["cands"][name]["curve"] for v in r["volumes"]], 0)
                           / max(sum(v["wrong"] for v in r["volumes"]), 1) for r in runs], 0)
            ax.plot(100 * shares, rec, label=name, lw=2.5 if name.startswith("flip x3") else 1)
        ax.set_title(f"{cohort} (mean of {len(runs)} models)")
        ax.set_xlabel("flagged share of the volume (%)")
        ax.set_ylabel("share of wrong voxels flagged")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarise(raw: list[Path], out: Path) -> int:
    results = [r for p in raw for r in json.loads(p.read_text())]
    for r in results:  # (early raw files named the networks candidate by its count)
        for v in r["volumes"]:
            for k in [k for k in v["cands"] if k.startswith("networks x")]:
                # measured before the label-only anchor was removed: its third network was the anchor
                v["cands"]["networks: student, teacher, anchor if any (3)"] = v["cands"].pop(k)
    sel = [r for r in results if r["cohort"].startswith("sel-")]
    rep = [r for r in results if not r["cohort"].startswith("sel-")]
    text = []
    if sel:
        winner, lines = select(sel)
        text += [f"## Selection ({len(sel)} models on {', '.join(sorted({r['cohort'] for r in sel}))})", ""]
        text += lines + ["", f"Rule's pick: **{winner}**", ""]
    for title, group in (("Selection cohorts", sel), ("Reported cohorts", rep)):
        if group and "product" in group[0]["volumes"][0]:
            text += [f"## {title}: the default overlay", ""] + report(group) + [""] + queue_table(group) + [""]
            text += single_table(group) + [""] + candidates_table(group) + [""]
            curves(group, out / f"recall_{title.split()[0].lower()}.png")
    (out / "summary.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", help="run folders named <cohort>-<method>")
    ap.add_argument("--cohorts", type=Path, help="folder of the demo cohorts, by name")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--summarise", type=Path, nargs="+", default=None, metavar="RAW_JSON",
                    help="only write summary.md and the curves from earlier raw.json files")
    args = ap.parse_args(argv)
    if args.summarise:
        args.out.mkdir(parents=True, exist_ok=True)
        return summarise(args.summarise, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results = []
    for run in args.runs:
        if not RunFolder(run).config.exists():
            continue
        cohort = args.cohorts / run.name.rsplit("-", 1)[0]
        results.append(evaluate(run, cohort))
        (args.out / "raw.json").write_text(json.dumps(results))
    print(f"wrote {args.out / 'raw.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
