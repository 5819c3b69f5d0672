"""Whole-volume inference: our sliding window against MONAI's and against the published dense protocol.

1. Speed, same network / volume / overlap / Gaussian weights (sigma 0.125 x patch) / windows per
   forward: ``napari_sgrs.core.infer.sliding_window`` (and ``Predictor.predict``, which adds
   normalisation, padding and the argmax) against ``monai.inferers.sliding_window_inference``.
   Random weights: only speed matters here.
2. Dice and time on the demo test volumes with a trained run: ``Predictor.predict`` (Gaussian,
   overlap 0.5) against the published code's dense protocol (``dense_protocol`` below: patch
   112x112x80 (H, W, D), stride 18 in-plane and 4 axial, one window per forward, plain
   averaging of the softmax). On the demo's 48^3 volumes the trained patch is 32^3, so the
   dense strides keep the published stride-to-patch ratios: 18/112 and 4/80 of 32 -> (2, 5, 5)
   in (D, H, W) after rounding.
3. Peak memory of whole-volume inference: the current RSS sampled every millisecond during
   ``Predictor.predict`` in a fresh process per volume size, minus the RSS just before it; the
   slope of peak memory over the size of one probability map (K x D x H x W float32) is the
   number of probability-map copies inference holds (activations and the network cancel out).

    python benchmarks/infer_benchmark.py --workdir /tmp/infer_bench            # trains a preview run
    python benchmarks/infer_benchmark.py --workdir /tmp/ib --run /tmp/pb/run   # reuse a trained run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

DENSE_STRIDE_RATIO = (4 / 80, 18 / 112, 18 / 112)  # published (axial, in-plane, in-plane) / patch, (D, H, W)


@torch.no_grad()
def dense_protocol(net: torch.nn.Module, image: np.ndarray, patch: tuple[int, int, int],
                   stride: tuple[int, int, int], num_classes: int, channels_last: bool = True) -> np.ndarray:
    """The published code's test_single_case: zero-pad to the patch, windows every ``stride``
    (the last one clamped to the border), one window per forward, softmax summed and divided by
    the count of windows per voxel (no weighting), argmax. image: normalised (D, H, W)."""
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(image.shape, patch)]
    padded = np.pad(image, pads, mode="constant") if any(a or b for a, b in pads) else image
    D, H, W = padded.shape
    counts = [math.ceil((S - p) / st) + 1 for S, p, st in zip(padded.shape, patch, stride)]
    vol = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))
    score = torch.zeros((num_classes, D, H, W))
    cnt = torch.zeros((D, H, W))
    d, h, w = patch
    for iz in range(counts[0]):
        z = min(stride[0] * iz, D - d)
        for iy in range(counts[1]):
            y = min(stride[1] * iy, H - h)
            for ix in range(counts[2]):
                x = min(stride[2] * ix, W - w)
                win = vol[z:z + d, y:y + h, x:x + w][None, None]
                if channels_last:
                    win = win.contiguous(memory_format=torch.channels_last_3d)
                score[:, z:z + d, y:y + h, x:x + w] += torch.softmax(net(win), 1)[0]
                cnt[z:z + d, y:y + h, x:x + w] += 1
    label = (score / cnt).argmax(0).numpy().astype(np.uint8)
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, image.shape))
    return label[crop]


def dense_window_count(shape, patch, stride) -> int:
    return int(np.prod([math.ceil((max(S, p) - p) / st) + 1 for S, p, st in zip(shape, patch, stride)]))


def ours_window_count(shape, patch, overlap=0.5) -> int:
    from napari_sgrs.core.infer import window_starts

    return int(np.prod([len(window_starts(max(S, p), p, overlap)) for S, p in zip(shape, patch)]))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    p, r = pred > 0, ref > 0
    denom = p.sum() + r.sum()
    return float(2 * (p & r).sum() / denom) if denom else 1.0


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def speed(filters: int, patch, shape, repeats: int, sw_batch: int) -> dict:
    """Ours vs MONAI on one random-weight network and one smooth random volume."""
    from monai.inferers import sliding_window_inference

    from napari_sgrs.core.infer import Predictor, sliding_window
    from napari_sgrs.core.vnet import VNet

    torch.manual_seed(0)
    net = VNet(1, 2, filters).eval().to(memory_format=torch.channels_last_3d)
    image = torch.nn.functional.avg_pool3d(torch.randn(1, 1, *shape), 5, 1, 2)[0, 0].numpy()
    image = (image - image.mean()) / image.std()
    vol = torch.from_numpy(image)[None]

    def forward(win):
        return torch.softmax(net(win.contiguous(memory_format=torch.channels_last_3d)), 1)

    def ours():
        return sliding_window(vol, lambda w: (forward(w),), patch, 1, 2, overlap=0.5, batch_size=sw_batch)[0]

    def monai():
        return sliding_window_inference(vol[None], patch, sw_batch, forward, overlap=0.5, mode="gaussian",
                                        sigma_scale=0.125)[0]

    meta = {"config": {"patch_size": list(patch), "normalization": "none"}, "num_classes": 2}
    predictor = Predictor(net, meta, torch.device("cpu"))

    with torch.no_grad():
        ours(); monai()  # warm-up
        a, b = ours(), monai()
        t_ours, t_monai = _best_of(ours, repeats), _best_of(monai, repeats)
        t_pred = _best_of(lambda: predictor.predict(image, batch_size=sw_batch), repeats)
        t_pred_regions = _best_of(lambda: predictor.predict(image, regions=True, batch_size=sw_batch), repeats)
        t_forward = _best_of(lambda: forward(vol[None, :, :patch[0], :patch[1], :patch[2]].repeat(sw_batch, 1, 1, 1, 1)),
                             repeats)
    n_ours = ours_window_count(shape, patch)
    return {"volume": list(shape), "patch": list(patch), "filters": filters, "sw_batch_size": sw_batch,
            "overlap": 0.5, "windows_ours": n_ours,
            "ours_sliding_window_s": round(t_ours, 3), "monai_sliding_window_inference_s": round(t_monai, 3),
            "ours_predictor_predict_s": round(t_pred, 3), "ours_predict_with_regions_s": round(t_pred_regions, 3),
            "forward_only_s": round(t_forward * math.ceil(n_ours / sw_batch), 3),
            "max_abs_prob_difference_vs_monai": float((a - b).abs().max()),
            "argmax_agreement_vs_monai": float((a.argmax(0) == b.argmax(0)).float().mean())}


def accuracy(run: Path, cohort, seed: int, cases: int, repeats_note: str = "") -> dict:
    from napari_sgrs.core.data import normalise
    from napari_sgrs.core.infer import Predictor
    from napari_sgrs.core.io import read_volume

    predictor = Predictor.from_run(run, device="cpu")
    patch = predictor.patch
    stride = tuple(max(1, round(p * r)) for p, r in zip(patch, DENSE_STRIDE_RATIO))
    rows = []
    for name in list(cohort.test_names)[:cases]:
        image = read_volume(cohort.images_ts / f"{name}.nii.gz").array
        truth = read_volume(cohort.labels_ts / f"{name}.nii.gz").array
        t = time.perf_counter()
        ours = predictor.predict(image).label
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        dense = dense_protocol(predictor.model, normalise(image, predictor.normalization, predictor.ct_window),
                               patch, stride, predictor.num_classes, channels_last=predictor.channels_last)
        t_dense = time.perf_counter() - t
        rows.append({"case": name, "dice_ours": dice(ours, truth), "dice_dense": dice(dense, truth),
                     "ours_s": t_ours, "dense_s": t_dense})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("dice_ours", "dice_dense", "ours_s", "dense_s")}
    shape = tuple(cohort.shape)
    la_shape, la_patch = (88, 120, 138), (80, 112, 112)
    return {"patch": list(patch), "dense_stride": list(stride), "cases": rows,
            "windows_ours": ours_window_count(shape, patch), "windows_dense": dense_window_count(shape, patch, stride),
            "mean_dice_ours": round(mean["dice_ours"], 4), "mean_dice_dense": round(mean["dice_dense"], 4),
            "dice_difference_points": round(100 * (mean["dice_ours"] - mean["dice_dense"]), 2),
            "mean_s_ours": round(mean["ours_s"], 3), "mean_s_dense": round(mean["dense_s"], 3),
            "speedup": round(mean["dense_s"] / mean["ours_s"], 1),
            "windows_at_published_scale": {
                "note": "window counts only (not run): a typical cropped LA volume at the published patch",
                "volume": list(la_shape), "patch": list(la_patch),
                "ours_overlap_0.5": ours_window_count(la_shape, la_patch),
                "dense_stride_4_18_18": dense_window_count(la_shape, la_patch, (4, 18, 18))}}


def memory_child(shape, regions: bool, filters: int, patch) -> dict:
    """Run in a fresh process: peak RSS of Predictor.predict on a (D, H, W) volume."""
    from napari_sgrs.core.infer import Predictor
    from napari_sgrs.core.vnet import VNet

    torch.manual_seed(0)
    net = VNet(1, 2, filters).eval().to(memory_format=torch.channels_last_3d)
    meta = {"config": {"patch_size": list(patch)}, "num_classes": 2}
    predictor = Predictor(net, meta, torch.device("cpu"))
    # warm-up at the same windows-per-forward, so the activations are in the baseline
    predictor.predict(np.zeros((patch[0], patch[1], 4 * patch[2]), np.float32), regions=regions)
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    # ru_maxrss is a high-water mark since process start, so the warm-up's peak can hide the one we
    # want; sample the CURRENT resident size instead, every millisecond, while predict runs.
    import gc
    import threading

    gc.collect()
    before = _rss_now()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_now())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = predictor.predict(image, regions=regions)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_now())
    del out
    return {"shape": list(shape), "regions": regions, "rss_before_bytes": before, "peak_bytes": peak[0]}


def _rss_now() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(filters: int, patch, sizes, regions: bool) -> dict:
    rows = []
    for s in sizes:
        cmd = [sys.executable, __file__, "--memory-child", *map(str, s), "--filters", str(filters),
               "--patch", *map(str, patch)] + (["--regions"] if regions else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["prob_map_bytes"] = 2 * int(np.prod(s)) * 4
        row["peak_minus_before_mib"] = round((row["peak_bytes"] - row["rss_before_bytes"]) / 2**20, 1)
        rows.append(row)
    a, b = rows[0], rows[-1]
    slope = ((b["peak_bytes"] - a["peak_bytes"]) - (b["rss_before_bytes"] - a["rss_before_bytes"])) / \
        (b["prob_map_bytes"] - a["prob_map_bytes"])
    return {"regions": regions, "rows": rows, "prob_map_copies": round(slope, 2),
            "note": "copies = d(peak - baseline) / d(K x D x H x W x 4 bytes) between the two sizes; the "
                    "input image (float32) itself counts as 0.5 of a copy at K=2"}


def _cpu_name() -> str:
    from _machine import cpu_name  # benchmarks/ is on sys.path when a script there runs

    return cpu_name()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("infer_bench"))
    p.add_argument("--run", type=Path, default=None, help="trained run on the demo cohort (default: train one "
                                                          "with --preset preview)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=4, help="demo test volumes for the Dice comparison")
    p.add_argument("--speed-volume", type=int, nargs=3, default=(96, 96, 96))
    p.add_argument("--speed-filters", type=int, default=8)
    p.add_argument("--patch", type=int, nargs=3, default=(32, 32, 32))
    p.add_argument("--sw-batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-sizes", type=int, nargs=2, default=(96, 192), help="two cube edge lengths")
    p.add_argument("--skip", nargs="*", default=(), choices=["speed", "accuracy", "memory"])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--memory-child", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
    p.add_argument("--filters", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--regions", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_child:
        print(json.dumps(memory_child(tuple(args.memory_child), args.regions, args.filters, tuple(args.patch))))
        return 0

    result = {"machine": f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads", "load_before": [round(x, 2) for x in os.getloadavg()]}
    if "speed" not in args.skip:
        result["speed"] = speed(args.speed_filters, tuple(args.patch), tuple(args.speed_volume), args.repeats,
                                args.sw_batch_size)
        print(json.dumps(result["speed"], indent=2), flush=True)
    if "accuracy" not in args.skip:
        from napari_sgrs.core.demo import make_demo_cohort
        from napari_sgrs.core.runfolder import RunFolder

        cohort = make_demo_cohort(args.workdir / "data", kind="blob", n_cases=8, n_labeled=4, n_test=4,
                                  shape=(48, 48, 48), seed=args.seed, overwrite=True)
        run = args.run
        if run is None:
            run = args.workdir / "run"
            if not RunFolder(run).last.exists():
                subprocess.run([sys.executable, "-m", "napari_sgrs.cli", "train", "--preset", "preview",
                                "--images", str(cohort.images_tr), "--labels", str(cohort.labels_tr),
                                "--out", str(run), "--device", "cpu", "--quiet"], check=True)
        result["accuracy"] = accuracy(run, cohort, args.seed, args.cases)
        print(json.dumps({k: v for k, v in result["accuracy"].items() if k != "cases"}, indent=2), flush=True)
    if "memory" not in args.skip:
        sizes = [(s, s, s) for s in args.memory_sizes]
        result["memory"] = [memory(args.filters, (64, 64, 64), sizes, regions) for regions in (False, True)]
        print(json.dumps([{k: v for k, v in m.items() if k != "rows"} | {"peak_minus_before_mib":
                          [r["peak_minus_before_mib"] for r in m["rows"]]} for m in result["memory"]], indent=2))
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
