"""Launch settings of the Triton kernels: the one place that says which configurations can run.

Everything ``expert_impl="triton"`` can launch on a GPU is listed here, and
``molora.core.kernels.aot`` compiles exactly this list for sm_80 and sm_90 (CI, no GPU needed):

- sparse kernels: fixed blocks (:func:`sparse_blocks`, by the rank's power of two), 4 warps,
  3 stages (triton's defaults), N_P2 = :data:`MAX_EXPERTS`;
- dense kernels: the autotune candidates :data:`DENSE_UP` and :data:`DENSE_DOWN`; their tiles do
  not depend on N or r, so each candidate compiles to the same code at every N and r;
- dtypes bf16 and fp16 (fp32 only under Triton's CPU interpreter, in the tests).

Shapes outside :func:`unsupported`'s domain (N > 64, r > 128, fp32 or another dtype on a GPU,
in or out not a multiple of 16) are never launched:
``triton`` runs ``dense`` (dense routing) or ``grouped`` (sparse routing) for them instead.
This module imports neither triton nor CUDA, so the rules are testable anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_EXPERTS = 64  # N_P2 of the sparse kernels: one compiled program for every N <= 64
MAX_RANK = 128  # R_P2 <= 128: the sparse kernels keep a (BM, R_P2) fp32 tile in registers
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}  # interpreter (CPU tests)
GPU_DTYPES = (torch.bfloat16, torch.float16)  # compiled for a GPU (fp32 runs dense/grouped there)


@dataclass(frozen=True)
class Config:
    """Constexpr block sizes of one launch, with warps and software-pipeline stages."""

    blocks: tuple[tuple[str, int], ...]  # (("BM", 64), ("BK", 64), ...)
    num_warps: int = 4
    num_stages: int = 3

    @property
    def kwargs(self) -> dict[str, int]:
        return dict(self.blocks)

    def label(self) -> str:
        sizes = " ".join(f"{k}={v}" for k, v in self.blocks)
        return f"{sizes} w{self.num_warps} s{self.num_stages}"


def _cfg(num_warps: int = 4, num_stages: int = 3, **blocks: int) -> Config:
    return Config(tuple(blocks.items()), num_warps, num_stages)


# Autotune candidates of the dense kernels (every one passes the AOT check on sm_80 and sm_90,
# bf16 and fp16). BC: columns of the rank-N*r space per tile (up) or per K step (down).
DENSE_UP = (
    _cfg(BM=64, BC=64, BK=64),
    _cfg(BM=128, BC=128, BK=32, num_warps=8),
)
DENSE_DOWN = (
    _cfg(BM=64, BN=64, BC=32),
    _cfg(BM=128, BN=64, BC=32, num_warps=8),  # BN=128 spilled 64 B/thread on sm_80
)
# Under Triton's CPU interpreter (tests): one small config, fewer numpy ops per program.
INTERPRETER_DENSE = {"up": _cfg(BM=16, BC=32, BK=32), "down": _cfg(BM=16, BN=32, BC=16)}
INTERPRETER_SPARSE = _cfg(BM=16, BK=64, BN=64)


def p2(n: int, floor: int = 1) -> int:
    """The smallest power of two >= n (and >= floor)."""
    return max(floor, 1 << max(0, n - 1).bit_length())


def rank_p2(rank: int) -> int:
    """R_P2 of the sparse kernels: r padded to a power of two >= 16 (tensor-core dot dims)."""
    return p2(rank, 16)


def sparse_blocks(rank: int) -> Config:
    """Blocks of the sparse kernels on a GPU, by r (the compiled code depends on R_P2 only).

    Each program keeps (BM, R_P2) fp32 tiles (h, its gated copy, d(hg)) and (R_P2, BN) tiles of
    B in registers. Measured by the AOT check: with 4 warps, sparse_fwd bf16 at R_P2=128 spills
    440 B/thread on sm_90; with 8 warps and BN=BK=64 still 48 B on sm_80. So 8 warps from
    R_P2 = 64, and BN = BK = 32 at R_P2 = 128: no spills on either target.
    """
    r_p2 = rank_p2(rank)
    if r_p2 >= 128:
        return _cfg(BM=64, BK=32, BN=32, num_warps=8)
    return _cfg(BM=64, BK=64, BN=64, num_warps=8 if r_p2 >= 64 else 4)


def wgrad_blocks(blocks: Config) -> Config:
    """Blocks of ``wgrad_kernel`` from the sparse kernels' (BM rows per step, BD = BK columns)."""
    sizes = blocks.kwargs
    return Config((("BM", sizes["BM"]), ("BD", sizes["BK"])), blocks.num_warps, blocks.num_stages)


def precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """The ``input_precision`` values a launch can pass for this dtype (fp32: ieee or tf32)."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)


def unsupported(
    num_experts: int, rank: int, dtype: torch.dtype, in_dim: int, out_dim: int, compiled: bool = True
) -> str | None:
    """Why the Triton kernels are not launched for these shapes (None: they are).

    The domain is what ``molora.core.kernels.aot`` checks: N <= 64 (the sparse kernels look
    for a block's expert among 64), r <= 128, and, when ``compiled`` for a GPU (not Triton's
    CPU interpreter), bf16 or fp16 with in and out dims that are multiples of 16: Triton
    compiles other sizes to different, unchecked code (with a shared A the kernels' in dim is
    r). fp32 on a GPU: its "ieee" dots are FMA loops and its tiles twice the bytes (the first
    AOT table: dense fp32 N*r=512 needed 388 KB of shared memory); cuBLAS runs it in ``dense``/``grouped``.
    """
    if dtype not in DTYPES:
        return f"dtype {dtype} (the kernels are checked for {sorted(DTYPES.values())})"
    if compiled and dtype not in GPU_DTYPES:
        return f"dtype {dtype} on a GPU (Triton's fp32 dots are FMA loops or TF32; the cuBLAS paths run fp32)"
    if num_experts > MAX_EXPERTS:
        return f"num_experts={num_experts} > {MAX_EXPERTS}"
    if rank > MAX_RANK:
        return f"r={rank} > {MAX_RANK}"
    if compiled and rank == 1:
        return "r=1 (its strides equal 1: other, unchecked programs)"
    if compiled and (in_dim % 16 or out_dim % 16):
        return f"in={in_dim}, out={out_dim} (the kernels are checked for multiples of 16)"
    return None


__all__ = [
    "DENSE_DOWN",
    "DENSE_UP",
    "DTYPES",
    "GPU_DTYPES",
    "INTERPRETER_DENSE",
    "INTERPRETER_SPARSE",
    "MAX_EXPERTS",
    "MAX_RANK",
    "Config",
    "p2",
    "precisions",
    "rank_p2",
    "sparse_blocks",
    "unsupported",
    "wgrad_blocks",
]
