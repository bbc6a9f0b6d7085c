"""Routing health (DESIGN §5): is each router specializing, still uniform, or collapsed?

Pure functions over the rows of a routing report (:func:`molora.routing_report.routing_report`:
``{"load": [N], "gates": [N], "tokens", "experts_per_token", "entropy", "max_gate"}``) and
:class:`RoutingHealthMonitor`, which turns them into at most one warning of each kind.
``molora train`` logs them at every log step and ``molora.RoutingHealthCallback`` in HF
``Trainer`` runs; both read the layers' ``last_routing`` at log time, so the forward pays nothing.

Per layer and per task:

- ``entropy``: mean over real tokens of the normalized entropy of the router's probabilities
  p = softmax(logits), -sum_i p_i log p_i / log N: 1 = uniform, 0 = one expert.
- ``max_gate``: mean over real tokens of max_i p_i (uniform: 1/N).
- ``usage``: each expert's share of the routing, summing to 1: the load / k for sparse
  routers (topk, topp), the gate mass for dense ones (soft, task without top_k), whose load
  is always 1 and says nothing.
- ``usage_cv``: coefficient of variation std/mean of ``usage`` (0 = perfectly balanced).
- ``dead``: experts whose usage is below :data:`DEAD_SHARE` of the fair share 1/N.

The warning rules (each warned once per monitor), checked at log steps from
:data:`CHECK_FROM` of ``max_steps`` on (earlier, routers are still near their init and a
small window can miss an expert by chance):

- still uniform (dense routers only: soft, and task without top_k): the mean over layers of
  ``entropy`` is >= :data:`UNIFORM_ENTROPY`. Near-uniform gates then make the N experts one
  LoRA. A sparse router (top-k, top-p) picks different experts for different tokens even when
  its probabilities are near uniform (the choice follows small logit differences, and the
  chosen gates are renormalized), so the rule says nothing about it and is not applied;
- collapsed: in some layer, over all tasks' tokens, one expert takes more than
  :data:`COLLAPSE_SHARE` of the usage, or (token routers only) an expert is dead, at
  :data:`COLLAPSE_CHECKS` checks in a row. The usage is read from one batch, and on a small
  batch an expert can miss it by chance and come back at the next check; a collapse lasts. A
  task router with fewer tasks than experts may leave experts unused by design, so its dead
  experts are reported but not warned about.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from molora.core.log import logger

__all__ = [
    "CHECK_FROM",
    "COLLAPSE_CHECKS",
    "COLLAPSE_SHARE",
    "DEAD_SHARE",
    "UNIFORM_ENTROPY",
    "RoutingHealthMonitor",
    "gate_entropy",
    "health_summary",
    "is_dense",
    "routing_health",
]

UNIFORM_ENTROPY = 0.98  # N=4: gates (0.29, 0.25, 0.23, 0.23) have 0.997; (0.47, 0.18, 0.18, 0.17) have 0.92
COLLAPSE_SHARE = 0.9
DEAD_SHARE = 0.01
CHECK_FROM = 0.25
COLLAPSE_CHECKS = 2  # consecutive checks (log steps) that must find the same collapse before it is warned about


def gate_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Normalized entropy -sum_i p_i log p_i / log N of each row of ``probs`` (..., N) -> (...):
    1 for uniform routing, 0 for one expert (0 when N = 1)."""
    n = probs.shape[-1]
    if n < 2:
        return torch.zeros(probs.shape[:-1], device=probs.device)
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1) / math.log(n)


def is_dense(row: Mapping[str, Any]) -> bool:
    """Whether a report row comes from a dense router (soft, task without top_k): every real
    token uses every expert, so its load is all ones and says nothing; its gates do."""
    load = row["load"]
    return bool(load) and all(abs(x - 1.0) < 1e-6 for x in load)


def row_health(row: Mapping[str, Any]) -> dict[str, Any]:
    """The health of one report row (see the module docstring)."""
    dense = is_dense(row)
    raw = row["gates"] if dense else row["load"]
    total = sum(raw)
    n = len(raw)
    usage = [x / total for x in raw] if total > 0 else [0.0] * n
    mean = 1.0 / n
    std = math.sqrt(sum((u - mean) ** 2 for u in usage) / n)
    return {
        "entropy": row.get("entropy"),
        "max_gate": row.get("max_gate"),
        "usage": usage,
        "usage_cv": std / mean,
        "dead": [i for i, u in enumerate(usage) if u < DEAD_SHARE * mean] if total > 0 else [],
        "dense": dense,
        "tokens": row.get("tokens", 0),
    }


