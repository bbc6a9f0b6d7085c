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

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from molora.core.kernels import launch as L
from molora.core.kernels import triton_kernels as K


@dataclass(frozen=True)
class _Launch:
    """Dot settings for one call (constexprs of every kernel) and where it runs."""

    upcast: bool
    prec: str
    gpu: bool  # False: Triton's CPU interpreter (fixed small blocks, no autotune)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return K.INTERPRETED


def _on_gpu(x: torch.Tensor) -> bool:
    """True on CUDA tensors, False under the interpreter; otherwise a clear error."""
    if x.device.type == "cuda":
        return True
    if interpreted():
        return False
    raise RuntimeError(
        f'expert_impl="triton" runs on CUDA tensors, got {x.device.type} tensors; for CPU checks set '
        "TRITON_INTERPRET=1 before molora's triton kernels are imported, or choose another `expert_impl`"
    )


def _launch(x: torch.Tensor) -> _Launch:
    if not _on_gpu(x):  # numpy: bf16 dots are wrong there (upcast)
        return _Launch(upcast=True, prec="ieee", gpu=False)
    fp32_prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    prec = fp32_prec if x.dtype == torch.float32 else "tf32"  # Triton's default; ignored for bf16/fp16 operands
    return _Launch(upcast=False, prec=prec, gpu=True)


def _strides(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[int, ...]:
    return (*lora_A.stride(), *lora_B.stride())


def _block_ends(offs: torch.Tensor, bm: int) -> torch.Tensor:
    """(N,) int32 cumulative count of BM-blocks per expert segment (device ops, no sync)."""
    counts = torch.diff(offs, prepend=offs.new_zeros(1))  # (N,)
    return torch.cumsum(torch.div(counts + (bm - 1), bm, rounding_mode="floor"), 0).to(torch.int32)


def _run(name: str, grid: Callable[[dict], tuple[int]], args: tuple, consts: dict, cfg: _Launch, configs, interp):
    """Launch kernel ``name`` of ``triton_kernels`` on a GPU with its one config, or through
    ``triton.autotune`` over several (``configs``, all checked by ``aot``); under the interpreter
    with the small config ``interp``."""
    kernel = getattr(K, name)
    config = interp if not cfg.gpu else configs[0] if len(configs) == 1 else None
    if config is not None:
        kernel[grid(config.kwargs)](
            *args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )
    else:
        _autotuned(kernel, tuple(configs))[grid](*args, **consts)


@functools.lru_cache(maxsize=None)
def _autotuned(kernel, configs: tuple[L.Config, ...]):
    """``triton.autotune`` over ``configs``, tuned once per (N, D, r) and dtypes."""
    candidates = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]
    return triton.autotune(configs=candidates, key=["num_experts", "dim", "rank"])(kernel)


def _dense_up(src, m, cfg: _Launch) -> torch.Tensor:
    """(T, N*r) fp32 = src (T, D) @ M_cat^T for M (N, r, D)."""
    num_tokens, dim = src.shape
    num_experts, rank = m.shape[0], m.shape[1]
    out = torch.empty(num_tokens, num_experts * rank, device=src.device, dtype=torch.float32)
    n_cols = num_experts * rank
    _run(
        "dense_up_kernel",
        lambda meta: (max(1, _cdiv(num_tokens, meta["BM"])) * _cdiv(n_cols, meta["BC"]),),
        (src, m, out, num_tokens, num_experts, dim, rank, *m.stride()),
        {"UPCAST": cfg.upcast, "PREC": cfg.prec},
        cfg,
        L.DENSE_UP,
        L.INTERPRETER_DENSE["up"],
    )
    return out


def _dense_down(h, weights, m, scaling: float, gated: bool, out_dtype, cfg: _Launch) -> torch.Tensor:
    """(T, D) = (s G * h) @ M_cat (``gated``) or h @ M_cat, h (T, N*r) fp32, M (N, r, D) strided."""
    num_tokens = h.shape[0]
    num_experts, rank, dim = m.shape
    out = torch.empty(num_tokens, dim, device=h.device, dtype=out_dtype)
    _run(
        "dense_down_kernel",
        lambda meta: (max(1, _cdiv(num_tokens, meta["BM"])) * _cdiv(dim, meta["BN"]),),
        (h, weights, m, out, num_tokens, num_experts, dim, rank, float(scaling), gated, *m.stride(), *weights.stride()),
        {"UPCAST": cfg.upcast, "PREC": cfg.prec},
        cfg,
        L.DENSE_DOWN,
        L.INTERPRETER_DENSE["down"],
    )
    return out


