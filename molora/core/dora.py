"""DoRA experts on the task router (DESIGN §5; Liu et al. 2024, arXiv 2402.09353).

For the task router a sequence of task t gets the update dW_t = s * sum_i g_{t,i} B_i A_i
(plus s * sum_j B_j A_j of the shared experts, gate 1), and the layer computes

    y = m * (W0 x + dW_t x) / ||W0 + dW_t||_c + b

with m (out,) one learned magnitude per layer, initialized to the row norms of W0 (PEFT's
``lora_magnitude_vector``; "column" norm in the paper's (in, out) notation), and the norm
detached from the graph (DoRA paper §4.3, as PEFT): gradients reach m, the experts and the
router through the numerator only. The bias stays outside the normalization, as in PEFT. With
``lora_dropout`` > 0 the experts see dropout(x) and W0 the clean x in training; PEFT's training
forward instead applies m / ||.|| - 1 to W0 dropout(x). Both are the same in eval and without dropout.

The norm is one (out,) vector per task, not per token, and it is computed for every task of
the router at once without forming W0 + dW_t. With the experts stacked as A_cat (R, in) and
B_t = B_cat * (s * gates_t) (out, R), R = (N + M) * r::

    ||w_o + d_o||^2 = ||w_o||^2 + 2 sum_j P[o, j] B_t[o, j] + B_t[o] C B_t[o]^T
    P = W0 A_cat^T (out, R),  C = A_cat A_cat^T (R, R)

Cost per forward, under no_grad, in float32: out*in*R (P, the product of W0 with R vectors:
the cost of running the base layer on R tokens) + in*R^2 (C) + K*out*R^2 for K = num_tasks
tasks, and memory O(out*in) for the float32 copy of W0 plus O(K*out*R). Materializing
W0 + dW_t per task would cost K*out*in*R. Computing the norms of every task (rather than of
the tasks present) keeps the forward free of host-device synchronization.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["base_weight", "dora_norms", "dora_output", "init_magnitude"]


def base_weight(layer: nn.Module) -> torch.Tensor:
    """W0 of a MoLoRA layer as (out, in) float32 (a transformers Conv1D stores (in, out)).

    Raises:
        ValueError: the base weight is not floating point (a quantized base: DoRA needs W0).
    """
    weight = layer.base_layer.weight
    if not weight.dtype.is_floating_point:
        raise ValueError(
            f"`use_dora=True` needs the base layer's weight, got a {weight.dtype} (quantized) "
            f"{type(layer.base_layer).__name__}; use a floating-point base or use_dora=False"
        )
    weight = weight.detach().float()
    return weight.t() if layer.fan_in_fan_out else weight  # (out, in)


@torch.no_grad()
def init_magnitude(layer: nn.Module) -> torch.Tensor:
    """(out,) the row norms ||W0[o, :]||, DoRA's initial magnitude (B = 0: the layer equals its base)."""
    return torch.linalg.norm(base_weight(layer), dim=1)


def _stacked_factors(layer: nn.Module, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A_cat (R, in), B_cat (out, R) and the per-task column scales s * gates (K, R), float32.

    The routed experts' A is expanded when shared (HydraLoRA); the shared experts join with gate 1.
    """
    num_experts, out_features, rank = layer.lora_B.shape
    lora_A = layer.lora_A.detach().float().expand(num_experts, -1, -1)  # (N, r, in)
    lora_B = layer.lora_B.detach().float()  # (N, out, r)
    col_gates = gates.float().repeat_interleave(rank, dim=1)  # (K, N*r)
    if layer.num_shared_experts:
        lora_A = torch.cat([lora_A, layer.lora_A_shared.detach().float()])  # (N+M, r, in)
        lora_B = torch.cat([lora_B, layer.lora_B_shared.detach().float()])  # (N+M, out, r)
        ones = col_gates.new_ones(col_gates.shape[0], layer.num_shared_experts * rank)
        col_gates = torch.cat([col_gates, ones], dim=1)  # (K, R)
    a_cat = lora_A.reshape(-1, lora_A.shape[2])  # (R, in)
    b_cat = lora_B.permute(1, 0, 2).reshape(out_features, -1)  # (out, R)
    return a_cat, b_cat, col_gates * layer.scaling


@torch.no_grad()
def dora_norms(layer: nn.Module, gates: torch.Tensor) -> torch.Tensor:
    """||W0 + dW_t|| per output row for every task t (see the module docstring), detached.

    Args:
        layer: a MoLoRALinear.
        gates: (K, N) the task router's gates of every task.

    Returns:
        (K, out) float32.
    """
    weight = base_weight(layer)  # (out, in)
    a_cat, b_cat, col_scale = _stacked_factors(layer, gates)
    p = weight @ a_cat.t()  # (out, R)
    c = a_cat @ a_cat.t()  # (R, R)
    b_t = b_cat[None] * col_scale[:, None, :]  # (K, out, R)
    cross = (b_t * p[None]).sum(-1)  # (K, out)
    quad = ((b_t @ c) * b_t).sum(-1)  # (K, out)
    sq = weight.pow(2).sum(1)[None] + 2 * cross + quad  # (K, out)
    return sq.clamp_min(0).sqrt()


def dora_output(
    layer: nn.Module, result: torch.Tensor, delta: torch.Tensor, task_ids: torch.Tensor
) -> torch.Tensor:
    """y = m / ||W0 + dW_t|| * (W0 x + delta) + b for a task-routed layer.

    Args:
        layer: a MoLoRALinear with ``lora_magnitude`` (out,) and a task router.
        result: (batch, ..., out) the base layer's output W0 x + b.
        delta: (batch, ..., out) the experts' output dW_t x (dropout applied to x there).
        task_ids: (batch,) the task of each sequence.

    Returns:
        (batch, ..., out) in ``result``'s dtype.
    """
    norms = dora_norms(layer, layer.router.table_weights())  # (K, out), no graph
    scale = layer.lora_magnitude.float()[None] / norms  # (K, out): the gradient reaches m
    scale = scale.index_select(0, task_ids.to(scale.device).long())  # (batch, out)
    scale = scale.view(scale.shape[0], *([1] * (result.dim() - 2)), -1) if result.dim() > 1 else scale[0]
    bias = layer.base_layer.bias
    bias = None if bias is None else bias.to(result.dtype)  # keeps a bf16 (autocast) output bf16
    base = result if bias is None else result - bias  # W0 x
    out = scale.to(result.dtype) * (base + delta.to(result.dtype))
    return out if bias is None else out + bias
