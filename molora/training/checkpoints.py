"""Training checkpoints: ``checkpoints/step_XXXXXXX/`` holds ``adapter/`` (``save_pretrained``),
``optimizer.pt`` (under FSDP2 one shard per rank, ``optimizer_rank<r>.pt``: the optimizer state
of the rank's parameter shards, keyed by parameter name), ``scheduler.pt``, ``rng_rank<r>.pt``
and ``trainer_state.json``. Under FSDP2 the adapter is gathered whole (only the adapter, never
the base) and written by the main process; the optimizer shards resume on the same number of
processes. A checkpoint is written by every rank into one hidden temporary
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
from molora.io import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict
from molora.model import MoLoRAModel
from molora.training.distributed import gather_full_tensors, is_sharded
from molora.training.resume import (
    changed_settings,
    check_optimizer_state,
    check_trainer_state,
    fresh_hyperparameters,
    reschedule,
)
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


def _optimizer_file(accelerator, model) -> str:
    """FSDP2 shards the optimizer state: one file per rank; otherwise one shared file."""
    return f"optimizer_rank{accelerator.process_index}.pt" if is_sharded(model) else "optimizer.pt"


def save_adapter(accelerator, model, path: Path) -> None:
    """``save_pretrained`` of the unwrapped model on the main process (all ranks call).

    Under FSDP2 every rank first all-gathers the adapter's shards (experts, routers, modules to
    save; the frozen base stays sharded), and the main process writes the full tensors.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        model: the prepared (possibly wrapped or sharded) MoLoRA model.
        path: the adapter folder to write.
    """
    inner = accelerator.unwrap_model(model)
    if is_sharded(model):
        state = gather_full_tensors(adapter_state_dict(inner))  # a collective: all ranks
        if accelerator.is_main_process:
            inner.save_pretrained(path, state=state)
    elif accelerator.is_main_process:
        inner.save_pretrained(path)
    accelerator.wait_for_everyone()


def _sharded_optimizer_state(model, optimizer) -> dict[str, Any]:
    """This rank's optimizer state under FSDP2, keyed by parameter name; each ``DTensor`` is
    replaced by its local shard (a plain tensor: the file loads with ``weights_only``)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    state = get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer))
    # new dicts: the returned ones may be the optimizer's live state
    local = {
        name: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in values.items()}
        for name, values in state["state"].items()
    }
    return {**state, "state": local}


def _load_sharded_optimizer(model, optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`_sharded_optimizer_state`: each shard becomes a ``DTensor`` laid out as
    its parameter (same mesh and placements), then the optimizer loads the state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    for name, values in state["state"].items():
        param = params[name]
        for key, value in values.items():
            if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.dim() > 0:
                values[key] = DTensor.from_local(
                    value.to(param.device),
                    param.device_mesh,
                    param.placements,
                    run_check=False,
                    shape=param.shape,
                    stride=param.stride(),
                )
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), optim_state_dict=state)


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
    with _shared_atomic_directory(accelerator, final, _checkpoint_files(accelerator, model)) as tmp:
        save_adapter(accelerator, model, tmp / "adapter")
        if is_sharded(model):
            torch.save(_sharded_optimizer_state(model, optimizer), tmp / _optimizer_file(accelerator, model))
        elif accelerator.is_main_process:
            torch.save(optimizer.state_dict(), tmp / _optimizer_file(accelerator, model))
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


def _checkpoint_files(accelerator, model) -> list[str]:
    """The files a complete checkpoint holds (checked before it is published)."""
    n = accelerator.num_processes
    optimizer = [f"optimizer_rank{r}.pt" for r in range(n)] if is_sharded(model) else ["optimizer.pt"]
    adapter = [f"adapter/{CONFIG_NAME}", f"adapter/{WEIGHTS_NAME}"]
    return [*adapter, *optimizer, "scheduler.pt", *[f"rng_rank{r}.pt" for r in range(n)], STATE]