class _SparseTriton(torch.autograd.Function):
    """Sparse expert sum on pairs sorted by expert; see ``triton_kernels`` for the kernels."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, top_w, order, token, offs, scaling):
        cfg = _launch(x)
        num_tokens, in_features = x.shape
        num_experts, rank, _ = lora_A.shape
        out_features = lora_B.shape[1]
        num_pairs = token.shape[0]
        blocks = L.sparse_blocks(rank) if cfg.gpu else L.INTERPRETER_SPARSE
        bm = blocks.kwargs["BM"]
        gate = top_w.reshape(-1).index_select(0, order).float()  # (P,) unscaled, fp32
        block_end = _block_ends(offs, bm)  # (N,)
        h = torch.empty(num_pairs, rank, device=x.device, dtype=torch.float32)  # (P, r)
        y = torch.zeros(num_tokens, out_features, device=x.device, dtype=torch.float32)  # (T, out)
        _run(
            "sparse_fwd_kernel",
            lambda meta: (_cdiv(num_pairs, meta["BM"]) + num_experts,),
            (x, lora_A, lora_B, gate, token, offs, block_end, h, y,
             num_experts, in_features, out_features, rank, float(scaling), *_strides(lora_A, lora_B)),
            {**_sparse_consts(cfg, rank), "N_P2": L.MAX_EXPERTS},
            cfg, (blocks,), blocks,
        )  # fmt: skip
        ctx.save_for_backward(x, lora_A, lora_B, gate, order, token, offs, block_end, h)
        ctx.scaling, ctx.cfg, ctx.blocks = float(scaling), cfg, blocks
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
        blocks = ctx.blocks
        common = _sparse_consts(cfg, rank)
        grad_x = grad_A = grad_B = grad_w = None
        if need_x or need_A or need_w:
            dh = torch.empty_like(h)  # (P, r) fp32
            d_gate = torch.empty_like(gate)  # (P,)
            gx = torch.zeros(x.shape, device=x.device, dtype=torch.float32) if need_x else dh
            _run(
                "sparse_bwd_pairs_kernel",
                lambda meta: (_cdiv(num_pairs, meta["BM"]) + num_experts,),
                (grad_out, lora_A, lora_B, gate, token, offs, block_end, h, dh, d_gate, gx,
                 num_experts, in_features, out_features, rank, scaling, need_x, *_strides(lora_A, lora_B)),
                {**common, "N_P2": L.MAX_EXPERTS},
                cfg, (blocks,), blocks,
            )  # fmt: skip
            if need_x:
                grad_x = gx.to(x.dtype)
            if need_w:
                grad_w = torch.empty_like(d_gate).index_copy_(0, order, d_gate)  # back to (T*k) order
                grad_w = grad_w.view(ctx.top_w_shape).to(ctx.top_w_dtype)
            if need_A:
                grad_A = _wgrad(dh, None, x, token, offs, num_experts, 1.0, cfg, common, blocks).to(lora_A.dtype)
        if need_B:
            grad_B = _wgrad(h, gate, grad_out, token, offs, num_experts, scaling, cfg, common, blocks)  # (N, r, out)
            grad_B = grad_B.transpose(1, 2).contiguous().to(lora_B.dtype)
        return grad_x, grad_A, grad_B, grad_w, None, None, None, None


def _sparse_consts(cfg: _Launch, rank: int) -> dict:
    return {"R_P2": L.rank_p2(rank), "UPCAST": cfg.upcast, "PREC": cfg.prec}


def _wgrad(lhs, gate, src, token, offs, num_experts: int, scaling: float, cfg: _Launch, common: dict, blocks):
    """(N, r, D) fp32: per expert, sum over its pairs of (s * gate *) lhs[p]^T src[token[p]]."""
    rank, dim = lhs.shape[1], src.shape[1]
    out = torch.empty(num_experts, rank, dim, device=src.device, dtype=torch.float32)
    wgrad = L.wgrad_blocks(blocks)
    _run(
        "wgrad_kernel",
        lambda meta: (num_experts, _cdiv(dim, meta["BD"])),
        (lhs, gate if gate is not None else lhs, src, token, offs, out, rank, dim, scaling, gate is not None),
        common,
        cfg, (wgrad,), wgrad,
    )  # fmt: skip
    return out


class _DenseTriton(torch.autograd.Function):
    """Dense expert sum as two tiled GEMMs (``dense_up_kernel``, ``dense_down_kernel``) with the
    gates applied to the fp32 rank-N*r intermediate as it is loaded; weight grads by cuBLAS GEMMs."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, weights, scaling):
        cfg = _launch(x)
        h = _dense_up(x, lora_A, cfg)  # (T, N*r) fp32, saved
        y = _dense_down(h, weights, lora_B.transpose(1, 2), scaling, True, x.dtype, cfg)  # (T, out)
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
        gates = weights.float()[:, :, None] * scaling  # (T, N, 1)
        grad_x = grad_A = grad_B = grad_w = None
        if need_x or need_A or need_w:
            d_hg = _dense_up(grad_out, lora_B.transpose(1, 2), cfg)  # (T, N*r) fp32: grad of s G h
            if need_x:
                grad_x = _dense_down(d_hg, weights, lora_A, scaling, True, x.dtype, cfg)  # (T, in)
            d_hg = d_hg.view(num_tokens, num_experts, rank)
            if need_w:
                grad_w = ((d_hg * h.view_as(d_hg)).sum(-1) * scaling).to(weights.dtype)  # (T, N)
            if need_A:
                dh_cat = (d_hg * gates).view(num_tokens, num_experts * rank).to(x.dtype)  # (T, N*r)
                grad_A = (dh_cat.t() @ x).view(num_experts, rank, in_features).to(lora_A.dtype)
        if need_B:
            hg = (h.view(num_tokens, num_experts, rank) * gates).view(num_tokens, num_experts * rank)  # (T, N*r)
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
