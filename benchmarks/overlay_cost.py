"""What the review overlay costs: ``Predictor.predict`` with and without ``regions`` on one volume,
side by side in one process, interleaved (label only, regions, label only, ...), best of N each.

    python benchmarks/overlay_cost.py --volume 128 128 128 --patch 64 64 64 --filters 16 --repeats 3

Random weights (only time matters); one thread unless --threads. Memory of whole-volume inference,
in probability-map copies, is ``benchmarks/infer_benchmark.py --skip speed accuracy``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volume", type=int, nargs=3, default=(128, 128, 128))
    ap.add_argument("--patch", type=int, nargs=3, default=(64, 64, 64))
    ap.add_argument("--filters", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from napari_sgrs.core.infer import Predictor
    from napari_sgrs.core.vnet import VNet

    torch.manual_seed(0)
    net = VNet(1, 2, args.filters).eval().to(memory_format=torch.channels_last_3d)
    image = torch.nn.functional.avg_pool3d(torch.randn(1, 1, *args.volume), 5, 1, 2)[0, 0].numpy()
    meta = {"config": {"patch_size": list(args.patch)}, "num_classes": 2}
    predictor = Predictor(net, meta, torch.device("cpu"))
    predictor.predict(image[: args.patch[0], : args.patch[1], : args.patch[2]], regions=True)  # warm-up
    times = {"label": [], "regions": []}
    for _ in range(args.repeats):
        for kind in times:
            t0 = time.perf_counter()
            predictor.predict(image, regions=kind == "regions")
            times[kind].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({"volume": args.volume, "patch": args.patch, "filters": args.filters,
                      "threads": args.threads, "load_average": [round(x, 2) for x in os.getloadavg()],
                      "label_only_s": round(best["label"], 2), "with_regions_s": round(best["regions"], 2),
                      "ratio": round(best["regions"] / best["label"], 2),
                      "all_s": {k: [round(x, 2) for x in v] for k, v in times.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