@contextlib.contextmanager
def _shared_atomic_directory(accelerator, path: Path, expect: list[str]) -> Iterator[Path]:
    """:func:`molora.atomic.atomic_directory` on the main process; its temporary folder is
    broadcast to the other ranks, which write into it. The swap happens after every rank is
    done, once the ``expect`` files are all there."""
    main = accelerator.is_main_process
    ctx = atomic_directory(path, expect=expect) if main else contextlib.nullcontext(None)
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


def load_training_state(accelerator, model, optimizer, scheduler, ckpt: Path, *, train) -> dict[str, Any]:
    """Restore the optimizer's moments, the step and this rank's RNG from a checkpoint; the
    learning rates and the schedule come from the current config (:mod:`molora.training.resume`).

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        model: the prepared (possibly sharded) model the optimizer holds the parameters of.
        optimizer: the prepared optimizer, as the current config built it.
        scheduler: the lr scheduler, as the current config built it.
        ckpt: the checkpoint folder.
        train: the current ``train`` section (a changed batch size is warned about: the data
            order differs; changed lr / schedule settings are listed).

    Returns:
        The checked trainer state (:func:`molora.training.resume.check_trainer_state`):
        ``step``, ``micro_step``, ``max_grad_accum``, ...

    Raises:
        ValueError: the checkpoint is beyond ``train.max_steps``, its trainer state or optimizer
            state is damaged or of another model, or laid out for another sharding.
    """
    with _reading(ckpt / STATE):
        state = check_trainer_state(json.loads((ckpt / STATE).read_text()), ckpt / STATE)
    _check_layout(accelerator, model, state, ckpt)
    if state["step"] > train.max_steps:
        raise ValueError(
            f"--resume: checkpoint {ckpt} is at step {state['step']} > train.max_steps={train.max_steps}; "
            f"set train.max_steps >= {state['step']}, or resume from an earlier checkpoint with --resume-from"
        )
    if state["world_size"] != accelerator.num_processes or state["batch_size"] != train.batch_size:
        accelerator.print(
            f"warning: resuming with another world size / batch size than {ckpt}: the data order differs from an uninterrupted run"
        )
    fresh = fresh_hyperparameters(optimizer)
    optimizer_file = ckpt / _optimizer_file(accelerator, model)
    with _reading(optimizer_file):
        saved = torch.load(optimizer_file, weights_only=True, map_location="cpu")
    named = dict(model.named_parameters()) if is_sharded(model) else None
    check_optimizer_state(optimizer, saved, optimizer_file, named)
    with _reading(optimizer_file):
        if is_sharded(model):
            _load_sharded_optimizer(model, optimizer, saved)
        else:
            optimizer.load_state_dict(saved)
    reschedule(optimizer, scheduler, fresh, state["step"])
    rng_file = ckpt / f"rng_rank{accelerator.process_index}.pt"
    if rng_file.is_file():
        with _reading(rng_file):
            _set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        accelerator.print(
            f"warning: --resume: {rng_file} is missing: random draws (dropout, router jitter) differ from an "
            "uninterrupted run; the data order does not"
        )
    changed = changed_settings(state["train"], train)
    if changed:
        accelerator.print("resume: settings changed since the checkpoint, taken from the current config: " + "; ".join(changed))
    accelerator.print(f"resumed from {ckpt} at step {state['step']}")
    return state


def _check_layout(accelerator, model, state: dict[str, Any], ckpt: Path) -> None:
    """The optimizer state of ``ckpt`` fits this run: the same sharding, and under FSDP2 the
    same number of processes (one shard per rank)."""
    sharded = is_sharded(model)
    if state["fsdp"] != sharded:
        raise ValueError(
            f"--resume: checkpoint {ckpt} was written with train.fsdp={str(state['fsdp']).lower()} "
            f"and this run has train.fsdp={str(sharded).lower()} over {accelerator.num_processes} process(es): "
            "resume with the same setting"
        )
    if sharded and state["world_size"] != accelerator.num_processes:
        raise ValueError(
            f"--resume: checkpoint {ckpt} holds FSDP2 optimizer shards of {state['world_size']} processes, "
            f"this run has {accelerator.num_processes}: resume with --num_processes {state['world_size']}"
        )


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
