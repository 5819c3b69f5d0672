"""Time one SGRS training step, with a breakdown by phase, at a given setting.

Phases: data (patch sampling + augmentation + host->device copy), teacher forward, student
forward + backward (one forward over [X, U, U_mix]), regions + losses, optimizer, EMA.
The phases are timed in the real order with synchronisation between them, so their sum is a
little above the plain step time (which is also reported, measured without the splits).

    python benchmarks/step_benchmark.py --patch 48 48 48 --filters 8            # CPU-sized
    python benchmarks/step_benchmark.py --patch 80 112 112 --filters 16 --device cuda   # paper
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import sys
import time

import numpy as np
import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patch", type=int, nargs=3, default=(48, 48, 48))
    p.add_argument("--filters", type=int, default=8)
    p.add_argument("--labeled", type=int, default=2)
    p.add_argument("--unlabeled", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--method", default="sgrs-plus", choices=["sgrs-plus", "sgrs", "supervised"],
                   help="sgrs-plus: ours (the default); sgrs: SGRS-Net, the paper's step")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="cuDNN's heuristic algorithms, no autotuning")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from napari_sgrs.core import sgrs as S
    from napari_sgrs.core.data import PatchSampler, TwoStreamBatches, make_sample
    from napari_sgrs.core.device import amp_dtype as autocast_dtype
    from napari_sgrs.core.device import configure_backends, resolve_device
    from napari_sgrs.core.network import build_model
    from napari_sgrs.core.steps import STEPS
    from napari_sgrs.core.train import TrainConfig

    device = resolve_device(args.device)
    cfg = TrainConfig(method=args.method, base_filters=args.filters, patch_size=tuple(args.patch),
                      batch_size=args.labeled + args.unlabeled, labeled_batch_size=args.labeled,
                      amp=args.amp, cudnn_benchmark=not args.no_cudnn_benchmark).validate()
    rng = np.random.default_rng(0)
    gen = torch.Generator(device=device).manual_seed(0)
    vol = tuple(int(s * 1.5) for s in args.patch)
    samples = [make_sample(f"c{i}", np.random.default_rng(i).standard_normal(vol).astype(np.float32),
                           (np.random.default_rng(i).random(vol) > 0.9).astype(np.int64), tuple(args.patch), 255)
               for i in range(4)]
    n_lab = cfg.batch_size if args.method == "supervised" else args.labeled
    batches = TwoStreamBatches(samples[:2], [make_sample(s.name, s.image, None, tuple(args.patch), 255)
                                             for s in samples[2:]],
                               n_lab, 0 if args.method == "supervised" else args.unlabeled,
                               PatchSampler(tuple(args.patch), rng))
    configure_backends(device, cfg)  # cuDNN autotuning on CUDA, as the trainer
    student = build_model(cfg, 2).to(device, memory_format=torch.channels_last_3d)  # as the trainer
    teacher = copy.deepcopy(student).eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    amp_dtype = autocast_dtype(args.amp, device)
    step_fn = STEPS[args.method]  # as the trainer chooses it
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def to_dev(t):
        if t is None:
            return None
        t = t.to(device, non_blocking=True)
        return t.to(memory_format=torch.channels_last_3d) if t.dim() == 5 else t

    def plain_step(step):
        x, y, u = (to_dev(t) for t in next(batches)[:3])
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = step_fn(student, teacher, x, y, u, step, cfg, rng, gen, 100.0, 2)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        S.ema_update(teacher, student, S.ema_alpha(step))

    for i in range(args.warmup):
        plain_step(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        plain_step(i)
    _sync(device)
    step_s = (time.perf_counter() - t0) / args.steps

    # Phase breakdown (same computation as steps.sgrs_step, split with synchronisation).
    phases = {k: 0.0 for k in ("data", "teacher_forward", "student_forward_backward", "regions_losses",
                               "optimizer", "ema")}
    for i in range(args.steps):
        t = time.perf_counter()
        x, y, u = (to_dev(tt) for tt in next(batches)[:3])
        _sync(device); phases["data"] += time.perf_counter() - t
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if args.method == "supervised":
                t = time.perf_counter()
                logits = student(x)
                loss = S.supervised_loss(logits.float(), y, 255)
                _sync(device)
                phases["student_forward_backward"] += time.perf_counter() - t
            else:
                t = time.perf_counter()
                u_noisy = S.add_noise(u, generator=gen)
                x_noisy = S.add_noise(x, generator=gen)
                with torch.no_grad():
                    pseudo = S.hard_label(teacher(u_noisy))
                _sync(device); phases["teacher_forward"] += time.perf_counter() - t
                t = time.perf_counter()
                lam = S.sample_mix_lambda(u.shape[0], 0.75, rng)
                u_mix = S.mix_augment(u_noisy, x_noisy, lam, torch.from_numpy(rng.integers(0, x.shape[0], u.shape[0])))
                logits = student(torch.cat([x, u, u_mix], 0))
                _sync(device); fwd = time.perf_counter() - t
                t = time.perf_counter()
                b, bu = x.shape[0], u.shape[0]
                ls = S.supervised_loss(logits[:b].float(), y, 255)
                lu_l, mx_l = logits[b:b + bu].float(), logits[b + bu:].float()
                with torch.no_grad():
                    reg = S.synergy_regions(torch.softmax(lu_l, 1), torch.softmax(mx_l, 1))
                taught = lu_l.detach() if cfg.pseudo_views == "mix" else lu_l  # as steps.sgrs_step
                loss = ls + S.regional_loss(taught, mx_l, pseudo, reg, weighting=cfg.region_weighting)
                _sync(device); phases["regions_losses"] += time.perf_counter() - t
                phases["student_forward_backward"] += fwd
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        _sync(device); phases["student_forward_backward"] += time.perf_counter() - t
        t = time.perf_counter()
        scaler.step(opt); scaler.update()
        _sync(device); phases["optimizer"] += time.perf_counter() - t
        t = time.perf_counter()
        S.ema_update(teacher, student, 0.99)
        _sync(device); phases["ema"] += time.perf_counter() - t
    phases = {k: v / args.steps for k, v in phases.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "method": args.method,
        "patch": list(args.patch), "filters": args.filters, "labeled": args.labeled,
        "unlabeled": args.unlabeled, "amp": str(amp_dtype), "step_s": step_s,
        "phases_s": phases,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        # the process does nothing but these steps, so its high-water mark is the training peak
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "region_weighting": cfg.region_weighting, "pseudo_views": cfg.pseudo_views,
        "cudnn_benchmark": cfg.cudnn_benchmark,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.method} step at patch {tuple(args.patch)}, F={args.filters}, "
              f"{args.labeled}+{args.unlabeled}, "
              f"{result['device']} x{result['threads']} threads: {step_s:.3f} s/step, "
              f"peak RSS {result['peak_rss_mb']:.0f} MiB" + (f", peak GPU {result['peak_gpu_mb']:.0f} MiB"
                                                             if result["peak_gpu_mb"] else ""))
        for k, v in phases.items():
            print(f"  {k:26s} {v:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
