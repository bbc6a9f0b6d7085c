"""What every demo task shares: importing the data packages with an install hint, dropping
ambiguous texts, and the class-balanced, seeded train/test split."""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

__all__ = ["balanced_split", "dedupe", "import_or_hint"]

_INSTALL_HINT = 'install the demo extra: pip install "molora[demo]"'


def import_or_hint(module: str, pip_name: str) -> ModuleType:
    """Import ``module`` or raise an ImportError saying which package to install.

    Args:
        module: the module to import, e.g. ``"vader.data.lexicon"``.
        pip_name: the distribution that provides it.

    Raises:
        ImportError: ``module`` cannot be imported (the message names ``pip_name``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"the molora demo needs the `{pip_name}` package ({module!r} could not be "
            f"imported): {_INSTALL_HINT} or pip install {pip_name}"
        ) from err


def dedupe(examples: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Sorted unique ``(text, label)``; texts seen under two labels are dropped."""
    labels: dict[str, set[str]] = {}
    for text, label in examples:
        labels.setdefault(text, set()).add(label)
    return sorted((t, next(iter(ls))) for t, ls in labels.items() if len(ls) == 1)


def balanced_split(
    examples: list[tuple[str, str]],
    label_names: list[str],
    *,
    max_train: int,
    max_test: int,
    seed: int,
    task_index: int,
) -> DatasetDict:
    """Draw the same number of examples per label into disjoint train and test splits.

    Per label: test = min(max_test // C, pool // 4), train = min(max_train // C,
    pool - test), with ``pool`` the smallest label's pool and C the number of labels.

    Args:
        examples: ``(text, label name)`` pairs, sorted (so the draw does not depend on
            file-system order).
        label_names: the task's labels; label id ``i`` is ``label_names[i]``.
        max_train: cap on train examples (split evenly over the labels).
        max_test: cap on test examples (split evenly over the labels).
        seed: seed of the draw.
        task_index: mixed into the seed so that tasks draw independently.

    Returns:
        "train" and "test" splits with columns ``text`` and ``label`` (a ``ClassLabel``).

    Raises:
        ValueError: some label has too few examples for one train and one test example.
    """
    by_label: dict[str, list[str]] = {name: [] for name in label_names}
    for text, label in examples:
        by_label[label].append(text)
    pool = min(len(texts) for texts in by_label.values())
    n_test = min(max_test // len(label_names), pool // 4)
    n_train = min(max_train // len(label_names), pool - n_test)
    if n_test < 1 or n_train < 1:
        sizes = {k: len(v) for k, v in by_label.items()}
        raise ValueError(f"too few examples per label for a train/test split: {sizes}")
    rng = np.random.default_rng([seed, task_index])
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for label_id, name in enumerate(label_names):
        texts = by_label[name]
        order = rng.permutation(len(texts))
        splits["test"] += [(texts[i], label_id) for i in order[:n_test]]
        splits["train"] += [(texts[i], label_id) for i in order[n_test : n_test + n_train]]
    features = Features({"text": Value("string"), "label": ClassLabel(names=label_names)})
    return DatasetDict({name: _to_dataset(rows, features, rng) for name, rows in splits.items()})


def _to_dataset(rows: list[tuple[str, int]], features: Features, rng: np.random.Generator) -> Dataset:
    """Shuffled ``Dataset`` of ``(text, label_id)`` rows (labels interleaved)."""
    rows = [rows[i] for i in rng.permutation(len(rows))]
    data = {"text": [t for t, _ in rows], "label": [y for _, y in rows]}
    return Dataset.from_dict(data, features=features)
