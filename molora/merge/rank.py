"""``rank="auto"``: the smallest export rank whose truncation error is within a tolerance.

The relative Frobenius error of the best rank-k approximation of one layer's dW is
sqrt(sum_{j>k} S_j^2 / sum_j S_j^2) (Eckart-Young), read off the singular values that
:func:`molora.merge.factors.singular_values` computes from the factors (never out x in).
The chosen rank is the smallest candidate whose error is <= ``tolerance`` on every layer:
any rank for a PEFT export, a rank of vLLM's set for ``target="vllm"`` (at most 512, vLLM's
largest, even where the exact rank is larger: 16 experts of r=64 on a 4096-wide layer). When the exact
"cat" factors are not larger than that rank (padded to vLLM's set for vLLM), "cat" is
used instead: exact and no bigger.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from molora.core.shared import shares_A
from molora.merge.factors import layer_singular_values, truncation_error
from molora.merge.vllm import VLLM_RANKS, vllm_rank

__all__ = ["cat_rank", "choose_rank", "format_rank_table"]


def _spectra(
    layers: Mapping[str, Any], gates: Mapping[str, torch.Tensor], task: int | None = None
) -> dict[str, torch.Tensor]:
    """{layer: (m,) singular values of its dW} and the exact "cat" rank of each layer."""
    out = {}
    with torch.no_grad():
        for name, layer in layers.items():
            out[name] = layer_singular_values(layer, gates[name], task)
    return out


def cat_rank(layer: Any, gates: torch.Tensor) -> int:
    """The rank of the "cat" factors of one layer, from its structure (as
    :func:`molora.merge.factors.cat_factors` builds them): r per routed expert with a nonzero
    gate (r in all with a shared A, 0 when every gate is 0), plus r per shared expert."""
    used = int((gates != 0).sum())
    routed = (layer.r if used else 0) if shares_A(layer.lora_A, layer.lora_B) else used * layer.r
    return routed + getattr(layer, "num_shared_experts", 0) * layer.r


def _residual_rows(layer: Any, task: int | None) -> int:
    """Rows PiSSA's frozen residual adds to a layer's "cat" merge (0 without PiSSA)."""
    if getattr(layer, "pissa_B", None) is None:
        return 0
    gates = layer.pissa_gates[0 if layer.pissa_gates.shape[0] == 1 or task is None else int(task)]
    return int((gates != 0).sum()) * layer.r


def _row(spectra: Mapping[str, torch.Tensor], rank: int) -> dict[str, Any]:
    errors = {name: truncation_error(s, rank) for name, s in spectra.items()}
    worst = max(errors, key=errors.get)
    return {"rank": rank, "max_rel_error": errors[worst], "worst_layer": worst}


def choose_rank(
    layers: Mapping[str, Any],
    gates: Mapping[str, torch.Tensor],
    *,
    tolerance: float,
    target: str,
    task: int | None = None,
) -> tuple[str, int | None, dict[str, Any]]:
    """The method and rank of a ``rank="auto"`` export, and its rank-versus-error table.

    Args:
        layers: ``{name: MoLoRALinear}``.
        gates: ``{name: (N,)}`` static gates.
        tolerance: the largest relative Frobenius error allowed on any layer, >= 0.
        target: ``"peft"`` (any rank) or ``"vllm"`` (a rank of :data:`VLLM_RANKS`).
        task: the task whose PiSSA residual a task-router merge includes (None: no task).

    Returns:
        ``(method, rank, auto)``: ``("cat", None, ...)`` or ``("svd", k, ...)``; ``auto`` is
        ``{"tolerance", "method", "rank", "cat_rank", "table": [{"rank", "max_rel_error",
        "worst_layer"}]}`` for the candidate ranks up to the exact one; ``auto["rank"]`` is the
        rank the export writes (for "cat": the largest layer's cat rank, padded to vLLM's set
        for vLLM), ``auto["cat_rank"]`` the cat rank counted from the structure (shared A and
        shared experts included: :func:`cat_rank`).

    Raises:
        ValueError: a negative or non-finite ``tolerance``; for vLLM, no rank up to 512 within it.
    """
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < float("inf")):
        raise ValueError(f"`tolerance` must be a finite number >= 0, got {tolerance!r}")
    spectra = _spectra(layers, gates, task)
    cat = max(cat_rank(layer, gates[n]) + _residual_rows(layer, task) for n, layer in layers.items())
    exact = max(1, max(s.numel() for s in spectra.values()))  # rank at which every layer is exact
    if target == "vllm":
        return _choose_vllm(spectra, cat, exact, tolerance)
    candidates = sorted({2**j for j in range(exact.bit_length()) if 2**j < exact} | {exact})
    table = [_row(spectra, k) for k in candidates]
    rank = next(k for k in range(1, exact + 1) if _row(spectra, k)["max_rel_error"] <= tolerance)
    if rank not in candidates:
        table = sorted([*table, _row(spectra, rank)], key=lambda row: row["rank"])
    use_cat = 1 <= cat <= rank
    return _result("cat" if use_cat else "svd", cat if use_cat else rank, cat, tolerance, table)


def _choose_vllm(
    spectra: Mapping[str, torch.Tensor], cat: int, exact: int, tolerance: float
) -> tuple[str, int | None, dict[str, Any]]:
    """:func:`choose_rank` for vLLM: candidates from vLLM's set, at most its largest rank (512).

    Raises:
        ValueError: even rank 512 misses ``tolerance`` on some layer.
    """
    top = VLLM_RANKS[-1]
    candidates = [k for k in VLLM_RANKS if k < min(exact, top)] + [vllm_rank(min(exact, top))]
    table = [_row(spectra, k) for k in candidates]
    within = [row["rank"] for row in table if row["max_rel_error"] <= tolerance]
    if not within:
        worst = table[-1]
        raise ValueError(
            f"rank='auto', target='vllm': vLLM serves LoRA ranks up to {top}, and rank {table[-1]['rank']} has a "
            f"relative error of {worst['max_rel_error']:.3g} on {worst['worst_layer']!r}, above tolerance={tolerance:g} "
            f"(the exact rank is {exact}): raise `tolerance`, or export with target='peft'"
        )
    rank = within[0]
    use_cat = 1 <= cat <= top and vllm_rank(cat) <= rank
    return _result("cat" if use_cat else "svd", vllm_rank(cat) if use_cat else rank, cat, tolerance, table)


def _result(
    method: str, rank: int, cat: int, tolerance: float, table: list[dict[str, Any]]
) -> tuple[str, int | None, dict[str, Any]]:
    """``(method, svd rank or None, auto)``; ``auto["rank"]`` is the rank the export writes."""
    auto = {"tolerance": tolerance, "method": method, "rank": rank, "cat_rank": cat, "table": table}
    return method, None if method == "cat" else rank, auto


def format_rank_table(auto: Mapping[str, Any]) -> str:
    """The rank-versus-error table of a ``rank="auto"`` export, the chosen row marked."""
    lines = [f"{'rank':>5}  {'max rel. error':>14}  worst layer"]
    for row in auto["table"]:
        mark = "  <- chosen" if row["rank"] == auto["rank"] else ""
        worst = row["worst_layer"] if row["max_rel_error"] > 0 else "-"
        lines.append(f"{row['rank']:>5}  {row['max_rel_error']:>14.3e}  {worst}{mark}")
    how = "cat (exact)" if auto["method"] == "cat" else f"svd rank {auto['rank']}"
    lines.append(f"tolerance {auto['tolerance']:g}: {how}; exact cat would be rank {auto['cat_rank']}")
    return "\n".join(lines)
