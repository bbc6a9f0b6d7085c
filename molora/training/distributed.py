"""The ``accelerate`` set-up of a training run: one code path for a single process, DDP and
FSDP (``accelerate launch``); mixed precision chosen from the config, the launcher or the GPU."""

from __future__ import annotations

import os

import torch

__all__ = ["is_sharded", "make_accelerator", "resolve_mixed_precision"]


def resolve_mixed_precision(choice: str) -> str | None:
    """``train.mixed_precision`` -> the ``Accelerator``'s ``mixed_precision`` argument.

    Args:
        choice: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"no"``.

    Returns:
        ``choice`` unless it is ``"auto"``; then None under ``accelerate launch
        --mixed_precision`` (the launcher decides), bf16 or fp16 on CUDA, ``"no"`` on CPU.
    """
    if choice != "auto":
        return choice
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # `accelerate launch --mixed_precision` decides
    if torch.cuda.is_available():
        # fp16 needs loss scaling (accelerate's GradScaler) and fp32 master weights: the
        # adapter is float32 by default (MoLoRAConfig.adapter_dtype), so both are in place.
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(mixed_precision: str):
    """A fresh ``accelerate.Accelerator`` for one run.

    Args:
        mixed_precision: ``train.mixed_precision`` (see :func:`resolve_mixed_precision`).

    Returns:
        The ``Accelerator``.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Several processes and no GPU (torchrun / `accelerate launch --multi_gpu` on a CPU box):
    # accelerate only picks its CPU backend (gloo) when told to run on CPU.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # train() may run several times in one process (notebooks, tests) with other precisions:
    # start from a fresh AcceleratorState, keeping the process group (PartialState).
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision), cpu=multi_cpu)


def is_sharded(accelerator) -> bool:
    """Whether the run is under FSDP (parameters and optimizer state sharded over ranks)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP
