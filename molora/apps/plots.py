"""Every plot of molora's apps: expert-load heatmaps per task and layer, metric curves, and the
demo's gate-weight grid (model x task).

matplotlib is optional (``pip install 'molora[plot]'``); :func:`require_matplotlib` raises an
ImportError that says so. Figures are written with the non-interactive Agg backend, through a
temporary file and a rename.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from molora.routing_report import heatmap_norm

__all__ = [
    "DENSE_ROUTERS",
    "plot_gate_grid",
    "plot_metrics",
    "plot_routing",
    "require_matplotlib",
    "routing_quantity",
    "short_layer_name",
]

MATPLOTLIB_HINT = "matplotlib is not installed; install it with `pip install 'molora[plot]'` (or `pip install matplotlib`) to write plots"


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend.

    Raises:
        ImportError: matplotlib is missing (the message says how to install it).
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(MATPLOTLIB_HINT) from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def short_layer_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3.self_attn.q_proj``."""
    for prefix in ("model.layers.", "transformer.h.", "model.decoder.layers.", "encoder.layer.", "layers."):
        if prefix in name:
            return name.split(prefix, 1)[1]
    return name


DENSE_ROUTERS = ("soft", "task")  # every token uses every expert: the load is all ones


def routing_quantity(router: str | None, stats: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """Which routing statistic shows a router's preferences, and its colorbar label.

    Dense routers (soft, task) send every token to every expert, so the share of tokens that
    pick an expert is always 1: their mean gate weight is plotted. Sparse routers (topk, topp)
    show their load, the share of tokens routed to each expert. Without a router name, a load
    of all ones marks a dense router.

    Args:
        router: ``MoLoRAConfig.router``, or None when unknown.
        stats: ``{layer: {"load": [N], "gates": [N], ...}}`` of one task.

    Returns:
        ``(key, label)``: ``"gates"`` or ``"load"``, and the colorbar label.
    """
    loads = [x for s in stats.values() for x in s["load"]]
    dense = router in DENSE_ROUTERS if router else bool(loads) and all(abs(x - 1) < 1e-6 for x in loads)
    if dense and all("gates" in s for s in stats.values()):
        return "gates", "mean gate weight per token"
    return "load", "fraction of tokens routed to the expert (load)"


def plot_routing(
    routing: dict[str, dict[str, dict[str, Any]]],
    path: str | os.PathLike,
    *,
    title: str = "",
    router: str | None = None,
) -> Path:
    """Heatmap per task and layer of what the router prefers (:func:`routing_quantity`): the
    mean gate weight for dense routers, the load for sparse ones; the colorbar says which.

    Args:
        routing: ``{task: {layer: {"load": [N], "gates": [N], ...}}}``, as in an eval record of
            ``metrics.jsonl``.
        path: the PNG to write.
        title: figure title.
        router: the model's router (None: guessed from the load).

    Returns:
        The written path.
    """
    plt = require_matplotlib()
    import numpy as np

    tasks = list(routing)
    if not tasks:
        raise ValueError("`routing` is empty: the run has no eval routing statistics")
    key, label = routing_quantity(router, routing[tasks[0]])
    layers = list(routing[tasks[0]])
    n_exp = len(routing[tasks[0]][layers[0]][key])
    grids = [np.array([routing[t][layer][key] for layer in layers]) for t in tasks]  # (L, N) per task
    # a fixed [0, 1] scale, white at uniform routing (1/N of the gate mass, k/N of the load):
    # scaled to the data's own range, gates of 0.24..0.26 would look as specialized as 0..1
    first = routing[tasks[0]][layers[0]]
    center = 1.0 / n_exp if key == "gates" else first.get("experts_per_token", sum(first["load"])) / n_exp
    norm = heatmap_norm(n_exp, center)
    height = min(2 + 0.22 * len(layers), 40)
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(1.2 + (0.45 * n_exp + 0.8) * len(tasks) + 2.5, height), squeeze=False, sharey=True
    )
    image = None
    for ax, task, grid in zip(axes[0], tasks, grids):
        image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(n_exp))
    axes[0][0].set_yticks(range(len(layers)))
    axes[0][0].set_yticklabels([short_layer_name(layer) for layer in layers], fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), label=f"{label} (white: uniform routing)")
    fig.suptitle(title or f"{label} per task and layer")
    return _save(fig, plt, path)


def plot_metrics(records: list[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Training loss (and aux loss), per-task eval loss and per-task eval accuracy vs step.

    Args:
        records: the parsed lines of ``metrics.jsonl``.
        path: the PNG to write.
        title: figure title.

    Returns:
        The written path.
    """
    plt = require_matplotlib()
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["loss"] for r in train], label="loss")
        if all("aux_loss" in r for r in train):
            twin = axes[0].twinx()
            twin.plot(steps, [r["aux_loss"] for r in train], color="tab:orange", alpha=0.6, label="aux loss")
            twin.set_ylabel("aux (balance) loss")
    axes[0].set_title("train loss")
    axes[0].set_ylabel("loss (with router losses)")
    tasks = list(evals[-1]["tasks"]) if evals else []
    for task in tasks:
        points = [(r["step"], r["tasks"][task]) for r in evals if task in r["tasks"]]
        axes[1].plot([s for s, _ in points], [m["loss"] for _, m in points], marker="o", label=task)
        axes[2].plot([s for s, _ in points], [m["accuracy"] for _, m in points], marker="o", label=task)
    axes[1].set_title("eval loss per task")
    axes[2].set_title("eval accuracy per task")
    for ax in axes:
        ax.set_xlabel("step")
    if tasks:
        axes[1].legend(fontsize=8)
        axes[2].legend(fontsize=8)
    fig.suptitle(title or "metrics")
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_gate_grid(routing: dict[str, dict[str, dict[str, Any]]], path: str | os.PathLike, *, title: str) -> Path:
    """Per model (row) and task (column), a (layer x expert) heatmap of routing preferences.

    As ``molora inspect`` (:func:`routing_quantity`): the mean gate weight per real token for
    dense routers (soft, task; their load is always 1), the load (share of tokens routed to the
    expert) for sparse ones; each panel's title says which. Layers are labelled as ``L3 query``.

    Args:
        routing: ``{model: {task: {layer: {"gates": (N,) tensor or array, ...}}}}``.
        path: the PNG to write.
        title: figure title.

    Returns:
        The written path.
    """
    plt = require_matplotlib()
    import numpy as np

    models = list(routing)
    task_names = list(next(iter(routing.values())))
    fig, axes = plt.subplots(
        len(models),
        len(task_names),
        figsize=(3.2 * len(task_names), 0.3 * 12 + 2.2 * len(models)),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for i, key in enumerate(models):
        for j, task in enumerate(task_names):
            stats = routing[key][task]
            layers = list(stats)
            quantity, _ = routing_quantity(None, stats)
            gates = np.stack([np.asarray(stats[name][quantity]) for name in layers])  # (layers, N)
            ax = axes[i][j]
            image = ax.imshow(gates, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(f"{key}: {task} ({'gate weight' if quantity == 'gates' else 'load'})", fontsize=9)
            ax.set_xticks(range(gates.shape[1]))
            ax.set_xlabel("expert", fontsize=8)
            ax.set_yticks(range(len(layers)))
            ax.set_yticklabels([_layer_label(n) for n in layers] if j == 0 else [], fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="mean gate weight (dense routers) or load (sparse), test set")
    fig.suptitle(title)
    return _save(fig, plt, path, dpi=110, bbox_inches=None)


def _layer_label(name: str) -> str:
    """'encoder.layer.3.attention.self.query' -> 'L3 query'."""
    parts = name.split(".")
    layer = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "layer"), "?")
    return f"L{layer} {parts[-1]}"


def _save(fig, plt, path: str | os.PathLike, *, dpi: int = 120, bbox_inches: str | None = "tight") -> Path:
    """Write ``fig`` to ``path`` through a temporary file and a rename, then close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches=bbox_inches)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path
