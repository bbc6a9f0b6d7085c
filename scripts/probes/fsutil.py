"""Helpers of the probe cases for files on disk (:mod:`probes.kills`, :mod:`probes.concurrent`,
:mod:`probes.disk`, :mod:`probes.owned`; issue 17, items 1-4, 11, 12, 16, 17, 21, 22).

A case passes when no data is lost (a folder is the old version or the new one, a user's file
is kept), nothing is accepted silently (a second writer, a base folder as ``--out``) and every
failure is a clear one-line error. Full-disk and read-only cases need root to mount a small
tmpfs or a read-only bind mount (``chmod`` does not stop root); elsewhere they are reported as
skipped (passing), and read-only ones fall back to ``chmod``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from pathlib import Path

import torch
from tampering import locked_by_another_process, small_disk

from molora import MoLoRAModel
from probes import case, clear_exit, expect_error, run_cli
from probes.common import tiny_llama  # noqa: F401 - re-exported for the case modules

# --- helpers -------------------------------------------------------------------------------------


def _content(path: Path) -> object:
    """A file's content; a safetensors file as its tensors and metadata (the header's metadata
    order differs from one save to the next)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return sorted((k, f.get_tensor(k).numpy().tobytes()) for k in f.keys()), sorted((f.metadata() or {}).items())


def _state(folder: Path) -> dict[str, object]:
    """Every file below ``folder`` (hidden ones included) with its content."""
    return {str(p.relative_to(folder)): _content(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _bumped(m: MoLoRAModel, by: float = 1.0) -> MoLoRAModel:
    with torch.no_grad():
        for layer in m.molora_layers().values():
            layer.lora_B.add_(by)
    return m


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _refused_while_locked(path: Path, call) -> tuple[bool, str]:
    """ok when ``call`` is refused with a message naming the other process, and ``path`` is unchanged."""
    before = _state(path) if path.is_dir() else None
    with locked_by_another_process(path, holder="probe") as pid:
        ok, message = call()
    kept = (_state(path) if path.is_dir() else None) == before
    return ok and f"pid {pid}" in message and kept, message + ("" if kept else " / FOLDER CHANGED")


def _api_busy(call) -> tuple[bool, str]:
    return expect_error(call, "another process")


def _cli_busy(argv: list[str]) -> tuple[bool, str]:
    ok, message = clear_exit(run_cli(argv))
    return ok and "another process" in message, message


def _root() -> bool:
    return os.geteuid() == 0


@contextlib.contextmanager
def _read_only(path: Path):
    """``path`` read-only: a read-only bind mount as root, else chmod a-w."""
    if not _root():
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p, mode in modes.items():
            os.chmod(p, stat.S_IMODE(mode) & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                os.chmod(p, stat.S_IMODE(mode))
        return
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def _full_disk_case(name: str, write, *, size: str = "1m") -> None:
    """Register: ``write(disk, fill)`` on a small full tmpfs returns (ok, message)."""

    @case("disk", f"full disk: {name}")
    def _run(tmp: Path) -> tuple[bool, str]:
        with small_disk(tmp, size) as disk:
            if disk is None:
                return True, "skipped: mounting a small tmpfs needs root"
            return write(*disk)


def _disk_full_error(call, folder: Path) -> tuple[bool, str]:
    """ok when ``call`` raises the one clear disk-full error and ``folder`` is unchanged."""
    before = _state(folder)
    ok, message = expect_error(call, "is full")
    kept = _state(folder) == before
    return ok and kept and "nothing was half-written" in message, message + ("" if kept else " / FOLDER CHANGED")
