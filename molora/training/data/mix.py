"""Mixing several task datasets into one stream with a ``task_ids`` column (size, equal or temperature)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from datasets import (
    ClassLabel,
    Dataset,
    Value,
    concatenate_datasets,
)

from molora.training.data.columns import MIX_STRATEGIES, TASK_IDS_COLUMN


def task_proportions(sizes: Sequence[int], *, strategy: str = "size", temperature: float = 2.0) -> np.ndarray:
    """Sampling probability of each task.

    - ``size``: p_t = n_t / sum n (examples-proportional mixing).
    - ``equal``: p_t = 1 / T.
    - ``temperature``: p_t ∝ n_t^(1/T) (T5 "temperature-scaled mixing", Raffel et al. 2020
      §3.5.2; mT5 / XLM-R use the same form). T = 1 is ``size``, T -> inf is ``equal``.

    Args:
        sizes: number of examples of each task, all > 0.
        strategy: one of ``MIX_STRATEGIES``.
        temperature: T > 0 (only read by ``temperature``, always validated).

    Returns:
        ``(num_tasks,)`` float64 array summing to 1.

    Raises:
        ValueError: unknown strategy, temperature not a finite number > 0, empty task.
    """
    _check_strategy(strategy, temperature)
    n = np.asarray(sizes, dtype=np.float64)  # (num_tasks,)
    if n.ndim != 1 or n.size == 0 or (n <= 0).any():
        raise ValueError(f"every task needs at least one example, got sizes {list(sizes)}")
    if strategy == "size":
        weights = n
    elif strategy == "equal":
        weights = np.ones_like(n)
    else:
        # Work in log space so that large sizes with small T do not overflow.
        log_w = np.log(n) / temperature
        weights = np.exp(log_w - log_w.max())
    return weights / weights.sum()


def mix_tasks(
    datasets: Mapping[str, Dataset],
    *,
    strategy: str = "size",
    temperature: float = 2.0,
    num_samples: int | None = None,
    seed: int = 0,
    task_to_id: Mapping[str, int] | None = None,
) -> Dataset:
    """Mix several task datasets into one shuffled stream with a ``task_ids`` column.

    Counts per task are ``num_samples * p_t`` (``task_proportions``), rounded with the
    largest-remainder method so that they sum exactly to ``num_samples``. A task asked for
    more examples than it has is repeated: every full pass over it is a fresh permutation,
    so an example appears ``floor(c/n)`` or ``ceil(c/n)`` times (sampling with replacement
    only as much as needed). With ``strategy="size"`` and the default ``num_samples`` this
    is exactly concatenate + shuffle: every example once.

    Args:
        datasets: ordered ``{task_name: Dataset}``; all must have the same columns
            (ClassLabel / integer columns of different tasks are unified to int64).
        strategy: ``"size"`` (p_t ∝ n_t), ``"equal"`` (same count per task) or
            ``"temperature"`` (p_t ∝ n_t^(1/temperature)).
        temperature: T > 0 for ``"temperature"``.
        num_samples: total length of the mixed stream; default: the sum of the task sizes
            (so that one "epoch" has the same length whatever the strategy).
        seed: seed of the numpy generator; the result is a deterministic function of it.
        task_to_id: task-name -> id; default: position in ``datasets``
            (as returned by ``load_task_datasets``).

    Returns:
        A ``Dataset`` with the input columns plus ``task_ids`` (int64), in shuffled order.
        An existing ``task_ids`` column is overwritten.

    Raises:
        ValueError: bad strategy / temperature / num_samples, empty task, mismatched
            columns, task_to_id missing a task.
    """
    _check_strategy(strategy, temperature)
    if not datasets:
        raise ValueError("`datasets` must hold at least one task, got an empty mapping")
    names = list(datasets)
    task_to_id = _resolve_task_ids(names, task_to_id)
    sizes = [len(datasets[n]) for n in names]
    total = sum(sizes) if num_samples is None else num_samples
    if not isinstance(total, (int, np.integer)) or isinstance(total, bool) or total < 1:
        raise ValueError(f"`num_samples` must be an int >= 1 or None, got {num_samples!r}")

    probs = task_proportions(sizes, strategy=strategy, temperature=temperature)
    counts = _largest_remainder(probs, int(total))  # (num_tasks,)
    rng = np.random.default_rng(seed)
    aligned = _align_features([datasets[n] for n in names], names)

    # Tag every full task dataset (cheap: no index mapping yet), concatenate them once,
    # then take all draws in one lazy `select` over global row numbers.
    tagged = [_with_task_id(ds, task_to_id[name]) for name, ds in zip(names, aligned)]
    return concatenate_datasets(tagged).select(_mixed_rows(sizes, counts, rng))


def _mixed_rows(sizes: list[int], counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shuffled global row numbers of the concatenated tasks: ``counts[t]`` draws from task t.

    Args:
        sizes: examples per task, in concatenation order.
        counts: (num_tasks,) draws per task.
        rng: the mixing generator (draws, then the final permutation).

    Returns:
        (sum(counts),) int row numbers into the concatenation.
    """
    offsets = np.cumsum([0] + sizes[:-1])  # (num_tasks,) first global row of each task
    rows = np.concatenate(
        [off + _draw_indices(n, int(c), rng) for off, n, c in zip(offsets, sizes, counts) if c]
    )  # (total,)
    return rows[rng.permutation(len(rows))]


