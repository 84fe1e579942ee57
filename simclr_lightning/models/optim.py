"""Optimizers and parameter groups shared by the pretraining and fine-tuning modules."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from lightly.utils.lars import LARS
from torch import nn

OptimizerName = Literal["lars", "sgd", "adamw"]


def split_decay_groups(
    parameters: Iterable[nn.Parameter], weight_decay: float
) -> list[dict[str, Any]]:
    """Split parameters into a weight-decay group and a group with no decay.

    Every one-dimensional tensor (biases, BatchNorm weights and biases, wherever they sit) goes
    to the group with ``weight_decay=0``. The test is on shape, not on names, so BatchNorm
    layers nested in projection heads or ResNet downsample branches are never missed. lightly's
    LARS also skips trust-ratio scaling for parameters whose group has ``weight_decay == 0``,
    which is the SimCLR recipe for biases and normalisation parameters.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for parameter in parameters:
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_optimizer(
    name: OptimizerName,
    groups: list[dict[str, Any]],
    lr: float,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """Build ``lars`` (lightly's LARS), ``sgd`` (with momentum) or ``adamw`` over ``groups``.

    Each group keeps its own ``weight_decay``; ``lr`` is the peak rate the scheduler scales.
    """
    if lr <= 0:
        raise ValueError(f"Learning rate must be positive, got {lr}.")
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, trust_coefficient=trust_coefficient)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"Unknown optimizer {name!r}; expected 'lars', 'sgd' or 'adamw'.")
