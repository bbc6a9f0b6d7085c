"""PiSSA-initialized experts (Meng et al. 2024, arXiv 2404.02948), one SVD segment per expert.

``init_lora_weights="pissa"`` (full SVD) or ``"pissa_niter_K"`` (randomized SVD,
``torch.svd_lowrank`` with K subspace iterations, as PEFT): with W0 = U S V^T and k = N*r,
expert i takes the components [i*r, (i+1)*r) of the top k (GOAT, Fan et al. 2025, arXiv
2502.16894, initializes its experts from distinct SVD segments the same way):

    A_i = sqrt(S_i / s) V_i^T  (r, in),    B_i = U_i sqrt(S_i / s)  (out, r)

so s * B_i A_i = U_i S_i V_i^T, and the experts differ from step 0.

**The residual, and why.** The routed update at the start is sum_i g_i U_i S_i V_i^T, where
the gates g depend on the router. molora never changes the base weights (they may be shared,
quantized, or reused after ``unload()``); instead the layer subtracts a frozen residual term

    y = W0 x - s * sum_i gbar_i B0_i A0_i x + (routed experts) + b

with the initial factors B0, A0 kept as buffers (``pissa_A``, ``pissa_B``) and saved with the
adapter. This is PEFT's W_res = W0 - s B0 A0 written as W0 plus a rank-N*r correction, the
form PEFT's PiSSA-to-LoRA conversion saves: an adapter (or an export, which includes the
correction in its factors) applies to the *original* base weights. The correction costs one
dense rank-N*r LoRA pass per forward (2*T*N*r*(in + out) FLOPs, small beside W0's 2*T*in*out).

- Task router: gbar_t = the router's initial gates of task t (``pissa_gates`` (num_tasks, N)),
  so every task starts exactly at the base model (up to float rounding). The router learns
  afterwards; gbar stays fixed, like PEFT's residual. Exports are per task (the correction is
  task t's), at rank r * (#experts with w_i != 0 + #experts with gbar_{t,i} != 0): 2*N*r for
  a dense task router's ``cat`` export.
- Token routers (soft, topk, topp): the gates vary per token, so no fixed residual is exact.
  gbar_i = (sum of the gates at uniform logits) / N, the mean gate of a balanced router:
  1/N for soft and normalized top-k. Because the segments are orthonormal,

      ||y_start(x) - y_base(x)|| = ||sum_i (g_i(x) - gbar_i) U_i S_i V_i^T x||
                                 <= max_i |g_i(x) - gbar_i| * ||W0 x||

  per layer and token. For soft routing at init (router std 0.02, nearly uniform) the max is
  small; for top-k with k < N the unchosen experts have g_i = 0, so the bound is
  max(gbar, 1/k - gbar) (0.25 for top-2 of 4): sparse routers start off the base model.
"""

from __future__ import annotations

import torch
from torch import nn

from molora.core.config import pissa_niter

__all__ = ["exact_rank_extra", "init_pissa_", "pissa_factors", "pissa_residual", "residual_gates"]


