"""The network a run trains and its optimiser: built from a run's settings, for training,
inference and the checkpoint check alike, and the optimiser's state as checkpoint tensors.

``config`` here is a TrainConfig or the settings a checkpoint saved (its ``config`` dict): only the
fields that shape the network and the optimiser are read, so this module needs neither of
:mod:`.train` nor :mod:`.infer`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .vnet import VNet

#: The settings that shape the network. A checkpoint's settings that lack one take VNet's default,
#: which is TrainConfig's too.
NETWORK_SETTINGS = ("base_filters", "dropout")


def build_model(config: Any, num_classes: int) -> VNet:
    """The run's V-Net, one input channel, ``num_classes`` outputs (background included)."""
    if isinstance(config, Mapping):
        given = {k: config[k] for k in NETWORK_SETTINGS if k in config}
    else:
        given = {k: getattr(config, k) for k in NETWORK_SETTINGS}
    return VNet(1, num_classes, **given)


def make_optimizer(network: torch.nn.Module, config: Any) -> torch.optim.SGD:
    """SGD with momentum and weight decay, as the paper trains."""
    return torch.optim.SGD(network.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def learning_rate(config: Any, step: int) -> float:
    """The learning rate at ``step``: constant (paper) or poly decay to 0 at the last step."""
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * (1.0 - min(step, config.iterations - 1) / config.iterations) ** 0.9


def set_learning_rate(optimizer: torch.optim.Optimizer, config: Any, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim.momentum") -> dict[str, torch.Tensor]:
    """The momentum buffers as checkpoint tensors ``<prefix>.<i>`` (i: the i-th parameter)."""
    out = {}
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[f"{prefix}.{i}"] = buf
    return out


def load_momentum(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Restore the momentum buffers that :func:`optimizer_tensors` saved under ``prefix``."""
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        buf = tensors.get(f"{prefix}.{i}")
        if buf is not None:
            optimizer.state[p]["momentum_buffer"] = buf.to(p.device).clone()
