"""Training checkpoints: ``checkpoints/step_XXXXXXX/`` holds ``adapter/`` (``save_pretrained``),
``optimizer.pt`` (under FSDP ``optimizer_rank<r>.pt``), ``scheduler.pt``, ``rng_rank<r>.pt``
and ``trainer_state.json``. A checkpoint is written to a temporary folder and renamed, so an
interrupted save leaves the previous checkpoints intact; resuming restores all of it, so that
a resumed run has the same losses as an uninterrupted one.

State files are read with ``torch.load(weights_only=True)``: no arbitrary pickle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from molora.core.config import MoLoRAConfig
from molora.model import MoLoRAModel
from molora.training.distributed import is_sharded
from molora.training.run_dir import CHECKPOINTS, STATE, checkpoint_dirs

__all__ = ["load_checkpoint_model", "load_training_state", "save_adapter", "save_checkpoint"]


def _rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *[float(x) for x in np_state[2:]]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _optimizer_file(accelerator) -> str:
    """FSDP shards the optimizer state: one file per rank; otherwise one shared file."""
    return f"optimizer_rank{accelerator.process_index}.pt" if is_sharded(accelerator) else "optimizer.pt"


def save_adapter(accelerator, model, path: Path) -> None:
    """``save_pretrained`` of the unwrapped model on the main process (all ranks call).

    Under FSDP (v1) the parameters are gathered first (``summon_full_params``); FSDP2
    (``fully_shard``) is not supported yet and raises.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        model: the prepared (possibly wrapped) MoLoRA model.
        path: the adapter folder to write.

    Raises:
        NotImplementedError: the model is sharded with FSDP2.
    """
    if is_sharded(accelerator):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not isinstance(model, FSDP):
            raise NotImplementedError(
                "saving MoLoRA adapters under FSDP2 (fully_shard) is not supported yet: use FSDP v1 or DDP"
            )
        with FSDP.summon_full_params(model, writeback=False, rank0_only=True, offload_to_cpu=True):
            if accelerator.is_main_process:
                accelerator.unwrap_model(model).save_pretrained(path)
    elif accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(path)
    accelerator.wait_for_everyone()


def save_checkpoint(
    accelerator, model, optimizer, scheduler, state: dict[str, Any], output_dir: Path, *, keep: int | None
) -> Path:
    """Write a checkpoint into a temporary folder, then rename it into place (all ranks call).

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        model: the prepared MoLoRA model.
        optimizer: the prepared optimizer.
        scheduler: the lr scheduler.
        state: the trainer state (``step``, ``micro_step``, ...), written last.
        output_dir: the run folder.
        keep: keep only the newest this many checkpoints (None: all).

    Returns:
        The checkpoint folder.
    """
    final = output_dir / CHECKPOINTS / f"step_{state['step']:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_adapter(accelerator, model, tmp / "adapter")
    if accelerator.is_main_process or is_sharded(accelerator):
        torch.save(optimizer.state_dict(), tmp / _optimizer_file(accelerator))
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep is not None:
            for old in checkpoint_dirs(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint_model(base: torch.nn.Module, ckpt: Path, config: MoLoRAConfig) -> MoLoRAModel:
    """The checkpoint's trainable adapter on ``base``, checked against the run's molora config.

    Args:
        base: the base model.
        ckpt: the checkpoint folder.
        config: the run config's ``molora`` section.

    Returns:
        The MoLoRA model, trainable.

    Raises:
        ValueError: the checkpoint's molora config differs from ``config``.
    """
    model = MoLoRAModel.from_pretrained(base, ckpt / "adapter", is_trainable=True)
    saved, wanted = model.molora_config.to_dict(), config.to_dict()
    if saved != wanted:
        raise ValueError(
            f"--resume: the checkpoint's molora config differs from the run config's: {_dict_diff(saved, wanted)}"
        )
    return model


def load_training_state(
    accelerator, optimizer, scheduler, ckpt: Path, *, batch_size: int, max_steps: int
) -> tuple[int, int]:
    """Restore the optimizer, scheduler and this rank's RNG from a checkpoint.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        optimizer: the prepared optimizer.
        scheduler: the lr scheduler.
        ckpt: the checkpoint folder.
        batch_size: ``train.batch_size`` (a change is warned about: the data order differs).
        max_steps: ``train.max_steps``.

    Returns:
        ``(step, micro_step)`` of the checkpoint.

    Raises:
        ValueError: the checkpoint is already at ``max_steps`` or beyond.
    """
    state = json.loads((ckpt / STATE).read_text())
    if state["world_size"] != accelerator.num_processes or state["batch_size"] != batch_size:
        accelerator.print(
            f"warning: resuming with another world size / batch size than {ckpt}: the data order differs from an uninterrupted run"
        )
    optimizer.load_state_dict(torch.load(ckpt / _optimizer_file(accelerator), weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng_file = ckpt / f"rng_rank{accelerator.process_index}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    step, micro = state["step"], state["micro_step"]
    if step >= max_steps:
        raise ValueError(
            f"--resume: checkpoint {ckpt} is at step {step} >= train.max_steps={max_steps}; raise train.max_steps to train on"
        )
    accelerator.print(f"resumed from {ckpt} at step {step}")
    return step, micro


def _dict_diff(a: dict, b: dict) -> dict:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
