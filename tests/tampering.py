"""What another process, or a damaged disk, does to a run's files: hold its writer lock, edit its
training state, put another model's optimizer state in its checkpoint, run out of space. Shared by the tests and
``scripts/probes`` (which put this folder on ``sys.path``)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["CKPT", "edit_trainer_state", "foreign_optimizer", "locked_by_another_process", "small_disk"]

CKPT = Path("checkpoints") / "step_0000002"
"""The checkpoint of a two-step run, relative to its output folder."""


@contextlib.contextmanager
def locked_by_another_process(path: Path, *, holder: str = "test", seconds: int = 600):
    """A second process holding the writer lock of ``path`` (molora.atomic's protocol: an
    exclusive flock on ``.{name}.molora-lock`` beside it) until the block ends (it is killed then;
    ``seconds`` only bounds an orphan, and must outlast a slow CLI start on a loaded machine); yields
    its pid."""
    lock = path.parent / f".{path.name}.molora-lock"
    code = (
        "import fcntl, os, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o600); fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"os.write(fd, f'pid {{os.getpid()}} on {holder}'.encode()); print('locked', flush=True); time.sleep({seconds})\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "locked":
            raise RuntimeError(f"the process meant to hold {lock} did not take it")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def edit_trainer_state(**values):
    """A damage function: set ``values`` in the run's ``CKPT/trainer_state.json``."""

    def damage(run: Path) -> None:
        path = run / CKPT / "trainer_state.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))

    return damage


def foreign_optimizer(run: Path) -> None:
    """A damage function: the optimizer state of an adapter with another rank (one moment of
    another shape) in the run's ``CKPT/optimizer.pt``."""
    path = run / CKPT / "optimizer.pt"
    state = torch.load(path, weights_only=True)
    moments = state["state"][0]
    moments["exp_avg"] = torch.zeros(*moments["exp_avg"].shape[:-1], moments["exp_avg"].shape[-1] + 1)
    torch.save(state, path)


@contextlib.contextmanager
def small_disk(tmp: Path, size: str = "1m"):
    """A ``size`` tmpfs at ``tmp/disk`` and a function that fills it, as ``(disk, fill)``; None
    when this process cannot mount one (not root, or no tmpfs). Unmounted at the block's end."""
    disk = tmp / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode:
        yield None
        return

    def fill() -> None:
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()

    try:
        yield disk, fill
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
