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
- Leftover temporary files and folders of an interrupted save are removed by the next save.
- Files get the usual modes (0644 / 0755 under the umask), not ``mkstemp``'s 0600 / 0700.
- A folder replacement never deletes what the writer does not own: entries of the old folder
  that the ``owned`` predicate rejects (a user's README, a tokenizer) are carried over.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

_TMP = ".molora-tmp-"  # hidden sibling being written: .{name}.molora-tmp-XXXX
_OLD = ".molora-old-"  # the previous folder, moved aside by the fallback swap: .{name}.molora-old-XXXX
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


def _leftovers(path: Path, tag: str) -> list[Path]:
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}{tag}"
    return [p for p in path.parent.iterdir() if p.name.startswith(prefix)]


def recover_directory(path: str | os.PathLike) -> None:
    """Finish or undo an interrupted folder replacement of ``path``, and clean its leftovers.

    If ``path`` is missing but a previous version was moved aside (a kill between the two
    renames of the fallback swap), that version is put back. Half-written temporary folders
    and files of ``path`` are removed.
    """
    path = Path(path)
    olds = _leftovers(path, _OLD)
    previous = [old / "previous" for old in olds if (old / "previous").exists()]
    if not path.exists() and previous:
        os.rename(max(previous, key=lambda p: p.stat().st_mtime), path)
    for leftover in _leftovers(path, _TMP) + _leftovers(path, _OLD):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
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
    """Hard-link (or copy) the entries of ``old`` that the writer does not own into ``new``."""
    for entry in old.iterdir():
        target = new / entry.name
        if owned(entry.name) or target.exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _usual_modes(root: Path) -> None:
    """0644 / 0755 under the umask for what a writer put in ``root`` (some libraries write 0600)."""
    mask = _umask()
    for sub, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(sub, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(sub, name), 0o666 & ~mask)


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
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{_OLD}"))
    os.rename(path, aside / "previous")  # a kill from here ...
    os.rename(tmp, path)  # ... to here is undone by recover_directory()
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, owned: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` as one unit.

    On an error inside the block the temporary folder is removed and ``path`` is untouched.

    Args:
        path: the folder to write.
        owned: ``owned(entry_name)`` says whether an entry of the existing folder belongs to
            this writer (and is dropped unless rewritten); the others are carried over into
            the new folder (hard links where possible), so that user files are never deleted.
            The default owns everything: the folder is replaced whole.

    Raises:
        NotADirectoryError: ``path`` exists and is a file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{_TMP}"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _usual_modes(tmp)  # before the carry-over: the user's own files keep their modes
        if path.is_dir():
            _carry_over(path, tmp, owned)
        _replace_directory(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
