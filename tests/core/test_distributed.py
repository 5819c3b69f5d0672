"""torchrun / DistributedDataParallel on CPU: 2 processes with gloo on a tiny configuration.

Each test launches ``python -m torch.distributed.run --nproc_per_node 2 -m napari_sgrs.cli train``
in a subprocess with a timeout, so a deadlock between ranks fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from napari_sgrs.core.checkpoint import load_checkpoint
from napari_sgrs.core.events import Event, EventKind, read_events

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny import TINY_ARGS  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _torchrun(cohort, run: Path, *extra: str) -> list[str]:
    args = list(TINY_ARGS)
    if extra:  # later values of an option win in argparse
        args += list(extra)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "napari_sgrs.cli", "train", "--images", str(cohort.images_tr), "--labels",
            str(cohort.labels_tr), "--out", str(run), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _events(run: Path) -> list[Event]:
    return read_events(run / "events.jsonl")


def test_two_ranks_train_split_the_volumes_and_rank0_writes(tiny_cohort, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(_torchrun(tiny_cohort, run, "--val-every", "2"), env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # channels-last 1x1x1 kernels would make DDP copy their gradient every step, with a warning
    assert "Grad strides do not match" not in proc.stderr
    events = _events(run)
    kinds = [e.kind for e in events]
    # one writer: a single started/finished pair, not one per rank
    assert kinds.count(EventKind.STARTED) == 1 and kinds.count(EventKind.FINISHED) == 1
    assert kinds[-1] is EventKind.FINISHED
    assert kinds.count(EventKind.VALIDATION) == 2  # steps 2 and 4, rank 0 only, no deadlock meanwhile
    started = events[0].data
    assert started["world_size"] == 2
    ranks = started["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    # 3 labeled -> 2 train + 1 validation; 3 unlabeled + the validation image -> 4 unlabeled:
    # each rank draws from its own, disjoint half
    for key in ("labeled", "unlabeled"):
        a, b = set(ranks[0][key]), set(ranks[1][key])
        assert a and b and not a & b, (key, a, b)
    ckpt = load_checkpoint(run)
    assert ckpt.meta["step"] == 4
    assert not any(k.startswith("student.module.") for k in ckpt.tensors)  # saved unwrapped, not DDP's
    from napari_sgrs.core.infer import Predictor

    pred = Predictor.from_run(run, device="cpu").predict(
        __import__("napari_sgrs.core.io", fromlist=["read_volume"]).read_volume(
            next(tiny_cohort.images_ts.iterdir())).array)
    assert pred.label.shape == (24, 24, 24)


def test_sigterm_to_one_rank_stops_every_rank(tiny_cohort, tmp_path):
    """Only rank 1 gets SIGTERM: the stop decision is shared, so rank 0 checkpoints and reports
    'stopped' instead of waiting forever in DDP's all-reduce."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_torchrun(tiny_cohort, run, "--iterations", "100000", "--checkpoint-every", "100000"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        ranks = None
        while time.time() < deadline and proc.poll() is None:
            if (run / "events.jsonl").exists():
                events = _events(run)
                if any(e.kind is EventKind.PROGRESS for e in events):
                    ranks = events[0].data["ranks"]
                    break
            time.sleep(0.2)
        assert ranks is not None, proc.stderr.read()[-3000:] if proc.poll() is not None else "no progress"
        os.kill(ranks[1]["pid"], signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    events = _events(run)
    stopped = [e for e in events if e.kind is EventKind.STOPPED]
    assert len(stopped) == 1 and stopped[0].data["reason"] == "stop requested on another rank"
    assert load_checkpoint(run).meta["step"] == stopped[0].step < 100000


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks only")
def test_threads_started_for_the_process_group_leave_stop_signals_to_the_main_thread():
    """Threads made while the process group starts (gloo's, NCCL's) inherit a mask that blocks
    SIGINT/SIGTERM, so the stop signal reaches the main thread's handler and never interrupts a
    system call in a communication thread; the main thread's own mask is restored afterwards."""
    import threading

    from napari_sgrs.core.distributed import signals_to_main_thread

    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    seen = {}

    def record():
        seen["mask"] = signal.pthread_sigmask(signal.SIG_BLOCK, set())

    with signals_to_main_thread():
        t = threading.Thread(target=record)
        t.start()
        t.join()
    assert {signal.SIGINT, signal.SIGTERM} <= seen["mask"]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before
    assert signal.SIGTERM not in before  # the main thread still takes the stop signal


def test_sync_bn_on_cpu_is_a_clear_error(tiny_cohort, tmp_path, monkeypatch):
    """PyTorch's SyncBatchNorm runs on GPUs only: on CPU ranks --sync-bn is refused before any
    process group exists (checked in-process with the rank variables torchrun would set)."""
    from napari_sgrs.core.errors import ConfigError
    from napari_sgrs.core.io import find_cases
    from napari_sgrs.core.train import train
    from tiny import tiny_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="--sync-bn needs CUDA"):
        train(tiny_config(sync_bn=True), find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr), tmp_path / "r")
    assert not torch.distributed.is_initialized()


def test_worker_streams_are_seeded_per_rank_and_worker(monkeypatch):
    """BatchStream: the same (seed, rank, worker, start step) gives the same batches, any other
    tuple different ones, so DataLoader workers never draw the same patches."""
    import numpy as np

    from napari_sgrs.core.data import BatchStream, PatchSampler, TwoStreamBatches, make_sample

    rng = np.random.default_rng(0)
    vols = [make_sample(f"v{i}", rng.normal(size=(24, 24, 24)).astype(np.float32),
                        (rng.random((24, 24, 24)) > 0.7).astype(np.int64), (16, 16, 16), 255) for i in range(2)]
    src = TwoStreamBatches(vols, [make_sample("u", vols[0].image, None, (16, 16, 16), 255)], 2, 2,
                           PatchSampler((16, 16, 16), np.random.default_rng(0)))

    def first_batch(rank=0, worker=0, start=0):
        info = type("Info", (), {"id": worker})() if worker is not None else None
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)
        return next(iter(BatchStream(src, seed=5, rank=rank, start_step=start)))[0]

    a = first_batch()
    assert torch.equal(a, first_batch())
    for other in (first_batch(worker=1), first_batch(rank=1), first_batch(start=100)):
        assert not torch.equal(a, other)


def test_training_with_worker_processes(tiny_cohort, tmp_path):
    from napari_sgrs.core.io import find_cases
    from napari_sgrs.core.train import train
    from tiny import tiny_config

    cases = find_cases(tiny_cohort.images_tr, tiny_cohort.labels_tr)
    result = train(tiny_config(workers=2, iterations=3, val_every=100), cases, tmp_path / "run")
    assert result.step == 3
    started = _events(tmp_path / "run")[0]
    assert started.data["workers"] == 2 and started.data["world_size"] == 1
    # the batches really came from the workers' own generators, not the in-process sampler
    train(tiny_config(workers=0, iterations=3, val_every=100), cases, tmp_path / "inproc")
    a, b = (load_checkpoint(tmp_path / r).tensors for r in ("run", "inproc"))
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("student."))
