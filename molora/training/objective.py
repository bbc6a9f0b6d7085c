"""The training objective of one micro-batch, weighted per optimizer step.

Causal LM: the next-token cross-entropy is summed over the supervised targets of a
micro-batch and divided by the supervised targets of the whole optimizer step (all its
micro-batches), so that a micro-batch without a supervised target contributes exactly nothing
(no 0/0, no NaN) and every target has the same weight whatever the accumulation. The router
losses (``router_aux_loss_coef * aux + router_z_loss_coef * z``, DESIGN §5) keep their
configured weight per optimizer step: each micro-batch adds ``1 / grad_accum`` of them.
Sequence classification uses the model's own loss (one target per example).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from molora.model import MoLoRAModel
from molora.training.data import IGNORE_INDEX

__all__ = ["count_targets", "micro_batch_loss", "router_loss"]


def count_targets(labels: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """Supervised targets of a batch, a 0-dim tensor (no host sync).

    Args:
        labels: (B, L) token labels (causal LM: target t + 1 is predicted at t) or (B,) classes.
        causal: causal-LM labels (shifted by one, -100 ignored) or one target per example.
    """
    if not causal:
        return torch.tensor(labels.shape[0], device=labels.device)
    return (labels[:, 1:] != IGNORE_INDEX).sum()  # (B, L-1) targets


def router_loss(model: MoLoRAModel) -> torch.Tensor:
    """``router_aux_loss_coef * aux + router_z_loss_coef * z`` of the last forward (0-dim)."""
    cfg = model.molora_config
    total = torch.zeros((), device=next(iter(model.molora_layers().values())).lora_A.device)
    if cfg.router_aux_loss_coef > 0:
        total = total + cfg.router_aux_loss_coef * model.aux_loss().float()
    if cfg.router_z_loss_coef > 0:
        total = total + cfg.router_z_loss_coef * model.z_loss().float()
    return total


def micro_batch_loss(
    model, inner: MoLoRAModel, batch: dict[str, Any], *, causal: bool, step_targets: torch.Tensor, grad_accum: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to backpropagate for one micro-batch, and its statistics for the log.

    Args:
        model: the prepared (possibly wrapped) model to call.
        inner: the same model, unwrapped (router losses).
        batch: the micro-batch, with ``labels``.
        causal: causal-LM data or sequence classification.
        step_targets: supervised targets of the whole optimizer step on this process (0-dim).
        grad_accum: micro-batches per optimizer step.

    Returns:
        ``(loss, stats)``: ``stats`` (3,) is (summed cross-entropy, targets, router loss / grad_accum).
    """
    labels = batch["labels"]
    targets = count_targets(labels, causal=causal)
    if causal:
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # no model loss: no 0/0
        if "position_ids" in inputs:  # packed rows: transformers reads their boundaries only without a cache
            inputs["use_cache"] = False
        out = model(**inputs)
        logits = out.logits[:, :-1].flatten(0, 1).float()  # (B*(L-1), V)
        ce_sum = F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        router = router_loss(inner)
    else:
        out = model(**batch)
        router = router_loss(inner)
        ce_sum = (out.loss.float() - router) * targets
    router = router / grad_accum
    loss = ce_sum / step_targets.clamp(min=1) + router
    stats = torch.stack([ce_sum.detach(), targets.to(ce_sum.dtype), router.detach()])
    return loss, stats
