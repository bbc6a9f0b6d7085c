"""Triton kernels of the expert sum ``y = s * sum_i G_i B_i A_i x``, forward and backward.

Sparse routing (top-k, top-p) works on the P = T*k (token, expert) pairs sorted by expert
(``molora.core.experts.sort_pairs``); expert e owns pairs ``offs[e-1]:offs[e]``. The launch
grid is fixed by shapes alone, ``cdiv(P, BM) + N`` blocks (each expert's segment adds at most
one partial block), and each block finds its expert from the (N,) cumulative block counts
``block_end`` and exits early when it is past the last one (vLLM's LoRA kernels do the same):
no host sync sizes the grid.

- :func:`sparse_fwd_kernel`: per block of pairs of expert e, gathers the rows of x by token
  inside the kernel, h = x A_e^T (BM, r) in fp32 (stored: the saved activation, O(P*r)),
  then y[token] += (s * gate * h) B_e^T, one (BM, BN) tile of out at a time, added atomically
  into the (T, out) output in the epilogue: no (P, in) or (P, out) buffer.
- :func:`sparse_bwd_pairs_kernel`: same blocks; d(hg) = grad_out[token] B_e (gathered),
  d gate = s * <d(hg), h>, dh = s * gate * d(hg) (stored fp32), and grad_x[token] += dh A_e.
- :func:`wgrad_kernel`: grad_A[e] = dh_e^T x[token_e] and grad_B[e]^T = (s g h)_e^T
  grad_out[token_e], grouped GEMMs over the same expert segments with the gathers
  recomputed; grid (N, cdiv(D, BD)), each program loops over its expert's segment.

Dense routing (soft, task) uses all experts per token as one rank N*r LoRA, as two tiled GEMMs
whose tiles do not depend on N or r (so no configuration outgrows registers or shared memory):

- :func:`dense_up_kernel`: h = src M_cat^T (T, N*r) fp32, one (BM, BC) tile per program. The
  forward's h = x A_cat^T (saved), the backward's d(hg) = grad_out B_cat.
- :func:`dense_down_kernel`: out = (s G * h) M_cat, the gates applied to each (BM, BC) chunk of
  h as it is loaded. The forward's y = (s G * h) B_cat^T, the backward's grad_x = (s G * d(hg)) A_cat.
  The gate gradient, dh and the weight gradients are elementwise ops and GEMMs in ``triton_experts``.

Column c of the rank-N*r space is expert ``c // r``, rank ``c % r``. The sparse kernels pad the
rank to R_P2 >= 16 (masked) and find a block's expert among N_P2 = 64 block ends, so their
compiled code depends on r's power of two only. Every ``tl.dot`` has all dims >= 16, as GPU
tensor cores require. ``UPCAST`` casts dot operands to fp32 first: the Triton 3.9 interpreter
computes bf16 dots wrongly (it is set only there). Launch settings (block sizes, warps, stages,
autotune candidates) live in ``launch``; ``aot`` compiles every one for sm_80 and sm_90.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    return tl.dot(a, b, input_precision=PREC)


# Strides are specialized when equal to 1 (contiguity) but not on divisibility by 16; N, r, T
# and the strides that are 1 only for r = 1 or N = 1 (s_bo, the gates') not at all: one
# compiled program per dtype, R_P2 and block config, whatever N and r (r = 1 is routed away).
_SPARSE_STRIDES = ["s_an", "s_ar", "s_ak", "s_bn", "s_br"]
_DENSE_STRIDES = ["s_mn", "s_mr", "s_md"]
INTERPRETED = type(_dot).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 when this module was imported


@triton.jit
def _block_rows(pid, offs_ptr, block_end_ptr, num_experts, N_P2: tl.constexpr, BM: tl.constexpr):
    """Expert e of block ``pid`` (num_experts when past the end) and its (BM,) pair rows."""
    ex = tl.arange(0, N_P2)
    ends = tl.load(block_end_ptr + ex, mask=ex < num_experts, other=2**30)  # (N_P2,)
    e = tl.sum((ends <= pid).to(tl.int32))
    e_c = tl.minimum(e, num_experts - 1)
    seg_end = tl.load(offs_ptr + e_c)
    seg_start = tl.load(offs_ptr + e_c - 1, mask=e_c > 0, other=0)
    blk_start = tl.load(block_end_ptr + e_c - 1, mask=e_c > 0, other=0)
    rows = seg_start + (pid - blk_start) * BM + tl.arange(0, BM)  # (BM,)
    return e, rows, rows < seg_end


@triton.jit(do_not_specialize=["num_experts", "rank", "s_bo"], do_not_specialize_on_alignment=_SPARSE_STRIDES)
def sparse_fwd_kernel(
    x_ptr, a_ptr, b_ptr, gate_ptr, token_ptr, offs_ptr, block_end_ptr, h_ptr, y_ptr,
    num_experts, in_features, out_features, rank, scaling,
    s_an, s_ar, s_ak, s_bn, s_bo, s_br,
    N_P2: tl.constexpr, R_P2: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    e, rows, row_mask = _block_rows(tl.program_id(0), offs_ptr, block_end_ptr, num_experts, N_P2, BM)
    if e >= num_experts:
        return
    tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # (BM,)
    rr = tl.arange(0, R_P2)
    r_mask = rr < rank
    acc = tl.zeros((BM, R_P2), tl.float32)
    for k0 in range(0, in_features, BK):
        kk = k0 + tl.arange(0, BK)
        k_mask = kk < in_features
        xt = tl.load(
            x_ptr + tok[:, None] * in_features + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        at = tl.load(
            a_ptr + e * s_an + rr[None, :] * s_ar + kk[:, None] * s_ak,
            mask=r_mask[None, :] & k_mask[:, None],
            other=0.0,
        )  # (BK, R_P2)
        acc += _dot(xt, at, UPCAST, PREC)
    tl.store(h_ptr + rows[:, None] * rank + rr[None, :], acc, mask=row_mask[:, None] & r_mask[None, :])
    gate = tl.load(gate_ptr + rows, mask=row_mask, other=0.0) * scaling  # (BM,) fp32
    hg = (acc * gate[:, None]).to(b_ptr.dtype.element_ty)
    for n0 in range(0, out_features, BN):
        nn = n0 + tl.arange(0, BN)
        n_mask = nn < out_features
        bt = tl.load(
            b_ptr + e * s_bn + nn[None, :] * s_bo + rr[:, None] * s_br,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # (R_P2, BN)
        yt = _dot(hg, bt, UPCAST, PREC)
        tl.atomic_add(
            y_ptr + tok[:, None] * out_features + nn[None, :],
            yt,
            mask=row_mask[:, None] & n_mask[None, :],
            sem="relaxed",
        )


@triton.jit(do_not_specialize=["num_experts", "rank", "s_bo"], do_not_specialize_on_alignment=_SPARSE_STRIDES)
def sparse_bwd_pairs_kernel(
    g_ptr, a_ptr, b_ptr, gate_ptr, token_ptr, offs_ptr, block_end_ptr, h_ptr, dh_ptr, dgate_ptr, gx_ptr,
    num_experts, in_features, out_features, rank, scaling, need_x,
    s_an, s_ar, s_ak, s_bn, s_bo, s_br,
    N_P2: tl.constexpr, R_P2: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    e, rows, row_mask = _block_rows(tl.program_id(0), offs_ptr, block_end_ptr, num_experts, N_P2, BM)
    if e >= num_experts:
        return
    tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # (BM,)
    rr = tl.arange(0, R_P2)
    r_mask = rr < rank
    d_hg = tl.zeros((BM, R_P2), tl.float32)  # grad of s * gate * h
    for n0 in range(0, out_features, BN):
        nn = n0 + tl.arange(0, BN)
        n_mask = nn < out_features
        gt = tl.load(
            g_ptr + tok[:, None] * out_features + nn[None, :], mask=row_mask[:, None] & n_mask[None, :], other=0.0
        )
        bt = tl.load(
            b_ptr + e * s_bn + nn[:, None] * s_bo + rr[None, :] * s_br,
            mask=n_mask[:, None] & r_mask[None, :],
            other=0.0,
        )  # (BN, R_P2)
        d_hg += _dot(gt, bt, UPCAST, PREC)
    hr_mask = row_mask[:, None] & r_mask[None, :]
    h = tl.load(h_ptr + rows[:, None] * rank + rr[None, :], mask=hr_mask, other=0.0)
    tl.store(dgate_ptr + rows, tl.sum(d_hg * h, axis=1) * scaling, mask=row_mask)
    gate = tl.load(gate_ptr + rows, mask=row_mask, other=0.0) * scaling
    dh = d_hg * gate[:, None]  # (BM, R_P2) fp32
    tl.store(dh_ptr + rows[:, None] * rank + rr[None, :], dh, mask=hr_mask)
    if need_x:
        dhc = dh.to(a_ptr.dtype.element_ty)
        for k0 in range(0, in_features, BK):
            kk = k0 + tl.arange(0, BK)
            k_mask = kk < in_features
            at = tl.load(
                a_ptr + e * s_an + rr[:, None] * s_ar + kk[None, :] * s_ak,
                mask=r_mask[:, None] & k_mask[None, :],
                other=0.0,
            )  # (R_P2, BK)
            dx = _dot(dhc, at, UPCAST, PREC)
            tl.atomic_add(
                gx_ptr + tok[:, None] * in_features + kk[None, :],
                dx,
                mask=row_mask[:, None] & k_mask[None, :],
                sem="relaxed",
            )


@triton.jit(do_not_specialize=["rank"])
def wgrad_kernel(
    lhs_ptr, gate_ptr, src_ptr, token_ptr, offs_ptr, out_ptr, rank, dim, scaling, has_gate,
    R_P2: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """out[e] (r, D) = sum over e's pairs p of lhs[p]^T src[token[p]]; lhs scaled by s*gate if has_gate."""
    e = tl.program_id(0)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_mask = dd < dim
    rr = tl.arange(0, R_P2)
    r_mask = rr < rank
    seg_end = tl.load(offs_ptr + e)
    seg_start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    acc = tl.zeros((R_P2, BD), tl.float32)
    for m0 in range(seg_start, seg_end, BM):
        rows = m0 + tl.arange(0, BM)
        row_mask = rows < seg_end
        lhs = tl.load(lhs_ptr + rows[:, None] * rank + rr[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        if has_gate:
            lhs = lhs * (tl.load(gate_ptr + rows, mask=row_mask, other=0.0) * scaling)[:, None]
        tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        src = tl.load(src_ptr + tok[:, None] * dim + dd[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        acc += _dot(tl.trans(lhs).to(src_ptr.dtype.element_ty), src, UPCAST, PREC)
    tl.store(out_ptr + e * rank * dim + rr[:, None] * dim + dd[None, :], acc, mask=r_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["num_tokens", "num_experts", "rank"], do_not_specialize_on_alignment=_DENSE_STRIDES)
def dense_up_kernel(
    src_ptr, m_ptr, out_ptr,
    num_tokens, num_experts, dim, rank,
    s_mn, s_mr, s_md,
    BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """out (T, N*r) fp32 = src (T, D) @ M_cat^T, M (N, r, D) strided; one (BM, BC) tile per program.

    Column c of the rank-N*r space is expert ``c // rank``, rank ``c % rank`` (no padding).
    Programs walk the column tiles of a row block first, so its src rows are re-read from L2.
    """
    pid = tl.program_id(0)
    n_cols = num_experts * rank
    n_cb = tl.cdiv(n_cols, BC)
    rows = (pid // n_cb) * BM + tl.arange(0, BM)  # (BM,)
    row_mask = rows < num_tokens
    rows64 = rows.to(tl.int64)
    cc = (pid % n_cb) * BC + tl.arange(0, BC)  # (BC,)
    c_mask = cc < n_cols
    m_off = (cc // rank).to(tl.int64) * s_mn + (cc % rank) * s_mr  # (BC,)
    acc = tl.zeros((BM, BC), tl.float32)
    for k0 in range(0, dim, BK):
        kk = k0 + tl.arange(0, BK)
        k_mask = kk < dim
        st = tl.load(src_ptr + rows64[:, None] * dim + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        mt = tl.load(
            m_ptr + m_off[None, :] + kk[:, None] * s_md, mask=c_mask[None, :] & k_mask[:, None], other=0.0
        )  # (BK, BC)
        acc += _dot(st, mt, UPCAST, PREC)
    tl.store(out_ptr + rows64[:, None] * n_cols + cc[None, :], acc, mask=row_mask[:, None] & c_mask[None, :])


@triton.jit(
    do_not_specialize=["num_tokens", "num_experts", "rank", "s_wt", "s_we"], do_not_specialize_on_alignment=_DENSE_STRIDES
)
def dense_down_kernel(
    h_ptr, w_ptr, m_ptr, out_ptr,
    num_tokens, num_experts, dim, rank, scaling, gated,
    s_mn, s_mr, s_md, s_wt, s_we,
    BM: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """out (T, D) = (s * G[:, c // r] * h) @ M_cat when ``gated`` (else h @ M_cat), h (T, N*r) fp32,
    G (T, N) strided, M (N, r, D) strided; one (BM, BN) tile of out per program, K-loop over N*r.

    Programs walk the column tiles of out of a row block first (its h rows stay in L2).
    """
    pid = tl.program_id(0)
    n_nb = tl.cdiv(dim, BN)
    n_cols = num_experts * rank
    rows = (pid // n_nb) * BM + tl.arange(0, BM)  # (BM,)
    row_mask = rows < num_tokens
    rows64 = rows.to(tl.int64)
    nn = (pid % n_nb) * BN + tl.arange(0, BN)  # (BN,)
    n_mask = nn < dim
    acc = tl.zeros((BM, BN), tl.float32)
    for c0 in range(0, n_cols, BC):
        cc = c0 + tl.arange(0, BC)  # (BC,)
        c_mask = cc < n_cols
        ce = cc // rank
        hc_mask = row_mask[:, None] & c_mask[None, :]
        ht = tl.load(h_ptr + rows64[:, None] * n_cols + cc[None, :], mask=hc_mask, other=0.0)  # (BM, BC) fp32
        if gated:
            gates = tl.load(w_ptr + rows64[:, None] * s_wt + ce[None, :] * s_we, mask=hc_mask, other=0.0)
            ht = ht * (gates.to(tl.float32) * scaling)
        mt = tl.load(
            m_ptr + (ce.to(tl.int64) * s_mn + (cc % rank) * s_mr)[:, None] + nn[None, :] * s_md,
            mask=c_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # (BC, BN)
        acc += _dot(ht.to(m_ptr.dtype.element_ty), mt, UPCAST, PREC)
    tl.store(out_ptr + rows64[:, None] * dim + nn[None, :], acc, mask=row_mask[:, None] & n_mask[None, :])


__all__ = [
    "INTERPRETED",
    "dense_down_kernel",
    "dense_up_kernel",
    "sparse_bwd_pairs_kernel",
    "sparse_fwd_kernel",
    "wgrad_kernel",
]
