"""What the demo shows and writes: the results table, the export-check lines, ``routing.png``
and ``results.json``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from molora.apps.demo.config import DemoConfig
from molora.apps.demo.models import DEMO_MODELS
from molora.atomic import atomic_write_text

__all__ = ["format_table", "plot_routing", "print_report", "write_results"]


def format_table(results: dict) -> str:
    """The results table as fixed-width text (one row per model).

    Args:
        results: the dict :func:`~molora.apps.demo.run.run_demo` returns (``tasks`` and ``models``).

    Returns:
        The table, header and rule included, without a trailing newline.
    """
    task_names = results["tasks"]
    head = f"{'model':<34}" + "".join(f"{t:>10}" for t in task_names) + f"{'mean':>8}{'trainable':>11}{'train s':>9}"
    lines = [head, "-" * len(head)]
    for key, row in results["models"].items():
        accs = "".join(f"{row['accuracy'][t]:>10.3f}" for t in task_names)
        name = f"{key} ({DEMO_MODELS[key].split(',')[-1].strip()})" if key.startswith("molora") else key
        lines.append(
            f"{name:<34}{accs}{row['mean_accuracy']:>8.3f}{row['trainable_params']:>11,d}{row['train_s']:>9.1f}"
        )
    return "\n".join(lines)


def plot_routing(routing: dict[str, dict[str, dict]], out: Path, cfg: DemoConfig) -> Path:
    """``out/routing.png``: expert load per router model, task and layer (see
    :func:`molora.apps.plots.plot_gate_grid`)."""
    from molora.apps.plots import plot_gate_grid

    title = f"expert load per task and layer (N={cfg.num_experts}, r={cfg.r})"
    return plot_gate_grid(routing, out / "routing.png", title=title)


def print_report(results: dict, out: Path) -> None:
    """Print the table, the export check per task and where the outputs are."""
    print()
    print(format_table(results))
    print()
    print(
        f"export check (task router -> one PEFT LoRA per task, method='cat', loaded with "
        f"peft.PeftModel.from_pretrained on a fresh MiniLM) in {out / 'adapters'}:"
    )
    for task, c in results["export_check"].items():
        mark = "OK" if c["ok"] else "MISMATCH"
        print(
            f"  {task:<10} routed {c['routed_accuracy']:.4f}  exported {c['exported_accuracy']:.4f}  "
            f"max |logit diff| {c['max_abs_logit_diff']:.1e}  {mark}"
        )
    print(f"routing heatmap: {out / 'routing.png'}")
    print(
        f"results: {out / 'results.json'}  (total {results['wall_s']:.0f}s wall, {results['cpu_s']:.0f}s CPU; "
        f"torch threads {torch.get_num_threads()})"
    )


def write_results(results: dict, out: Path) -> None:
    """Write ``out/results.json`` (indented JSON)."""
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
