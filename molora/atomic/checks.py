"""Checks around a save (see :mod:`molora.atomic`): what is about to be published is complete,
and a failed write that failed for lack of space says so (torch and safetensors raise errors
that are not ``OSError`` on a full disk)."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterable
from pathlib import Path

from safetensors import safe_open

_FULL_BYTES = 1 << 20  # after a failed write, less free space than this means the disk is full


class DiskFullError(OSError):
    """A save failed for lack of space; nothing was published."""


class IncompleteSaveError(OSError):
    """The folder about to be published misses a file or holds an unreadable one."""


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for lack of space (torch and safetensors raise their own
    error types, with or without the system's message)."""
    if "No space left" in str(err) or "Disk quota" in str(err):
        return True
    if isinstance(err, OSError):  # the system says which (a busy folder, a missing file: not a full disk)
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(err, (ValueError, TypeError, LookupError, AttributeError)):
        return False  # a bad input raised inside the block, whatever the free space
    try:
        return shutil.disk_usage(folder).free < _FULL_BYTES
    except OSError:
        return False


def raise_if_disk_full(err: BaseException, folder: Path, target: Path) -> None:
    """Raise :class:`DiskFullError` naming ``target`` when ``err`` came from a full disk (a
    DiskFullError of a file written inside ``target``'s temporary folder is named again for ``target``).
    """
    if not isinstance(err, Exception) or not (isinstance(err, DiskFullError) or _disk_full(err, folder)):
        return
    cause = err.__cause__ if isinstance(err, DiskFullError) and err.__cause__ is not None else err
    free = shutil.disk_usage(folder).free
    raise DiskFullError(
        errno.ENOSPC,
        f"the disk holding {str(target)!r} is full ({free / 2**20:.1f} MiB free; {type(cause).__name__} while "
        f"writing): nothing was half-written, {target.name!r} is as it was before; free some space and retry",
    ) from cause


def check_complete(folder: Path, expect: Iterable[str], *, name: str | None = None) -> None:
    """Each ``expect`` path (relative to ``folder``) is a non-empty file; a ``.safetensors``
    file has a readable header. ``name`` is how errors name the folder (default: ``folder``).

    Raises:
        IncompleteSaveError: naming the first missing, empty or unreadable file.
    """
    for rel in expect:
        file, where = folder / rel, f"{name or folder}/{rel}"
        problem = None
        if not file.is_file():
            problem = "is missing"
        elif file.stat().st_size == 0:
            problem = "is empty"
        elif file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="pt") as f:
                    list(f.keys())
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                problem = f"is not a readable safetensors file ({e})"
        if problem:
            raise IncompleteSaveError(
                errno.EIO, f"refusing to publish {name or folder}: {where} {problem}; the previous version is unchanged"
            )
