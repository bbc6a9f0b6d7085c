"""The expert sum ``s * sum_i G_i B_i A_i x`` on stacked factors, as pure functions.

All implementations share one signature and are interchangeable (``EXPERT_IMPLS``)::

    fn(x (T, in), lora_A (N, r, in), lora_B (N, out, r), weights (T, N), indices (T, k) | None,
       scaling) -> (T, out)

``weights`` are the router's dense gates G (zeros outside the chosen experts) and ``indices``
the chosen experts of sparse (top-k) routing, ``None`` for dense routing.

Shared A (HydraLoRA, ``share_lora_A``): ``lora_A`` may be (1, r, in), one down-projection for
all N heads of ``lora_B``. Every path then computes h = A x once per token: ``dense`` as one
(T, r) down-projection whose (T, N*r) gated copy feeds the up-projection, the sparse paths as
``hybrid`` with a (T, r) down-projection (the pairs pick rows of h) and the grouped
up-projection, ``triton`` with h computed first and the kernels run on it.

- ``eager``:       the reference: a Python loop over experts. Slow, obviously right.
- ``dense``:       all experts as one rank N*r LoRA; gates scale the (T, N*r) intermediate.
                   Six GEMMs of rank N*r for forward+backward: the floor for dense routing
                   (soft, task), and the fastest path for tiny T or k close to N.
- ``grouped``:     the T*k (token, expert) pairs of sparse routing sorted by expert, one
                   grouped GEMM (``F.grouped_mm``) per factor over contiguous segments, results
                   summed back per token. Work O(T*k*r*(in+out)) and saved activations
                   O(T*k*r) beyond x; a custom autograd Function reuses the forward's sort and
                   runs only the GEMMs the requested gradients need.
- ``grouped_bmm``: ``grouped`` with the padded-bmm fallback of ``molora.core.kernels.grouped_mm`` forced.
- ``hybrid``:      sparse routing with a dense down-projection h = x A_cat^T (T, N*r) (x read
                   once, no (T*k, in) gather) and the grouped up-projection of ``grouped``.
- ``triton``:      Triton kernels (``molora.core.kernels.triton_experts``): the pairs sorted by
                   expert, x gathered and y accumulated inside the kernels (sparse routing); one
                   rank-N*r LoRA as two tiled GEMMs, the gates applied to the intermediate
                   as it is loaded (dense routing). N > 64 or r > 128: ``grouped``/``dense``.
- ``auto``:        ``dense`` for dense routing and tiny T; for sparse routing ``dense``,
                   ``triton``, ``hybrid`` or ``grouped`` by device and shapes (:func:`choose_impl`).

Performance notes (profiled on CPU, T=2048, in=out=1024, N=8, r=16, top-2; see
``benchmarks/RESULTS.md``): advanced indexing ``x[idx]`` is ~5x slower than
``x.index_select(0, idx)``; the (T*k, in) gathered copy of x is recomputed in the backward
rather than saved (it is as large as k copies of x); the weight gradient of B is computed as
(r, out) blocks and transposed, which is ~2x faster than (out, r) blocks in
``F.grouped_mm``'s per-group GEMMs; on CPU, fresh buffers of 32 MiB and more are
page-faulted on every call (glibc mmap), so large (T*k, d) temporaries cost more than their
bytes suggest. The router (3 thin GEMMs on x) costs about half of a whole PEFT LoRA at these
shapes and is outside these functions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from molora.core.choose import choose_impl
from molora.core.kernels.grouped_mm import gmm, gmm_wgrad
from molora.core.kernels.launch import unsupported
from molora.core.shared import shares_A

ExpertFn = Callable[..., torch.Tensor]


def eager_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Reference: loop over the N experts, y = s * sum_i G_i * B_i (A_i x) (A_i = A_0 when shared)."""
    out = x.new_zeros(x.shape[0], lora_B.shape[1])  # (T, out)
    gates = weights.to(x.dtype)
    for i in range(lora_B.shape[0]):
        a = lora_A[0] if shares_A(lora_A, lora_B) else lora_A[i]  # (r, in)
        out = out + gates[:, i : i + 1] * ((x @ a.t()) @ lora_B[i].t())
    return out * scaling


