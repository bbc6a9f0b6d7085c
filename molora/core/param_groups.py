"""Optimizer parameter groups of a MoLoRA model: the router's own learning rate and LoRA+.

:func:`get_optimizer_param_groups` plays the role of PEFT's ``create_loraplus_optimizer`` for
users who write their own loop or train with HF ``Trainer(optimizers=...)``; ``molora
train`` builds its AdamW from the same groups. Defaults per router kind come from
:mod:`molora.core.recipes`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from molora.core.recipes import default_router_lr_ratio

__all__ = ["create_molora_optimizer", "get_optimizer_param_groups"]


def _check_positive(name: str, value: Any, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        none = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a finite number > 0{none}, got {value!r}")


def _router_kind(model: nn.Module) -> str:
    """The router kind of the MoLoRA model(s) inside ``model`` (the model itself or a wrapper)."""
    kinds = {m.__dict__["molora_config"].router for m in model.modules() if "molora_config" in m.__dict__}
    if len(kinds) != 1:
        found = "no MoLoRA model" if not kinds else f"MoLoRA models with routers {sorted(kinds)}"
        raise ValueError(f"`router_lr_ratio` has no default here: `model` holds {found}; pass router_lr_ratio=")
    return kinds.pop()


def get_optimizer_param_groups(
    model: nn.Module,
    lr: float,
    *,
    router_lr_ratio: float | None = None,
    router_lr: float | None = None,
    loraplus_lr_ratio: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Parameter groups with the router's learning rate and LoRA+ built in.

    Groups (empty ones are left out), each with a ``name``:

    - ``"base"``: the experts' A (and trainable ``modules_to_save``) at ``lr``;
    - ``"lora_B"``: the experts' B (shared experts' too) at ``loraplus_lr_ratio * lr``
      (LoRA+, Hayou et al. 2024);
    - ``"router"``: every router parameter at ``router_lr_ratio * lr``, without weight decay
      (decay would pull the logits back to uniform routing);
    - ``"magnitude"``: DoRA's magnitudes (``use_dora``) at ``lr``, without weight decay (decay
      would pull m, which starts at ||W0||, toward 0).

    Only parameters with ``requires_grad`` are grouped (frozen experts are left out).

    Args:
        model: a ``MoLoRAModel``, or any module that holds one (a classifier around it).
        lr: the experts' learning rate.
        router_lr_ratio: router lr = ratio * lr. ``None``: the default of the model's router
            kind (:data:`molora.core.recipes.ROUTER_LR_RATIO`: task 20, soft 5, topk/topp 1).
        router_lr: an absolute router lr; when given it wins over ``router_lr_ratio``.
        loraplus_lr_ratio: B's lr = ratio * lr (``None``: 1, plain LoRA).
        weight_decay: AdamW weight decay of the non-router groups.

    Returns:
        ``[{"name", "params", "lr", "weight_decay"}, ...]``, ready for any torch optimizer.

    Raises:
        ValueError: a non-positive or non-finite lr or ratio, a negative weight decay, or no
            default router lr ratio (``model`` holds no MoLoRA model, or several router kinds).
    """
    _check_positive("lr", lr, allow_none=False)
    _check_positive("router_lr_ratio", router_lr_ratio)
    _check_positive("router_lr", router_lr)
    _check_positive("loraplus_lr_ratio", loraplus_lr_ratio)
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"`weight_decay` must be a finite number >= 0, got {weight_decay!r}")
    groups: dict[str, list[nn.Parameter]] = {"base": [], "lora_B": [], "router": [], "magnitude": []}
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
    if router_lr is None and groups["router"]:
        ratio = router_lr_ratio if router_lr_ratio is not None else default_router_lr_ratio(_router_kind(model))
        router_lr = ratio * lr
    settings = {
        "base": (lr, weight_decay),
        "lora_B": (lr * (loraplus_lr_ratio or 1.0), weight_decay),
        "router": (router_lr, 0.0),
        "magnitude": (lr, 0.0),
    }
    return [
        {"name": key, "params": params, "lr": settings[key][0], "weight_decay": settings[key][1]}
        for key, params in groups.items()
        if params
    ]


def create_molora_optimizer(
    model: nn.Module,
    lr: float,
    *,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    router_lr_ratio: float | None = None,
    router_lr: float | None = None,
    loraplus_lr_ratio: float | None = None,
    weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` over :func:`get_optimizer_param_groups` (same arguments).

    Args:
        model, lr, router_lr_ratio, router_lr, loraplus_lr_ratio, weight_decay: as
            :func:`get_optimizer_param_groups`.
        optimizer_cls: the optimizer class (default AdamW).
        **optimizer_kwargs: passed to ``optimizer_cls`` (``betas``, ``eps``, ...).

    Returns:
        The optimizer; each of its param groups keeps its ``name``.
    """
    groups = get_optimizer_param_groups(
        model,
        lr,
        router_lr_ratio=router_lr_ratio,
        router_lr=router_lr,
        loraplus_lr_ratio=loraplus_lr_ratio,
        weight_decay=weight_decay,
    )
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
