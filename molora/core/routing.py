"""The per-model routing context: task ids, their validation, and their replay under checkpointing.

Task ids are not a layer input: the model receives them once per call, as (batch,) ids, and
every MoLoRA layer reads them from the shared :class:`RoutingContext`. Three rules keep that
safe:

- Ids are validated once per model call, on the host-side input (:func:`validate_task_ids`),
  never truncated or repeated to fit: a float, a bool, an id out of range or a count that is
  not the batch size is an error. Under ``torch.compile`` the range check is an assertion
  inside the graph (``torch._assert_async``), so the call stays one graph.
- Generation expands the ids itself for beams and returned sequences (``MoLoRAModel.generate``);
  the layers never guess an expansion.
- Gradient checkpointing recomputes a block during backward, after later forwards may have
  changed the context. :func:`replay_routing` wraps the checkpoint function of every
  checkpointed block so that the recomputation runs with the ids of *its own* forward (a loss
  over two forwards, as in DPO, gets the right gradients).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class RoutingContext:
    """Per-model routing inputs that are not layer inputs, shared by all its MoLoRA layers.

    Attributes:
        task_ids: (batch,) int64 task id of each sequence of the current call, or None.
    """

    task_ids: torch.Tensor | None = None

    @contextlib.contextmanager
    def using(self, task_ids: torch.Tensor | None) -> Iterator[None]:
        """Temporarily route with ``task_ids`` (used to replay a forward's ids on recompute)."""
        previous, self.task_ids = self.task_ids, task_ids
        try:
            yield
        finally:
            self.task_ids = previous


class BlockRouting:
    """The routing one router computes for all the targeted layers of a parent module
    (``router_sharing="block"``, MixLoRA form).

    The first targeted layer of the block (its owner) routes in each forward and stores the
    RouterOutput here; the block's other layers read it. Gradient checkpointing recomputes a
    block in the same order, so a recomputation reads the routing of its own recomputed owner.

    Attributes:
        owner: qualified name of the layer that routes.
        routing: the RouterOutput of the owner's latest forward (None before the first).
    """

    def __init__(self, owner: str):
        self.owner = owner
        self.routing = None

    def __repr__(self) -> str:
        return f"BlockRouting(owner={self.owner!r})"


def validate_task_ids(
    task_ids: Any,
    *,
    batch_size: int | None,
    num_tasks: int | None,
    task_names: Sequence[str] | None = None,
) -> torch.Tensor | None:
    """(batch,) int64 task ids from what the user passed, or a clear ValueError.

    Args:
        task_ids: None, an int or task name, a sequence of ints or names, or an integer tensor.
        batch_size: the batch size of the call (None when it cannot be told).
        num_tasks: valid ids are ``0 .. num_tasks - 1`` (None: any id >= 0).
        task_names: names that may stand for ids, in id order.

    Raises:
        ValueError: floats, bools, unknown names, ids out of range, or not one id per sequence.
    """
    if task_ids is None:
        return None
    ids = _as_id_tensor(task_ids, task_names)
    if batch_size is not None and ids.shape[0] != batch_size:
        raise ValueError(
            f"`task_ids` must hold one id per sequence: batch size {batch_size}, got {ids.shape[0]} ids "
            f"({_preview(ids)}); ids are never repeated or truncated to fit"
        )
    if not ids.numel():
        return ids
    allowed = f"[0, num_tasks={num_tasks})" if num_tasks is not None else ">= 0"
    if torch.compiler.is_compiling():
        # Inside a compiled graph a value check on the host would break the graph: assert
        # without a sync instead (raises on CPU; a device-side assert on CUDA).
        in_range = ids >= 0 if num_tasks is None else (ids >= 0) & (ids < num_tasks)
        torch._assert_async(in_range.all(), f"`task_ids` must be in {allowed}")
        return ids
    low, high = int(ids.min()), int(ids.max())  # one host sync per model call
    if low < 0 or (num_tasks is not None and high >= num_tasks):
        raise ValueError(f"`task_ids` must be in {allowed}, got values in [{low}, {high}]")
    return ids


def _as_id_tensor(task_ids: Any, task_names: Sequence[str] | None) -> torch.Tensor:
    if isinstance(task_ids, torch.Tensor):
        if task_ids.dtype == torch.bool or task_ids.is_floating_point() or task_ids.is_complex():
            raise ValueError(f"`task_ids` must be an integer tensor, got dtype {task_ids.dtype}")
        return task_ids.reshape(-1).long()
    values = [task_ids] if isinstance(task_ids, (int, str)) else task_ids
    if not isinstance(values, Sequence) or isinstance(values, (bytes, bytearray)):
        raise ValueError(f"`task_ids` must be ints, task names or an integer tensor, got {type(task_ids).__name__}")
    return torch.tensor([_one_id(v, task_names) for v in values], dtype=torch.long)


def _one_id(value: Any, task_names: Sequence[str] | None) -> int:
    if isinstance(value, str):
        if not task_names or value not in task_names:
            known = list(task_names) if task_names else "none (set MoLoRAConfig.task_names)"
            raise ValueError(f"`task_ids` names an unknown task {value!r}; task names: {known}")
        return list(task_names).index(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`task_ids` entries must be ints or task names, got {value!r} ({type(value).__name__})")
    return value


def _preview(ids: torch.Tensor) -> str:
    shown = ids[:8].tolist()
    return f"{shown}{' ...' if ids.numel() > 8 else ''}"


def checkpointable_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that transformers may checkpoint (those with a ``gradient_checkpointing``
    flag): where :func:`replay_routing` looks, found once instead of walking the model every forward."""
    return [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]


def replay_routing(blocks: Iterable[nn.Module], context: RoutingContext) -> None:
    """Make every checkpointed block recompute with the task ids of its own forward.

    transformers stores the checkpoint function on each block as ``_gradient_checkpointing_func``;
    it is wrapped (once) so that the function it checkpoints first restores the routing context
    captured when the block ran forward. Idempotent; call it after checkpointing is enabled.

    Args:
        blocks: the modules to look at (:func:`checkpointable_blocks` of the model).
        context: the model's routing context.
    """
    for module in blocks:
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None and not getattr(func, "_molora_replays_routing", False):
            module._gradient_checkpointing_func = _replaying(func, context)


def _replaying(checkpoint_func, context: RoutingContext):
    @functools.wraps(checkpoint_func)
    def checkpoint_with_routing(function, *args, **kwargs):
        captured = context.task_ids  # the ids of this forward

        def run(*inner_args, **inner_kwargs):
            with context.using(captured):
                return function(*inner_args, **inner_kwargs)

        return checkpoint_func(run, *args, **kwargs)

    checkpoint_with_routing._molora_replays_routing = True
    return checkpoint_with_routing
