"""PiSSA-initialized experts against the default init on the demo's tasks (task and top-k routers).

The same steps, data order, lr, heads and adapter budget as ``molora demo`` (MiniLM, N=4 experts
of rank 4 on query/value, 150 steps by default), for each seed: the task router and the top-k
(top-2 of 4) router, each with ``init_lora_weights=True`` (Kaiming A, zero B) and ``"pissa"``.
Prints a Markdown table (test accuracy per task, mean +- std over seeds) and writes it with the
raw runs as JSON. Offline; about 1-2 minutes per model on 2 CPU cores.

    python benchmarks/bench_pissa.py --seeds 3 --out runs/bench_pissa        # the full comparison
    python benchmarks/bench_pissa.py --seeds 1 --steps 60                     # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

FORMS = {
    "task": ("task router", dict(router="task", router_aux_loss_coef=0.0), True),
    "task-pissa": ("task router, PiSSA init", dict(router="task", router_aux_loss_coef=0.0), "pissa"),
    "topk": ("top-2 of 4 token router", dict(router="topk"), True),
    "topk-pissa": ("top-2 of 4 token router, PiSSA init", dict(router="topk"), "pissa"),
}


def build(key: str, base: nn.Module, tasks, cfg):
    """The demo's classifier (fresh encoder copy, seeded heads) with the MoLoRA form ``key``."""
    from molora import MoLoRAConfig, get_molora_model
    from molora.apps.demo.models import MultitaskClassifier

    _, router_kw, init = FORMS[key]
    encoder = copy.deepcopy(base)
    torch.manual_seed(cfg.seed)
    heads = nn.ModuleList(nn.Linear(base.config.hidden_size, len(t.labels)) for t in tasks)
    torch.manual_seed(cfg.seed + 1)
    common = dict(
        target_modules=list(cfg.target_modules), num_experts=cfg.num_experts, r=cfg.r, lora_alpha=cfg.lora_alpha,
        router_init_std=cfg.router_init_std, init_lora_weights=init,
    )  # fmt: skip
    if router_kw["router"] == "task":
        extra = dict(num_tasks=len(tasks), task_names=[t.name for t in tasks], top_k=cfg.task_top_k)
    else:
        extra = dict(top_k=cfg.top_k, router_aux_loss_coef=cfg.router_aux_loss_coef)
    config = MoLoRAConfig(**common, **{**router_kw, **extra})
    return MultitaskClassifier(get_molora_model(encoder, config), heads, pass_task_ids=True)


def main() -> None:
    from transformers import AutoModel, AutoTokenizer

    from molora.apps.demo.config import DemoConfig
    from molora.apps.demo.data import load_data, make_schedule
    from molora.apps.demo.tasks import minilm_model_path
    from molora.apps.demo.train import evaluate, train
    from molora.training.data import MultitaskCollator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default: the demo's)")
    parser.add_argument("--out", default="runs/bench_pissa")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = DemoConfig() if args.steps is None else DemoConfig(steps=args.steps)
    path = minilm_model_path()
    tokenizer, base = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    collator = MultitaskCollator.from_tokenizer(tokenizer)
    runs: dict[str, list[dict]] = {k: [] for k in FORMS}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task_names: list[str] = []
    for seed in range(cfg.seed, cfg.seed + args.seeds):
        seed_cfg = replace(cfg, seed=seed)
        tasks = load_data(seed_cfg, tokenizer)
        task_names = [t.name for t in tasks]
        schedule = make_schedule(tasks, seed_cfg)
        for key in FORMS:
            t0 = time.perf_counter()
            model = build(key, base, tasks, seed_cfg)
            train(model, key, tasks, schedule, collator, seed_cfg, False)
            acc, _, _ = evaluate(model, tasks, collator, seed_cfg)
            runs[key].append({"seed": seed, "accuracy": acc, "mean": statistics.fmean(acc.values())})
            print(f"seed {seed} {key}: mean accuracy {runs[key][-1]['mean']:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        table = format_table(runs, task_names, cfg.steps)
        (out / "pissa.md").write_text(table + "\n")
        (out / "pissa.json").write_text(json.dumps({"steps": cfg.steps, "runs": runs}, indent=2))
    print(table)


def format_table(runs: dict[str, list[dict]], task_names: list[str], steps: int) -> str:
    """Markdown: one row per form, mean test accuracy per task and mean +- std over seeds."""
    lines = [f"{steps} steps, seeds {[r['seed'] for r in next(iter(runs.values()))]}", ""]
    lines.append("| form | " + " | ".join(task_names) + " | mean ± std | per seed |")
    lines.append("|" + "---|" * (len(task_names) + 3))
    for key, rs in runs.items():
        if not rs:
            continue
        means = [r["mean"] for r in rs]
        per_task = " | ".join(f"{statistics.fmean(r['accuracy'][t] for r in rs):.3f}" for t in task_names)
        std = statistics.stdev(means) if len(means) > 1 else 0.0
        seeds = ", ".join(f"{m:.3f}" for m in means)
        lines.append(f"| {FORMS[key][0]} | {per_task} | {statistics.fmean(means):.3f} ± {std:.3f} | {seeds} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
