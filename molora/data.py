"""Multitask data: several datasets -> one training stream with task ids.

The pipeline is

    load_task_datasets  ->  mix_tasks  ->  tokenize_causal_lm | tokenize_classification
                        ->  DataLoader(collate_fn=MultitaskCollator(...))

Every example of the mixed stream carries an int ``task_ids`` column: the id of the task it
came from. ``MultitaskCollator`` turns it into a ``(batch,)`` long tensor, which is what
``MoLoRAModel.forward(task_ids=...)`` and the ``task`` router expect.

Task ids are the position of the task in the ordered ``dict`` of datasets: insertion order
of a user-given mapping, sorted order of the values of a ``task_column``. The mapping
``task_name -> task_id`` is returned by ``load_task_datasets`` and accepted by ``mix_tasks``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Value,
    concatenate_datasets,
    load_dataset,
)

__all__ = [
    "MIX_STRATEGIES",
    "MultitaskCollator",
    "load_task_datasets",
    "mix_tasks",
    "task_proportions",
    "tokenize_causal_lm",
    "tokenize_classification",
]

MIX_STRATEGIES = ("equal", "size", "temperature")
TASK_IDS_COLUMN = "task_ids"
IGNORE_INDEX = -100  # label value ignored by torch's cross-entropy (and HF models' losses)

# File suffix -> `datasets` builder name for local files.
_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_task_datasets(
    spec: Mapping[str, Dataset | DatasetDict | str | os.PathLike] | Dataset,
    *,
    task_column: str | None = None,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, Dataset], dict[str, int]]:
    """Load one dataset per task.

    Args:
        spec: either a mapping ``{task_name: dataset_or_path}`` whose values are a
            ``datasets.Dataset``, a ``DatasetDict`` (``split`` is taken) or the path of a
            local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file; or one ``Dataset``
            holding all tasks, split by ``task_column``.
        task_column: with a single ``Dataset``, the column naming each example's task.
            Task names are ``str(value)``.
        split: the split taken from ``DatasetDict`` values (local files load as "train").
        cache_dir: where ``datasets`` caches the Arrow files of loaded paths (default:
            its own cache, ``HF_DATASETS_CACHE``).

    Returns:
        ``(datasets, task_to_id)``: an ordered ``dict[str, Dataset]`` and the stable
        ``dict[str, int]`` task-name -> task-id mapping, ``task_to_id[name] == position of
        name in datasets``. Order is the mapping's insertion order, or the sorted task
        values for ``task_column``.

    Raises:
        ValueError: empty spec, unknown file suffix, missing ``task_column``.
        FileNotFoundError: a path that does not exist.
    """
    if isinstance(spec, Dataset):
        datasets = _split_by_column(spec, task_column)
    elif isinstance(spec, Mapping):
        if task_column is not None:
            raise ValueError(
                "`task_column` is only used with a single Dataset; got a mapping of "
                f"{len(spec)} tasks and task_column={task_column!r}"
            )
        if not spec:
            raise ValueError("`spec` must name at least one task, got an empty mapping")
        datasets = {
            str(name): _load_one(name, value, split, cache_dir) for name, value in spec.items()
        }
    else:
        raise TypeError(
            "`spec` must be a Dataset or a mapping {task_name: Dataset | path}, "
            f"got {type(spec).__name__}"
        )
    task_to_id = {name: i for i, name in enumerate(datasets)}
    return datasets, task_to_id


def _load_one(name: str, value: Any, split: str, cache_dir: Any) -> Dataset:
    """One task's dataset from a Dataset, a DatasetDict or a local file path."""
    if isinstance(value, Dataset):
        return value
    if isinstance(value, DatasetDict):
        if split not in value:
            raise ValueError(
                f"task {name!r}: `split` {split!r} not in the DatasetDict; "
                f"available splits: {sorted(value)}"
            )
        return value[split]
    if isinstance(value, (str, os.PathLike)):
        return _load_file(name, Path(value), cache_dir)
    raise TypeError(
        f"task {name!r}: expected a Dataset, DatasetDict or file path, got {type(value).__name__}"
    )


