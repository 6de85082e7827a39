"""Private files written atomically and guarded by ``flock(2)``.

One place for what the state store, the ACRN UUID pool, the KVM verdict cache, the image
store and the tap network lock each need:

* :func:`atomic_write`: temp file in the target's directory, ``fchmod`` 0600, write all,
  ``fsync``, ``rename`` over the target, ``fsync`` the directory. A reader sees the old
  document or the new one, never half of one, even after a crash.
* :func:`open_private` / :func:`mkdir_private`: 0600 files (never through a symlink) and
  0700 directories, whatever the umask.
* :func:`flock` and :func:`locked`: an exclusive or shared lock, optionally bounded by a
  timeout. Locks belong to the open file description, so they are released when the
  descriptor is closed, including when the process dies.

Errors are plain ``OSError``/``TimeoutError``: each caller translates them once into its own
typed error (``StoreError`` for the store and the pool), naming its own file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "atomic_write",
    "flock",
    "fsync_dir",
    "locked",
    "mkdir_private",
    "open_private",
]

FILE_MODE = 0o600
DIR_MODE = 0o700
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW


def mkdir_private(path: Path) -> None:
    """``mkdir -p`` where every directory created here is 0700; existing ones are left alone.

    Raises:
        OSError: a component cannot be created.
    """
    if os.path.isdir(path):
        return
    mkdir_private(path.parent)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return  # created concurrently, or not a directory (the caller's next step reports it)
    os.chmod(path, DIR_MODE)  # the umask may have removed bits


def open_private(path: Path, flags: int = os.O_RDWR) -> int:
    """Open (creating if needed) a 0600 file, never following a symlink; returns the fd.

    Raises:
        OSError: cannot open (``ELOOP`` for a symlink).
    """
    fd = os.open(path, flags | os.O_CREAT | _OPEN_FLAGS, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)  # the umask may have removed bits
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable. Raises ``OSError``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path, data: bytes, *, tmp_prefix: str = ".tmp-", tmp_suffix: str = ".part"
) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the file is 0600.

    The temp file is ``<tmp_prefix>…<tmp_suffix>`` in the same directory (a rename is only
    atomic within one filesystem); it is removed if anything fails. A caller holding a lock
    may delete stale temp files of crashed writers by that pattern.

    Raises:
        OSError: cannot write, sync or rename.
    """
    import tempfile  # here: `vc ps`, which only reads, does not load it

    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix, suffix=tmp_suffix, dir=directory)
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def flock(fd: int, *, exclusive: bool = True, timeout: float | None = None) -> None:
    """Lock ``fd`` (``LOCK_EX`` or ``LOCK_SH``), waiting at most ``timeout`` seconds.

    ``timeout=None`` blocks in the kernel. With a timeout the lock is retried with a short
    back-off (1 ms doubling to 20 ms): ``flock`` itself has no timeout.

    Raises:
        TimeoutError: the lock was not granted within ``timeout`` seconds.
        OSError: the descriptor cannot be locked.
    """
    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    if timeout is None:
        fcntl.flock(fd, op)
        return
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"lock not granted within {timeout:g} s")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            continue


@contextlib.contextmanager
def locked(path: Path, *, exclusive: bool = True, timeout: float | None = None) -> Iterator[int]:
    """Hold ``flock`` on the 0600 file ``path`` (created if needed) for the ``with`` body.

    Yields the descriptor; closing it (on exit) releases the lock.

    Raises:
        OSError: cannot open or lock. TimeoutError: see :func:`flock`.
    """
    fd = open_private(path)
    try:
        flock(fd, exclusive=exclusive, timeout=timeout)
        yield fd
    finally:
        os.close(fd)
