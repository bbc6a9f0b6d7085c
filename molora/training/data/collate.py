"""MultitaskCollator: pad a list of examples into a batch with a (batch,) ``task_ids`` tensor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from molora.training.data.columns import IGNORE_INDEX

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
    float32 for floats. An ``attention_mask`` is made from the lengths when missing, except
    for packed rows (with ``position_ids``, padded with 0: each pad is a segment of its own).

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
            problems.append(f"`padding_side` must be 'left' or 'right', got {self.padding_side!r}")
        if self.pad_to_multiple_of is not None and (
            not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1
        ):
            problems.append(f"`pad_to_multiple_of` must be an int >= 1 or None, got {self.pad_to_multiple_of!r}")
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
            raise ValueError("tokenizer has no pad_token_id and no eos_token_id; pass pad_token_id=")
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
                raise ValueError(f"example {i} has keys {sorted(f)}, example 0 has {sorted(keys)}")
        seq_keys = [k for k in keys if _is_sequence(features[0][k])]
        lengths = self._row_lengths(features, seq_keys)  # (batch,)
        batch: dict[str, torch.Tensor] = {}
        if seq_keys:
            width = self._padded_length(max(lengths))
            for k in seq_keys:
                batch[k] = self._pad(features, k, width)
            # packed rows carry restarting position_ids instead of a mask (see data/packing.py)
            if "attention_mask" not in batch and "input_ids" in batch and "position_ids" not in batch:
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
