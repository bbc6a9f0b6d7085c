"""``expert_impl="triton"``: the Triton kernels of ``triton_kernels`` wrapped in autograd Functions.

Same signature as every path of ``molora.core.experts``::

    sparse_triton(x (T, in), lora_A (N, r, in), lora_B (N, out, r), top_w (T, k), order, token,
                  offs, scaling) -> (T, out)          # the pair sort of ``sort_pairs``
    dense_triton(x, lora_A, lora_B, weights (T, N), scaling) -> (T, out)

Gates and the rank-r intermediates (h, dh) are float32; outputs are accumulated in float32
(atomics) and cast to x's dtype. Saved for backward: x, the factors, and h: (P, r) for sparse
routing (O(T*k*r)), (T, N*r) for dense routing. Importing this module imports triton; run on
CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
this module is first imported), which is how the tests check the kernels without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from molora.core.kernels import triton_kernels as K


@dataclass(frozen=True)
class _Launch:
    """Block sizes and dot settings for one call (constexprs of the kernels)."""

    bm: int
    bk: int
    bn: int
    upcast: bool
    prec: str


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _p2(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return K.INTERPRETED


def _launch(x: torch.Tensor) -> _Launch:
    if x.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f'expert_impl="triton" runs on CUDA tensors, got {x.device.type} tensors; for CPU checks set '
            "TRITON_INTERPRET=1 before molora's triton kernels are imported, or choose another `expert_impl`"
        )
    fp32_prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    prec = fp32_prec if x.dtype == torch.float32 else "tf32"  # Triton's default; ignored for bf16/fp16 operands
    if interpreted():  # numpy: fewer, larger blocks run faster; bf16 dots are wrong there (upcast)
        return _Launch(bm=16, bk=64, bn=64, upcast=True, prec="ieee")
    return _Launch(bm=64, bk=64, bn=64, upcast=False, prec=prec)


def _strides(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[int, ...]:
    return (*lora_A.stride(), *lora_B.stride())


def _block_ends(offs: torch.Tensor, bm: int) -> torch.Tensor:
    """(N,) int32 cumulative count of BM-blocks per expert segment (device ops, no sync)."""
    counts = torch.diff(offs, prepend=offs.new_zeros(1))  # (N,)
    return torch.cumsum(torch.div(counts + (bm - 1), bm, rounding_mode="floor"), 0).to(torch.int32)


class _SparseTriton(torch.autograd.Function):
    """Sparse expert sum on pairs sorted by expert; see ``triton_kernels`` for the kernels."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, top_w, order, token, offs, scaling):
        cfg = _launch(x)
        num_tokens, in_features = x.shape
        num_experts, rank, _ = lora_A.shape
        out_features = lora_B.shape[1]
        num_pairs = token.shape[0]
        gate = top_w.reshape(-1).index_select(0, order).float()  # (P,) unscaled, fp32
        block_end = _block_ends(offs, cfg.bm)  # (N,)
        h = torch.empty(num_pairs, rank, device=x.device, dtype=torch.float32)  # (P, r)
        y = torch.zeros(num_tokens, out_features, device=x.device, dtype=torch.float32)  # (T, out)
        grid = (_cdiv(num_pairs, cfg.bm) + num_experts,)
        K.sparse_fwd_kernel[grid](
            x, lora_A, lora_B, gate, token, offs, block_end, h, y,
            num_experts, in_features, out_features, rank, float(scaling), *_strides(lora_A, lora_B),
            N_P2=_p2(num_experts), R_P2=_p2(rank, 16), BM=cfg.bm, BK=cfg.bk, BN=cfg.bn,
            UPCAST=cfg.upcast, PREC=cfg.prec,
        )  # fmt: skip
        ctx.save_for_backward(x, lora_A, lora_B, gate, order, token, offs, block_end, h)
        ctx.scaling, ctx.cfg = float(scaling), cfg
        ctx.top_w_shape, ctx.top_w_dtype = top_w.shape, top_w.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, gate, order, token, offs, block_end, h = ctx.saved_tensors
        cfg, scaling = ctx.cfg, ctx.scaling
        need_x, need_A, need_B, need_w = ctx.needs_input_grad[:4]
        grad_out = grad_out.contiguous().to(x.dtype)  # (T, out)
        num_experts, rank, in_features = lora_A.shape
        out_features = lora_B.shape[1]
        num_pairs = token.shape[0]
        common = {"R_P2": _p2(rank, 16), "BM": cfg.bm, "UPCAST": cfg.upcast, "PREC": cfg.prec}
        grad_x = grad_A = grad_B = grad_w = None
        if need_x or need_A or need_w:
            dh = torch.empty_like(h)  # (P, r) fp32
            d_gate = torch.empty_like(gate)  # (P,)
            gx = torch.zeros(x.shape, device=x.device, dtype=torch.float32) if need_x else dh
            grid = (_cdiv(num_pairs, cfg.bm) + num_experts,)
            K.sparse_bwd_pairs_kernel[grid](
                grad_out, lora_A, lora_B, gate, token, offs, block_end, h, dh, d_gate, gx,
                num_experts, in_features, out_features, rank, scaling, *_strides(lora_A, lora_B),
                N_P2=_p2(num_experts), BK=cfg.bk, BN=cfg.bn, NEED_X=need_x, **common,
            )  # fmt: skip
            if need_x:
                grad_x = gx.to(x.dtype)
            if need_w:
                grad_w = torch.empty_like(d_gate).index_copy_(0, order, d_gate)  # back to (T*k) order
                grad_w = grad_w.view(ctx.top_w_shape).to(ctx.top_w_dtype)
            if need_A:
                grad_A = _wgrad(dh, None, x, token, offs, num_experts, 1.0, cfg, common).to(lora_A.dtype)
        if need_B:
            grad_B = _wgrad(h, gate, grad_out, token, offs, num_experts, scaling, cfg, common)  # (N, r, out)
            grad_B = grad_B.transpose(1, 2).contiguous().to(lora_B.dtype)
        return grad_x, grad_A, grad_B, grad_w, None, None, None, None


