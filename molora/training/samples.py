"""Eval samples (``train.eval_samples: K``): at each eval, greedy completions of the first K eval
prompts of every task, written to ``RUN/samples.jsonl`` (one record per eval, ``{"type":
"samples", "step", "tasks": {task: [{"prompt", "completion", "reference"}]}}``) and to
TensorBoard as text. ``molora inspect RUN`` prints the latest record.

A row's prompt is its tokens before the first supervised label (the prompt of a
prompt/response row; a chat row up to its first assistant turn); the reference is the
supervised tokens. Sampling runs on the main process, on the unwrapped model; under FSDP2 it
is skipped (every rank would have to join the generation of the sharded model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from molora.training.data import IGNORE_INDEX

__all__ = ["SAMPLES", "eval_samples", "latest_samples"]

SAMPLES = "samples.jsonl"


def _split_row(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids) of one tokenized row."""
    first = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX and i > 0), len(ids))
    reference = [y for y in labels[first:] if y != IGNORE_INDEX]
    return ids[:first], reference


@torch.no_grad()
def eval_samples(model, eval_sets: dict, tokenizer, *, k: int, max_new_tokens: int, device) -> dict[str, list[dict]]:
    """Greedy completions of the first ``k`` rows of each task's eval set.

    Args:
        model: the unwrapped MoLoRA model (task ids by name are not needed: rows carry ids).
        eval_sets: ``{task: tokenized eval Dataset with input_ids, labels, task_ids}``.
        tokenizer: decodes prompts, completions and references.
        k: rows per task.
        max_new_tokens: new tokens per completion.
        device: where the model runs.

    Returns:
        ``{task: [{"prompt", "completion", "reference"}, ...]}``.
    """
    was_training = model.training
    model.eval()
    out: dict[str, list[dict]] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        for task, ds in eval_sets.items():
            rows = []
            for row in ds.select(range(min(k, len(ds)))):
                prompt, reference = _split_row(list(row["input_ids"]), list(row["labels"]))
                ids = torch.tensor([prompt], device=device)  # (1, P)
                generated = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=torch.tensor([row["task_ids"]]),
                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                )
                completion = generated[0, ids.shape[1] :].tolist()
                rows.append({
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                    "completion": tokenizer.decode(completion, skip_special_tokens=True),
                    "reference": tokenizer.decode(reference, skip_special_tokens=True),
                })
            out[task] = rows
    finally:
        model.train(was_training)
    return out


def latest_samples(path: Path) -> dict[str, Any] | None:
    """The last complete record of a ``samples.jsonl`` (None: no file or no record)."""
    if not path.is_file():
        return None
    from molora.training.metrics import read_metrics

    records = read_metrics(path)
    return records[-1] if records else None
