"""The distributed set-up of a training run: one code path for a single process, DDP
(``accelerate launch`` / torchrun) and FSDP2 (``train.fsdp: true``); mixed precision chosen from
the config, the launcher or the GPU.

FSDP2 is applied here with ``torch.distributed.fsdp.fully_shard``, not through accelerate's FSDP
plugin: accelerate only turns its plugin on for GPU-type backends (on CPU/gloo it silently falls
back to DDP-less ``MULTI_CPU``), while ``fully_shard`` runs the same way on CPU (gloo) and GPU
(NCCL). Each decoder layer (the model's ``_no_split_modules``) is one FSDP unit, so the experts
and routers injected into it are sharded with it; the root unit holds the rest (embeddings,
final norm, head).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = [
    "check_launcher",
    "gather_full_tensors",
    "is_sharded",
    "make_accelerator",
    "no_sync",
    "resolve_mixed_precision",
    "shard_model",
]


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


def check_launcher(accelerator, *, fsdp: bool) -> None:
    """Refuse the set-ups molora does not run: accelerate's own FSDP plugin, FSDP2 in fp16.

    Raises:
        NotImplementedError: ``accelerate launch --use_fsdp`` (or an accelerate config with
            FSDP), or ``train.fsdp`` with fp16 mixed precision.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise NotImplementedError(
            "accelerate's FSDP plugin (--use_fsdp / an accelerate config with FSDP) is not supported: "
            "launch with --multi_gpu and set train.fsdp=true (molora applies FSDP2 itself)"
        )
    if fsdp and accelerator.mixed_precision == "fp16":
        raise NotImplementedError(
            "train.fsdp=true with fp16 mixed precision is not supported (loss scaling of sharded gradients): "
            "use train.mixed_precision=bf16 or no"
        )


def shard_model(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 (``fully_shard``) over all processes, in place.

    The trainable parameters (adapters, routers) are first broadcast from rank 0, as DDP does;
    the frozen base is the same on every rank (loaded from the same files or built from the
    same seed). Under bf16 the parameters are all-gathered and computed in bf16 and the
    gradients reduced in float32 (``MixedPrecisionPolicy``), except the routers', which are
    their own units gathered and computed in float32; the sharded master copies keep their dtype. Build the optimizer afterwards: it must hold the sharded parameters.

    Args:
        model: the MoLoRA model (its ``base_model`` names its decoder layer classes in
            ``_no_split_modules``).
        accelerator: the run's ``accelerate.Accelerator`` (several processes).

    Returns:
        ``model``, now an ``FSDPModule`` (parameters are ``DTensor`` shards on the
        accelerator's device: ``fully_shard`` moves one unit at a time).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for param in model.parameters():
        if param.requires_grad:  # small (adapters): a device copy for NCCL, not the whole model
            synced = param.data.to(accelerator.device)
            dist.broadcast(synced, src=0)
            param.data.copy_(synced)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    policy = MixedPrecisionPolicy()
    if accelerator.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if accelerator.mixed_precision == "bf16":
        _shard_routers_in_float32(model, mesh)
    layer_classes = set(getattr(model.base_model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _shard_routers_in_float32(model: torch.nn.Module, mesh) -> None:
    """Each router its own FSDP2 unit with a float32 policy (parameters gathered and computed in
    float32, its inputs cast to float32), inside the bf16 unit of its decoder layer: routing
    uses float32 weights under bf16 (DESIGN §5), as it does without FSDP. A router shared by a
    block (``router_sharing="block"``) is sharded once."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    seen = set()
    for layer in model.molora_layers().values():
        router = layer.router
        if id(router) in seen or not any(True for _ in router.parameters()):
            continue
        seen.add(id(router))
        fully_shard(router, mesh=mesh, mp_policy=policy)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded with FSDP2 (parameters and optimizer state split over ranks)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(accelerator, model: torch.nn.Module) -> Iterator[None]:
    """Accumulate gradients locally, without the all-reduce (DDP) or reduce-scatter (FSDP2)."""
    if not is_sharded(model):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def gather_full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full, detached CPU copies of ``tensors``; FSDP2 shards (``DTensor``) are all-gathered.

    A collective under FSDP2: every rank calls it, with the same names in the same order.
    """
    from torch.distributed.tensor import DTensor

    full = {}
    for name, t in tensors.items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        full[name] = t.detach().cpu()
    return full
