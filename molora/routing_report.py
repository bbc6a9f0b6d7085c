"""Routing statistics of a MoLoRA model: per-layer, per-task expert load, as a table and a PNG.

``MoLoRAModel`` accumulates, per layer, over the forwards since ``reset_routing_stats()``:
``tokens``, ``load`` (N,) (tokens routed to each expert) and ``gates`` (N,) (summed gate
weights), and per task (when the number of tasks is known: ``config.num_tasks`` or
``config.task_names``) the same as (num_tasks, N) rows. :func:`accumulate` does it without
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

__all__ = ["accumulate", "format_routing", "plot_routing", "routing_report"]


@torch.no_grad()
def accumulate(
    stats: dict[str, torch.Tensor],
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    task_ids: torch.Tensor | None,
    num_tasks: int | None,
) -> None:
    """Add one forward's routing of one layer to ``stats`` (in place).

    Args:
        stats: the layer's running sums (empty at first).
        weights: (T, N) combine weights of the layer's tokens.
        mask: (T,) 1 for real tokens, or None (all real).
        task_ids: (batch,) task id per sequence, or None.
        num_tasks: the number of tasks (None: no per-task sums).
    """
    w = weights.detach().float()  # (T, N)
    real = torch.ones(w.shape[0], device=w.device) if mask is None else mask.to(w.device, torch.float32)  # (T,)
    chosen = (w > 0).float()  # (T, N)
    _add(stats, "tokens", real.sum())
    _add(stats, "load", real @ chosen)  # (N,)
    _add(stats, "gates", real @ w)  # (N,)
    if task_ids is None or not num_tasks or w.shape[0] % task_ids.numel():
        return
    per_token = task_ids.to(w.device).long().repeat_interleave(w.shape[0] // task_ids.numel())  # (T,)
    onehot = torch.nn.functional.one_hot(per_token, num_tasks).float() * real[:, None]  # (T, tasks)
    _add(stats, "task_tokens", onehot.sum(0))  # (tasks,)
    _add(stats, "task_load", onehot.T @ chosen)  # (tasks, N)
    _add(stats, "task_gates", onehot.T @ w)  # (tasks, N)


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
        entry: dict[str, Any] = {"all": _norm(s["load"], s["gates"], tokens), "tasks": {}}
        if "task_tokens" in s:
            for t, n in enumerate(s["task_tokens"].tolist()):
                if n > 0:
                    name = task_names[t] if task_names and t < len(task_names) else str(t)
                    entry["tasks"][name] = _norm(s["task_load"][t], s["task_gates"][t], n)
        out[layer] = entry
    return out


def _norm(load: torch.Tensor, gates: torch.Tensor, tokens: float) -> dict[str, Any]:
    scale = 1.0 / max(tokens, 1.0)
    return {
        "load": (load * scale).cpu().tolist(),
        "gates": (gates * scale).cpu().tolist(),
        "tokens": int(tokens),
        "experts_per_token": float(load.sum()) * scale,
    }


def format_routing(report: Mapping[str, Any]) -> str:
    """A terminal table: one row per layer and task, the load of each expert in percent."""
    if not report:
        return "no routing statistics: run forwards with model.track_routing_stats = True first"
    n = len(next(iter(report.values()))["all"]["load"])
    width = max(len(layer) for layer in report)
    tasks = sorted({t for entry in report.values() for t in entry["tasks"]})
    tw = max([4] + [len(t) for t in tasks])
    head = f"{'layer':<{width}}  {'task':<{tw}}  " + " ".join(f"{'e' + str(i):>6}" for i in range(n)) + "  tokens  k/tok"
    lines = [head, "-" * len(head)]
    for layer, entry in report.items():
        for i, (task, row) in enumerate([("all", entry["all"]), *entry["tasks"].items()]):
            cells = " ".join(f"{100 * v:>5.1f}%" for v in row["load"])
            k_mean = row.get("experts_per_token", sum(row["load"]))
            lines.append(f"{layer if i == 0 else '':<{width}}  {task:<{tw}}  {cells}  {row['tokens']:>6}  {k_mean:5.2f}")
    lines.append("(load: % of the real tokens routed to each expert, sums to k x 100%; k/tok: mean experts per token)")
    return "\n".join(lines)


def plot_routing(report: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """Write a heat map per task (rows: layers, columns: experts, colour: load) to ``path`` (PNG).

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(report)
    groups = sorted({t for entry in report.values() for t in entry["tasks"]}) or ["all"]
    fig, axes = plt.subplots(1, len(groups), figsize=(2 + 2.5 * len(groups), 1 + 0.3 * len(layers)), squeeze=False)
    for ax, group in zip(axes[0], groups):
        rows = [(report[layer]["tasks"].get(group) or report[layer]["all"])["load"] for layer in layers]
        image = ax.imshow(rows, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(group)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(layers)), layers if ax is axes[0][0] else [""] * len(layers), fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), label="load")
    fig.suptitle(title or "expert load per layer and task")
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
