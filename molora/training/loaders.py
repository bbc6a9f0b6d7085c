"""The data of a training run, from the run config: each task's files loaded and tokenized,
the training tasks mixed into one stream (``molora.training.data.mix_tasks``), the eval sets
tagged with their task ids, and the DataLoaders, whose order is a function of the seed and the
number of batches consumed (so that a resumed run sees the batches an uninterrupted one would)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from molora.training.data import (
    IGNORE_INDEX,
    MESSAGES_COLUMN,
    eval_carve_out,
    load_task_datasets,
    mix_tasks,
    pack_rows,
    tokenize_causal_lm,
    tokenize_chat,
    tokenize_classification,
)
from molora.training.run_config import RunConfig, TaskSpec, TrainSection

__all__ = ["EpochSampler", "build_datasets", "build_loaders", "check_files"]


def check_files(config: RunConfig) -> None:
    """Every data file exists (checked before any model is loaded).

    Raises:
        FileNotFoundError: naming each missing file by its dotted key.
    """
    missing = [
        f"data.tasks.{name}.{which}={getattr(spec, which)!r}"
        for name, spec in config.data.tasks.items()
        for which in ("train", "eval")
        if getattr(spec, which) is not None and not Path(getattr(spec, which)).is_file()
    ]
    if missing:
        raise FileNotFoundError("data files not found: " + ", ".join(missing))


def _tokenize(ds, spec: TaskSpec, config: RunConfig, tokenizer, *, where: str):
    """One task's examples tokenized and checked (``where`` names the file in errors).

    Raises:
        ValueError: a bad row (naming the file and row), or no supervised token at all.
    """
    try:
        ds = _tokenize_columns(ds, spec, config, tokenizer)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    if len(ds) == 0:
        raise ValueError(f"{where}: no examples")
    if config.model.task_type == "causal_lm" and not _has_target(ds["labels"]):
        raise ValueError(
            f"{where}: no example keeps a supervised token: every response is cut off by "
            f"data.max_length={config.data.max_length} (or is empty); raise data.max_length or shorten the prompts"
        )
    return ds


def _has_target(labels: list[list[int]]) -> bool:
    """Whether any example has a supervised next-token target (label != -100 after the first position)."""
    return any(y != IGNORE_INDEX for row in labels for y in row[1:])


def _tokenize_columns(ds, spec: TaskSpec, config: RunConfig, tokenizer):
    """One task's examples tokenized for the model's task type, with its columns (the task's, or the data section's).

    Causal-LM rows with a ``messages`` column are chat conversations (:func:`tokenize_chat`).
    """
    d = config.data
    if config.model.task_type == "causal_lm" and MESSAGES_COLUMN in ds.column_names:
        return tokenize_chat(ds, tokenizer, max_length=d.max_length)
    if config.model.task_type == "causal_lm":
        return tokenize_causal_lm(
            ds,
            tokenizer,
            prompt_column=spec.prompt_column or d.prompt_column,
            response_column=spec.response_column or d.response_column,
            max_length=d.max_length,
        )
    return tokenize_classification(
        ds,
        tokenizer,
        text_column=spec.text_column or d.text_column,
        label_column=spec.label_column or d.label_column,
        max_length=d.max_length,
    )


def build_datasets(config: RunConfig, tokenizer):
    """The run's tokenized data.

    Args:
        config: the run config (``data`` section; ``train.seed`` seeds the mixing and the
            ``data.eval_split`` carve-outs).
        tokenizer: the run's tokenizer.

    Returns:
        ``(mixed training Dataset with task_ids, {task: eval Dataset with task_ids})``; a task
        without an eval file has no eval set, unless ``data.eval_split`` carves one out of its
        training rows. With ``data.packing`` the training rows of each task are packed
        (:func:`molora.training.data.pack_rows`); eval rows stay one per sequence.
    """
    tasks, d = config.data.tasks, config.data
    raw, task_to_id = load_task_datasets({n: s.train for n, s in tasks.items()}, cache_dir=d.cache_dir)
    tokenized, evals = {}, {}
    for name, spec in tasks.items():
        where = f"data.tasks.{name}.train={spec.train!r}"
        ds = _tokenize(raw[name], spec, config, tokenizer, where=where)
        if spec.eval is not None:
            loaded, _ = load_task_datasets({name: spec.eval}, cache_dir=d.cache_dir)
            evals[name] = _tokenize(loaded[name], spec, config, tokenizer, where=f"data.tasks.{name}.eval={spec.eval!r}")
        elif d.eval_split is not None:
            try:
                ds, evals[name] = eval_carve_out(ds, d.eval_split, seed=config.train.seed + task_to_id[name])
            except ValueError as e:
                raise ValueError(f"{where}: data.eval_split: {e}") from e
        tokenized[name] = pack_rows(ds, max_length=d.max_length) if d.packing else ds
    mixed = mix_tasks(
        tokenized,
        strategy=d.mixing,
        temperature=d.temperature,
        num_samples=d.num_samples,
        seed=config.train.seed,
        task_to_id=task_to_id,
    )
    for name, ds in evals.items():
        if d.max_eval_examples is not None:
            ds = ds.select(range(min(d.max_eval_examples, len(ds))))
        evals[name] = ds.add_column("task_ids", [task_to_id[name]] * len(ds))
    return mixed, evals


class EpochSampler(Sampler):
    """A fresh permutation of ``range(n)`` each epoch, a pure function of (seed, epoch), so
    that a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def build_loaders(
    train_ds, eval_sets: dict, collator, t: TrainSection, *, num_processes: int
) -> tuple[DataLoader, dict[str, DataLoader]]:
    """The training DataLoader (:class:`EpochSampler`, full batches) and one eval DataLoader per task.

    Args:
        train_ds: the mixed training Dataset.
        eval_sets: ``{task: eval Dataset}``.
        collator: pads a list of examples into a batch.
        t: the ``train`` section (batch sizes, seed, workers, eval cap).
        num_processes: processes sharing the eval data (``max_eval_batches`` is per process).

    Returns:
        ``(train_loader, {task: eval_loader})``, not yet prepared by accelerate.
    """
    sampler = EpochSampler(len(train_ds), t.seed)
    train_loader = DataLoader(
        train_ds,
        batch_size=t.batch_size,
        sampler=sampler,
        collate_fn=collator,
        drop_last=True,
        num_workers=t.num_workers,
    )
    eval_bs = t.eval_batch_size or t.batch_size
    eval_loaders = {}
    for name, ds in eval_sets.items():
        if t.max_eval_batches is not None:
            ds = ds.select(range(min(len(ds), t.max_eval_batches * eval_bs * num_processes)))
        eval_loaders[name] = DataLoader(ds, batch_size=eval_bs, collate_fn=collator, num_workers=t.num_workers)
    return train_loader, eval_loaders
