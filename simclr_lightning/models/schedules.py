"""Learning-rate scaling rules and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from typing import Literal

LRScaling = Literal["linear", "sqrt", "none"]


def scale_learning_rate(base_lr: float, global_batch_size: int, rule: LRScaling) -> float:
    """Scale a base learning rate by the global batch size.

    The SimCLR paper (Chen et al. 2020, appendix B.1) uses ``lr = 0.3 * batch / 256`` (linear)
    and, for small batches or long runs, ``lr = 0.075 * sqrt(batch)`` (square root).

    Args:
        base_lr: The learning rate before scaling (0.3 for linear, 0.075 for square root in the
            paper).
        global_batch_size: Images per optimizer step over all devices, nodes and gradient
            accumulation steps.
        rule: ``linear`` (``base_lr * batch / 256``), ``sqrt`` (``base_lr * sqrt(batch)``) or
            ``none`` (``base_lr`` unchanged).
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}.")
    if rule == "linear":
        return base_lr * global_batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch_size)
    if rule == "none":
        return base_lr
    raise ValueError(f"Unknown lr_scaling {rule!r}; expected 'linear', 'sqrt' or 'none'.")


class WarmupCosineSchedule:
    """Learning-rate multiplier: linear warm-up, then cosine decay, per optimizer step.

    At step ``s`` (0-based) the multiplier is ``(s + 1) / warmup_steps`` during warm-up, so the
    first step never runs at 0, then ``final + (1 - final) * (1 + cos(pi * p)) / 2`` with
    ``p = (s - warmup_steps) / (total_steps - warmup_steps)``. Steps past ``total_steps`` stay at
    ``final``. It is a plain object, so ``LambdaLR.state_dict`` stores its fields and a resumed
    run continues where it stopped.

    Args:
        warmup_steps: Optimizer steps of linear warm-up; 0 disables it.
        total_steps: All optimizer steps of the run, warm-up included.
        final_ratio: Multiplier reached at the end of the decay.
    """

    def __init__(self, warmup_steps: int, total_steps: int, final_ratio: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {total_steps}.")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}; "
                "shorten the warm-up or train for more steps."
            )
        if not 0.0 <= final_ratio <= 1.0:
            raise ValueError(f"final_ratio must be in [0, 1], got {final_ratio}.")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.final_ratio = final_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps == 0:
            return 1.0
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final_ratio + (1.0 - self.final_ratio) * cosine
