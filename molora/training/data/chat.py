"""Chat data for causal-LM fine-tuning: ``{"messages": [{"role", "content"}, ...]}`` rows,
rendered with the tokenizer's chat template and supervised on the assistant turns only."""

from __future__ import annotations

import re
from typing import Any

from datasets import Dataset

from molora.training.data.columns import IGNORE_INDEX
from molora.training.data.tokenize import _check_max_length, _map_keeping_task_ids, _require_columns

__all__ = ["MESSAGES_COLUMN", "chat_labels", "tokenize_chat"]

MESSAGES_COLUMN = "messages"
_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


def _render(tokenizer: Any, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes BOS itself


def chat_labels(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation, labels -100 outside the assistant turns.

    An assistant turn's tokens are those the template adds between the conversation before it
    (rendered with the generation prompt, e.g. ``<|assistant|>``) and the conversation up to
    and including it: its content and the end-of-turn tokens the template closes it with, so
    the model learns to stop. The role header is a prompt, not supervised. This needs a
    template whose renderings of a conversation's prefixes are prefixes of its rendering
    (true of the usual templates); one that rewrites earlier turns is refused, unless it marks
    the assistant tokens itself with ``{% generation %}`` blocks: then those are supervised
    (transformers' ``return_assistant_tokens_mask``).

    Raises:
        ValueError: a message without a string ``role``/``content``, or a template that is
            not prefix-consistent.
    """
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"message {i} must be {{'role': str, 'content': str}}, got {m!r:.80}")
    if _GENERATION_BLOCK.search(tokenizer.chat_template or ""):
        # the template marks the assistant tokens itself: transformers' assistant mask
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, enc["assistant_masks"])]
    ids = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], generation_prompt=True)
        end = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if ids[: len(start)] != start or ids[: len(end)] != end:
            raise ValueError(
                "the chat template does not render a conversation's prefixes as prefixes of it, so the "
                "assistant turns cannot be located: use prompt/response rows for this tokenizer"
            )
        labels[len(start) : len(end)] = ids[len(start) : len(end)]
    return ids, labels


def tokenize_chat(
    ds: Dataset, tokenizer: Any, *, messages_column: str = MESSAGES_COLUMN, max_length: int = 512
) -> Dataset:
    """Tokenize chat rows with the tokenizer's chat template, supervising assistant turns only.

    Args:
        ds: dataset with ``messages_column``: a list of ``{"role", "content"}`` per row, and
            optionally ``task_ids``.
        tokenizer: a Hugging Face tokenizer with a ``chat_template``.
        messages_column: the column of conversations.
        max_length: conversations are truncated on the right to this many tokens.

    Returns:
        Dataset with ``input_ids``, ``attention_mask``, ``labels`` (see :func:`chat_labels`)
        and ``task_ids`` when ``ds`` has it.

    Raises:
        ValueError: no chat template, a missing column, ``max_length < 1``, malformed messages.
    """
    _require_columns(ds, [messages_column])
    _check_max_length(max_length)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"rows with {messages_column!r} are rendered with the tokenizer's chat template, and this tokenizer "
            "has none: set data.chat_template (a name such as chatml, llama3, zephyr, or a Jinja string), set "
            "model.tokenizer to a chat (instruct) tokenizer, or give prompt/response rows"
        )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for messages in batch[messages_column]:
            ids, labels = chat_labels(tokenizer, messages)
            out["input_ids"].append(ids[:max_length])
            out["attention_mask"].append([1] * len(ids[:max_length]))
            out["labels"].append(labels[:max_length])
        return out

    return _map_keeping_task_ids(ds, encode)