def _wgrad(lhs, gate, src, token, offs, num_experts: int, scaling: float, cfg: _Launch, common: dict):
    """(N, r, D) fp32: per expert, sum over its pairs of (s * gate *) lhs[p]^T src[token[p]]."""
    rank, dim = lhs.shape[1], src.shape[1]
    out = torch.empty(num_experts, rank, dim, device=src.device, dtype=torch.float32)
    grid = (num_experts, _cdiv(dim, cfg.bk))
    K.wgrad_kernel[grid](
        lhs, gate if gate is not None else lhs, src, token, offs, out, rank, dim, scaling,
        HAS_GATE=gate is not None, BD=cfg.bk, **common,
    )  # fmt: skip
    return out


class _DenseTriton(torch.autograd.Function):
    """Dense expert sum (all experts, gates on the intermediate); weight grads by cuBLAS GEMMs."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, weights, scaling):
        cfg = _launch(x)
        num_tokens, in_features = x.shape
        num_experts, rank, _ = lora_A.shape
        out_features = lora_B.shape[1]
        h = torch.empty(num_tokens, num_experts, rank, device=x.device, dtype=torch.float32)  # (T, N, r)
        y = torch.empty(num_tokens, out_features, device=x.device, dtype=x.dtype)  # (T, out)
        K.dense_fwd_kernel[(max(1, _cdiv(num_tokens, cfg.bm)),)](
            x, lora_A, lora_B, weights, h, y,
            num_tokens, num_experts, in_features, out_features, rank, float(scaling),
            *_strides(lora_A, lora_B), *weights.stride(),
            N_P2=_p2(num_experts), R_P2=_p2(rank, 16), BM=cfg.bm, BK=cfg.bk, BN=cfg.bn,
            UPCAST=cfg.upcast, PREC=cfg.prec,
        )  # fmt: skip
        ctx.save_for_backward(x, lora_A, lora_B, weights, h)
        ctx.scaling, ctx.cfg = float(scaling), cfg
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, weights, h = ctx.saved_tensors
        cfg, scaling = ctx.cfg, ctx.scaling
        need_x, need_A, need_B, need_w = ctx.needs_input_grad[:4]
        grad_out = grad_out.contiguous().to(x.dtype)  # (T, out)
        num_tokens, in_features = x.shape
        num_experts, rank, _ = lora_A.shape
        out_features = lora_B.shape[1]
        grad_x = grad_A = grad_B = grad_w = None
        if need_x or need_A or need_w:
            dh = torch.empty_like(h)  # (T, N, r) fp32
            dw = torch.empty(num_tokens, num_experts, device=x.device, dtype=torch.float32)  # (T, N)
            gx = torch.empty_like(x) if need_x else x
            K.dense_bwd_kernel[(max(1, _cdiv(num_tokens, cfg.bm)),)](
                grad_out, lora_A, lora_B, weights, h, dh, dw, gx,
                num_tokens, num_experts, in_features, out_features, rank, scaling,
                *_strides(lora_A, lora_B), *weights.stride(),
                N_P2=_p2(num_experts), R_P2=_p2(rank, 16), BM=cfg.bm, BK=cfg.bk, BN=cfg.bn,
                NEED_X=need_x, UPCAST=cfg.upcast, PREC=cfg.prec,
            )  # fmt: skip
            grad_x = gx if need_x else None
            grad_w = dw.to(weights.dtype) if need_w else None
            if need_A:
                dh_cat = dh.view(num_tokens, num_experts * rank).to(x.dtype)  # (T, N*r)
                grad_A = (dh_cat.t() @ x).view(num_experts, rank, in_features).to(lora_A.dtype)
        if need_B:
            hg = (h * (weights.float() * scaling)[:, :, None]).view(num_tokens, num_experts * rank)  # (T, N*r)
            grad_b_cat = grad_out.t() @ hg.to(x.dtype)  # (out, N*r)
            grad_B = grad_b_cat.view(out_features, num_experts, rank).transpose(0, 1).contiguous().to(lora_B.dtype)
        return grad_x, grad_A, grad_B, grad_w, None


def sparse_triton(x, lora_A, lora_B, top_w, order, token, offs, scaling: float) -> torch.Tensor:
    """Sparse expert sum (T, out) from the chosen gates top_w (T, k) and the pair sort."""
    return _SparseTriton.apply(x.contiguous(), lora_A, lora_B, top_w, order, token, offs, float(scaling))


def dense_triton(x, lora_A, lora_B, weights, scaling: float) -> torch.Tensor:
    """Dense expert sum (T, out) with the (T, N) gates applied to the rank-N*r intermediate."""
    return _DenseTriton.apply(x.contiguous(), lora_A, lora_B, weights, float(scaling))


__all__ = ["dense_triton", "interpreted", "sparse_triton"]
