"""Fidelity of a static merge: the routed MoLoRA model against the adapter an export wrote.

Exactness of "cat" and of full-rank "svd" is of the factorization: the adapter equals the
MoLoRA model run with the same static gates. For token routing (soft, topk, topp) those gates
are an average, so the adapter only approximates the routed model; for the task router a
task's gates do not depend on the token, so a per-task export is exact. This module measures
the gap on evaluation batches (DESIGN §6):

- ``mean_kl``: mean over real tokens of KL(p_routed || p_exported) of the output
  distribution (nats; classification: over sequences);
- ``max_abs_logit_diff``: the largest |logit difference| over real tokens;
- ``loss_routed`` / ``loss_exported``: the cross-entropy of both on the batches' ``labels``
  (causal LM: shifted as transformers does; -100 ignored), token-weighted; None without labels.

The exported model is computed by molora itself: the experts and routers are switched off
(``layer.disabled``) and a forward hook adds x A^T B^T with the factors as written
(``adapter_model.safetensors``, in its dtype), which is what PEFT computes for a LoRA with
scaling 1. The tests check it against ``peft.PeftModel``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FIDELITY_KEYS", "format_fidelity_table", "measure_fidelity", "rows_of_task", "static_adapter"]

FIDELITY_KEYS = ("mean_kl", "max_abs_logit_diff", "loss_routed", "loss_exported")


@contextmanager
def static_adapter(model: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
    """Run ``model`` as its base plus the LoRA ``factors`` {layer: (A (k, in), B (out, k))}, or
    {layer: (A, B, m (out,))} for a DoRA adapter (PEFT's DoRA forward).

    Layers without factors (an all-zero merge, left out of the adapter) run the base only.
    """
    layers = model.molora_layers()
    hooks, tracked = [], getattr(model, "track_routing_stats", False)

    def add_update(layer, args, output, A, B, magnitude=None):
        x = args[0]  # (..., in)
        delta = (x.to(A.dtype) @ A.T) @ B.T  # (..., out)
        if magnitude is not None:  # PEFT's DoRA: m / ||W0 + B A|| * (W0 x + B A x) + b, norm per output row
            weight = layer.base_layer.weight.detach().float()
            weight = weight.T if layer.fan_in_fan_out else weight  # (out, in)
            scale = magnitude.float() / torch.linalg.norm(weight + B.float() @ A.float(), dim=1)  # (out,)
            bias = layer.base_layer.bias
            base = output if bias is None else output - bias
            out = scale.to(output.dtype) * (base + delta.to(output.dtype))
            return out if bias is None else out + bias
        return output + delta.to(output.dtype)

    try:
        model.track_routing_stats = False  # the switched-off layers keep their previous routing
        for name, layer in layers.items():
            layer.disabled = True
            if name in factors:
                A, B, *mag = (t.to(layer.base_layer.weight.device) for t in factors[name])  # mag: DoRA's m
                mag = mag[0] if mag else None
                hooks.append(layer.register_forward_hook(lambda m, a, o, A=A, B=B, g=mag: add_update(m, a, o, A, B, g)))
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers.values():
            layer.disabled = False
        model.track_routing_stats = tracked


def rows_of_task(batch: Mapping[str, Any], task: int | None) -> dict[str, Any] | None:
    """A copy of ``batch`` with only the rows of ``task`` (every row when ``task`` is None or the
    batch has no ``task_ids``); None when no row belongs to ``task``. Selected on the host."""
    inputs = dict(batch)
    ids = inputs.get("task_ids")
    if task is None or ids is None:
        return inputs
    rows = (torch.as_tensor(ids).reshape(-1) == int(task)).nonzero().flatten()
    if rows.numel() == 0:
        return None
    return {k: v[rows.to(v.device)] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


class _Acc:
    """Sums for one group of rows (all rows, or one task's)."""

    def __init__(self) -> None:
        self.kl, self.count, self.max_diff = 0.0, 0, 0.0
        self.ce_routed, self.ce_exported, self.labels = 0.0, 0.0, 0

    def result(self) -> dict[str, float | None]:
        has_loss = self.labels > 0
        return {
            "mean_kl": self.kl / max(self.count, 1),
            "max_abs_logit_diff": self.max_diff,
            "loss_routed": self.ce_routed / self.labels if has_loss else None,
            "loss_exported": self.ce_exported / self.labels if has_loss else None,
            "tokens": self.count,
        }


def _per_row(routed: torch.Tensor, exported: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor | None):
    """Per-row sums: KL, token count, max |diff|, CE routed, CE exported, label count; each (batch,)."""
    if routed.dim() == 2:  # sequence classification: one distribution per row
        routed, exported = routed[:, None], exported[:, None]  # (B, 1, C)
        mask = None
        labels = None if labels is None else labels.reshape(-1, 1)  # (B, 1)
        shift = False
    else:
        shift = True
    real = torch.ones(routed.shape[:2], device=routed.device) if mask is None else mask.to(routed.device).float()
    log_r, log_e = routed.log_softmax(-1), exported.log_softmax(-1)  # (B, L, V)
    kl = (log_r.exp() * (log_r - log_e)).sum(-1).clamp(min=0)  # (B, L); >= 0, rounding aside
    diff = (routed - exported).abs().amax(-1)  # (B, L)
    rows = [(kl * real).sum(1), real.sum(1), (diff * real).amax(1)]
    if labels is None:
        return rows + [None, None, None]
    labels = labels.to(routed.device)
    if shift:  # transformers' causal-LM loss: position t predicts label t + 1
        routed, exported, labels = routed[:, :-1], exported[:, :-1], labels[:, 1:]
    keep = labels != -100  # (B, L')
    safe = labels.clamp(min=0)

    def ce(logits):
        return (F.cross_entropy(logits.transpose(1, 2), safe, reduction="none") * keep).sum(1)  # (B,)

    return rows + [ce(routed), ce(exported), keep.sum(1).float()]


@torch.no_grad()
def measure_fidelity(
    model: nn.Module,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    batches: Iterable[Mapping[str, Any]],
    *,
    task: int | None = None,
    task_names: list[str] | None = None,
) -> dict[str, Any]:
    """The routed model against the adapter ``factors`` on ``batches`` (see the module docstring).

    Args:
        model: a MoLoRAModel (run in eval mode; its mode is restored).
        factors: ``{layer: (lora_A (k, in), lora_B (out, k))}`` as written to the adapter.
        batches: model input dicts; ``labels`` (optional) give the losses, ``task_ids``
            (batch,) give the per-task breakdown.
        task: only the rows of this task id are measured (a per-task export).
        task_names: names for the per-task entries (default: the ids as strings).

    Returns:
        ``{"mean_kl", "max_abs_logit_diff", "loss_routed", "loss_exported", "tokens",
        "batches"}`` and, when the batches carry task ids, ``"tasks": {task: {same keys}}``.

    Raises:
        ValueError: no batch had a row to measure.
    """
    total, per_task, seen = _Acc(), {}, 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = rows_of_task(batch, task)
            if inputs is None:
                continue
            labels = inputs.pop("labels", None)
            ids = inputs.get("task_ids")
            routed = model(**inputs).logits.float()
            with static_adapter(model, factors):
                exported = model(**inputs).logits.float()
            sums = _per_row(routed, exported, inputs.get("attention_mask"), labels)
            groups = [(None, total)]
            if ids is not None:
                for t in torch.as_tensor(ids).reshape(-1).unique().tolist():
                    groups.append((int(t), per_task.setdefault(int(t), _Acc())))
            for key, acc in groups:
                sel = slice(None) if key is None else (torch.as_tensor(ids).reshape(-1) == key).to(routed.device)
                _add(acc, [None if v is None else v[sel] for v in sums])
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError(
            "`eval_batches` had no rows to measure fidelity on" + (f" for task {task}" if task is not None else "")
        )
    out = {**total.result(), "batches": seen}
    if per_task:
        out["tasks"] = {_name(t, task_names): acc.result() for t, acc in sorted(per_task.items())}
    return out


def _add(acc: _Acc, sums: list[torch.Tensor | None]) -> None:
    kl, count, diff, ce_r, ce_e, n_labels = sums
    acc.kl += float(kl.double().sum())
    acc.count += int(count.sum())
    acc.max_diff = max(acc.max_diff, float(diff.max()) if diff.numel() else 0.0)
    if ce_r is not None:
        acc.ce_routed += float(ce_r.double().sum())
        acc.ce_exported += float(ce_e.double().sum())
        acc.labels += int(n_labels.sum())


def _name(tid: int, names: list[str] | None) -> str:
    return names[tid] if names and 0 <= tid < len(names) else str(tid)


def format_fidelity_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per export (or per task of an export): rank, SVD truncation error and fidelity.

    Args:
        reports: ``{label: export report}`` (a report as :func:`export_merged_adapter` returns).
    """
    head = f"{'export':<18} {'rank':>5} {'svd err':>9} {'mean KL':>10} {'max|dlogit|':>11} {'loss routed':>11} {'loss export':>11} {'gap':>9}"
    lines = [head, "-" * len(head)]
    for label, rep in reports.items():
        layers = rep.get("layers", {})
        rank = max((row["rank"] for row in layers.values()), default=0)
        err = max((row["rel_error"] for row in layers.values()), default=0.0)
        fid = rep.get("fidelity")
        rows = [(label, fid)]
        if fid and fid.get("tasks") and len(fid["tasks"]) > 1:
            rows += [(f"  {label}/{t}" if label else f"  {t}", v) for t, v in fid["tasks"].items()]
        for i, (name, f) in enumerate(rows):
            cols = f"{name:<18} {rank if i == 0 else '':>5} {f'{err:.2e}' if i == 0 else '':>9}"
            lines.append(cols + (" " + _fid_cols(f) if f else "  (no eval batches: fidelity not measured)"))
    return "\n".join(lines)


def _fid_cols(f: Mapping[str, Any]) -> str:
    def num(v: float | None, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    gap = None if f["loss_routed"] is None else f["loss_exported"] - f["loss_routed"]
    return (
        f"{num(f['mean_kl'], '.3e'):>10} {num(f['max_abs_logit_diff'], '.3e'):>11} "
        f"{num(f['loss_routed'], '.4f'):>11} {num(f['loss_exported'], '.4f'):>11} {num(gap, '+.4f'):>9}"
    )
