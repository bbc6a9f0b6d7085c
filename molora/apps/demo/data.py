"""The demo's data: each task's tokenized train/test rows, and the shared training schedule.

Batches hold one task each, tasks in turn (as MT-DNN), so short sentiment words are not padded
to docstring length; the schedule is built once so that every model sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from molora.apps.demo.config import DemoConfig

__all__ = ["TaskData", "batches", "load_data", "make_schedule"]


@dataclass
class TaskData:
    """One task's tokenized splits as plain rows (dicts of input_ids/attention_mask/labels)."""

    name: str
    labels: list[str]
    train: list[dict[str, Any]]
    test: list[dict[str, Any]]


def load_data(cfg: DemoConfig, tokenizer) -> list[TaskData]:
    """Read the demo tasks (:func:`~molora.apps.demo.tasks.load_demo_tasks`) and tokenize them.

    Args:
        cfg: the caps per task, the seed of the split and ``max_length``.
        tokenizer: the MiniLM tokenizer.

    Returns:
        One :class:`TaskData` per task, in the tasks' order.
    """
    from molora.apps.demo.tasks import load_demo_tasks
    from molora.training.data import tokenize_classification

    raw = load_demo_tasks(
        max_train_per_task=cfg.max_train_per_task,
        max_test_per_task=cfg.max_test_per_task,
        seed=cfg.seed,
    )
    tasks = []
    for name, splits in raw.items():
        rows = {}
        for split in ("train", "test"):
            tok = tokenize_classification(splits[split], tokenizer, max_length=cfg.max_length)
            tok = tok.remove_columns(
                [c for c in tok.column_names if c not in ("input_ids", "attention_mask", "labels")]
            )
            columns = tok[:]  # {column: list}
            rows[split] = [dict(zip(columns, values)) for values in zip(*columns.values())]
        tasks.append(
            TaskData(
                name,
                splits["train"].features["label"].names,
                rows["train"],
                rows["test"],
            )
        )
    return tasks


def make_schedule(tasks: list[TaskData], cfg: DemoConfig) -> list[tuple[int, list[int]]]:
    """(task id, row indices) of every training step: tasks in turn, each task's rows in
    seeded epochs. Built once so that all three models see exactly the same batches.

    Args:
        tasks: the tasks' rows.
        cfg: ``steps``, ``batch_size`` and ``seed``.

    Returns:
        ``cfg.steps`` pairs ``(task index, indices into tasks[t].train)``.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    orders: list[list[int]] = [[] for _ in tasks]
    steps = []
    for step in range(cfg.steps):
        t = step % len(tasks)
        while len(orders[t]) < cfg.batch_size:
            orders[t] += torch.randperm(len(tasks[t].train), generator=g).tolist()
        steps.append((t, orders[t][: cfg.batch_size]))
        orders[t] = orders[t][cfg.batch_size :]
    return steps


def batches(rows: list[dict[str, Any]], batch_size: int, collator) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of ``rows`` in order (the last one may be short)."""
    for start in range(0, len(rows), batch_size):
        yield collator(rows[start : start + batch_size])