def _load_file(name: str, path: Path, cache_dir: Any) -> Dataset:
    """Load a local JSON/JSONL/CSV/Parquet file with ``datasets.load_dataset``."""
    if not path.is_file():
        raise FileNotFoundError(f"task {name!r}: data file {str(path)!r} does not exist")
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"task {name!r}: file suffix {path.suffix!r} of {str(path)!r} is not supported; "
            f"allowed: {sorted(_FILE_BUILDERS)}"
        )
    cache = None if cache_dir is None else str(cache_dir)
    return load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)


def _split_by_column(ds: Dataset, task_column: str | None) -> dict[str, Dataset]:
    """Split one dataset into ``{str(task_value): rows}`` in sorted task order."""
    if task_column is None:
        raise ValueError("a single Dataset needs `task_column=` naming the task of each row")
    if task_column not in ds.column_names:
        raise ValueError(
            f"`task_column` {task_column!r} is not a column; columns: {ds.column_names}"
        )
    values = ds[task_column]
    rows: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        rows.setdefault(v, []).append(i)
    keys = sorted(rows, key=lambda v: (str(type(v)), v))
    return {str(k): ds.select(rows[k]) for k in keys}


# --------------------------------------------------------------------------------------
# Mixing
# --------------------------------------------------------------------------------------


def task_proportions(
    sizes: Sequence[int], *, strategy: str = "size", temperature: float = 2.0
) -> np.ndarray:
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
    offsets = np.cumsum([0] + sizes[:-1])  # (num_tasks,) first global row of each task
    rows = np.concatenate(
        [off + _draw_indices(n, int(c), rng) for off, n, c in zip(offsets, sizes, counts) if c]
    )  # (total,)
    rows = rows[rng.permutation(len(rows))]
    return concatenate_datasets(tagged).select(rows)


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
        raise ValueError(
            f"`task_to_id` has no id for tasks {missing}; it maps {sorted(task_to_id)}"
        )
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
    int_columns = [
        c for c in columns[0] if all(_is_int_feature(ds.features[c]) for ds in datasets)
    ]
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
    return isinstance(feature, ClassLabel) or (
        isinstance(feature, Value) and feature.dtype.startswith(("int", "uint"))
    )


# --------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------


def tokenize_causal_lm(
    ds: Dataset,
    tokenizer: Any,
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    max_length: int = 512,
    add_eos: bool = True,
) -> Dataset:
    """Tokenize prompt/response pairs for causal-LM fine-tuning with the prompt masked.

    ``input_ids = tok(prompt) + tok(response) + [eos]``: the prompt is encoded with the
    tokenizer's special tokens (e.g. Llama's BOS), the response without, on its own, so
    the prompt/response boundary is exact (no BPE merge crosses it; put any separating
    space/newline at the end of the prompt or the start of the response). ``labels`` is a
    copy of ``input_ids`` with ``-100`` on every prompt token, so that only the response
    (and EOS) is in the loss; HF causal-LM models shift labels themselves. Padding (done
    by ``MultitaskCollator``) gets ``-100`` too. The concatenation is truncated on the
    right to ``max_length``; an example whose prompt fills ``max_length`` keeps no
    supervised token (all labels -100).

    Args:
        ds: dataset with ``prompt_column`` and ``response_column`` (str), optionally
            ``task_ids``.
        tokenizer: a Hugging Face tokenizer.
        prompt_column: column of prompts.
        response_column: column of responses.
        max_length: maximum number of tokens per example, >= 1.
        add_eos: append ``tokenizer.eos_token_id`` after the response.

    Returns:
        Dataset with columns ``input_ids``, ``attention_mask``, ``labels`` (lists of int,
        same length per row) and ``task_ids`` when ``ds`` has it; other columns dropped.

    Raises:
        ValueError: missing columns, ``max_length < 1``, ``add_eos`` without an EOS token.
    """
    _require_columns(ds, [prompt_column, response_column])
    _check_max_length(max_length)
    eos = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos is None:
        raise ValueError(
            "`add_eos=True` but the tokenizer has no eos_token_id; set tokenizer.eos_token "
            "or pass add_eos=False"
        )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        prompts = tokenizer(batch[prompt_column], add_special_tokens=True)["input_ids"]
        responses = tokenizer(batch[response_column], add_special_tokens=False)["input_ids"]
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for p, r in zip(prompts, responses):
            ids = (list(p) + list(r) + ([eos] if eos is not None else []))[:max_length]
            n_prompt = min(len(p), len(ids))
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([IGNORE_INDEX] * n_prompt + ids[n_prompt:])
        return out

    return _map_keeping_task_ids(ds, encode)


