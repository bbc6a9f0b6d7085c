"""Atomic writes: a file or a whole folder is replaced as one unit, or not at all (DESIGN §8).

A foundation module (it imports torch and safetensors only): the adapter I/O, the exports and
the training checkpoints all write through it.

- A file is written to a hidden temporary file in the same folder, flushed, then renamed over
  the old one.
- A folder is written as a hidden temporary sibling, then swapped with the old folder in one
  ``renameat2(RENAME_EXCHANGE)`` system call (Linux). Where the kernel or file system lacks it,
  the old folder is first renamed aside; :func:`recover_directory` (run by the next save and
  by readers) puts it back if a kill came between the two renames. Either way a reader sees the
  old folder or the new one, never a mix of both.
- One writer at a time: a folder's writer holds an exclusive ``flock`` on a hidden lock file
  beside it, ``.{name}.molora-lock`` (:func:`writer_lock`); a second writer is refused at
  once with :class:`FolderBusyError`, naming the process that writes. The kernel drops the lock
  when its process dies, so a killed writer never leaves a stale lock; the holder removes
  the lock file when done (others re-check that the file they locked is still the one in place).
- Readers never delete another process's work in progress: leftovers of an interrupted save are
  cleaned (and a moved-aside folder put back) only under that lock, i.e. when no writer is at
  work; while one is, a reader leaves everything as it is.
- Before the swap the writer checks what it is about to publish (``expect``: present,
  non-empty, a readable safetensors header); a failed check leaves the old folder untouched.
- A symlinked folder or file is written through: the link's target is replaced, the link kept.
- Modes: a new folder gets the usual modes (0644 / 0755 under the umask, not ``mkstemp``'s
  0600 / 0700); a replaced folder or file keeps its mode, and new files in a private folder
  get no more access than the folder gives (0700 folder: 0600 files).
- A folder replacement never deletes what the writer does not own: entries of the old folder
  that the ``owned`` predicate rejects (a user's README, a tokenizer) are carried over; a new
  entry of the same name as one of them is refused (``FileExistsError``), never a replacement.
- A full disk (``torch.save`` and safetensors raise errors that are not ``OSError``) becomes
  :class:`DiskFullError`: nothing was published, the old folder or file is unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from molora.atomic.checks import DiskFullError, IncompleteSaveError, check_complete, raise_if_disk_full
from molora.atomic.lock import (
    OLD_TAG,
    TMP_TAG,
    FolderBusyError,
    real_path,
    recover_directory,
    recover_locked,
    remove_dead_temp_files,
    recover_tree,
    writer_lock,
)

__all__ = [
    "DiskFullError",
    "FolderBusyError",
    "IncompleteSaveError",
    "atomic_directory",
    "atomic_save_safetensors",
    "atomic_write_text",
    "check_complete",
    "recover_directory",
    "recover_tree",
    "writer_lock",
]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _keep_mode(tmp: str | os.PathLike, path: Path) -> None:
    """The mode of the file ``path`` replaces (a private file stays private), else the usual one."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask() & ~_closed_bits(path.parent)
    os.chmod(tmp, mode)


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    path = real_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temp_files(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}{os.getpid()}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _keep_mode(tmp, path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise_if_disk_full(err, path.parent, path)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to ``path`` through a temporary file and a rename."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, write)


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` through a temporary file and a rename."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


@functools.cache
def _renameat2() -> Callable | None:
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one system call; False where the platform cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _carry_over(old: Path, new: Path, owned: Callable[[str], bool]) -> None:
    """Hard-link (or copy) the entries of ``old`` that the writer does not own into ``new``.

    Raises:
        FileExistsError: the writer wrote an entry of the same name as one it does not own.
    """
    for entry in old.iterdir():
        target = new / entry.name
        if owned(entry.name):
            continue
        if target.exists() or target.is_symlink():
            raise FileExistsError(
                f"{str(old)!r} holds {entry.name!r}, which molora did not write; the new version would replace it: "
                f"rename or move {entry.name!r}, or write to another folder; nothing was changed"
            )
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _closed_bits(folder: Path) -> int:
    """The group / other permission bits ``folder`` withholds (0o077 for a 0700 folder), which
    new files in it must not grant either; 0 where ``folder`` cannot be read."""
    try:
        return 0o077 & ~stat.S_IMODE(os.stat(folder).st_mode)
    except OSError:
        return 0


def _set_modes(root: Path, path: Path) -> None:
    """Modes for what a writer put in ``root`` (some libraries write 0600), before it replaces
    ``path``: where ``path`` exists its folder mode and the modes of the files it already had
    are kept (a private adapter stays private); new entries get the usual modes (0644 / 0755
    under the umask) less the access the folder withholds."""
    mask = _umask()
    old = path if path.is_dir() else None
    closed = _closed_bits(path) if old else 0
    os.chmod(root, stat.S_IMODE(os.stat(path).st_mode) if old else 0o777 & ~mask)
    for sub, dirs, files in os.walk(root):
        rel = Path(sub).relative_to(root)
        for name, usual in [(n, 0o777) for n in dirs] + [(n, 0o666) for n in files]:
            before = old / rel / name if old else None
            if before is not None and before.exists() and not before.is_symlink():
                mode = stat.S_IMODE(os.stat(before).st_mode)
            else:
                mode = usual & ~mask & ~closed
            os.chmod(os.path.join(sub, name), mode)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _replace_directory(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous folder
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{OLD_TAG}"))
    os.rename(path, aside / "previous")  # a kill from here ...
    os.rename(tmp, path)  # ... to here is undone by recover_directory()
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike,
    *,
    owned: Callable[[str], bool] = lambda name: True,
    expect: Iterable[str] | Callable[[Path], Iterable[str]] = (),
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` as one unit.

    The writer lock of ``path`` is held throughout (:func:`writer_lock`). On an error inside the
    block the temporary folder is removed and ``path`` is untouched. A symlink ``path`` is
    written through (its target is replaced; the link stays).

    Args:
        path: the folder to write.
        owned: ``owned(entry_name)`` says whether an entry of the existing folder belongs to
            this writer (and is dropped unless rewritten); the others are carried over into
            the new folder (hard links where possible), so that user files are never deleted.
            The default owns everything: the folder is replaced whole.
        expect: files (relative paths, or a function of the written folder giving them) that
            must be present, non-empty and readable before the folder is published
            (:func:`check_complete`).

    Raises:
        NotADirectoryError: ``path`` exists and is a file.
        FolderBusyError: another process is writing ``path``.
        IncompleteSaveError: an ``expect`` file is missing, empty or unreadable.
        FileExistsError: the writer wrote an entry named like one of ``path`` it does not own.
        DiskFullError: the disk filled up while writing.
    """
    shown = Path(path)
    path = real_path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{str(shown)!r} exists and is not a folder")
    with writer_lock(path):
        recover_locked(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{TMP_TAG}"))
        try:
            yield tmp
            check_complete(tmp, expect(tmp) if callable(expect) else expect, name=str(shown))
            _set_modes(tmp, path)  # before the carry-over: the user's own files keep their modes
            if path.is_dir():
                _carry_over(path, tmp, owned)
            _replace_directory(tmp, path)
            _fsync_dir(path.parent)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise_if_disk_full(err, path.parent, shown)
            raise
