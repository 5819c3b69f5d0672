"""Issue #20 item 5: the default training step against the published SGRS-Net step, side by side in
one process, interleaved, at the same patch and filters.

- **published**: the authors' training iteration restated from their code (the restatement the
  parity test checks, ``tests/core/test_paper_parity.py``: ``authors_step`` with their defects,
  backward, their SGD, ``authors_ema``; ``.cuda()`` a no-op), at their 2 + 2 batch, on our V-Net.
  Twice: with our memory format (channels-last 3D, the strict comparison: the network's layout
  is not the method) and as their code runs it (contiguous).
- **our variants**: a real :class:`napari_sgrs.core.train.Trainer` built from ``TrainConfig`` and
  stepped with its own ``_train_step`` (the method's loss, learning rate, SGD, teacher update,
  progress bookkeeping). ``default`` is the method and batch a plain ``sgrs train``
  gets today.

Both sides take their patches from one pool drawn beforehand (their DataLoader prepares batches in
worker processes, so patch sampling is left out of both). Each round runs ``--steps`` steps of every
variant in turn; the figure is the median over rounds of each variant's time over the published
step's time in the same round.

    python benchmarks/step_side_by_side.py --patch 48 48 48 --filters 8
    python benchmarks/step_side_by_side.py --patch 64 64 64 --filters 16 --rounds 4 --steps 2
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
#: name -> TrainConfig overrides ({} : what `sgrs train` does with no method options)
OURS = {
    "default": {},
    "sgrs: SGRS-Net as published, our implementation": dict(method="sgrs", batch_size=4, labeled_batch_size=2),
    "sgrs-plus 4 + 2 (the batch before)": dict(method="sgrs-plus", batch_size=6, labeled_batch_size=4),
}


def _restatement():
    """The authors' step as the parity test restates it (one definition for both)."""
    spec = importlib.util.spec_from_file_location("paper_parity", ROOT / "tests" / "core" / "test_paper_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.authors_step, module.authors_ema


def _trainer(overrides: dict, patch, filters: int, cases, folder: Path):
    from napari_sgrs.core.events import EventWriter
    from napari_sgrs.core.runfolder import RunFolder
    from napari_sgrs.core.train import Trainer, TrainConfig, _StopFlag

    cfg = TrainConfig(**{"iterations": 10**9, "patch_size": tuple(patch), "base_filters": filters, "device": "cpu",
                         "log_every": 10**9, "checkpoint_every": 10**9, "val_fraction": 0.0, **overrides}).validate()
    run = RunFolder(folder)
    folder.mkdir(parents=True)
    t = Trainer(cfg, run, EventWriter(None), _StopFlag(run.stop_file))
    t.setup(cases)
    t._announce()
    t.student.train()
    t.teacher.eval()
    t.t0, t.step0 = time.time(), 0
    return t


class Published:
    """The authors' iteration: loss, backward, SGD (constant lr), their two EMA updates."""

    def __init__(self, filters: int, channels_last: bool, step_fn, ema_fn):
        from napari_sgrs.core.network import build_model
        from napari_sgrs.core.settings import TrainConfig

        cfg = TrainConfig(method="sgrs", base_filters=filters)
        torch.manual_seed(0)
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.fmt = fmt
        self.student = build_model(cfg, 2).to(memory_format=fmt).train()
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.gen, self.rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
        self.step_fn, self.ema_fn, self.it = step_fn, ema_fn, 0

    def step(self, x, y, u) -> None:
        x, u = (t.contiguous(memory_format=self.fmt) for t in (x, u))
        loss = self.step_fn(self.student, self.teacher, x, y, u, self.it, self.gen, self.rng, True)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.ema_fn(self.teacher, self.student, self.it, True)
        self.it += 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, nargs=3, default=(48, 48, 48))
    p.add_argument("--filters", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=3, help="steps of each variant per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    from napari_sgrs.core.demo import make_demo_cohort
    from napari_sgrs.core.io import find_cases

    step_fn, ema_fn = _restatement()
    tmp = Path(tempfile.mkdtemp(prefix="sgrs-side-by-side-"))
    shape = tuple(int(s * 1.25) for s in args.patch)
    cohort = make_demo_cohort(tmp / "data", kind="blob", n_cases=6, n_labeled=3, n_test=0, shape=shape, seed=0)
    cases = find_cases(cohort.images_tr, cohort.labels_tr)
    trainers = {name: _trainer(o, args.patch, args.filters, cases, tmp / f"run{i}") for i, (name, o) in
                enumerate(OURS.items())}
    default_cfg = trainers["default"].config
    # one pool of 2 + 2 batches for the published step, drawn by the sgrs trainer's sampler
    draw = trainers["sgrs: SGRS-Net as published, our implementation"].batches
    pool = [next(draw)[:3] for _ in range(args.steps)]
    published = {"published, channels-last (strict)": Published(args.filters, True, step_fn, ema_fn),
                 "published, as their code runs (contiguous)": Published(args.filters, False, step_fn, ema_fn)}
    for t in trainers.values():  # each trainer cycles its own pre-drawn batches
        batches = [next(t.batches)[:3] for _ in range(args.steps)]
        t.batch_source = itertools.cycle(batches)

    def run(name: str, n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            if name in published:
                published[name].step(*pool[i % len(pool)])
            else:
                trainers[name]._train_step()
        return (time.perf_counter() - t0) / n

    names = list(published) + list(trainers)
    for name in names:
        run(name, args.warmup)
    times = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            times[name].append(run(name, args.steps))
    ref = "published, channels-last (strict)"
    rows = []
    for name in names:
        ratios = [a / b for a, b in zip(times[name], times[ref])]
        cfg = trainers[name].config if name in trainers else None
        batch = (f"{cfg.labeled_batch_size} + {cfg.batch_size - cfg.labeled_batch_size}" if cfg else "2 + 2")
        rows.append(dict(variant=name, batch=batch, step_s=statistics.median(times[name]),
                         ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                         method=cfg.method if cfg else "sgrs (published)"))
    machine = platform.processor() or platform.machine()
    head = (f"patch {tuple(args.patch)}, {args.filters} filters, CPU {machine}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}; {args.rounds} rounds x {args.steps} steps, interleaved; default = "
            f"{default_cfg.method} {default_cfg.labeled_batch_size} + "
            f"{default_cfg.batch_size - default_cfg.labeled_batch_size}")
    print(head)
    print("| variant | batch | s/step (median) | x published step (median, min-max over rounds) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['batch']} | {r['step_s']:.3f} | {r['ratio']:.2f} ({r['ratio_min']:.2f}-"
              f"{r['ratio_max']:.2f}) |")
    if args.json:
        args.json.write_text(json.dumps({"setting": head, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
