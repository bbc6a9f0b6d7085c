"""Which expert path ``expert_impl="auto"`` runs: rules by routing kind, shapes and device.

:func:`choose_impl` returns a name of ``molora.core.experts.EXPERT_IMPLS``; it reads only
shapes, dtypes and the device (never a tensor's values), so it costs no host-device sync.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from molora.core.kernels.launch import unsupported
from molora.core.log import warn_once
from molora.core.shared import shares_A


def prefers_dense(num_tokens: int, num_experts: int, top_k: int) -> bool:
    """Whether ``dense`` beats the sparse paths for sparse routing with these shapes.

    The sparse paths do k/N of dense's up-projection work but pay a sort, gathers and
    scatter-adds of (T*k, d) rows and thinner GEMMs; below ~64 token-expert pairs the fixed
    cost of the sort and the per-expert GEMM calls dominates, and with k > N/2 there is
    little work to skip.
    """
    return num_tokens * top_k < 64 or 2 * top_k > num_experts


_HYBRID_MAX_RANK = 256  # N*r up to which one dense down-projection GEMM is still "thin"
_CPU_FRESH_BUFFER_BYTES = 32 * 2**20  # glibc's largest dynamic mmap threshold


def choose_impl(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, indices: torch.Tensor | None) -> str:
    """The name of the path ``auto`` runs for these operands (by routing kind, shapes, device).

    Dense routing, or :func:`prefers_dense` (tiny T, k > N/2): ``dense`` everywhere. Then by
    device: :func:`_choose_cuda` on CUDA, :func:`_choose_cpu` elsewhere.
    """
    num_experts = lora_B.shape[0]  # lora_A may be one shared (1, r, in)
    if indices is None or prefers_dense(x.shape[0], num_experts, indices.shape[1]):
        return "dense"
    if x.device.type == "cuda":
        return _choose_cuda(x, lora_A, lora_B)
    return _choose_cpu(x, lora_A, lora_B, indices)


def _choose_cpu(x, lora_A, lora_B, indices) -> str:
    """Sparse routing on CPU (measured, ``benchmarks/RESULTS.md``).

    - With more than one torch thread and N*r <= 256: ``dense``. Every op is an OpenMP
      parallel region, and the sparse paths run ~10x more ops (per-expert GEMMs, gathers,
      scatters); when the cores are shared, each region can wait a scheduler slice for a
      descheduled thread. Measured with 2 threads on 2 shared cores (T=2048, d=1024, top-2 of
      8), wall clock: in a busy period dense 1.40x, hybrid 3.1x, grouped 4.6x PEFT LoRA; in a
      calmer one all three within noise (1.5-1.6x). With one thread grouped is 5-10% faster.
    - N*r <= 256 once a (T*k, d) buffer reaches 32 MiB: ``hybrid``. glibc then maps every
      such buffer fresh and page-faults it on first write, which makes the five (T*k, d)
      temporaries of ``grouped`` cost more than the extra down-projection FLOPs of ``hybrid``
      (two such temporaries). Measured at T=4096, d=4096, top-2 of 8, r=16: grouped 1.26x,
      hybrid 1.12x PEFT LoRA; at T=2048, d=1024 grouped wins (1.15-1.22x vs 1.23-1.33x).
    - Otherwise ``grouped``, whose GEMM work scales with k rather than N.
    """
    num_experts, rank = lora_B.shape[0], lora_A.shape[1]
    if num_experts * rank <= _HYBRID_MAX_RANK:
        if _num_threads() > 1:
            return "dense"
        pair_bytes = indices.numel() * max(x.shape[1], lora_B.shape[1]) * x.element_size()
        if pair_bytes >= _CPU_FRESH_BUFFER_BYTES:
            return "hybrid"
    return "grouped"


def dense_floor_rank(device: torch.device) -> int:
    """N*r below which ``dense`` runs at the memory-bound floor on this GPU (FLOP per byte).

    A rank-N*r LoRA GEMM on bf16 x does 2*T*in*N*r FLOPs for 2*T*in bytes of x (and the same
    for y), so its arithmetic intensity is N*r FLOP/byte; below the GPU's ridge point (peak
    FLOPs over memory bandwidth: about 150 effective on A100, 300 on H100/H200) it costs
    what reading x and writing y cost, the floor that every path pays, and the sparse paths
    (which read x k times) cannot beat it. Not yet measured here (``scripts/gpu_check.sh``).
    """
    major = torch.cuda.get_device_capability(device)[0]
    return 300 if major >= 9 else 150


def _choose_cuda(x, lora_A, lora_B) -> str:
    """Sparse routing on CUDA, by the roofline (reasoned; ``scripts/gpu_check.sh`` measures it).

    - N*r below :func:`dense_floor_rank`: ``dense`` (memory-bound: at the floor).
    - Else ``triton`` when triton is installed and the shapes are in the domain whose every
      launch the AOT check compiles for sm_80/sm_90 (``molora.core.kernels.launch.unsupported``:
      bf16/fp16, N <= 64, 2 <= r <= 128, in/out multiples of 16): within shared memory, no
      spills (``benchmarks/RESULTS-gpu.md``, section ``aot_kernels``). x gathered and y
      accumulated inside the kernels, work O(T*k*r*(in+out)), saved activations O(T*k*r).
    - Else ``grouped`` where ``F.grouped_mm`` runs its CUTLASS kernel (sm90+, bf16, in, out
      and r multiples of 8); else ``hybrid`` (N*r <= 256) or ``grouped`` with a warning,
      logged once, that a slower path runs.

    What a measurement on the device must confirm (``bash scripts/gpu_check.sh``, layer table):

    1. the floor: at N*r = 128 (N=8, r=16, T=4096, d=4096, bf16, top-2), ``dense`` is within
       ~10% of PEFT LoRA r=16 and no sparse path beats it; otherwise lower :func:`dense_floor_rank`;
    2. above the floor (N*r >= 300 on H100, >= 150 on A100), ``triton`` beats ``grouped`` and
       ``hybrid``; if not, ``grouped`` goes first here;
    3. the AOT table's occupancy: the sparse kernels with 8 warps at R_P2 >= 64 and the dense
       autotune candidates run without local-memory traffic (Nsight Compute, local load/store
       bytes = 0), as ptxas's zero spill count says;
    4. dense routing stays on ``dense`` (``choose_impl``): the dense Triton kernels are two
       tiled GEMMs with the gates fused into the second, so at most an elementwise pass over
       the (T, N*r) intermediate separates them from ``dense``; ``auto`` switches to them only if
       the layer table shows ``triton`` faster for soft/task routing.
    """
    num_experts, (rank, in_features) = lora_B.shape[0], lora_A.shape[1:]
    if num_experts * rank < dense_floor_rank(x.device):
        return "dense"
    in_dim = rank if shares_A(lora_A, lora_B) else in_features  # shared A: the kernels run on h = A x
    why_not = unsupported(num_experts, rank, x.dtype, in_dim, lora_B.shape[1])
    if _triton_installed() and why_not is None:
        return "triton"
    hint = f"outside the Triton kernels' checked domain: {why_not}" if _triton_installed() else "`pip install triton`"
    major = torch.cuda.get_device_capability(x.device)[0]
    aligned = all(n % 8 == 0 for n in (in_features, lora_B.shape[1], rank))
    if major >= 9 and x.dtype == torch.bfloat16 and aligned and hasattr(torch.nn.functional, "grouped_mm"):
        warn_once(f"molora: expert_impl='auto' uses 'grouped' (F.grouped_mm) ({hint})")
        return "grouped"
    choice = "hybrid" if num_experts * rank <= _HYBRID_MAX_RANK else "grouped"
    warn_once(
        f"molora: expert_impl='auto' falls back to {choice!r} on this GPU/dtype ({x.dtype}, sm{major}x): "
        f"no F.grouped_mm kernel ({hint})"
    )
    return choice


@torch.compiler.assume_constant_result
def _num_threads() -> int:
    """torch's thread count; a constant of the graph under ``torch.compile`` (no graph break)."""
    return torch.get_num_threads()


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None