def dense_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """All experts as one rank N*r product; gates (and s) scale the (T, N*r) intermediate.

    The gates broadcast over the rank inside a (T, N, r) view, so no (T, N*r) gate tensor is
    built; autograd saves x, the (T, N*r) intermediate and the (T, N) gates: O(T*N*r). With a
    shared A (1, r, in) the down-projection is one (T, r) GEMM and the gates scale its copies.
    """
    h = x @ lora_A.reshape(-1, lora_A.shape[2]).t()  # (T, N*r), or (T, r) with a shared A
    return dense_up(h, lora_B, weights, scaling, shared_A=shares_A(lora_A, lora_B))


def dense_up(
    h: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor, scaling: float, *, shared_A: bool = False
) -> torch.Tensor:
    """The second half of ``dense``: gates scale the down-projection h, then one up-projection GEMM.

    Args:
        h: (T, N*r) down-projection x A_cat^T, or (T, r) with a shared A.
        lora_B: (N, out, r).
        weights: (T, N) gates.
        scaling: s.
        shared_A: h is the one shared head (T, r).

    Returns:
        (T, out).
    """
    num_experts, out_features, rank = lora_B.shape
    num_tokens = h.shape[0]
    gates = weights.to(h.dtype) * scaling  # (T, N)
    if shared_A:
        hg = (gates[:, :, None] * h[:, None, :]).view(num_tokens, num_experts * rank)  # (T, N*r)
    else:
        hg = (h.view(num_tokens, num_experts, rank) * gates[:, :, None]).view(num_tokens, num_experts * rank)
    b_cat = lora_B.permute(1, 0, 2).reshape(out_features, num_experts * rank)  # (out, N*r)
    return hg @ b_cat.t()  # (T, out)


