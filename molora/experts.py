"""The expert sum ``s * sum_i G_i B_i A_i x`` on stacked factors, as pure functions.

All implementations share one signature and are interchangeable (``EXPERT_IMPLS``)::

    fn(x (T, in), lora_A (N, r, in), lora_B (N, out, r), weights (T, N), indices (T, k) | None,
       scaling) -> (T, out)

``weights`` are the router's dense gates G (zeros outside the chosen experts) and ``indices``
the chosen experts of sparse (top-k) routing, ``None`` for dense routing.

- ``eager``:   the reference: a Python loop over experts. Slow, obviously right.
- ``dense``:   all experts as one rank N*r LoRA; gates scale the (T, N*r) intermediate. Two
               GEMMs, best for dense routing (soft, task) and for tiny T.
- ``grouped``: the (token, expert) pairs of sparse routing sorted by expert, one grouped GEMM
               over contiguous segments for each factor, results scattered back with their
               gates. Work and activation memory O(T*k*r); a custom autograd Function reuses
               the sort and runs only the GEMMs the backward needs.

``auto`` (:func:`resolve_impl`) picks ``dense`` for dense routing and ``grouped`` for sparse.
GPU kernels register here under their own names (lazily imported from ``molora.kernels``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from molora.grouped_mm import gmm, gmm_wgrad

ExpertFn = Callable[..., torch.Tensor]


def eager_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Reference: loop over the N experts, y = s * sum_i G_i * B_i (A_i x)."""
    out = x.new_zeros(x.shape[0], lora_B.shape[1])  # (T, out)
    gates = weights.to(x.dtype)
    for i in range(lora_A.shape[0]):
        out = out + gates[:, i : i + 1] * ((x @ lora_A[i].t()) @ lora_B[i].t())
    return out * scaling


def dense_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """All experts as one rank N*r product; gates (and s) scale the (T, N*r) intermediate."""
    num_experts, rank, in_features = lora_A.shape
    out_features = lora_B.shape[1]
    h = x @ lora_A.reshape(num_experts * rank, in_features).t()  # (T, N*r)
    gates = (weights.to(h.dtype) * scaling).repeat_interleave(rank, dim=1)  # (T, N*r)
    b_cat = lora_B.permute(1, 0, 2).reshape(out_features, num_experts * rank)  # (out, N*r)
    return (h * gates) @ b_cat.t()  # (T, out)


class _GroupedLoRA(torch.autograd.Function):
    """Sparse expert sum on token-expert pairs sorted by expert.

    Forward saves x (not its gathered copy), the (P, r) intermediate and the sort, so the
    activation memory of the expert part is O(T*k*r) beyond x itself.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, weights, indices, scaling, use_kernel):
        num_tokens, top_k = indices.shape
        num_experts = lora_A.shape[0]
        flat_expert = indices.reshape(-1)  # (P,) with P = T*k
        order = torch.argsort(flat_expert, stable=True)  # (P,)
        token = torch.div(order, top_k, rounding_mode="floor")  # (P,) token of each sorted pair
        offs = torch.bincount(flat_expert, minlength=num_experts).cumsum(0).to(torch.int32)  # (N,)
        gate = weights.gather(1, indices).reshape(-1)[order].to(x.dtype) * scaling  # (P,)

        xs = x[token]  # (P, in)
        h = gmm(xs, lora_A.transpose(1, 2), offs, use_kernel=use_kernel)  # (P, r)
        ys = gmm(h * gate[:, None], lora_B.transpose(1, 2), offs, use_kernel=use_kernel)  # (P, out)
        out = x.new_zeros(num_tokens, lora_B.shape[1]).index_add_(0, token, ys)  # (T, out)

        ctx.save_for_backward(x, lora_A, lora_B, indices, order, token, offs, gate, h)
        ctx.scaling, ctx.use_kernel, ctx.weights_shape = scaling, use_kernel, weights.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, indices, order, token, offs, gate, h = ctx.saved_tensors
        use_kernel = ctx.use_kernel
        grad_out = grad_out.contiguous()
        gys = grad_out[token]  # (P, out)
        d_hg = gmm(gys, lora_B, offs, use_kernel=use_kernel)  # (P, r): grad of h * gate
        dh = d_hg * gate[:, None]  # (P, r)

        grad_x = grad_A = grad_B = grad_w = None
        if ctx.needs_input_grad[0]:
            dxs = gmm(dh, lora_A, offs, use_kernel=use_kernel)  # (P, in)
            grad_x = torch.zeros_like(x).index_add_(0, token, dxs)
        if ctx.needs_input_grad[1]:
            grad_A = gmm_wgrad(dh, x[token], offs, use_kernel=use_kernel)  # (N, r, in)
        if ctx.needs_input_grad[2]:
            grad_B = gmm_wgrad(gys, h * gate[:, None], offs, use_kernel=use_kernel)  # (N, out, r)
        if ctx.needs_input_grad[3]:
            d_gate = (d_hg * h).sum(-1) * ctx.scaling  # (P,) grad of the unscaled gate
            flat = torch.empty_like(d_gate).scatter_(0, order, d_gate)  # back to (T*k) order
            grad_w = torch.zeros(ctx.weights_shape, dtype=torch.float32, device=x.device)
            grad_w.scatter_(1, indices, flat.view(indices.shape).float())  # (T, N)
        return grad_x, grad_A, grad_B, grad_w, None, None, None


def grouped_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor | None,
    scaling: float,
    *,
    use_kernel: bool = True,
) -> torch.Tensor:
    """Sorted token-expert pairs and grouped GEMMs; dense routing is treated as top-N.

    Only the chosen experts of each token are computed. Gradients flow to ``weights`` at
    the chosen positions only (where the router's gates can be non-zero).
    """
    if indices is None:
        indices = torch.arange(lora_A.shape[0], device=x.device).expand(x.shape[0], -1)
    return _GroupedLoRA.apply(x, lora_A, lora_B, weights, indices, float(scaling), use_kernel)


def grouped_bmm_experts(x, lora_A, lora_B, weights, indices, scaling) -> torch.Tensor:
    """``grouped`` with its padded-bmm fallback forced (for tests and for old torch)."""
    return grouped_experts(x, lora_A, lora_B, weights, indices, scaling, use_kernel=False)


EXPERT_IMPLS: dict[str, ExpertFn] = {
    "eager": eager_experts,
    "dense": dense_experts,
    "grouped": grouped_experts,
    "grouped_bmm": grouped_bmm_experts,
}


def resolve_impl(name: str, *, sparse: bool) -> ExpertFn:
    """The expert function for an ``expert_impl`` name ("auto" chooses by routing kind).

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    if name == "auto":
        return grouped_experts if sparse else dense_experts
    if name not in EXPERT_IMPLS:
        raise ValueError(f"unknown `expert_impl` {name!r}; choose one of {sorted(['auto', *EXPERT_IMPLS])}")
    return EXPERT_IMPLS[name]
