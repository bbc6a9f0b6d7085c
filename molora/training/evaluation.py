"""Per-task evaluation during training: loss and accuracy on each task's eval data, and the
experts' load per task and layer, reduced over processes.

Eval loss is the mean cross-entropy over supervised tokens (causal LM) or examples
(classification), without the router losses; accuracy is next-token accuracy on the
supervised tokens, or classification accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from molora.model import MoLoRAModel
from molora.training.data import IGNORE_INDEX

__all__ = ["evaluate"]


def _example_stats(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> tuple[torch.Tensor, ...]:
    """Per example: (loss sum, counted targets, correct), each (batch,)."""
    if causal:
        labels = labels[:, 1:]  # (B, L-1): token t predicts token t+1
        mask = labels != IGNORE_INDEX
        # One example at a time: a float32 copy of (B, L, V) logits is gigabytes at LLM vocab sizes.
        ce = torch.stack(
            [
                F.cross_entropy(logits[i, :-1].float(), labels[i], ignore_index=IGNORE_INDEX, reduction="sum")
                for i in range(labels.shape[0])
            ]
        )  # (B,)
        correct = (logits[:, :-1].argmax(-1) == labels) & mask  # (B, L-1)
        return ce, mask.sum(1).float(), correct.sum(1).float()
    logits = logits.float()  # (B, C)
    ce = F.cross_entropy(logits, labels, reduction="none")  # (B,)
    return ce, torch.ones_like(ce), (logits.argmax(-1) == labels).float()


@torch.no_grad()
def evaluate(accelerator, model, loaders: dict[str, DataLoader], *, causal: bool) -> dict[str, Any]:
    """Per-task loss/accuracy and per-task, per-layer expert load, reduced over processes.

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (all processes call).
        model: the prepared (possibly wrapped) MoLoRA model; left in its train/eval mode.
        loaders: ``{task: prepared eval DataLoader}``.
        causal: causal-LM data (token-level stats) or sequence classification.

    Returns:
        ``{"tasks": {task: {"loss", "accuracy", "examples", "tokens"}}, "routing": {task:
        {layer: {"load": [N], "gates": [N], "tokens": int, "entropy", "max_gate"}}}}``.
    """
    inner: MoLoRAModel = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    inner.track_routing_stats = True
    tasks, routing = {}, {}
    try:
        for name, loader in loaders.items():
            inner.reset_routing_stats()
            sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, targets, correct, examples
            for batch in loader:
                out = model(**batch)
                stats = _example_stats(out.logits, batch["labels"], causal)
                stats = accelerator.gather_for_metrics(tuple(s.double() for s in stats))
                sums += torch.stack(
                    [s.sum() for s in stats]
                    + [torch.tensor(float(stats[0].numel()), device=sums.device, dtype=sums.dtype)]
                )
            loss, count, correct, examples = sums.tolist()
            tasks[name] = {
                "loss": loss / max(count, 1),
                "accuracy": correct / max(count, 1),
                "examples": int(examples),
                "tokens": int(count),
            }
            routing[name] = _reduce_routing(accelerator, inner.routing_stats())
    finally:
        inner.track_routing_stats = False
        model.train(was_training)
    return {"tasks": tasks, "routing": routing}


def _reduce_routing(accelerator, stats: dict[str, dict]) -> dict[str, dict]:
    """Sum token counts and token-weighted loads, gates, entropy and max gate over processes; back to means."""
    out = {}
    for layer, s in stats.items():
        tokens = torch.tensor([float(s["tokens"])], dtype=torch.float64)
        means = torch.tensor([s["entropy"], s["max_gate"]], dtype=torch.float64)
        parts = [tokens, s["load"].double(), s["gates"].double(), means]
        packed = torch.cat([tokens] + [p * s["tokens"] for p in parts[1:]]).to(accelerator.device)
        packed = accelerator.reduce(packed, reduction="sum").cpu()
        n = len(s["load"])
        total = max(packed[0].item(), 1.0)
        out[layer] = {
            "load": (packed[1 : 1 + n] / total).tolist(),
            "gates": (packed[1 + n : 1 + 2 * n] / total).tolist(),
            "tokens": int(packed[0].item()),
            "entropy": packed[1 + 2 * n].item() / total,
            "max_gate": packed[2 + 2 * n].item() / total,
        }
    return out