def sort_pairs(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the T*k (token, expert) pairs by expert.

    Args:
        indices: (T, k) chosen experts.
        num_experts: N.

    Returns:
        order (P,) positions in the flattened (T*k) pairs, sorted by expert (stable, so tokens
        stay in order inside an expert); token (P,) the token of each sorted pair; offs (N,)
        int32 end of each expert's segment. P = T*k.
    """
    flat_expert = indices.reshape(-1)  # (P,)
    order = torch.argsort(flat_expert, stable=True)  # (P,)
    token = torch.div(order, indices.shape[1], rounding_mode="floor")  # (P,)
    counts = torch.zeros(num_experts, dtype=torch.long, device=indices.device)  # (N,), not bincount: no sync
    offs = counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert)).cumsum(0).to(torch.int32)  # (N,)
    return order, token, offs


def _grouped_up(h, gate, lora_B, token, offs, num_tokens: int, use_kernel: bool) -> torch.Tensor:
    """Grouped up-projection and combine: y[t] = sum over t's pairs of B_e (gate * h).

    h (P, r) and gate (P,) are in expert-sorted pair order; returns (T, out).
    """
    ys = gmm(h * gate[:, None], lora_B.transpose(1, 2), offs, use_kernel=use_kernel)  # (P, out)
    return ys.new_zeros(num_tokens, ys.shape[1]).index_add_(0, token, ys)  # (T, out)


def _grouped_up_backward(ctx, grad_out, lora_B, order, token, offs, gate, h, *, need_B, need_w, need_h):
    """Backward of :func:`_grouped_up`, running only the GEMMs the requested gradients need.

    Returns:
        grad_B (N, out, r), grad_w (T, k) of the unscaled gates, and dh (P, r) the gradient of
        h; each None when not requested.
    """
    use_kernel = ctx.use_kernel
    gys = grad_out.contiguous().index_select(0, token)  # (P, out)
    grad_B = grad_w = dh = None
    if need_B:
        grad_B = gmm_wgrad(h * gate[:, None], gys, offs, use_kernel=use_kernel).transpose(1, 2).contiguous()
    if not (need_w or need_h):
        return grad_B, grad_w, dh
    d_hg = gmm(gys, lora_B, offs, use_kernel=use_kernel)  # (P, r): grad of s * g * h
    del gys
    if need_w:
        d_gate = (d_hg * h).sum(-1) * ctx.scaling  # (P,) grad of the unscaled gate
        grad_w = torch.empty_like(d_gate).index_copy_(0, order, d_gate)  # back to (T*k) order
        grad_w = grad_w.view(ctx.top_w_shape).to(ctx.top_w_dtype)  # (T, k)
    if need_h:
        dh = d_hg * gate[:, None]  # (P, r)
    return grad_B, grad_w, dh


class _GroupedLoRA(torch.autograd.Function):
    """Sparse expert sum on token-expert pairs sorted by expert (the sort is an input).

    Inputs: x (T, in), lora_A (N, r, in), lora_B (N, out, r), top_w (T, k) the gates of the
    chosen experts, and the sort (order, token, offs) of :func:`sort_pairs`.

    Forward: xs = x[token] (P, in), h = A_e xs (P, r), hg = s * g * h, ys = B_e hg (P, out),
    y[t] = sum of its k rows of ys. Saved: x, the (P, r) h, the (P,) gates and the sort, so
    the expert part keeps O(T*k*r) activations; the (P, in) gathered copy of x is rebuilt in
    the backward only when grad_A needs it.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, top_w, order, token, offs, scaling, use_kernel):
        num_tokens = x.shape[0]
        gate = top_w.reshape(-1).index_select(0, order).to(x.dtype) * scaling  # (P,)
        xs = x.index_select(0, token)  # (P, in)
        h = gmm(xs, lora_A.transpose(1, 2), offs, use_kernel=use_kernel)  # (P, r)
        del xs
        out = _grouped_up(h, gate, lora_B, token, offs, num_tokens, use_kernel)  # (T, out)
        ctx.save_for_backward(x, lora_A, lora_B, order, token, offs, gate, h)
        ctx.scaling, ctx.use_kernel = scaling, use_kernel
        ctx.top_w_shape, ctx.top_w_dtype = top_w.shape, top_w.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, order, token, offs, gate, h = ctx.saved_tensors
        use_kernel = ctx.use_kernel
        need_x, need_A, need_B, need_w = ctx.needs_input_grad[:4]
        grad_B, grad_w, dh = _grouped_up_backward(
            ctx, grad_out, lora_B, order, token, offs, gate, h, need_B=need_B, need_w=need_w, need_h=need_x or need_A
        )
        grad_x = grad_A = None
        if need_A:
            xs = x.index_select(0, token)  # (P, in), rebuilt rather than saved
            grad_A = gmm_wgrad(dh, xs, offs, use_kernel=use_kernel)  # (N, r, in)
            del xs
        if need_x:
            dxs = gmm(dh, lora_A, offs, use_kernel=use_kernel)  # (P, in)
            grad_x = torch.zeros_like(x).index_add_(0, token, dxs)  # (T, in)
        return grad_x, grad_A, grad_B, grad_w, None, None, None, None, None


