"""The router contract: :class:`RouterOutput` and the shared softmax / top-k math.

Every router is an ``nn.Module`` with attributes ``num_experts`` and ``top_k`` (``None`` for
dense routing) whose ``forward(x, task_ids=None)`` takes ``x`` of shape (T, in) and
``task_ids`` of shape (T,) and returns a :class:`RouterOutput`. Router math runs in float32
whatever the input dtype, so that bf16/fp16 models route stably.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RouterOutput:
    """What a router returns for T tokens and N experts.

    Attributes:
        logits: (T, N) float32 router logits.
        weights: (T, N) float32 dense combine weights G: zeros outside the chosen experts.
        indices: (T, k) int64 chosen experts for sparse routing, ``None`` for dense routing.
            With ``padded`` (top-p routing) a token may use fewer than k experts: the unused
            slots hold -1 (static shape; :func:`fill_padding` makes them dispatchable).
        padded: whether ``indices`` may hold -1 slots (a static fact of the router, no sync).
    """

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor | None = None
    padded: bool = False

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]


def check_finite(logits: torch.Tensor, name: str) -> None:
    """Raise if router logits hold NaN or inf (called only in debug mode: it syncs the device)."""
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).sum().item()
        raise FloatingPointError(
            f"{name}: {bad} router logits are NaN or inf; routing would be silently wrong. "
            "Check the learning rate, the input scale, or run the router in float32."
        )


class _Float32Linear(torch.autograd.Function):
    """logits = x W^T computed in float32, saving x in its own dtype for the backward.

    ``F.linear(x.float(), W)`` would save the float32 copy of x: under a bf16 model that is a
    hidden (T, in) float32 activation per layer, twice the bytes of x itself (DESIGN §7).
    Autocast is off inside, so bf16/fp16 autocast cannot round the logits (DESIGN §5).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ weight.float().t()  # (T, N)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        with torch.autocast(x.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = (grad_logits @ weight.float()).to(x.dtype)  # (T, in)
            if ctx.needs_input_grad[1]:
                grad_w = (grad_logits.t() @ x.float()).to(weight.dtype)  # (N, in), one (T, in) cast at a time
        return grad_x, grad_w


def float32_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(T, in) x, (N, in) gate -> (T, N) float32 logits, even under autocast; x is saved as is."""
    return _Float32Linear.apply(x, weight)


def route_topk(logits: torch.Tensor, top_k: int | None, normalize: bool | None = None) -> RouterOutput:
    """Softmax routing, optionally restricted to the top-k experts.

    weights[t, S_t] = p[t, S_t] / sum(p[t, S_t]) when normalized, p[t, S_t] (the raw
    probabilities) when not, 0 elsewhere (DESIGN §4); p is the softmax over all N. By default
    the gates are normalized for k >= 2 and raw for k == 1: a renormalized single gate is
    always 1, so the router would get no gradient (Switch Transformer uses the raw p for k=1).
    With ``top_k`` None or >= N this is plain softmax routing.

    Args:
        logits: (T, N) float32 logits.
        top_k: number of experts per token, or ``None`` for all.
        normalize: renormalize the chosen gates to sum to 1; ``None`` picks ``top_k >= 2``.

    Returns:
        RouterOutput with dense (T, N) weights and (T, k) indices (``None`` when dense).
    """
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)  # (T, N)
    if top_k is None or top_k >= num_experts:
        return RouterOutput(logits=logits, weights=probs, indices=None)
    top_p, indices = probs.topk(top_k, dim=-1)  # (T, k), (T, k)
    if normalize is None:
        normalize = top_k >= 2
    if normalize:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(-1, indices, top_p)  # (T, N)
    return RouterOutput(logits=logits, weights=weights, indices=indices)


def route_topp(logits: torch.Tensor, top_p: float, top_k: int | None = None) -> RouterOutput:
    """Top-p routing: the fewest experts, in order of probability, whose probabilities sum to
    >= ``top_p`` (at least 1, at most ``top_k`` when given), gated by their raw probabilities.

    Expert j of a token's sorted list is kept while the mass before it is < top_p, so the
    first is always kept. Shapes are static: indices is (T, k_max), k_max = ``top_k`` or N,
    with -1 in the slots a token does not use.

    Args:
        logits: (T, N) float32 logits.
        top_p: in (0, 1].
        top_k: cap on the experts per token, or ``None`` (k_max = N).

    Returns:
        RouterOutput with (T, N) weights (raw probabilities on S_t, 0 elsewhere), (T, k_max)
        indices padded with -1, and ``padded=True``.
    """
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)  # (T, N)
    k_max = num_experts if top_k is None else min(top_k, num_experts)
    sorted_p, order = probs.topk(k_max, dim=-1)  # (T, k_max), descending
    before = sorted_p.detach().cumsum(-1) - sorted_p.detach()  # (T, k_max) mass before each slot
    keep = (before < top_p).to(sorted_p.dtype)  # (T, k_max), slot 0 always kept
    weights = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)  # (T, N)
    indices = torch.where(keep > 0, order, torch.full_like(order, -1))  # (T, k_max)
    return RouterOutput(logits=logits, weights=weights, indices=indices, padded=True)


def fill_padding(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, k) indices with -1 slots -> (T, k) valid indices, each -1 replaced by an expert the
    token does not use (distinct from its real ones and from each other).

    The combine weights are 0 at those experts, so the filled pairs add nothing and pass no
    gradient; being distinct, no (token, expert) pair is counted twice (a hybrid path's
    per-pair slots stay unique). Static shapes, no host-device sync: an argsort of (T, N).
    """
    valid = indices >= 0  # (T, k)
    used = torch.zeros(indices.shape[0], num_experts, dtype=torch.long, device=indices.device)
    used = used.scatter_add(1, indices.clamp(min=0), valid.long())  # (T, N), 1 on the real experts
    free = torch.argsort(used, dim=1, stable=True)  # (T, N): the unused experts first
    pad_rank = (~valid).long().cumsum(1) - 1  # (T, k): which unused expert each -1 slot takes
    return torch.where(valid, indices, free.gather(1, pad_rank.clamp(min=0)))


def check_normalize(normalize: bool | None) -> None:
    if normalize is not None and not isinstance(normalize, bool):
        raise ValueError(f"`normalize_top_k` must be None, True or False, got {normalize!r}")


def check_top_k(top_k: int | None, num_experts: int, *, allow_none: bool) -> None:
    if num_experts < 1:
        raise ValueError(f"`num_experts` must be >= 1, got {num_experts}")
    if top_k is None:
        if not allow_none:
            raise ValueError(f"`top_k` must be an int in [1, num_experts={num_experts}], got None")
        return
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"`top_k` must be in [1, num_experts={num_experts}], got {top_k!r}")