def tokenize_classification(
    ds: Dataset,
    tokenizer: Any,
    *,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int = 128,
) -> Dataset:
    """Tokenize a (multitask) sequence-classification dataset.

    Args:
        ds: dataset with ``text_column`` (str), ``label_column`` (int or ClassLabel; a
            float column is kept as float for regression) and optionally ``task_ids``.
        tokenizer: a Hugging Face tokenizer.
        text_column: column of texts.
        label_column: column of labels.
        max_length: texts are truncated to this many tokens (special tokens included).

    Returns:
        Dataset with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
        tokenizer makes them), a scalar ``labels`` column (int64 for class ids) and
        ``task_ids`` when present; other columns dropped. No padding: the collator pads.

    Raises:
        ValueError: missing columns or ``max_length < 1``.
    """
    _require_columns(ds, [text_column, label_column])
    _check_max_length(max_length)
    int_labels = _is_int_feature(ds.features[label_column])

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out = dict(tokenizer(batch[text_column], truncation=True, max_length=max_length))
        labels = batch[label_column]
        out["labels"] = [int(y) for y in labels] if int_labels else list(labels)
        return out

    tokenized = _map_keeping_task_ids(ds, encode)
    if int_labels:
        tokenized = tokenized.cast_column("labels", Value("int64"))
    return tokenized


def _map_keeping_task_ids(ds: Dataset, fn: Any) -> Dataset:
    """Batched map that drops every input column except ``task_ids``."""
    drop = [c for c in ds.column_names if c != TASK_IDS_COLUMN]
    return ds.map(fn, batched=True, remove_columns=drop, desc=None)


def _require_columns(ds: Dataset, columns: list[str]) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"columns {missing} not in the dataset; columns: {ds.column_names}")


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"`max_length` must be an int >= 1, got {max_length!r}")


# --------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------

_DEFAULT_PAD = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}