def routing_health(report: Mapping[str, Any]) -> dict[str, Any]:
    """``{layer: {"all": health, "tasks": {task: health}}}`` of a routing report."""
    return {
        layer: {
            "all": row_health(entry["all"]),
            "tasks": {task: row_health(row) for task, row in entry["tasks"].items()},
        }
        for layer, entry in report.items()
        if entry["all"].get("tokens", 1) > 0
    }


def health_summary(health: Mapping[str, Any]) -> dict[str, Any]:
    """Means over layers of the pooled rows: ``entropy``, ``max_gate``, ``usage_cv``; the
    largest ``max_usage`` of any layer and the number of ``dead_experts`` (layer, expert)."""
    rows = [entry["all"] for entry in health.values()]
    if not rows:
        return {}
    known = [r for r in rows if r["entropy"] is not None]
    mean = lambda key: sum(r[key] for r in known) / len(known) if known else None  # noqa: E731
    return {
        "entropy": mean("entropy"),
        "max_gate": mean("max_gate"),
        "usage_cv": sum(r["usage_cv"] for r in rows) / len(rows),
        "max_usage": max(max(r["usage"]) for r in rows),
        "dead_experts": sum(len(r["dead"]) for r in rows),
        "num_experts": len(rows[0]["usage"]),
    }


class RoutingHealthMonitor:
    """Turns routing health into at most one "still uniform" and one "collapsed" warning.

    Args:
        max_steps: the run's optimizer steps; checks start at ``CHECK_FROM * max_steps``.
        router: ``MoLoRAConfig.router`` (a task router's dead experts are not warned about).
        hint: what to suggest when routing stays uniform (the knobs of the caller).
    """

    def __init__(self, max_steps: int, *, router: str, hint: str = "") -> None:
        self.max_steps, self.router, self.hint = max_steps, router, hint
        self.warned: dict[str, str] = {}
        self._collapse_streak = 0  # checks in a row that found a collapse

    def check(self, step: int, health: Mapping[str, Any]) -> list[str]:
        """The new warnings at ``step`` (each logged once, at warning level, on the ``molora`` logger)."""
        if step < CHECK_FROM * self.max_steps or not health:
            return []
        collapse = self._collapse(step, health)
        self._collapse_streak = self._collapse_streak + 1 if collapse else 0
        found = {
            "uniform": self._uniform(step, health),
            "collapse": collapse if self._collapse_streak >= COLLAPSE_CHECKS else None,
        }
        new = [msg for kind, msg in found.items() if msg and kind not in self.warned]
        for kind, msg in found.items():
            if msg and kind not in self.warned:
                self.warned[kind] = msg
                logger.warning(msg)
        return new

    def _uniform(self, step: int, health: Mapping[str, Any]) -> str | None:
        if not all(entry["all"]["dense"] for entry in health.values()):
            return None  # sparse routing: near-uniform probabilities still pick experts per token
        s = health_summary(health)
        if s.get("entropy") is None or s["entropy"] < UNIFORM_ENTROPY:
            return None
        n = s["num_experts"]
        return (
            f"routing is still uniform at step {step}/{self.max_steps}: mean normalized gate entropy "
            f"{s['entropy']:.3f} >= {UNIFORM_ENTROPY} (mean max gate {s['max_gate']:.3f}; uniform: 1/N = {1 / n:.3f}), "
            f"so the {n} experts act as one LoRA with {n}x the parameters. {self.hint}".rstrip()
        )

    def _collapse(self, step: int, health: Mapping[str, Any]) -> str | None:
        for layer, entry in health.items():
            row = entry["all"]
            what = "gate mass" if row["dense"] else "load"
            top = max(row["usage"])
            if len(row["usage"]) > 1 and top > COLLAPSE_SHARE:
                expert = row["usage"].index(top)
                return (
                    f"routing collapsed at step {step}/{self.max_steps}: layer {layer}: expert {expert} takes "
                    f"{100 * top:.0f}% of the {what} (> {100 * COLLAPSE_SHARE:.0f}%); raise "
                    "molora.router_aux_loss_coef or lower the router lr"
                )
            if row["dead"] and self.router != "task":
                return (
                    f"routing collapsed at step {step}/{self.max_steps}: layer {layer}: experts {row['dead']} are "
                    f"dead (< {100 * DEAD_SHARE:.0f}% of their fair share of the {what}); raise "
                    "molora.router_aux_loss_coef or lower the router lr"
                )
        return None
