"""Tokenizing mixed task data: causal-LM prompt/response with prompt masking, and classification."""

from __future__ import annotations

from typing import Any

from datasets import (
    Dataset,
    Value,
)

from molora.training.data.columns import IGNORE_INDEX, TASK_IDS_COLUMN
from molora.training.data.mix import _is_int_feature


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
    _require_strings(ds, [prompt_column, response_column])
    _check_max_length(max_length)
    eos = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos is None:
        raise ValueError(
            "`add_eos=True` but the tokenizer has no eos_token_id; set tokenizer.eos_token or pass add_eos=False"
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
    _require_strings(ds, [text_column])
    _check_max_length(max_length)
    missing = next((i for i, y in enumerate(ds[label_column]) if y is None), None)
    if missing is not None:
        raise ValueError(f"row {missing + 1}: column {label_column!r} is null")
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


def _require_strings(ds: Dataset, columns: list[str]) -> None:
    """Every value of ``columns`` is a string (a null or a number would reach the tokenizer).

    Raises:
        ValueError: naming the column, the (1-based) row and the value.
    """
    for column in columns:
        for i, value in enumerate(ds[column]):
            if not isinstance(value, str):
                raise ValueError(f"row {i + 1}: column {column!r} must be a string, got {value!r}")


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"`max_length` must be an int >= 1, got {max_length!r}")