@dataclass
class MultitaskCollator:
    """Pad a list of examples into a batch of tensors, keeping ``task_ids``.

    Works as ``DataLoader(collate_fn=collator)`` and as HF ``Trainer(data_collator=...)``.

    Sequence fields (lists / 1-D tensors) are padded to the longest in the batch
    (rounded up to ``pad_to_multiple_of``): ``input_ids`` with ``pad_token_id``,
    ``attention_mask`` and ``token_type_ids`` with 0, token ``labels`` with
    ``label_pad_id`` (-100, ignored by the loss), any other sequence with 0. Scalar fields
    (``task_ids``, class ``labels``) are stacked into ``(batch,)`` tensors: long for ints,
    float32 for floats. An ``attention_mask`` is made from the lengths when missing.

    Attributes:
        pad_token_id: id used to pad ``input_ids``.
        label_pad_id: value used to pad token-level ``labels``.
        pad_to_multiple_of: round the padded length up to a multiple of this (tensor cores).
        padding_side: "right" (training) or "left" (batched generation).
    """

    pad_token_id: int = 0
    label_pad_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"

    def __post_init__(self) -> None:
        problems = []
        if self.padding_side not in ("left", "right"):
            problems.append(
                f"`padding_side` must be 'left' or 'right', got {self.padding_side!r}"
            )
        if self.pad_to_multiple_of is not None and (
            not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1
        ):
            problems.append(
                f"`pad_to_multiple_of` must be an int >= 1 or None, got {self.pad_to_multiple_of!r}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> MultitaskCollator:
        """Collator padding with the tokenizer's pad token (or EOS when it has none).

        Raises:
            ValueError: the tokenizer has neither a pad nor an EOS token.
        """
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            raise ValueError(
                "tokenizer has no pad_token_id and no eos_token_id; pass pad_token_id="
            )
        kwargs.setdefault("padding_side", getattr(tokenizer, "padding_side", "right"))
        return cls(pad_token_id=int(pad), **kwargs)

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``features`` (one mapping per example) into a dict of tensors.

        Returns:
            ``input_ids``/``attention_mask``/token ``labels``: (batch, L) long;
            ``task_ids`` and scalar ``labels``: (batch,).

        Raises:
            ValueError: empty batch, examples with different keys, a row whose sequence
                fields have different lengths.
            TypeError: a field that is neither numbers nor a sequence of numbers (e.g. a
                leftover text column).
        """
        if not features:
            raise ValueError("cannot collate an empty list of examples")
        keys = list(features[0])
        for i, f in enumerate(features):
            if set(f) != set(keys):
                raise ValueError(
                    f"example {i} has keys {sorted(f)}, example 0 has {sorted(keys)}"
                )
        seq_keys = [k for k in keys if _is_sequence(features[0][k])]
        lengths = self._row_lengths(features, seq_keys)  # (batch,)
        batch: dict[str, torch.Tensor] = {}
        if seq_keys:
            width = self._padded_length(max(lengths))
            for k in seq_keys:
                batch[k] = self._pad(features, k, width)
            if "attention_mask" not in batch and "input_ids" in batch:
                batch["attention_mask"] = self._mask(lengths, width)
        for k in keys:
            if k not in seq_keys:
                batch[k] = _stack_scalars(k, [f[k] for f in features])
        return batch

    def _row_lengths(self, features: list[Mapping[str, Any]], seq_keys: list[str]) -> list[int]:
        lengths = []
        for i, f in enumerate(features):
            row = {k: len(f[k]) for k in seq_keys}
            if len(set(row.values())) > 1:
                raise ValueError(f"example {i} has sequence fields of different lengths: {row}")
            lengths.append(next(iter(row.values()), 0))
        return lengths

    def _padded_length(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return longest if m is None else -(-longest // m) * m

    def _pad_value(self, key: str) -> int:
        if key == "input_ids":
            return self.pad_token_id
        if key == "labels":
            return self.label_pad_id
        return _DEFAULT_PAD.get(key, 0)

    def _pad(self, features: list[Mapping[str, Any]], key: str, width: int) -> torch.Tensor:
        out = torch.full((len(features), width), self._pad_value(key), dtype=torch.long)
        for i, f in enumerate(features):
            row = torch.as_tensor(f[key], dtype=torch.long)  # (L_i,)
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, width - len(row) :] = row
        return out  # (batch, width)

    def _mask(self, lengths: list[int], width: int) -> torch.Tensor:
        pos = torch.arange(width)  # (width,)
        n = torch.tensor(lengths)[:, None]  # (batch, 1)
        if self.padding_side == "right":
            return (pos[None, :] < n).long()
        return (pos[None, :] >= width - n).long()  # (batch, width)


def _is_sequence(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 1
    if isinstance(value, np.ndarray):
        return value.ndim == 1
    return isinstance(value, (list, tuple))


def _stack_scalars(key: str, values: list[Any]) -> torch.Tensor:
    """(batch,) tensor: long for integer values, float32 for floats."""
    array_types = (torch.Tensor, np.ndarray, np.generic)
    items = [v.item() if isinstance(v, array_types) else v for v in values]
    if all(isinstance(v, (bool, int)) for v in items):
        return torch.tensor(items, dtype=torch.long)
    if all(isinstance(v, (bool, int, float)) for v in items):
        return torch.tensor(items, dtype=torch.float32)
    bad = next(v for v in items if not isinstance(v, (bool, int, float)))
    raise TypeError(
        f"field {key!r} holds {type(bad).__name__} values ({bad!r:.40}); the collator takes "
        "numbers or sequences of numbers: remove text columns before batching"
    )
