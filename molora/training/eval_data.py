"""Batches of a finished training run, rebuilt from its folder (``run_config.yaml``): each task's
eval (or train) file tokenized with the run's tokenizer, padded by its collator, tagged with the
task id the run gave the task. ``molora export RUN`` measures the fidelity of a static merge on
the eval batches (:mod:`molora.merge.fidelity`) and distills on the train batches
(:mod:`molora.merge.distill`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from molora.training.data import MultitaskCollator, load_task_datasets
from molora.training.loaders import _tokenize
from molora.training.run_config import load_run_config
from molora.training.run_dir import RUN_CONFIG
from molora.training.tokenizer import load_tokenizer

__all__ = ["run_eval_batches", "run_train_batches"]


def run_eval_batches(run_dir: str | os.PathLike, *, max_batches: int) -> list[dict[str, torch.Tensor]] | None:
    """Up to ``max_batches`` eval batches per task of the run in ``run_dir``.

    Args:
        run_dir: a ``molora train`` output folder (holds ``run_config.yaml``).
        max_batches: batches per task (of ``train.eval_batch_size`` or ``train.batch_size``).

    Returns:
        Batches (``input_ids``, ``attention_mask``, ``labels``, ``task_ids``), or None when the
        folder has no run config or no task has an eval file (or the files are gone).
    """
    return _run_batches(run_dir, "eval", max_batches)


def run_train_batches(run_dir: str | os.PathLike, *, max_batches: int) -> list[dict[str, torch.Tensor]] | None:
    """Up to ``max_batches`` batches of each task's training file, the tasks interleaved batch by batch.

    The rows are the first ones of each file (in file order), in batches of ``train.batch_size``;
    interleaving keeps every task in any tail of the list (a held-out tail sees all tasks).

    Returns:
        Batches as :func:`run_eval_batches`, or None when the folder has no run config or the
        training files are gone.
    """
    batches = _run_batches(run_dir, "train", max_batches)
    if batches is None:
        return None
    by_task: dict[int, list] = {}
    for b in batches:
        by_task.setdefault(int(b["task_ids"][0]), []).append(b)
    longest = max(len(v) for v in by_task.values())
    return [q[i] for i in range(longest) for q in by_task.values() if i < len(q)]


def _run_batches(run_dir: str | os.PathLike, split: str, max_batches: int) -> list[dict[str, torch.Tensor]] | None:
    path = Path(run_dir) / RUN_CONFIG
    if max_batches < 1 or not path.is_file():
        return None
    config = load_run_config(path)
    specs = {
        n: s for n, s in config.data.tasks.items() if getattr(s, split) is not None and Path(getattr(s, split)).is_file()
    }
    if not specs:
        return None
    tokenizer = load_tokenizer(config)
    collator = MultitaskCollator.from_tokenizer(tokenizer, pad_to_multiple_of=config.data.pad_to_multiple_of)
    size = config.train.batch_size if split == "train" else config.train.eval_batch_size or config.train.batch_size
    task_to_id = {name: i for i, name in enumerate(config.data.tasks)}  # as the training run numbered them
    batches = []
    for name, spec in specs.items():
        file = getattr(spec, split)
        raw, _ = load_task_datasets({name: file}, cache_dir=config.data.cache_dir)
        ds = _tokenize(raw[name], spec, config, tokenizer, where=f"data.tasks.{name}.{split}={file!r}")
        n = min(len(ds), max_batches * size)
        ds = ds.select(range(n))
        for start in range(0, n, size):
            rows = [dict(ds[i], task_ids=task_to_id[name]) for i in range(start, min(start + size, n))]
            batches.append(collator(rows))
    return batches or None
