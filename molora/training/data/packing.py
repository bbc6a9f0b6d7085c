"""Packing and eval carve-outs of one task's tokenized rows.

Packing (``data.packing``) concatenates the rows of *one* task into sequences of up to
``max_length`` tokens, so a packed sequence still has one task id. Attention must not cross
rows: each packed sequence carries ``position_ids`` that restart at 0 on every row and no
``attention_mask``. From restarting positions transformers builds a block-diagonal causal mask
(sdpa, eager, flex; ``masking_utils.find_packed_sequence_indices``) or runs the varlen kernel
(flash-attention), when the model runs without a KV cache (molora's training forward passes
``use_cache=False``). The first token of each row gets no target, so no target crosses a row
boundary either: a packed batch has the loss of its rows run one by one.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from molora.training.data.columns import IGNORE_INDEX

__all__ = ["POSITION_IDS_COLUMN", "eval_carve_out", "pack_rows"]

POSITION_IDS_COLUMN = "position_ids"


def pack_rows(ds: Dataset, *, max_length: int) -> Dataset:
    """Greedily concatenate consecutive rows while the sequence stays within ``max_length``.

    Args:
        ds: one task's tokenized causal-LM rows (``input_ids``, ``labels``; rows of at most
            ``max_length`` tokens, as the tokenizers truncate them); its other columns are dropped.
        max_length: tokens per packed sequence, >= 1.

    Returns:
        Dataset with ``input_ids``, ``labels`` and ``position_ids`` (restarting at 0 per row),
        in row order; each row appears once, whole.
    """
    if max_length < 1:
        raise ValueError(f"`max_length` must be >= 1, got {max_length!r}")
    packs: dict[str, list] = {"input_ids": [], "labels": [], POSITION_IDS_COLUMN: []}
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for row_ids, row_labels in zip(ds["input_ids"], ds["labels"]):
        row_ids = row_ids[:max_length]
        if ids and len(ids) + len(row_ids) > max_length:
            packs["input_ids"].append(ids)
            packs["labels"].append(labels)
            packs[POSITION_IDS_COLUMN].append(positions)
            ids, labels, positions = [], [], []
        ids = ids + list(row_ids)
        labels = labels + [IGNORE_INDEX] + list(row_labels[1 : len(row_ids)])  # no target across rows
        positions = positions + list(range(len(row_ids)))
    if ids:
        packs["input_ids"].append(ids)
        packs["labels"].append(labels)
        packs[POSITION_IDS_COLUMN].append(positions)
    return Dataset.from_dict(packs)


def eval_carve_out(ds: Dataset, fraction: float, *, seed: int) -> tuple[Dataset, Dataset]:
    """Split one task's rows into (train, eval): a seeded random ``fraction`` of them for eval.

    Args:
        ds: the task's rows (at least 2).
        fraction: in (0, 1); the eval set has ``round(fraction * n)`` rows, at least 1 and at
            most ``n - 1``.
        seed: seeds the permutation (the same seed gives the same split).

    Returns:
        ``(train rows, eval rows)``, each in the original row order.

    Raises:
        ValueError: fewer than 2 rows, or a fraction outside (0, 1).
    """
    n = len(ds)
    if not 0 < fraction < 1:
        raise ValueError(f"`eval_split` must be in (0, 1), got {fraction!r}")
    if n < 2:
        raise ValueError(f"eval_split={fraction} needs at least 2 rows to carve an eval set from, got {n}")
    n_eval = min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    eval_rows = sorted(order[:n_eval].tolist())
    train_rows = sorted(order[n_eval:].tolist())
    return ds.select(train_rows), ds.select(eval_rows)
