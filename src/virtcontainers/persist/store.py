"""The state store: one versioned JSON document per sandbox, written atomically under a lock.

The document itself (:class:`SandboxDocument`, its schema and migrations) is
``persist/document.py``; this module stores it.

Layout::

    <root>/                       0700  (see default_root())
    └── sandboxes/                0700
        └── <id>/                 0700  the sandbox's run dir (drivers put sockets and logs here)
            ├── .lock             0600  flock target: shared for reads, exclusive for writes
            └── state.json        0600  SandboxDocument, replaced atomically

Why it is built this way:

* Sandbox ids become path components, so :func:`validate_sandbox_id` is a security boundary:
  no separators, no leading dot, bounded length.
* A write goes to a temp file in the same directory, is fsynced, renamed over ``state.json`` and
  the directory is fsynced, so a crash leaves either the old or the new document, never a torn
  one. ``load`` never repairs, rewrites or deletes a document it cannot read: a corrupt or
  newer-version document raises :class:`~virtcontainers.errors.StoreError` and stays on disk for
  a human (or a newer virtcontainers) to look at.
* Locks are ``flock(2)`` on ``<id>/.lock``. They belong to an open file description, so they
  exclude other processes *and* other threads of this process; every fd is ``O_CLOEXEC`` so a
  VMM spawned while a lock is held does not inherit it. A thread that already holds a sandbox's
  lock (via :meth:`StateStore.lock`) may call the store's methods for that sandbox without
  deadlocking on itself.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from virtcontainers.errors import StoreError
from virtcontainers.fsutil import atomic_write, flock, mkdir_private, open_private
from virtcontainers.persist.document import SCHEMA_VERSION, SandboxDocument
from virtcontainers.persist.layout import (
    ROOT_ENV,
    SANDBOXES_DIR,
    default_root,
    is_sandbox_id,
    sandbox_dir,
    validate_sandbox_id,
)

__all__ = [
    "SCHEMA_VERSION",
    "SandboxDocument",
    "StateStore",
    "ROOT_ENV",
    "default_root",
    "validate_sandbox_id",
]

STATE_FILE: Final = "state.json"
LOCK_FILE: Final = ".lock"

_DIR_MODE: Final = 0o700
_FILE_MODE: Final = 0o600
_TMP_PREFIX: Final = ".state."
_TMP_SUFFIX: Final = ".tmp"
_OPEN_FLAGS: Final = os.O_CLOEXEC | os.O_NOFOLLOW


# --------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------


@dataclass
class _Held:
    exclusive: bool
    depth: int


class _Gone(StoreError):
    """The sandbox directory (or its lock file) disappeared: it was deleted."""


_local = threading.local()


def _held_locks() -> dict[str, _Held]:
    held: dict[str, _Held] | None = getattr(_local, "held", None)
    if held is None:
        held = {}
        _local.held = held
    return held


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class StateStore:
    """Per-sandbox state documents under ``<root>/sandboxes/<id>/``.

    ``root`` defaults to :func:`default_root`. ``lock_timeout`` bounds every wait for a lock
    (``None`` waits forever). Safe to use from several threads and processes at once.
    """

    def __init__(self, root: Path | None = None, *, lock_timeout: float | None = 30.0) -> None:
        self._root = Path(root).absolute() if root is not None else default_root()
        self._lock_timeout = lock_timeout
        self._root_checked = False

    @property
    def root(self) -> Path:
        """The store's root directory."""
        return self._root

    def __repr__(self) -> str:
        return f"StateStore({str(self._root)!r})"

    # -- paths --------------------------------------------------------------------------------

    def sandbox_dir(self, sandbox_id: str) -> Path:
        """The sandbox's directory (state and run dir). Does not create it.

        Raises:
            StoreError: the id is invalid (see :func:`validate_sandbox_id`).
        """
        return sandbox_dir(self._root, sandbox_id)

    def state_path(self, sandbox_id: str) -> Path:
        """Path of the sandbox's ``state.json``."""
        return self.sandbox_dir(sandbox_id) / STATE_FILE

    def create_sandbox_dir(self, sandbox_id: str) -> Path:
        """Create the sandbox directory (and missing parents), all 0700, plus its lock file.

        Raises:
            StoreError: invalid id, the directory already exists, the root is unsafe (not owned
                by us or writable by others), or an OS error.
        """
        path = self.sandbox_dir(sandbox_id)
        self._ensure_root()
        try:
            mkdir_private(path.parent)
            try:
                os.mkdir(path, _DIR_MODE)
            except FileExistsError as exc:
                raise StoreError(f"sandbox {sandbox_id!r} already exists", path=str(path)) from exc
            os.chmod(path, _DIR_MODE)  # mkdir's mode is filtered by the umask
            os.close(open_private(path / LOCK_FILE))
        except OSError as exc:
            raise _wrap(exc, "cannot create sandbox directory", path) from exc
        return path

    # -- documents ----------------------------------------------------------------------------

    def save(self, sandbox_id: str, document: SandboxDocument) -> None:
        """Atomically replace the sandbox's document, under its exclusive lock.

        The sandbox directory must exist (:meth:`create_sandbox_dir`): saving never resurrects
        a deleted sandbox.

        Raises:
            StoreError: invalid id, ``document.id`` differs from ``sandbox_id``, no such
                sandbox, lock timeout, or an OS error (e.g. ENOSPC; the old document is kept).
        """
        _check_doc(sandbox_id, document, "save")
        data = document.to_json().encode()
        with self._locked(sandbox_id, exclusive=True):
            self._write(sandbox_id, data)

    def load(self, sandbox_id: str) -> SandboxDocument:
        """Read the sandbox's document under a shared lock. Never modifies the file.

        Raises:
            StoreError: invalid id, no such sandbox or document, corrupt document, a document
                from a newer virtcontainers, lock timeout, or an OS error.
        """
        with self._locked(sandbox_id, exclusive=False):
            return self._read(sandbox_id)

    def update(
        self, sandbox_id: str, fn: Callable[[SandboxDocument], SandboxDocument]
    ) -> SandboxDocument:
        """Read, apply ``fn``, write back, all under one exclusive lock; returns the new document.

        Concurrent updates from any process serialize, so none is lost. If ``fn`` raises,
        nothing is written and the exception propagates unchanged.

        Raises:
            StoreError: as :meth:`load` and :meth:`save`; also if ``fn`` changes the id.
            TypeError: ``fn`` did not return a SandboxDocument.
        """
        with self._locked(sandbox_id, exclusive=True):
            new = fn(self._read(sandbox_id))
            if not isinstance(new, SandboxDocument):
                raise TypeError(f"update function returned {type(new).__name__}, not a document")
            _check_doc(sandbox_id, new, "update")
            self._write(sandbox_id, new.to_json().encode())
            return new

    def exists(self, sandbox_id: str) -> bool:
        """Whether the sandbox has a state document."""
        try:
            st = os.lstat(self.state_path(sandbox_id))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _wrap(exc, "cannot stat", self.state_path(sandbox_id)) from exc
        return stat.S_ISREG(st.st_mode)

    def list(self) -> builtins.list[str]:
        """Sorted ids of the sandboxes that have a state document (a new process can reattach).

        Raises:
            StoreError: the root is unsafe, or an OS error other than "no root yet".
        """
        base = self._root / SANDBOXES_DIR
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _wrap(exc, "cannot list sandboxes", base) from exc
        self._ensure_root(create=False)
        return sorted(n for n in names if is_sandbox_id(n) and self.exists(n))

    def delete(self, sandbox_id: str) -> None:
        """Remove the sandbox directory and everything in it. Idempotent.

        Takes the exclusive lock first so it never removes a document mid-write; writers that
        were waiting for the lock then fail with StoreError instead of recreating it.

        Raises:
            StoreError: invalid id, lock timeout, or an OS error.
        """
        path = self.sandbox_dir(sandbox_id)
        if not os.path.lexists(path):
            return
        try:
            import shutil  # here: `vc ps`, which only reads, does not load it

            with self._locked(sandbox_id, exclusive=True):
                shutil.rmtree(path)
        except _Gone:
            return
        except FileNotFoundError:
            return  # raced with another deleter that held no lock (e.g. a dir without .lock)
        except OSError as exc:
            raise _wrap(exc, "cannot delete sandbox", path) from exc

    @contextlib.contextmanager
    def lock(self, sandbox_id: str, *, exclusive: bool = True) -> Iterator[Path]:
        """Hold the sandbox's lock across several operations; yields the sandbox directory.

        The store's own methods called from the same thread for the same sandbox reuse the
        held lock. A shared lock cannot be upgraded: ``save``/``update``/``delete`` inside
        ``lock(id, exclusive=False)`` raise StoreError.

        Raises:
            StoreError: invalid id, no such sandbox, lock timeout.
        """
        with self._locked(sandbox_id, exclusive=exclusive):
            yield self.sandbox_dir(sandbox_id)

    # -- internals ----------------------------------------------------------------------------

    def _ensure_root(self, *, create: bool = True) -> None:
        """Create the root 0700 if missing (when ``create``) and refuse a root someone else
        could tamper with: this matters for the /tmp fallback, where anyone can pre-create it.
        Reading never creates the root; a missing root just means "no sandboxes"."""
        if self._root_checked:
            return
        try:
            if create:
                mkdir_private(self._root)
            st = os.stat(self._root)
        except FileNotFoundError:
            if not create:
                return
            raise StoreError("store root vanished", path=str(self._root)) from None
        except OSError as exc:
            raise _wrap(exc, "cannot create store root", self._root) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError("store root is not a directory", path=str(self._root))
        if st.st_uid != os.geteuid():
            raise StoreError(
                f"store root is owned by uid {st.st_uid}, not by us ({os.geteuid()})",
                path=str(self._root),
            )
        if st.st_mode & 0o022:
            raise StoreError(
                f"store root is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})",
                path=str(self._root),
            )
        self._root_checked = True

    @contextlib.contextmanager
    def _locked(self, sandbox_id: str, *, exclusive: bool) -> Iterator[None]:
        path = self.sandbox_dir(sandbox_id) / LOCK_FILE
        held = _held_locks()
        key = str(path)
        current = held.get(key)
        if current is not None:  # this thread already holds it (StateStore.lock)
            if exclusive and not current.exclusive:
                raise StoreError("cannot upgrade a shared lock to exclusive", path=key)
            current.depth += 1
            try:
                yield
            finally:
                current.depth -= 1
            return
        self._ensure_root(create=False)
        fd = self._acquire(sandbox_id, path, exclusive)
        held[key] = _Held(exclusive, 1)
        try:
            yield
        finally:
            del held[key]
            os.close(fd)  # releases the flock

    def _acquire(self, sandbox_id: str, path: Path, exclusive: bool) -> int:
        deadline = None if self._lock_timeout is None else time.monotonic() + self._lock_timeout
        while True:
            try:
                fd = open_private(path)
            except FileNotFoundError as exc:
                raise _Gone(f"no sandbox {sandbox_id!r}", path=str(path.parent)) from exc
            except OSError as exc:
                if exclusive or exc.errno != errno.EROFS:
                    raise _wrap(exc, "cannot open lock file", path) from exc
                # A read-only store can still be read: flock works on a read-only descriptor.
                try:
                    fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
                except FileNotFoundError as gone:
                    raise _Gone(f"no sandbox {sandbox_id!r}", path=str(path.parent)) from gone
                except OSError as again:
                    raise _wrap(again, "cannot open lock file", path) from again
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                flock(fd, exclusive=exclusive, timeout=left)
                # delete() may have removed (and create_sandbox_dir recreated) the directory
                # while we waited; a lock on an unlinked file protects nothing.
                try:
                    on_disk = os.stat(path, follow_symlinks=False)
                except FileNotFoundError as exc:
                    raise _Gone(
                        f"sandbox {sandbox_id!r} was deleted while waiting for its lock",
                        path=str(path.parent),
                    ) from exc
                mine = os.fstat(fd)
                if (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino):
                    return fd
            except TimeoutError:
                os.close(fd)
                raise StoreError(
                    f"timed out after {self._lock_timeout:g} s waiting for the lock", path=str(path)
                ) from None
            except OSError as exc:
                os.close(fd)
                raise _wrap(exc, "cannot lock", path) from exc
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # replaced by a new sandbox of the same id: lock that one

    def _read(self, sandbox_id: str) -> SandboxDocument:
        path = self.state_path(sandbox_id)
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError as exc:
            raise StoreError(
                f"sandbox {sandbox_id!r} has no state document", path=str(path)
            ) from exc
        except OSError as exc:
            raise _wrap(exc, "cannot open", path) from exc
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise _wrap(exc, "cannot read", path) from exc
        document = SandboxDocument.from_json(data, path=str(path))
        if document.id != sandbox_id:
            raise StoreError(
                f"document belongs to sandbox {document.id!r}, not {sandbox_id!r}", path=str(path)
            )
        return document

    def _write(self, sandbox_id: str, data: bytes) -> None:
        """Temp file + fsync + rename + fsync(dir). Caller holds the exclusive lock."""
        directory = self.sandbox_dir(sandbox_id)
        target = directory / STATE_FILE
        try:
            # Holding the exclusive lock, any temp file left here is from a crashed writer.
            for stale in directory.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
            atomic_write(target, data, tmp_prefix=_TMP_PREFIX, tmp_suffix=_TMP_SUFFIX)
        except OSError as exc:
            raise _wrap(exc, "cannot write state document", target) from exc


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_doc(sandbox_id: str, document: SandboxDocument, operation: str) -> None:
    validate_sandbox_id(sandbox_id)
    if document.id != sandbox_id:
        raise StoreError(
            f"cannot {operation} document of sandbox {document.id!r} as sandbox {sandbox_id!r}"
        )


def _wrap(exc: OSError, action: str, path: Path | str) -> StoreError:
    reason = exc.strerror or str(exc)
    name = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    return StoreError(f"{action}: {reason}" + (f" ({name})" if name else ""), path=str(path))
