"""Training checkpoints: ``checkpoints/step_XXXXXXX/`` holds ``adapter/`` (``save_pretrained``),
``optimizer.pt`` (under FSDP ``optimizer_rank<r>.pt``), ``scheduler.pt``, ``rng_rank<r>.pt``
and ``trainer_state.json``. A checkpoint is written by every rank into one hidden temporary
folder that then replaces ``step_XXXXXXX/`` as one unit (:mod:`molora.atomic`), so an
interrupted save leaves the old checkpoint or the new one, and its leftovers are removed by the
next save; resuming restores all of it, so that a resumed run has the same losses as an
uninterrupted one.

State files are read with ``torch.load(weights_only=True)``: no arbitrary pickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from molora.atomic import atomic_directory, atomic_write_text
from molora.core.config import MoLoRAConfig
from molora.model import MoLoRAModel
from molora.training.distributed import is_sharded
from molora.training.run_dir import CHECKPOINTS, STATE, checkpoint_dirs, checkpoint_step

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
    """Write a checkpoint as one unit (all ranks call): every rank writes into one temporary
    folder, which then replaces ``step_N/`` in one swap (:func:`molora.atomic.atomic_directory`),
    so that a kill at any moment leaves the old checkpoint or the new one.

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
    if accelerator.is_main_process:
        _remove_leftovers(final.parent)
    with _shared_atomic_directory(accelerator, final) as tmp:
        save_adapter(accelerator, model, tmp / "adapter")
        if accelerator.is_main_process or is_sharded(accelerator):
            torch.save(optimizer.state_dict(), tmp / _optimizer_file(accelerator))
        if accelerator.is_main_process:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_text(tmp / STATE, json.dumps(state, indent=2))
    if accelerator.is_main_process and keep is not None:
        for old in checkpoint_dirs(output_dir)[:-keep]:
            _delete(old)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def _shared_atomic_directory(accelerator, path: Path) -> Iterator[Path]:
    """:func:`molora.atomic.atomic_directory` on the main process; its temporary folder is
    broadcast to the other ranks, which write into it. The swap happens after every rank is done."""
    ctx = atomic_directory(path) if accelerator.is_main_process else contextlib.nullcontext(None)
    with ctx as tmp:
        shared = [None if tmp is None else str(tmp)]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(shared, from_process=0)
        yield Path(shared[0])
        accelerator.wait_for_everyone()


def _remove_leftovers(root: Path) -> None:
    """Remove what interrupted saves left in ``checkpoints/``: hidden temporary folders and the
    ``step_N.tmp`` folders of earlier molora versions (complete checkpoints are kept)."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if (
            entry.is_dir()
            and checkpoint_step(entry.name) is None
            and (entry.name.startswith(".step_") or entry.name.endswith(".tmp"))
        ):
            shutil.rmtree(entry, ignore_errors=True)


def _delete(folder: Path) -> None:
    """Delete a checkpoint: first renamed to a hidden name (one step), so that a kill during the
    removal never leaves a half-deleted folder that looks like a checkpoint."""
    hidden = folder.with_name(f".{folder.name}.deleting")
    os.rename(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


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
    with _reading(ckpt / "adapter"):
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
    with _reading(ckpt / STATE):
        state = json.loads((ckpt / STATE).read_text())
        state = {k: state[k] for k in ("step", "micro_step", "world_size", "batch_size")}
    if state["world_size"] != accelerator.num_processes or state["batch_size"] != batch_size:
        accelerator.print(
            f"warning: resuming with another world size / batch size than {ckpt}: the data order differs from an uninterrupted run"
        )
    optimizer_file = ckpt / _optimizer_file(accelerator)
    with _reading(optimizer_file):
        optimizer.load_state_dict(torch.load(optimizer_file, weights_only=True, map_location="cpu"))
    with _reading(ckpt / "scheduler.pt"):
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng_file = ckpt / f"rng_rank{accelerator.process_index}.pt"
    if rng_file.is_file():
        with _reading(rng_file):
            _set_rng_state(torch.load(rng_file, weights_only=True))
    step, micro = state["step"], state["micro_step"]
    if step >= max_steps:
        raise ValueError(
            f"--resume: checkpoint {ckpt} is at step {step} >= train.max_steps={max_steps}; raise train.max_steps to train on"
        )
    accelerator.print(f"resumed from {ckpt} at step {step}")
    return step, micro


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn the errors of a damaged checkpoint file (truncated or corrupt, missing keys) into
    one ValueError naming it; a missing file stays a FileNotFoundError."""
    try:
        yield
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--resume: the checkpoint is incomplete: {e}") from e
    except (RuntimeError, OSError, EOFError, KeyError, TypeError, pickle.UnpicklingError, json.JSONDecodeError) as e:
        raise ValueError(
            f"--resume: {str(path)!r} is damaged ({type(e).__name__}: {str(e)[:200]}); "
            "resume from an earlier checkpoint with --resume-from"
        ) from e


def _dict_diff(a: dict, b: dict) -> dict:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