@torch.no_grad()
def pissa_factors(
    weight: torch.Tensor, num_experts: int, r: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The N experts' initial factors from W0's top N*r singular components, segment i to expert i.

    Args:
        weight: (out, in) W0.
        num_experts: N.
        r: rank of each expert.
        scaling: s; the factors hold sqrt(S / s) so that s * B_i A_i = U_i S_i V_i^T.
        niter: None for a full SVD, else subspace iterations of a randomized SVD.

    Returns:
        lora_A (N, r, in), lora_B (N, out, r), float32.

    Raises:
        ValueError: N*r > min(in, out) (W0 has fewer singular components).
    """
    out_features, in_features = weight.shape
    k = num_experts * r
    if k > min(out_features, in_features):
        raise ValueError(
            f"init_lora_weights='pissa' needs num_experts * r <= min(in, out) = {min(out_features, in_features)} "
            f"(one segment of W0's singular components per expert), got {num_experts} * {r} = {k}"
        )
    w = weight.float()
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, m), (m,), (m, in)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    else:
        u, s, v = torch.svd_lowrank(w, q=k, niter=niter)  # (out, k), (k,), (in, k)
        vh = v.t()
    root = (s / scaling).sqrt()  # (k,)
    lora_A = (root[:, None] * vh).view(num_experts, r, in_features)  # (N, r, in)
    lora_B = (u * root[None]).view(out_features, num_experts, r).permute(1, 0, 2)  # (N, out, r)
    return lora_A.contiguous(), lora_B.contiguous()


@torch.no_grad()
def residual_gates(router: nn.Module, num_experts: int) -> torch.Tensor:
    """gbar, the gates the frozen residual subtracts at (see the module docstring).

    Returns:
        (num_tasks, N) the initial gates of every task for the task router; (1, N) the mean
        gate of a balanced router, (sum of the gates at uniform logits) / N, for token routers.
    """
    if hasattr(router, "table_weights"):
        return router.table_weights().detach().float()  # (num_tasks, N)
    uniform = torch.zeros(1, num_experts, device=next(router.parameters()).device)  # (1, N)
    mass = router.route(uniform).weights.float().sum()
    return torch.full((1, num_experts), float(mass) / num_experts, device=uniform.device)


@torch.no_grad()
def init_pissa_(layer: nn.Module, init_lora_weights: str) -> None:
    """Set a layer's experts and its residual buffers from W0's SVD (``"pissa"`` / ``"pissa_niter_K"``)."""
    weight = layer.base_layer.weight
    if not weight.dtype.is_floating_point:
        raise ValueError(
            f"`init_lora_weights`={init_lora_weights!r} needs the base weight's SVD, got a {weight.dtype} "
            f"(quantized) {type(layer.base_layer).__name__}; use init_lora_weights=True"
        )
    weight = weight.t() if layer.fan_in_fan_out else weight  # (out, in)
    lora_A, lora_B = pissa_factors(weight, layer.num_experts, layer.r, layer.scaling, pissa_niter(init_lora_weights))
    layer.lora_A.copy_(lora_A)
    layer.lora_B.copy_(lora_B)
    layer.pissa_A.copy_(lora_A)
    layer.pissa_B.copy_(lora_B)
    gates = residual_gates(layer.router, layer.num_experts)
    layer.pissa_gates = gates.to(device=layer.pissa_A.device, dtype=layer.pissa_A.dtype)


def pissa_residual(layer: nn.Module, tokens: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
    """s * sum_i gbar_i B0_i A0_i x, the frozen term the layer subtracts (grad reaches x only).

    Args:
        layer: a MoLoRALinear with ``pissa_A`` (N, r, in), ``pissa_B`` (N, out, r) and
            ``pissa_gates`` (R, N).
        tokens: (T, in) in the compute dtype.
        task_ids: (T,) task of each token (used when R > 1: the task router).

    Returns:
        (T, out).
    """
    gates = layer.pissa_gates  # (R, N)
    if gates.shape[0] > 1:
        gates = gates.index_select(0, task_ids.to(gates.device).long())  # (T, N)
    else:
        gates = gates.expand(tokens.shape[0], -1)  # (T, N)
    num_experts, out_features, rank = layer.pissa_B.shape
    a_cat = layer.pissa_A.to(tokens.dtype).reshape(num_experts * rank, -1)  # (N*r, in)
    b_cat = layer.pissa_B.to(tokens.dtype).permute(1, 0, 2).reshape(out_features, num_experts * rank)  # (out, N*r)
    h = (tokens @ a_cat.t()).view(tokens.shape[0], num_experts, rank)  # (T, N, r)
    h = h * (gates.to(tokens.dtype) * layer.scaling)[:, :, None]
    return h.reshape(tokens.shape[0], num_experts * rank) @ b_cat.t()  # (T, out)


def exact_rank_extra(layer: nn.Module) -> int:
    """The rank the residual term adds to a layer's exact merge (N*r with PiSSA, else 0)."""
    return layer.pissa_B.shape[0] * layer.r if getattr(layer, "pissa_B", None) is not None else 0