class _HybridLoRA(torch.autograd.Function):
    """Sparse expert sum with a dense down-projection and a grouped up-projection.

    The down-projection of every token onto all N experts, h_all = x A_cat^T (T, N*r), is one
    GEMM that reads x once; the pairs' rows are then picked out of it (P*r values), instead of
    gathering a (T*k, in) copy of x for a grouped GEMM. It does N/k times the down-projection
    FLOPs of ``grouped`` but, while N*r is small (a thin GEMM, bound by reading x), costs less
    than the gather plus the grouped GEMM. The up-projection stays grouped (k/N of the dense
    work). Backward: grad_x and grad_A are two dense GEMMs on the (T, N*r) gradient, which is
    zero outside the chosen experts. Saved: x, the (P, r) h and the (P,) gates: O(T*k*r).

    With a shared A (1, r, in) (N_A = 1) h_all is (T, r), computed once per token, each pair's
    slot is its token, and the backward sums the pairs' dh per token (index_add).
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, top_w, order, token, slot, offs, scaling, use_kernel):
        num_tokens = x.shape[0]
        num_a, rank, in_features = lora_A.shape  # N_A = N, or 1 for a shared A
        gate = top_w.reshape(-1).index_select(0, order).to(x.dtype) * scaling  # (P,)
        h_all = x @ lora_A.reshape(num_a * rank, in_features).t()  # (T, N_A*r)
        h = h_all.view(num_tokens * num_a, rank).index_select(0, slot)  # (P, r)
        del h_all
        out = _grouped_up(h, gate, lora_B, token, offs, num_tokens, use_kernel)  # (T, out)
        ctx.save_for_backward(x, lora_A, lora_B, order, token, slot, offs, gate, h)
        ctx.scaling, ctx.use_kernel = scaling, use_kernel
        ctx.top_w_shape, ctx.top_w_dtype = top_w.shape, top_w.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, order, token, slot, offs, gate, h = ctx.saved_tensors
        num_tokens = x.shape[0]
        num_a, rank, in_features = lora_A.shape
        need_x, need_A, need_B, need_w = ctx.needs_input_grad[:4]
        grad_B, grad_w, dh = _grouped_up_backward(
            ctx, grad_out, lora_B, order, token, offs, gate, h, need_B=need_B, need_w=need_w, need_h=need_x or need_A
        )
        grad_x = grad_A = None
        if need_x or need_A:
            dh_all = dh.new_zeros(num_tokens * num_a, rank)
            # slots are unique per pair unless A is shared (then a token's k pairs share one)
            dh_all = dh_all.index_add_(0, slot, dh) if num_a == 1 else dh_all.index_copy_(0, slot, dh)
            dh_all = dh_all.view(num_tokens, num_a * rank)  # (T, N_A*r), zero off the chosen experts
            if need_x:
                grad_x = dh_all @ lora_A.reshape(num_a * rank, in_features)  # (T, in)
            if need_A:
                grad_A = (dh_all.t() @ x).view(num_a, rank, in_features)  # (N_A, r, in)
        return grad_x, grad_A, grad_B, grad_w, None, None, None, None, None, None


def _sorted_pairs(weights, indices, num_experts: int, num_tokens: int, device):
    """Indices (dense routing as top-N), the chosen gates (T, k), and the expert sort."""
    if indices is None:
        indices = torch.arange(num_experts, device=device).expand(num_tokens, -1)
    top_w = weights.gather(1, indices)  # (T, k)
    with torch.no_grad():
        order, token, offs = sort_pairs(indices, num_experts)
    return indices, top_w, order, token, offs


def hybrid_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor | None,
    scaling: float,
    *,
    use_kernel: bool = True,
) -> torch.Tensor:
    """Sparse routing with a dense down-projection (x read once) and a grouped up-projection.

    See :class:`_HybridLoRA`; dense routing is treated as top-N. With a shared A (1, r, in)
    the down-projection is (T, r) and every pair reads its token's row.
    """
    num_experts = lora_B.shape[0]
    indices, top_w, order, token, offs = _sorted_pairs(weights, indices, num_experts, x.shape[0], x.device)
    with torch.no_grad():
        if shares_A(lora_A, lora_B):
            slot = token  # (P,) row in (T, r)
        else:
            slot = token * num_experts + indices.reshape(-1).index_select(0, order)  # (P,) row in (T*N, r)
    return _HybridLoRA.apply(
        x.contiguous(), lora_A, lora_B, top_w, order, token, slot, offs, float(scaling), use_kernel
    )


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
    the chosen positions only (where the router's gates can be non-zero). A shared A (1, r, in)
    runs :func:`hybrid_experts`: h = A x once per token, only the up-projection grouped.
    """
    if shares_A(lora_A, lora_B):
        return hybrid_experts(x, lora_A, lora_B, weights, indices, scaling, use_kernel=use_kernel)
    _, top_w, order, token, offs = _sorted_pairs(weights, indices, lora_A.shape[0], x.shape[0], x.device)
    return _GroupedLoRA.apply(x.contiguous(), lora_A, lora_B, top_w, order, token, offs, float(scaling), use_kernel)


