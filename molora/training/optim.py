"""The optimizer and learning-rate schedule of a training run: AdamW with separate groups for
the experts' A, the experts' B (LoRA+) and the routers; warm-up then cosine/linear/constant."""

from __future__ import annotations

import functools
import math

import torch

from molora.model import MoLoRAModel
from molora.training.run_config import TrainSection

__all__ = ["build_optimizer", "lr_factor", "param_groups"]


def param_groups(
    model: MoLoRAModel, *, lr: float, router_lr: float | None, loraplus_lr_ratio: float | None, weight_decay: float
) -> list[dict]:
    """AdamW parameter groups: experts' A (and modules_to_save) at ``lr``; experts' B at
    ``loraplus_lr_ratio * lr`` (LoRA+, Hayou et al. 2024; shared experts' B too); routers at ``router_lr`` without
    weight decay; DoRA's magnitudes at ``lr`` without weight decay (decay would pull m, which starts at
    ||W0||, toward 0). Empty groups are left out; each group has a ``name``.

    Args:
        model: the MoLoRA model; only parameters that require grad are grouped.
        lr: base learning rate.
        router_lr: routers' learning rate (None: ``lr``).
        loraplus_lr_ratio: B's lr = ratio * lr (None: 1).
        weight_decay: AdamW weight decay of the non-router groups.

    Returns:
        ``[{"name", "params", "lr", "weight_decay"}, ...]``.
    """
    groups: dict[str, list] = {"base": [], "lora_B": [], "router": [], "magnitude": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".router." in name:
            groups["router"].append(param)
        elif name.endswith(("lora_B", "lora_B_shared")):  # LoRA+ applies to every B factor
            groups["lora_B"].append(param)
        elif name.endswith("lora_magnitude"):
            groups["magnitude"].append(param)
        else:
            groups["base"].append(param)
    settings = {
        "base": (lr, weight_decay),
        "lora_B": (lr * (loraplus_lr_ratio or 1.0), weight_decay),
        "router": (router_lr or lr, 0.0),
        "magnitude": (lr, 0.0),
    }
    return [
        {"name": key, "params": params, "lr": settings[key][0], "weight_decay": settings[key][1]}
        for key, params in groups.items()
        if params
    ]


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
        model: the MoLoRA model (not yet wrapped by accelerate).
        t: the ``train`` section (learning rates, weight decay, warm-up, schedule).

    Returns:
        ``(optimizer, scheduler)``; the scheduler is meant to be stepped once per optimizer step.
    """
    groups = param_groups(
        model, lr=t.lr, router_lr=t.router_lr, loraplus_lr_ratio=t.loraplus_lr_ratio, weight_decay=t.weight_decay
    )
    optimizer = torch.optim.AdamW(groups)
    # `warmup` is a step count (int) or a fraction of max_steps (float < 1)
    warmup = t.warmup if isinstance(t.warmup, int) else int(round(t.warmup * t.max_steps))
    schedule = functools.partial(
        lr_factor, warmup_steps=warmup, max_steps=t.max_steps, schedule=t.lr_schedule, min_lr_ratio=t.min_lr_ratio
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
