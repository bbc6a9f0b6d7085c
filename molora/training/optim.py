"""The optimizer and learning-rate schedule of a training run: AdamW over
:func:`molora.core.param_groups.get_optimizer_param_groups` (separate groups for the experts'
A, the experts' B (LoRA+) and the routers); warm-up then cosine/linear/constant."""

from __future__ import annotations

import functools
import math

import torch

from molora.core.param_groups import get_optimizer_param_groups
from molora.model import MoLoRAModel
from molora.training.run_config import TrainSection

__all__ = ["build_optimizer", "lr_factor"]


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up from 0, then cosine/linear
    decay to ``min_lr_ratio`` at ``max_steps`` (or constant).

    Args:
        step: the optimizer step (0-based).
        warmup_steps: steps of linear warm-up.
        max_steps: the step at which the decay ends.
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"``.
        min_lr_ratio: the final multiplier of the cosine/linear decay.

    Returns:
        The lr multiplier.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * decay


def build_optimizer(
    model: MoLoRAModel, t: TrainSection
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and a ``LambdaLR`` following :func:`lr_factor`.

    Args:
        model: the MoLoRA model (not yet wrapped by accelerate; a sharded one keeps its names).
        t: the ``train`` section (learning rates, weight decay, warm-up, schedule).

    Returns:
        ``(optimizer, scheduler)``; the scheduler is meant to be stepped once per optimizer step.
    """
    groups = get_optimizer_param_groups(
        model,
        t.lr,
        router_lr_ratio=t.router_lr_ratio,  # None: the router kind's default (molora.core.recipes)
        router_lr=t.router_lr,  # an explicit router lr wins over the ratio
        loraplus_lr_ratio=t.loraplus_lr_ratio,
        weight_decay=t.weight_decay,
    )
    optimizer = torch.optim.AdamW(groups)
    # `warmup` is a step count (int) or a fraction of max_steps (float < 1)
    warmup = t.warmup if isinstance(t.warmup, int) else int(round(t.warmup * t.max_steps))
    schedule = functools.partial(
        lr_factor, warmup_steps=warmup, max_steps=t.max_steps, schedule=t.lr_schedule, min_lr_ratio=t.min_lr_ratio
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
