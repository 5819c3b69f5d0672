"""Cost of the one-piece rule on benchmark-sized label sets.

Training runs ``single_component_classes`` once over every labeled volume (the record that
``predict --largest-component auto`` uses), and ``keep_largest_component`` runs once per predicted
volume under ``--largest-component``. This times both on synthetic volumes of a given size: each
label is a jittered ellipsoid (one 26-connected piece, the worst case for the rule, which must
label the whole volume) and, for ``keep_largest_component``, three extra islands. Single-threaded scipy; the volume count and size default to the LA benchmark
(80 training volumes, about 88 x 112 x 112 voxels after the usual crop).

    python benchmarks/postprocess_benchmark.py --volumes 80 --shape 88 112 112
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def ellipsoid(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    centre = [s / 2 + rng.uniform(-0.05, 0.05) * s for s in shape]
    radii = [s * rng.uniform(0.18, 0.25) for s in shape]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def main(argv=None) -> dict:
    from napari_sgrs.core.postprocess import keep_largest_component, single_component_classes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volumes", type=int, default=80)
    p.add_argument("--shape", type=int, nargs=3, default=[88, 112, 112])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    shape = tuple(args.shape)
    rng = np.random.default_rng(args.seed)
    labels = [ellipsoid(shape, rng).astype(np.uint8) for _ in range(args.volumes)]

    t0 = time.perf_counter()
    classes = single_component_classes(labels, 2)
    t_rule = time.perf_counter() - t0
    assert classes == [1], classes  # every label is one piece: the rule had to label each volume

    noisy = []
    for lab in labels[: min(10, len(labels))]:
        lab = lab.copy()
        for _ in range(3):
            z, y, x = (int(rng.integers(0, s - 4)) for s in shape)
            lab[z:z + 3, y:y + 3, x:x + 3] = 1
        noisy.append(lab)
    t0 = time.perf_counter()
    removed = sum(int((keep_largest_component(lab, [1]) != lab).sum()) for lab in noisy)
    t_mask = (time.perf_counter() - t0) / len(noisy)

    result = {"volumes": args.volumes, "shape": list(shape),
              "single_component_classes_s": round(t_rule, 6),  # 3 digits rounded a warm 24^3 run to 0
              "per_volume_ms": round(1000 * t_rule / args.volumes, 2),
              "keep_largest_component_ms_per_volume": round(1000 * t_mask, 2), "islands_removed_voxels": removed}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
