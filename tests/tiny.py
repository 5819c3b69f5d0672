"""Tiny training settings shared by the tests (a module, not conftest, so imports are unambiguous)."""

from __future__ import annotations


def tiny_config(**overrides):
    from napari_sgrs.core.train import TrainConfig

    base = dict(iterations=4, patch_size=(16, 16, 16), base_filters=2, batch_size=4, labeled_batch_size=2,
                seed=0, device="cpu", checkpoint_every=2, val_every=2, log_every=1)
    base.update(overrides)
    return TrainConfig(**base)


TINY_ARGS = ["--iterations", "4", "--patch-size", "16", "16", "16", "--base-filters", "2", "--device", "cpu",
             "--checkpoint-every", "2", "--quiet"]
