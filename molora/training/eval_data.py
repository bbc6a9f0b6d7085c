"""Evaluation batches of a finished training run, rebuilt from its folder (``run_config.yaml``):
each task's eval file tokenized with the run's tokenizer, padded by its collator, tagged with
the task id the run gave the task. ``molora export RUN`` measures the fidelity of a static
merge on them (:mod:`molora.merge.fidelity`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from molora.training.data import MultitaskCollator, load_task_datasets
from molora.training.loaders import _tokenize
from molora.training.run_config import load_run_config
from molora.training.run_dir import RUN_CONFIG
from molora.training.tokenizer import load_tokenizer

__all__ = ["run_eval_batches"]


def run_eval_batches(run_dir: str | os.PathLike, *, max_batches: int) -> list[dict[str, torch.Tensor]] | None:
    """Up to ``max_batches`` eval batches per task of the run in ``run_dir``.

    Args:
        run_dir: a ``molora train`` output folder (holds ``run_config.yaml``).
        max_batches: batches per task (of ``train.eval_batch_size`` or ``train.batch_size``).

    Returns:
        Batches (``input_ids``, ``attention_mask``, ``labels``, ``task_ids``), or None when the
        folder has no run config or no task has an eval file (or the files are gone).
    """
    path = Path(run_dir) / RUN_CONFIG
    if max_batches < 1 or not path.is_file():
        return None
    config = load_run_config(path)
    specs = {n: s for n, s in config.data.tasks.items() if s.eval is not None and Path(s.eval).is_file()}
    if not specs:
        return None
    tokenizer = load_tokenizer(config)
    collator = MultitaskCollator.from_tokenizer(tokenizer, pad_to_multiple_of=config.data.pad_to_multiple_of)
    size = config.train.eval_batch_size or config.train.batch_size
    task_to_id = {name: i for i, name in enumerate(config.data.tasks)}  # as the training run numbered them
    batches = []
    for name, spec in specs.items():
        raw, _ = load_task_datasets({name: spec.eval}, cache_dir=config.data.cache_dir)
        ds = _tokenize(raw[name], spec, config, tokenizer, where=f"data.tasks.{name}.eval={spec.eval!r}")
        n = min(len(ds), max_batches * size)
        ds = ds.select(range(n))
        for start in range(0, n, size):
            rows = [dict(ds[i], task_ids=task_to_id[name]) for i in range(start, min(start + size, n))]
            batches.append(collator(rows))
    return batches or None
