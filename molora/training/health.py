"""Routing health during training (DESIGN §5): the record ``molora train`` writes to
``metrics.jsonl`` at each log step, and :class:`RoutingHealthCallback` for HF ``Trainer``.

Both read the layers' ``last_routing`` (the last micro-batch before the log) through
:meth:`molora.model.MoLoRAModel.last_routing_report`, so the forward pass does nothing extra
and makes no host sync; the metrics and the warning rules are in
:mod:`molora.core.routing_health`.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from molora.core.routing_health import RoutingHealthMonitor, health_summary, routing_health
from molora.model import MoLoRAModel

__all__ = ["RoutingHealthCallback", "health_record", "TRAIN_HINT"]

TRAIN_HINT = (
    "Raise the router's learning rate (train.router_lr_ratio; router lr = ratio x lr), lower "
    "molora.router_aux_loss_coef, or train longer."
)
TRAINER_HINT = (
    "Give the router its own learning rate: Trainer(optimizers=(molora.create_molora_optimizer(model, lr), None)) "
    "(router lr = the router kind's default ratio x lr); lower router_aux_loss_coef, or train longer."
)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items() if k != "dense"}
    return value


def health_record(model: MoLoRAModel, step: int, monitor: RoutingHealthMonitor | None = None) -> dict[str, Any]:
    """The ``routing_health`` record of ``metrics.jsonl`` at ``step``, from the last forward.

    Args:
        model: the (unwrapped) MoLoRA model, after a training forward.
        step: the optimizer step.
        monitor: checks the warning rules and logs new warnings (they go in ``warnings``).

    Returns:
        ``{"type": "routing_health", "step", "summary": {...}, "layers": {layer: {"all":
        {...}, "tasks": {task: {...}}}}, "warnings": [...]}`` (floats rounded to 4 digits).
    """
    health = routing_health(model.last_routing_report())
    warnings = monitor.check(step, health) if monitor is not None else []
    return {
        "type": "routing_health",
        "step": step,
        "summary": _rounded(health_summary(health)),
        "layers": _rounded(health),
        "warnings": warnings,
    }


def _find_molora(model: nn.Module | None) -> MoLoRAModel | None:
    if model is None:
        return None
    return next((m for m in model.modules() if isinstance(m, MoLoRAModel)), None)


class RoutingHealthCallback(TrainerCallback):
    """HF ``Trainer`` callback: routing health at every training log, and one warning when
    routing stays uniform or collapses (rules: :mod:`molora.core.routing_health`).

    At each training log (``logging_steps``) it adds ``routing/entropy``, ``routing/max_gate``,
    ``routing/usage_cv``, ``routing/max_usage`` and ``routing/dead_experts`` (means over
    layers) to the logged metrics (``trainer.state.log_history``; reporting integrations that
    run after it see them too), and keeps the per-layer, per-task health in ``history``.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[RoutingHealthCallback()])
    """

    def __init__(self) -> None:
        self.monitor: RoutingHealthMonitor | None = None
        self.history: list[dict[str, Any]] = []

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):  # noqa: D102 (TrainerCallback API)
        inner = _find_molora(model)
        if inner is None or logs is None or "loss" not in logs:  # eval logs: not a training forward
            return
        if self.monitor is None:
            self.monitor = RoutingHealthMonitor(state.max_steps, router=inner.molora_config.router, hint=TRAINER_HINT)
        record = health_record(inner, state.global_step, self.monitor)
        self.history.append(record)
        scalars = {f"routing/{k}": v for k, v in record["summary"].items() if k != "num_experts" and v is not None}
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)
