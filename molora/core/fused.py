"""The router fused into the experts' down-projection: ``[A_cat; W_router] x`` in one GEMM.

A token router (soft, top-k, top-p) reads the same x as the experts' down-projection. When the
layer runs the ``dense`` path, both are thin GEMMs bound by reading x (rank N*r and N): one
GEMM over the stacked (N*r + N, in) weight reads x once in the forward, and its backward gives
grad_x, grad_A and grad_router in two GEMMs instead of four (DESIGN §7).

It gives the same results as the separate GEMMs (up to float32 summation order), so it runs
only where the two are the same computation:

- float32 compute and float32 experts: the router math must stay float32 (DESIGN §5), and a
  bf16 GEMM over the stacked weight would round the logits;
- the router's logits are ``x @ W.T`` right now (no jitter noise in training) and the experts
  see the same x (no LoRA dropout in training);
- one router per layer (block routers reuse another layer's routing), no shared A, and the
  path this call runs is ``dense`` (``expert_impl="dense"``, or ``"auto"`` choosing it).
"""

from __future__ import annotations

import torch
from torch import nn

from molora.core.choose import choose_impl
from routers import RouterOutput
from routers.base import check_finite


def fused_route(layer: nn.Module, tokens: torch.Tensor) -> tuple[RouterOutput, torch.Tensor] | None:
    """``(routing, h)`` from one GEMM over ``[A_cat; W_router]``, or None where it does not apply.

    Args:
        layer: a MoLoRALinear.
        tokens: (T, in) the layer's input tokens.

    Returns:
        The router's output for ``tokens`` and the experts' down-projection h (T, N*r).
    """
    if not _applies(layer, tokens):
        return None
    router = layer.router
    lora_A = layer.lora_A.reshape(-1, layer.in_features)  # (N*r, in)
    both = tokens @ torch.cat([lora_A, router.weight]).t()  # (T, N*r + N): x read once
    h, logits = both.split([lora_A.shape[0], router.weight.shape[0]], dim=1)  # (T, N*r), (T, N)
    if router.debug:
        check_finite(logits, type(router).__name__)
    return router.route(logits), h


def _applies(layer: nn.Module, tokens: torch.Tensor) -> bool:
    router = layer.router
    if layer.routing_block is not None or not hasattr(router, "logits_are_linear") or not router.logits_are_linear():
        return False
    if layer.lora_A.shape[0] != layer.num_experts:  # a shared A: its (T, r) down-projection is not fused
        return False
    if layer.training and isinstance(layer.lora_dropout, nn.Dropout):
        return False
    float32 = torch.float32
    if tokens.dtype != float32 or layer.lora_A.dtype != float32 or torch.is_autocast_enabled(tokens.device.type):
        return False
    return _runs_dense(layer, tokens)


def _runs_dense(layer: nn.Module, tokens: torch.Tensor) -> bool:
    """Whether this call's expert path is ``dense`` (decided from shapes, before routing)."""
    if layer.expert_impl == "dense":
        return True
    if layer.expert_impl != "auto":
        return False
    k = getattr(layer.router, "top_k", None) or layer.num_experts
    if k >= layer.num_experts:
        return True  # dense routing (or top-p without a cap): auto runs dense
    shape_only = torch.empty((tokens.shape[0], k), dtype=torch.long, device="meta")  # choose_impl reads shapes only
    return choose_impl(tokens, layer.lora_A, layer.lora_B, shape_only) == "dense"
