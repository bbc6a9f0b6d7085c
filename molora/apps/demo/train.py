"""Training and evaluation of one demo model: the same schedule, lr and steps for every model.

AdamW with linear warm-up then linear decay; each MoLoRA model's router trains at its router lr
ratio times the lr and adds its balancing loss (both the router kind's recipe,
:func:`~molora.apps.demo.config.router_recipe`, unless the config sets them). Evaluation
gives per-task test accuracy, the test logits and (MoLoRA) the per-task routing statistics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from molora.apps.demo.config import DemoConfig, router_recipe
from molora.apps.demo.data import TaskData, batches
from molora.apps.demo.models import (
    MODEL_DESCRIPTIONS,
    ROUTER_KINDS,
    MultitaskClassifier,
    build_model,
    trainable_parameters,
)

__all__ = ["TrainedModel", "accuracy", "evaluate", "predict", "train", "train_and_evaluate"]


@dataclass
class TrainedModel:
    """A trained demo model and what its evaluation measured.

    Attributes:
        model: the trained model.
        row: its row of ``results["models"]`` (accuracy, parameter counts, timings).
        logits: task -> test logits (n, C_task).
        routing: task -> ``routing_stats()`` on its test set; empty for the shared LoRA.
    """

    model: MultitaskClassifier
    row: dict[str, Any]
    logits: dict[str, torch.Tensor]
    routing: dict[str, dict]


def train_and_evaluate(
    key: str,
    base: torch.nn.Module,
    tasks: list[TaskData],
    schedule: list[tuple[int, list[int]]],
    collator,
    cfg: DemoConfig,
    progress: bool,
) -> TrainedModel:
    """Build the model ``key`` of :data:`~molora.apps.demo.models.MODEL_DESCRIPTIONS`, train it on ``schedule`` and test it.

    Args:
        key: which demo model.
        base: the pretrained encoder (copied).
        tasks: the tasks' rows.
        schedule: the steps of :func:`~molora.apps.demo.data.make_schedule`.
        collator: turns rows into a padded batch.
        cfg: the demo settings.
        progress: show a tqdm bar.

    Returns:
        The trained model and its measurements.
    """
    model = build_model(key, base, tasks, cfg)
    adapter_params, head_params = trainable_parameters(model)
    train_s, train_cpu_s = train(model, key, tasks, schedule, collator, cfg, progress)
    t0 = time.perf_counter()
    accuracy, logits, routing = evaluate(model, tasks, collator, cfg)
    row = {
        "description": MODEL_DESCRIPTIONS[key],
        "accuracy": accuracy,
        "mean_accuracy": sum(accuracy.values()) / len(accuracy),
        "trainable_params": adapter_params + head_params,
        "adapter_params": adapter_params,
        "head_params": head_params,
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "eval_s": time.perf_counter() - t0,
    }
    return TrainedModel(model, row, logits, routing)


def _optimizer(model: MultitaskClassifier, key: str, cfg: DemoConfig):
    """AdamW (the router at its ratio x lr, :func:`router_recipe`) and its warm-up/decay schedule."""
    ratio = router_recipe(ROUTER_KINDS[key], cfg)[0] if key in ROUTER_KINDS else 1.0
    gates = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in n]
    others = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
    groups = [{"params": others}]
    if gates:
        groups.append({"params": gates, "lr": cfg.lr * ratio})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, round(cfg.warmup_ratio * cfg.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warmup, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warmup))),
    )
    return optimizer, scheduler


def train(
    model: MultitaskClassifier,
    key: str,
    tasks: list[TaskData],
    schedule: list[tuple[int, list[int]]],
    collator,
    cfg: DemoConfig,
    progress: bool,
) -> tuple[float, float]:
    """Train ``model`` in place, one scheduled batch per step.

    Returns:
        (wall seconds, CPU seconds of this process).
    """
    from tqdm.auto import tqdm

    optimizer, scheduler = _optimizer(model, key, cfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    aux_coef = getattr(getattr(model.encoder, "molora_config", None), "router_aux_loss_coef", 0.0)
    torch.manual_seed(cfg.seed + 2)  # dropout
    model.train()
    start, cpu = time.perf_counter(), time.process_time()
    bar = tqdm(schedule, desc=f"train {key}", unit="step", disable=not progress, leave=True)
    for step, (t, indices) in enumerate(bar):
        batch = collator([tasks[t].train[i] for i in indices])
        logits = model(batch["input_ids"], batch["attention_mask"], t)  # (B, C_t)
        loss = F.cross_entropy(logits, batch["labels"])
        if aux_coef > 0:
            loss = loss + aux_coef * model.encoder.aux_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", task=tasks[t].name)
    bar.close()
    return time.perf_counter() - start, time.process_time() - cpu


@torch.no_grad()
def predict(model: MultitaskClassifier, task: int, rows, collator, batch_size: int) -> torch.Tensor:
    """Logits (n, C) of a task's rows, in eval mode."""
    model.eval()
    out = [model(b["input_ids"], b["attention_mask"], task) for b in batches(rows, batch_size, collator)]
    return torch.cat(out)


def accuracy(logits: torch.Tensor, rows) -> float:
    """Fraction of ``rows`` whose label is the argmax of ``logits`` (n, C)."""
    labels = torch.tensor([row["labels"] for row in rows])
    return (logits.argmax(-1) == labels).float().mean().item()


def evaluate(model: MultitaskClassifier, tasks: list[TaskData], collator, cfg: DemoConfig):
    """Per-task test accuracy, test logits, and (MoLoRA) per-task routing stats.

    Returns:
        ``(accuracy, logits, routing)``: dicts keyed by task name; ``routing`` is empty for a
        model without ``routing_stats``.
    """
    accuracies, logits, routing = {}, {}, {}
    is_molora = hasattr(model.encoder, "routing_stats")
    for t, task in enumerate(tasks):
        if is_molora:
            model.encoder.reset_routing_stats()
        logits[task.name] = predict(model, t, task.test, collator, cfg.eval_batch_size)  # (n, C)
        accuracies[task.name] = accuracy(logits[task.name], task.test)
        if is_molora:
            routing[task.name] = model.encoder.routing_stats()
    return accuracies, logits, routing
