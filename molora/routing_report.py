"""Routing statistics of a MoLoRA model: per-layer, per-task expert load, gate mass and gate
entropy, as a table and a PNG.

``MoLoRAModel`` accumulates, per layer, over the forwards since ``reset_routing_stats()``:
``tokens``, ``load`` (N,) (tokens routed to each expert), ``gates`` (N,) (summed gate
weights), ``entropy`` and ``max_gate`` (summed per-token normalized entropy and largest value
of the router's probabilities p = softmax(logits) over all N experts, the gates before any
top-k: they say how specialized the routing is, for dense and sparse routers alike), and
per task (when the number of tasks is known: ``config.num_tasks`` or ``config.task_names``)
the same as (num_tasks, N) or (num_tasks,) rows. :func:`accumulate` does it without
asking the device for a value (masks multiply, tasks are a one-hot matmul), so statistics
stay on during compiled or graph-captured evaluation.

This module sits beside :mod:`molora.merge` below :mod:`molora.model`, so that the model's
``print_routing()`` / ``routing_report()`` need nothing from ``molora.apps``; matplotlib is
imported only by :func:`plot_routing`, and only when it is installed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from molora.core.routing_health import gate_entropy, is_dense

__all__ = ["accumulate", "format_routing", "heatmap_norm", "plot_routing", "routing_report"]


@torch.no_grad()
def accumulate(
    stats: dict[str, torch.Tensor],
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    task_ids: torch.Tensor | None,
    num_tasks: int | None,
    probs: torch.Tensor | None = None,
) -> None:
    """Add one forward's routing of one layer to ``stats`` (in place).

    Args:
        stats: the layer's running sums (empty at first).
        weights: (T, N) combine weights of the layer's tokens.
        mask: (T,) 1 for real tokens, or None (all real).
        task_ids: (batch,) task id per sequence, or None.
        num_tasks: the number of tasks (None: no per-task sums).
        probs: (T, N) the router's probabilities softmax(logits), or None (no entropy sums).
    """
    w = weights.detach().float()  # (T, N)
    real = torch.ones(w.shape[0], device=w.device) if mask is None else mask.to(w.device, torch.float32)  # (T,)
    chosen = (w > 0).float()  # (T, N)
    per_token = {"load": chosen, "gates": w}  # key -> (T, N) or (T,)
    if probs is not None:
        p = probs.detach().float()  # (T, N)
        per_token.update(entropy=gate_entropy(p), max_gate=p.max(dim=-1).values)  # (T,) each
    _add(stats, "tokens", real.sum())
    for key, value in per_token.items():
        _add(stats, key, real @ value)  # (N,) or ()
    if task_ids is None or not num_tasks or w.shape[0] % task_ids.numel():
        return
    token_task = task_ids.to(w.device).long().repeat_interleave(w.shape[0] // task_ids.numel())  # (T,)
    onehot = torch.nn.functional.one_hot(token_task, num_tasks).float() * real[:, None]  # (T, tasks)
    _add(stats, "task_tokens", onehot.sum(0))  # (tasks,)
    for key, value in per_token.items():
        _add(stats, f"task_{key}", onehot.T @ value)  # (tasks, N) or (tasks,)


def _add(stats: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    stats[key] = stats[key] + value if key in stats else value


def routing_report(stats: Mapping[str, Mapping[str, torch.Tensor]], task_names: list[str] | None = None) -> dict:
    """``{layer: {"all": {"load", "gates", "tokens"}, "tasks": {task: {...}}}}`` from the sums.

    ``load`` is the fraction of real tokens routed to each expert (sums to k), ``gates`` the
    mean gate weight per expert; ``tasks`` holds the tasks that had tokens.
    """
    out = {}
    for layer, s in stats.items():
        tokens = float(s["tokens"])
        entry: dict[str, Any] = {"all": _norm(s, "", None, tokens), "tasks": {}}
        if "task_tokens" in s:
            for t, n in enumerate(s["task_tokens"].tolist()):
                if n > 0:
                    name = task_names[t] if task_names and t < len(task_names) else str(t)
                    entry["tasks"][name] = _norm(s, "task_", t, n)
        out[layer] = entry
    return out


def _norm(s: Mapping[str, torch.Tensor], prefix: str, task: int | None, tokens: float) -> dict[str, Any]:
    """One row of the report: the sums ``s[prefix + key]`` (row ``task`` when per task) per token."""
    scale = 1.0 / max(tokens, 1.0)

    def get(key: str) -> torch.Tensor:
        value = s[prefix + key]
        return value if task is None else value[task]

    load = get("load")
    row = {
        "load": (load * scale).cpu().tolist(),
        "gates": (get("gates") * scale).cpu().tolist(),
        "tokens": int(tokens),
        "experts_per_token": float(load.sum()) * scale,
    }
    if prefix + "entropy" in s:
        row["entropy"] = float(get("entropy")) * scale
        row["max_gate"] = float(get("max_gate")) * scale
    return row


def format_routing(report: Mapping[str, Any]) -> str:
    """A terminal table: one row per layer and task. Sparse routers (topk, topp): the load of
    each expert in percent. Dense routers (soft, task), whose load is always 100%: the gate
    mass of each expert. Both: the normalized gate entropy (1 = uniform) and the mean largest gate."""
    if not report:
        return "no routing statistics: run forwards with model.track_routing_stats = True first"
    first = next(iter(report.values()))["all"]
    n, dense = len(first["load"]), is_dense(first)
    key = "gates" if dense else "load"
    width = max(len(layer) for layer in report)
    tasks = sorted({t for entry in report.values() for t in entry["tasks"]})
    tw = max([4] + [len(t) for t in tasks])
    head = (
        f"{'layer':<{width}}  {'task':<{tw}}  "
        + " ".join(f"{'e' + str(i):>6}" for i in range(n))
        + "  entropy  max gate  tokens  k/tok"
    )
    lines = [head, "-" * len(head)]
    for layer, entry in report.items():
        for i, (task, row) in enumerate([("all", entry["all"]), *entry["tasks"].items()]):
            cells = " ".join(f"{100 * v:>5.1f}%" for v in row[key])
            k_mean = row.get("experts_per_token", sum(row["load"]))
            ent = f"{row['entropy']:7.3f}  {row['max_gate']:8.3f}" if "entropy" in row else f"{'-':>7}  {'-':>8}"
            name = layer if i == 0 else ""
            lines.append(f"{name:<{width}}  {task:<{tw}}  {cells}  {ent}  {row['tokens']:>6}  {k_mean:5.2f}")
    if dense:
        lines.append(
            "(dense router: every token uses every expert, so the load is always 100%; shown instead: the gate mass, "
            "% of the gate weight per expert, sums to 100%)"
        )
    else:
        lines.append("(load: % of the real tokens routed to each expert, sums to k x 100%; k/tok: mean experts per token)")
    lines.append(
        f"(entropy: mean normalized entropy of the router's probabilities, 1 = uniform, 0 = one expert; max gate: "
        f"their mean largest value, uniform = 1/N = {1 / n:.3f})"
    )
    return "\n".join(lines)


def heatmap_norm(num_experts: int, center: float):
    """A matplotlib colour norm on [0, 1] with white at ``center`` (the value of uniform
    routing: 1/N for gate mass, k/N for load), so that uniform routing looks flat and pale
    and a preferred expert stands out, whatever the spread of the data (a colour scale
    stretched to the data's own range makes 0.24-vs-0.26 look like specialization)."""
    from matplotlib.colors import Normalize, TwoSlopeNorm

    if num_experts < 2 or not 0.0 < center < 1.0:
        return Normalize(vmin=0.0, vmax=1.0)
    return TwoSlopeNorm(vcenter=center, vmin=0.0, vmax=1.0)


def plot_routing(report: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """Write a heat map per task (rows: layers, columns: experts) to ``path`` (PNG): gate mass
    for dense routers, load for sparse ones, on a fixed [0, 1] scale that is white at uniform
    routing (:func:`heatmap_norm`).

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(report)
    groups = sorted({t for entry in report.values() for t in entry["tasks"]}) or ["all"]
    fig, axes = plt.subplots(1, len(groups), figsize=(2 + 2.5 * len(groups), 1 + 0.3 * len(layers)), squeeze=False)
    first = report[layers[0]]["all"]
    key, n = ("gates" if is_dense(first) else "load"), len(first["load"])
    center = 1.0 / n if key == "gates" else first.get("experts_per_token", 1.0) / n
    for ax, group in zip(axes[0], groups):
        rows = [(report[layer]["tasks"].get(group) or report[layer]["all"])[key] for layer in layers]
        image = ax.imshow(rows, aspect="auto", norm=heatmap_norm(n, center), cmap="RdBu_r")
        ax.set_title(group)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(layers)), layers if ax is axes[0][0] else [""] * len(layers), fontsize=6)
    label = "gate mass per expert" if key == "gates" else "load (share of tokens)"
    fig.colorbar(image, ax=axes[0].tolist(), label=f"{label}; white = uniform")
    fig.suptitle(title or f"{label} per layer and task", y=1.04)
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