def triton_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Triton kernels (``molora.core.kernels.triton_experts``): sparse routing on the pairs sorted
    by expert, with x gathered and y accumulated inside the kernels; dense routing as one
    rank-N*r LoRA in two tiled GEMMs with the gates applied as the intermediate is loaded.

    Shapes outside the domain the kernels are compiled and checked for
    (``molora.core.kernels.launch.unsupported``: N > 64, r > 128, a dtype other than
    bf16/fp16/fp32, in or out not a multiple of 16) are never launched: they run ``dense`` (dense routing) or ``grouped``.

    Raises:
        ImportError: triton is not installed.
        RuntimeError: CPU tensors without Triton's interpreter (``TRITON_INTERPRET=1``).
    """
    shared = shares_A(lora_A, lora_B)
    in_dim = lora_A.shape[1] if shared else x.shape[1]  # the kernels run on h = A x with a shared A
    if unsupported(lora_B.shape[0], lora_B.shape[2], x.dtype, in_dim, lora_B.shape[1], x.is_cuda) is not None:
        fallback = dense_experts if indices is None else grouped_experts
        return fallback(x, lora_A, lora_B, weights, indices, scaling)
    kernels = _triton_module()
    if shared:
        # h = A x once per token (T, r); the kernels then run on h with an identity
        # down-projection (stride-0 view, no gradient), adding r*r instead of r*in per pair.
        x = x @ lora_A[0].t()  # (T, r)
        rank = lora_A.shape[1]
        eye = torch.eye(rank, device=x.device, dtype=x.dtype)
        lora_A = eye.expand(lora_B.shape[0], rank, rank)  # (N, r, r)
    if indices is None:
        return kernels.dense_triton(x, lora_A, lora_B, weights, scaling)
    _, top_w, order, token, offs = _sorted_pairs(weights, indices, lora_B.shape[0], x.shape[0], x.device)
    return kernels.sparse_triton(x, lora_A, lora_B, top_w, order, token, offs, scaling)


def _triton_module():
    try:
        return importlib.import_module("molora.core.kernels.triton_experts")
    except ImportError as err:
        if "triton" not in (err.name or str(err)):
            raise
        raise ImportError('expert_impl="triton" needs triton: `pip install triton` (or `molora[gpu]`)') from err


def grouped_bmm_experts(x, lora_A, lora_B, weights, indices, scaling) -> torch.Tensor:
    """``grouped`` with its padded-bmm fallback forced (for tests and for old torch)."""
    return grouped_experts(x, lora_A, lora_B, weights, indices, scaling, use_kernel=False)


def auto_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Run the path :func:`choose_impl` picks for these operands."""
    return EXPERT_IMPLS[choose_impl(x, lora_A, lora_B, indices)](x, lora_A, lora_B, weights, indices, scaling)


EXPERT_IMPLS: dict[str, ExpertFn] = {
    "eager": eager_experts,
    "dense": dense_experts,
    "grouped": grouped_experts,
    "grouped_bmm": grouped_bmm_experts,
    "hybrid": hybrid_experts,
    "triton": triton_experts,
    "auto": auto_experts,
}


def resolve_impl(name: str, *, sparse: bool) -> ExpertFn:
    """The expert function for an ``expert_impl`` name.

    "auto" gives ``dense`` for dense routing and :func:`auto_experts` (which chooses by
    shapes at call time) for sparse routing.

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    if name == "auto":
        return auto_experts if sparse else dense_experts
    if name not in EXPERT_IMPLS:
        raise ValueError(f"unknown `expert_impl` {name!r}; choose one of {sorted(EXPERT_IMPLS)}")
    return EXPERT_IMPLS[name]
