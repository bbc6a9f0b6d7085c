"""The run folder (``train.output_dir``): the names of what a run writes there, where its
checkpoints are, and the checks made before a run starts (one run at a time in a folder:
:func:`run_lock`; a fresh run does not mix its files with an earlier run's; ``--resume``
finds a complete checkpoint)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from molora.atomic import FolderBusyError, recover_tree, writer_lock

__all__ = [
    "CHECKPOINTS",
    "EXPORT",
    "FINAL",
    "METRICS",
    "RUN_CONFIG",
    "STATE",
    "SUMMARY",
    "check_fresh",
    "checkpoint_dirs",
    "checkpoint_step",
    "resolve_resume",
    "run_lock",
]

CHECKPOINTS = "checkpoints"  # step_XXXXXXX/ folders
METRICS = "metrics.jsonl"
STATE = "trainer_state.json"  # in each checkpoint; written last, so it marks a complete one
RUN_CONFIG = "run_config.yaml"
FINAL = "final"
EXPORT = "export"
SUMMARY = "summary.json"

_STEP_DIR = re.compile(r"step_(\d+)")  # a complete checkpoint's name; temp and hidden folders do not match


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name (``step_0000015`` -> 15); None for any other name
    (``step_0000015.tmp``, hidden temporary folders of an interrupted save)."""
    match = _STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with a trainer state) in ``output_dir``, oldest first.

    Folders left by an interrupted save (``step_N.tmp``, hidden temporary folders) are ignored.
    """
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p.name) is not None and (p / STATE).is_file()]
    return sorted(found, key=lambda p: checkpoint_step(p.name))


@contextlib.contextmanager
def run_lock(accelerator, output_dir: Path) -> Iterator[None]:
    """Hold the run folder's writer lock for the whole run (all processes call; the main one
    locks): a second ``molora train`` into the same ``output_dir`` is refused before it reads,
    deletes or writes anything there, instead of dying on the first run's cleanup.

    Raises:
        FolderBusyError: another process is writing ``output_dir`` (on every rank).
    """
    with contextlib.ExitStack() as stack:
        problem = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(writer_lock(output_dir, what="run folder (train.output_dir)"))
            except FolderBusyError as e:
                problem = e.strerror
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            shared = [problem]
            broadcast_object_list(shared, from_process=0)
            problem = shared[0]
        if problem:
            raise FolderBusyError(11, problem)
        yield


def check_fresh(accelerator, output_dir: Path, *, overwrite: bool) -> None:
    """A fresh run must not mix its files with an earlier run's (unless asked to clear it).

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (all processes call).
        output_dir: the run folder.
        overwrite: delete an earlier run's files instead of refusing.

    Raises:
        FileExistsError: ``output_dir`` holds an earlier run and ``overwrite`` is false.
    """
    accelerator.wait_for_everyone()  # every rank looks before the main one deletes anything
    old = [output_dir / n for n in (CHECKPOINTS, METRICS, FINAL, EXPORT, SUMMARY) if (output_dir / n).exists()]
    if not old:
        return
    if not overwrite:
        raise FileExistsError(
            f"train.output_dir={str(output_dir)!r} holds an earlier run ({', '.join(p.name for p in old)}): "
            "continue it with --resume, choose another train.output_dir, or set train.overwrite_output_dir=true"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for path in old:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    accelerator.wait_for_everyone()


def resolve_resume(resume: bool | str | os.PathLike, output_dir: Path) -> Path:
    """The checkpoint folder to resume from.

    Args:
        resume: ``True``: the newest checkpoint in ``output_dir``; a path: that folder.
        output_dir: the run folder.

    Returns:
        The checkpoint folder.

    Raises:
        FileNotFoundError: no checkpoint, or the path is not a complete checkpoint.
    """
    if resume is True:
        if (output_dir / CHECKPOINTS).is_dir():
            recover_tree(output_dir / CHECKPOINTS)  # a checkpoint moved aside by a killed save is put back
        found = checkpoint_dirs(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint in {str(output_dir / CHECKPOINTS)!r}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"--resume {str(path)!r}: not a checkpoint folder ({STATE} missing)")
    return path