def _with_task_id(ds: Dataset, task_id: int) -> Dataset:
    """``ds`` with an int64 ``task_ids`` column equal to ``task_id`` (replacing any)."""
    if TASK_IDS_COLUMN in ds.column_names:
        ds = ds.remove_columns(TASK_IDS_COLUMN)
    column = np.full(len(ds), task_id, dtype=np.int64)
    return ds.add_column(TASK_IDS_COLUMN, column, feature=Value("int64"))


def _check_strategy(strategy: str, temperature: float) -> None:
    """Raise one ValueError listing every bad mixing argument."""
    problems = []
    if strategy not in MIX_STRATEGIES:
        problems.append(f"`strategy` must be one of {list(MIX_STRATEGIES)}, got {strategy!r}")
    ok_temp = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not ok_temp or not math.isfinite(temperature) or temperature <= 0:
        problems.append(f"`temperature` must be a finite number > 0, got {temperature!r}")
    if problems:
        raise ValueError("; ".join(problems))


def _resolve_task_ids(names: list[str], task_to_id: Mapping[str, int] | None) -> dict[str, int]:
    """Default ids = positions; a given mapping must cover every task with distinct ids."""
    if task_to_id is None:
        return {n: i for i, n in enumerate(names)}
    missing = [n for n in names if n not in task_to_id]
    if missing:
        raise ValueError(f"`task_to_id` has no id for tasks {missing}; it maps {sorted(task_to_id)}")
    ids = [task_to_id[n] for n in names]
    if len(set(ids)) != len(ids) or any(not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"`task_to_id` must give distinct ints >= 0, got {dict(task_to_id)}")
    return {n: task_to_id[n] for n in names}


def _largest_remainder(probs: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``probs * total`` (Hamilton method)."""
    exact = probs * total  # (num_tasks,)
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    # Ties broken by task order (stable sort), so the result does not depend on the seed.
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


def _draw_indices(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices into ``range(n)``: full shuffled passes, then a random subset."""
    passes, rest = divmod(count, n)
    chunks = [rng.permutation(n) for _ in range(passes)]
    if rest:
        chunks.append(rng.choice(n, size=rest, replace=False))
    return np.concatenate(chunks)


def _align_features(datasets: list[Dataset], names: list[str]) -> list[Dataset]:
    """Make the features of all tasks identical so that they can be concatenated.

    Integer-like columns (``ClassLabel`` with different names per task, int32 vs int64)
    become ``int64``: a label id only means something together with its task id.
    """
    columns = [set(ds.column_names) - {TASK_IDS_COLUMN} for ds in datasets]
    for name, cols in zip(names[1:], columns[1:]):
        if cols != columns[0]:
            raise ValueError(
                f"task {name!r} has columns {sorted(cols)} but task {names[0]!r} has "
                f"{sorted(columns[0])}; select/rename columns so that all tasks match "
                "(or tokenize each task first and mix the tokenized datasets)"
            )
    reference = datasets[0].features
    if all(ds.features == reference for ds in datasets[1:]):
        return datasets
    int_columns = [c for c in columns[0] if all(_is_int_feature(ds.features[c]) for ds in datasets)]
    aligned = []
    for ds in datasets:
        features = ds.features.copy()
        for c in int_columns:
            features[c] = Value("int64")
        aligned.append(ds.cast(features) if features != ds.features else ds)
    target = aligned[0].features
    # Anything still different (e.g. string vs large_string) is cast to the first task's
    # features; datasets raises its own error when that is impossible.
    return [ds if ds.features == target else ds.cast(target) for ds in aligned]


def _is_int_feature(feature: Any) -> bool:
    return isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")))
