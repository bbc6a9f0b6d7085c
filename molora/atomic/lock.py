"""The writer lock of a folder and the recovery of interrupted saves (see :mod:`molora.atomic`).

A writer holds an exclusive ``flock`` on ``.{name}.molora-lock`` beside the folder. The kernel
releases it when the process dies (no stale locks, no pid guessing); the holder unlinks the
file before closing it, and a process that locked a file that was meanwhile unlinked retries
on the new one. Recovery (putting back a folder moved aside by a killed fallback swap, removing
hidden temporary folders) runs only under the lock, so it never touches a save in progress.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

TMP_TAG = ".molora-tmp-"  # hidden sibling being written: .{name}.molora-tmp-XXXX
OLD_TAG = ".molora-old-"  # the previous folder, moved aside by the fallback swap: .{name}.molora-old-XXXX
_LOCK = ".molora-lock"  # the writer's lock file beside the folder: .{name}.molora-lock
_READER_GRACE_S = 1.0  # a writer waits this long for a reader's recovery before calling the folder busy


class FolderBusyError(BlockingIOError):
    """Another process is writing the same folder (it holds the writer lock)."""



def real_path(path: str | os.PathLike) -> Path:
    """``path`` with its symlinks resolved: a write through a link goes to the link's target."""
    return Path(os.path.realpath(path))


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}{_LOCK}"


def _try_lock(path: Path) -> int | None:
    """An fd holding the exclusive lock of ``path``, or None when another process holds it.

    Raises:
        OSError: the lock file cannot be created (a read-only folder).
    """
    lock = _lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:  # the previous holder removed the file we opened: retry
            same = False
        if same:
            return fd
        os.close(fd)


def _unlock(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_lock_path(path))  # while still held: a waiter re-checks the inode and retries
    os.close(fd)


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = _lock_path(path).read_text().strip()
        if text:
            return f" ({text})"
    return ""


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike, *, what: str = "folder") -> Iterator[None]:
    """Hold the exclusive writer lock of ``path`` (a flock on ``.{name}.molora-lock`` beside it).

    Readers take the same lock for the moment of their recovery, so a writer that finds it held
    retries for up to a second before it calls the folder busy.

    Args:
        path: the folder (or file) about to be written.
        what: how the refusal names ``path`` ("folder", "run folder").

    Raises:
        FolderBusyError: another process holds the lock.
    """
    path = real_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _try_lock(path)
        deadline = time.monotonic() + _READER_GRACE_S
        while fd is None and time.monotonic() < deadline:  # a reader's recovery holds it for a moment
            time.sleep(0.02)
            fd = _try_lock(path)
    except PermissionError as e:
        raise PermissionError(e.errno, f"cannot write {str(path)!r}: {e.strerror} in {str(path.parent)!r}") from e
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
        raise OSError(e.errno, f"cannot write {str(path)!r}: {str(path.parent)!r} is on a read-only file system") from e
    if fd is None:
        raise FolderBusyError(
            errno.EWOULDBLOCK,
            f"another process{_holder(path)} is writing the {what} {str(path)!r}: wait for it to finish "
            f"(or stop it), then retry; nothing was changed",
        )
    try:
        with contextlib.suppress(OSError):  # who holds it, for the refusal's message (a full disk may refuse)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        _unlock(path, fd)


def leftovers(path: Path, tag: str) -> list[Path]:
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}{tag}"
    return [p for p in path.parent.iterdir() if p.name.startswith(prefix)]


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_dead_temp_files(path: Path) -> None:
    """Remove temporary files of earlier writes of the file ``path`` whose process is gone
    (their names carry the writer's pid: ``.{name}.molora-tmp-{pid}-XXXX``); a temporary file
    of a live writer, or of unknown origin, is never touched."""
    for leftover in leftovers(path, TMP_TAG):
        pid = leftover.name[len(f".{path.name}{TMP_TAG}") :].split("-", 1)[0]
        if leftover.is_file() and pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def recover_locked(path: Path) -> None:
    """Put back a folder moved aside by a killed fallback swap, and remove the leftovers of
    interrupted saves of ``path`` (the caller holds the writer lock: no folder save is running;
    temporary files of single-file writes, which take no lock, go only when their writer is dead)."""
    olds = leftovers(path, OLD_TAG)
    previous = [old / "previous" for old in olds if (old / "previous").exists()]
    if not path.exists() and previous:
        os.rename(max(previous, key=lambda p: p.stat().st_mtime), path)
    for leftover in leftovers(path, TMP_TAG) + leftovers(path, OLD_TAG):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
    remove_dead_temp_files(path)


def recover_directory(path: str | os.PathLike, *, wait_s: float = 2.0) -> None:
    """Finish or undo an interrupted folder replacement of ``path``, and clean its leftovers.

    Safe for readers: it acts only when no process is writing ``path`` (it takes the writer
    lock for a moment); while a writer is at work it changes nothing, except that it waits up
    to ``wait_s`` seconds for a folder that is missing only between the writer's two renames.
    In a folder this process cannot write (read-only), it changes nothing.
    """
    path = real_path(path)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = _try_lock(path)
        except OSError:  # read-only or missing parent: nothing to recover here
            return
        if fd is not None:
            try:
                recover_locked(path)
            finally:
                _unlock(path, fd)
            return
        if path.exists() or not leftovers(path, OLD_TAG) or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def recover_tree(root: str | os.PathLike) -> None:
    """:func:`recover_directory` for every interrupted save found in ``root`` and its (not hidden)
    sub-folders, e.g. a run folder's ``final/`` or ``checkpoints/step_N/`` after a kill."""
    for sub, dirs, files in os.walk(root):
        names = {n for n in dirs + files if n.startswith(".") and (OLD_TAG in n or TMP_TAG in n)}
        for name in names:
            target = name[1:].split(OLD_TAG if OLD_TAG in name else TMP_TAG)[0]
            recover_directory(Path(sub) / target)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
