"""``rank="auto"``: the smallest export rank whose truncation error is within a tolerance.

The relative Frobenius error of the best rank-k approximation of one layer's dW is
sqrt(sum_{j>k} S_j^2 / sum_j S_j^2) (Eckart-Young), read off the singular values that
:func:`molora.merge.factors.singular_values` computes from the factors (never out x in).
The chosen rank is the smallest candidate whose error is <= ``tolerance`` on every layer:
any rank for a PEFT export, a rank of vLLM's set for ``target="vllm"``. When the exact
"cat" factors are not larger than that rank (padded to vLLM's set for vLLM), "cat" is
used instead: exact and no bigger.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from molora.merge.factors import layer_singular_values, truncation_error
from molora.merge.vllm import VLLM_RANKS, vllm_rank

__all__ = ["choose_rank", "format_rank_table"]


def _spectra(
    layers: Mapping[str, Any], gates: Mapping[str, torch.Tensor], task: int | None = None
) -> dict[str, torch.Tensor]:
    """{layer: (m,) singular values of its dW} and the exact "cat" rank of each layer."""
    out = {}
    with torch.no_grad():
        for name, layer in layers.items():
            out[name] = layer_singular_values(layer, gates[name], task)
    return out


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
        "worst_layer"}]}`` for the candidate ranks up to the exact one.

    Raises:
        ValueError: a negative or non-finite ``tolerance``.
    """
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < float("inf")):
        raise ValueError(f"`tolerance` must be a finite number >= 0, got {tolerance!r}")
    spectra = _spectra(layers, gates, task)
    cat_rank = max(int((gates[n] != 0).sum()) * layer.r + _residual_rows(layer, task) for n, layer in layers.items())
    exact = max(1, max(s.numel() for s in spectra.values()))  # rank at which every layer is exact
    if target == "vllm":
        candidates = [k for k in VLLM_RANKS if k < vllm_rank(exact)] + [vllm_rank(exact)]
    else:
        candidates = sorted({2**j for j in range(exact.bit_length()) if 2**j < exact} | {exact})
    table = [_row(spectra, k) for k in candidates]
    if target == "vllm":
        rank = next(row["rank"] for row in table if row["max_rel_error"] <= tolerance)
        use_cat = cat_rank >= 1 and vllm_rank(cat_rank) <= rank
    else:
        rank = next(k for k in range(1, exact + 1) if _row(spectra, k)["max_rel_error"] <= tolerance)
        use_cat = 1 <= cat_rank <= rank
        if rank not in candidates:
            table = sorted([*table, _row(spectra, rank)], key=lambda row: row["rank"])
    method = "cat" if use_cat else "svd"
    auto = {"tolerance": tolerance, "method": method, "rank": rank, "cat_rank": cat_rank, "table": table}
    return method, None if use_cat else rank, auto


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
