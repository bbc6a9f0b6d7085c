"""``molora demo --variants``: the expert forms side by side, mean +- std over seeds.

On the demo's three real tasks, the same steps, data order, lr, heads and adapter budget
(:data:`~molora.apps.demo.models.VARIANT_MODELS`): a shared PEFT LoRA of rank N r, the task
router, top-k, HydraLoRA (shared A, rank :func:`~molora.apps.demo.models.hydra_rank`) with the
task router, the task router with N - 1 routed experts and one shared expert, top-p (p = 0.5),
DoRA experts with the task router, and PiSSA-initialized experts with the task and the top-k
router. Each seed draws its own data split, schedule and inits; every form sees the same ones.
The table goes into ``results.json`` under ``"variants"`` and ``variants.md``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from molora.apps.demo.config import DemoConfig
from molora.apps.demo.data import load_data, make_schedule
from molora.apps.demo.models import VARIANT_MODELS
from molora.apps.demo.train import train_and_evaluate
from molora.atomic import atomic_write_text

__all__ = ["format_variants", "run_variants"]


def run_variants(
    cfg: DemoConfig, base, tokenizer, out: Path, *, seeds: int, progress: bool, forms: list[str] | None = None
) -> dict[str, Any]:
    """Train every form of :data:`VARIANT_MODELS` (or those of ``forms``) for seeds
    ``cfg.seed .. cfg.seed + seeds - 1``.

    Raises:
        ValueError: a key of ``forms`` is not a form (the choices are listed).

    Returns:
        ``{"seeds": [...], "tasks": [...], "models": {key: {"description", "runs": [{"seed",
        "accuracy", "mean_accuracy", "trainable_params", "train_s"}], "mean", "std",
        "task_mean": {task: mean}, "trainable_params"}}}``; also written to ``variants.md``
        (the table) after every seed, so an interrupted run keeps what it finished.
    """
    from molora.training.data import MultitaskCollator

    keys = list(VARIANT_MODELS) if forms is None else list(forms)
    unknown = [k for k in keys if k not in VARIANT_MODELS]
    if unknown or not keys:
        raise ValueError(f"`forms` must be keys of the variant forms, got {unknown or keys}; choices: {list(VARIANT_MODELS)}")
    collator = MultitaskCollator.from_tokenizer(tokenizer)
    section: dict[str, Any] = {"seeds": [], "tasks": [], "models": {k: {"runs": []} for k in keys}}
    for seed in range(cfg.seed, cfg.seed + seeds):
        seed_cfg = replace(cfg, seed=seed)
        tasks = load_data(seed_cfg, tokenizer)
        schedule = make_schedule(tasks, seed_cfg)
        section["tasks"] = [t.name for t in tasks]
        for key in keys:
            t0 = time.perf_counter()
            row = train_and_evaluate(key, base, tasks, schedule, collator, seed_cfg, progress).row
            run = {k: row[k] for k in ("accuracy", "mean_accuracy", "trainable_params", "train_s")}
            section["models"][key]["runs"].append({"seed": seed, **run})
            print(f"  seed {seed} {key}: mean accuracy {row['mean_accuracy']:.3f} ({time.perf_counter() - t0:.0f}s)")
        section["seeds"].append(seed)
        _summarize(section)
        atomic_write_text(out / "variants.md", format_variants(section) + "\n")
    return section


def _summarize(section: dict[str, Any]) -> None:
    for key, entry in section["models"].items():
        means = [r["mean_accuracy"] for r in entry["runs"]]
        entry["description"] = VARIANT_MODELS[key]
        entry["mean"] = statistics.fmean(means)
        entry["std"] = statistics.stdev(means) if len(means) > 1 else 0.0
        entry["task_mean"] = {t: statistics.fmean(r["accuracy"][t] for r in entry["runs"]) for t in section["tasks"]}
        entry["trainable_params"] = entry["runs"][-1]["trainable_params"]


def format_variants(section: dict[str, Any]) -> str:
    """A Markdown table: one row per form, mean accuracy per task and mean +- std over seeds."""
    tasks = section["tasks"]
    head = "| form | " + " | ".join(tasks) + " | mean ± std | trainable |"
    lines = [f"seeds: {section['seeds']}", "", head, "|" + "---|" * (len(tasks) + 3)]
    for key, entry in section["models"].items():
        if not entry["runs"]:
            continue
        accs = " | ".join(f"{entry['task_mean'][t]:.3f}" for t in tasks)
        lines.append(
            f"| {key} ({entry['description']}) | {accs} | {entry['mean']:.3f} ± {entry['std']:.3f} | "
            f"{entry['trainable_params']:,d} |"
        )
    return "\n".join(lines)
