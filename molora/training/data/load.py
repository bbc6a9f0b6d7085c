"""Loading task datasets: Hub names, local files (json/jsonl/csv/parquet) or one file split by a task column."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datasets import (
    Dataset,
    DatasetDict,
    load_dataset,
)

# File suffix -> `datasets` builder name for local files.
_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


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
        datasets = {str(name): _load_one(name, value, split, cache_dir) for name, value in spec.items()}
    else:
        raise TypeError(
            f"`spec` must be a Dataset or a mapping {{task_name: Dataset | path}}, got {type(spec).__name__}"
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
                f"task {name!r}: `split` {split!r} not in the DatasetDict; available splits: {sorted(value)}"
            )
        return value[split]
    if isinstance(value, (str, os.PathLike)):
        return _load_file(name, Path(value), cache_dir)
    raise TypeError(f"task {name!r}: expected a Dataset, DatasetDict or file path, got {type(value).__name__}")


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
    if builder == "json":
        _check_json_rows(name, path)
    cache = None if cache_dir is None else str(cache_dir)
    return load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)


def _check_json_rows(name: str, path: Path) -> None:
    """Every row of a JSON Lines file (or JSON array) is a JSON object, and there is one at least.

    Raises:
        ValueError: naming the file and line of the first bad row, or saying the file is empty.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    where = f"task {name!r}: data file {str(path)!r}"
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}, line {e.lineno}: not valid JSON ({e.msg})") from e
        numbered = [(f"row {i + 1}", row) for i, row in enumerate(rows)]
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}, line {number}: not valid JSON ({e.msg}): {line[:80]!r}") from e
    for at, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(
                f"{where}, {at}: expected a JSON object with the task's columns, got {json.dumps(row)[:80]}"
            )
    if not numbered:
        raise ValueError(f"{where} has no rows")


def _split_by_column(ds: Dataset, task_column: str | None) -> dict[str, Dataset]:
    """Split one dataset into ``{str(task_value): rows}`` in sorted task order."""
    if task_column is None:
        raise ValueError("a single Dataset needs `task_column=` naming the task of each row")
    if task_column not in ds.column_names:
        raise ValueError(f"`task_column` {task_column!r} is not a column; columns: {ds.column_names}")
    values = ds[task_column]
    rows: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        rows.setdefault(v, []).append(i)
    keys = sorted(rows, key=lambda v: (str(type(v)), v))
    return {str(k): ds.select(rows[k]) for k in keys}
