"""Grouped matrix multiplies over contiguous row segments ("jagged" groups), one call for all groups.

Rows of the left operand are sorted by group (expert) and group g owns rows
``offs[g-1]:offs[g]``. Two forms are needed by a grouped LoRA forward and backward:

- :func:`gmm`        a (M, K) x b (G, K, P)  -> (M, P):    row block g times b[g]
- :func:`gmm_wgrad`  a (M, K), b (M, P)      -> (G, K, P): sum over the rows of block g of a^T b

Both use ``torch.nn.functional.grouped_mm`` (one kernel, CPU and CUDA) where this torch has it
and the operands meet its layout rules (16-byte aligned strides), and otherwise a padded
``bmm`` over a (G, C, K) buffer (C = largest group), which is also the reference that the
tests compare against. Neither form loops over groups in Python.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from molora.core.log import warn_once

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def _aligned(*tensors: torch.Tensor) -> bool:
    """The layout ``F.grouped_mm`` accepts: a 16-byte aligned base, one of the last two dims
    with unit stride and every other stride a multiple of 16 bytes (conservative)."""
    for t in tensors:
        if t.data_ptr() % 16:
            return False
        align = max(1, 16 // t.element_size())
        rows, cols = t.stride()[-2], t.stride()[-1]
        if cols == 1:
            lead = rows
        elif rows == 1:
            lead = cols
        else:
            return False
        if lead % align or (t.dim() == 3 and t.stride(0) % align):
            return False
    return True


def _use_grouped_mm(a: torch.Tensor, b: torch.Tensor, use_kernel: bool) -> bool:
    """Whether to call ``F.grouped_mm`` on these operands.

    On CPU torch runs it as one ``mm`` per group; on CUDA it is a CUTLASS grouped GEMM for
    bf16 on sm90+ (and a per-group ``mm`` loop elsewhere in recent torch). Both check that
    strides are 16-byte multiples, which the padded fallback does not need.
    """
    if not (use_kernel and _HAS_GROUPED_MM and a.dtype == b.dtype and a.device == b.device):
        return False
    return _aligned(a, b)


_DEVICE_ERRORS = tuple(
    cls for cls in (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", None)) if cls is not None
)


def _reraise_unless_unsupported(err: RuntimeError, a: torch.Tensor) -> None:
    """Re-raise ``err`` unless it is ``F.grouped_mm`` rejecting this device or dtype.

    Out-of-memory and device errors (``torch.AcceleratorError``, "CUDA error: ...") are never
    swallowed: the padded fallback needs more memory and a failed device stays failed. On CPU
    every error is re-raised (there torch's grouped GEMM accepts whatever ``_aligned`` lets
    through). What is left falls back to the padded bmm, with one warning per reason.
    """
    if a.device.type == "cpu" or isinstance(err, _DEVICE_ERRORS) or "CUDA error" in str(err):
        raise err
    warn_once(
        f"molora: F.grouped_mm rejected {a.dtype} on {a.device.type} ({str(err).splitlines()[0][:200]}); "
        "using the slower padded-bmm grouped GEMM"
    )


def _row_slots(offs: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) group of each row and (M,) position of each row inside its group."""
    ends = offs.long()
    group = torch.bucketize(torch.arange(num_rows, device=offs.device), ends, right=True)  # (M,)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])  # (G,)
    return group, torch.arange(num_rows, device=offs.device) - starts[group]


def _to_padded(a: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, num_groups: int, capacity: int):
    buf = a.new_zeros(num_groups, capacity, a.shape[-1])  # (G, C, K)
    buf[group, slot] = a
    return buf


def gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, use_kernel: bool = True) -> torch.Tensor:
    """Grouped a @ b[g] for each row block g.

    Under ``torch.compile`` this is the opaque custom op ``molora::gmm``: its output shape does
    not depend on ``offs``, but the kernel choice (strides, the padded capacity) reads values,
    which would break the graph.

    Args:
        a: (M, K) rows sorted by group.
        b: (G, K, P) one matrix per group.
        offs: (G,) int32 cumulative row counts (end of each group); offs[-1] == M.
        use_kernel: use ``F.grouped_mm`` where possible (False forces the padded-bmm path).

    Returns:
        (M, P) in a's dtype.
    """
    if torch.compiler.is_compiling():
        return torch.ops.molora.gmm(a, b, offs, use_kernel)
    return _gmm(a, b, offs, use_kernel)


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, use_kernel: bool) -> torch.Tensor:
    num_rows, num_groups = a.shape[0], b.shape[0]
    if num_rows == 0:
        return a.new_zeros(0, b.shape[-1])
    if _use_grouped_mm(a, b, use_kernel):
        try:
            return F.grouped_mm(a, b, offs=offs)
        except RuntimeError as err:  # a device/dtype this torch's grouped GEMM rejects: padded fallback
            _reraise_unless_unsupported(err, a)
    group, slot = _row_slots(offs, num_rows)
    capacity = int(slot.max()) + 1
    out = torch.bmm(_to_padded(a, group, slot, num_groups, capacity), b)  # (G, C, P)
    return out[group, slot]


def gmm_wgrad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, use_kernel: bool = True) -> torch.Tensor:
    """Per-group a[rows of g]^T @ b[rows of g], the weight gradient of :func:`gmm`.

    Args:
        a: (M, K) rows sorted by group.
        b: (M, P) rows sorted the same way.
        offs: (G,) int32 cumulative row counts.

    Returns:
        (G, K, P); zeros for groups with no rows.

    On CPU the per-group GEMMs are about twice as fast with K <= P (a thin left factor), so
    callers pick the orientation: ``gmm_wgrad(b, a).transpose(1, 2)`` gives the same result.
    Under ``torch.compile`` this is the custom op ``molora::gmm_wgrad`` (see :func:`gmm`).
    """
    if torch.compiler.is_compiling():
        return torch.ops.molora.gmm_wgrad(a, b, offs, use_kernel)
    return _gmm_wgrad(a, b, offs, use_kernel)


def _gmm_wgrad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, use_kernel: bool) -> torch.Tensor:
    num_rows, num_groups = a.shape[0], offs.shape[0]
    if num_rows == 0:
        return a.new_zeros(num_groups, a.shape[-1], b.shape[-1])
    a_t = a.t()  # (K, M)
    if _use_grouped_mm(a_t, b, use_kernel):
        try:
            return F.grouped_mm(a_t, b, offs=offs)
        except RuntimeError as err:  # see gmm
            _reraise_unless_unsupported(err, a)
    group, slot = _row_slots(offs, num_rows)
    capacity = int(slot.max()) + 1
    pa = _to_padded(a, group, slot, num_groups, capacity)  # (G, C, K)
    pb = _to_padded(b, group, slot, num_groups, capacity)  # (G, C, P)
    return torch.bmm(pa.transpose(1, 2), pb)  # (G, K, P)


# Opaque to torch.compile: shapes are static ((M, P) and (G, K, P)), values are not looked at.
# Outside compilation gmm / gmm_wgrad call the functions directly (no dispatcher overhead).
_gmm_op = torch.library.custom_op("molora::gmm", _gmm, mutates_args=())
_gmm_wgrad_op = torch.library.custom_op("molora::gmm_wgrad", _gmm_wgrad, mutates_args=())


@_gmm_op.register_fake
def _gmm_fake(a, b, offs, use_kernel):
    return a.new_empty(a.shape[0], b.shape[-1])


@_gmm_wgrad_op.register_fake
def _gmm_wgrad_fake(a, b, offs, use_kernel):
    return a.new_empty(offs.shape[0], a.shape[-1], b.shape[-1])
