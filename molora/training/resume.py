"""What ``--resume`` reads from a checkpoint besides the weights, checked before it is used:

- the trainer state (``trainer_state.json``): integer counters in range, a data position
  (``micro_step``) that the recorded steps and gradient accumulation can have reached;
- the optimizer state: the same parameter groups, and moments of the parameters' shapes
  (a foreign or damaged file fails here, naming the file, not at the first step);
- the learning rates and the schedule: rebuilt from the *current* config. Only the
  optimizer's moments and the step come from the checkpoint, so that a changed ``train.lr``,
  ``router_lr``, ``loraplus_lr_ratio``, ``max_steps``, ``warmup`` or ``lr_schedule`` takes
  effect; what changed since the checkpoint's run is listed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "logged_so_far",
    "SCHEDULE_FIELDS",
    "changed_settings",
    "check_optimizer_state",
    "check_trainer_state",
    "fresh_hyperparameters",
    "reschedule",
]

# the train settings a resume takes from the current config (and reports when they changed)
SCHEDULE_FIELDS = (
    "lr",
    "router_lr",
    "loraplus_lr_ratio",
    "weight_decay",
    "max_steps",
    "warmup",
    "lr_schedule",
    "min_lr_ratio",
    "max_grad_norm",
    "batch_size",
    "grad_accum",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_trainer_state(state: Any, path: Path) -> dict[str, Any]:
    """The checked counters of a ``trainer_state.json``.

    Returns:
        ``{"step", "micro_step", "world_size", "batch_size", "max_grad_accum", "fsdp", "train"}``;
        ``max_grad_accum`` is the largest gradient accumulation the run used (older states
        record only ``grad_accum``), ``train`` the writer's train settings (None when not recorded).

    Raises:
        ValueError: a missing or non-integer counter, or one out of range (named with its value).
    """
    if not isinstance(state, dict):
        raise ValueError(f"--resume: {str(path)!r} must hold a JSON object, got {type(state).__name__}")
    wanted = {"step": 0, "micro_step": 0, "world_size": 1, "batch_size": 1}
    problems = []
    for key, low in wanted.items():
        if key not in state:
            problems.append(f"{key!r} is missing")
        elif not _is_int(state[key]) or state[key] < low:
            problems.append(f"{key!r} must be an integer >= {low}, got {state[key]!r}")
    accum = state.get("max_grad_accum", state.get("grad_accum", 1))
    if not _is_int(accum) or accum < 1:
        problems.append(f"'grad_accum' must be an integer >= 1, got {accum!r}")
    if not problems:
        step, micro = state["step"], state["micro_step"]
        if not step <= micro <= step * accum:  # every step consumes 1 to grad_accum micro-batches
            problems.append(
                f"'micro_step'={micro} does not fit 'step'={step} with gradient accumulation <= {accum} "
                f"(expected {step}..{step * accum})"
            )
    if problems:
        raise ValueError(
            f"--resume: {str(path)!r} is damaged or not molora's: " + "; ".join(problems)
            + "; resume from an earlier checkpoint with --resume-from"
        )  # fmt: skip
    train = state.get("train")
    return {k: state[k] for k in wanted} | {
        "max_grad_accum": accum,
        "fsdp": bool(state.get("fsdp", False)),
        "train": train if isinstance(train, dict) else None,
    }


def check_optimizer_state(optimizer, saved: Any, path: Path, params_by_name: dict[str, torch.Tensor] | None) -> None:
    """The saved optimizer state fits ``optimizer``: the same groups (by name and size) and
    moments of the parameters' shapes.

    Args:
        optimizer: the run's (possibly accelerate-wrapped) optimizer.
        saved: what ``torch.load`` read (``{"state", "param_groups"}``).
        path: the file, for the message.
        params_by_name: under FSDP2 (state keyed by parameter name): the model's parameters;
            each moment is compared with the local shard. None: the state is keyed by index.

    Raises:
        ValueError: the state is laid out for another model.
    """

    def fail(what: str):
        raise ValueError(
            f"--resume: {str(path)!r} holds the optimizer state of another model ({what}); "
            "resume from a checkpoint written with this run's molora config and targets"
        )

    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or "param_groups" not in saved:
        fail("no 'state' / 'param_groups'")
    if params_by_name is not None:
        for name, values in saved["state"].items():
            param = params_by_name.get(name)
            if param is None:
                fail(f"unknown parameter {name!r}")
            local = param.to_local() if hasattr(param, "to_local") else param
            _check_moments(values, local, name, fail)
        return
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    names = [g.get("name") for g in groups]
    if [g.get("name") for g in saved_groups] != names or [len(g["params"]) for g in saved_groups] != [
        len(g["params"]) for g in groups
    ]:
        fail(
            f"groups {[(g.get('name'), len(g['params'])) for g in saved_groups]}, "
            f"this run has {[(g.get('name'), len(g['params'])) for g in groups]}"
        )
    for group, saved_group in zip(groups, saved_groups):
        for index, (key, param) in enumerate(zip(saved_group["params"], group["params"])):
            _check_moments(saved["state"].get(key, {}), param, f"group {group.get('name')!r} parameter {index}", fail)


def _check_moments(values: Any, param: torch.Tensor, where: str, fail) -> None:
    if not isinstance(values, dict):
        fail(f"{where}: not a dict of moments")
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
            fail(f"{where}: {key} of shape {list(value.shape)}, the parameter is {list(param.shape)}")


def fresh_hyperparameters(optimizer) -> list[dict[str, Any]]:
    """Each group's settings (lr, initial_lr, weight decay, betas, ...) as the current config
    built them: taken before the checkpoint's state overwrites them."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def reschedule(optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, fresh: list[dict[str, Any]], step: int) -> None:
    """Put the current config's settings back into the loaded optimizer and move the schedule
    (built from the current config) to ``step``: the next optimizer step uses
    ``initial_lr * lr_factor(step)`` of the current warm-up, decay and ``max_steps``."""
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)
    scheduler.base_lrs = [settings["initial_lr"] for settings in fresh]
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def changed_settings(saved_train: dict[str, Any] | None, train) -> list[str]:
    """``"train.lr: 0.005 -> 0.001"`` for each of :data:`SCHEDULE_FIELDS` that differs between
    the checkpoint's run (``saved_train``, None: not recorded) and the current ``train`` section."""
    if not saved_train:
        return []
    current = dataclasses.asdict(train)
    return [
        f"train.{key}: {saved_train[key]!r} -> {current[key]!r}"
        for key in SCHEDULE_FIELDS
        if key in saved_train and saved_train[key] != current[key]
    ]


def logged_so_far(metrics: Path, step: int) -> tuple[float | None, dict[str, Any] | None]:
    """The last logged train loss and the eval record of ``step`` in a run's ``metrics.jsonl``
    (what the summary of a run resumed at its last step reports); None where there is none."""
    from molora.training.metrics import read_metrics

    last_loss, last_eval = None, None
    if not metrics.is_file():
        return last_loss, last_eval
    for record in read_metrics(metrics):
        if record.get("type") == "train" and record.get("loss") is not None:
            last_loss = record["loss"]
        if record.get("type") == "eval" and record.get("step") == step and "tasks" in record:
            last_eval = record
    return last_loss, last_eval
