"""Where the store keeps things: its root, the sandbox ids that may become directory names,
and each sandbox's run dir. No document code here, so a client that only needs a sandbox's
run dir (`vc exec` connecting to its server's socket) imports neither msgspec nor the
records (bench/cli.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Final, TypeGuard

from virtcontainers.errors import StoreError

#: Environment variable that overrides the store's root directory.
ROOT_ENV: Final = "VC_RUN_ROOT"
SANDBOXES_DIR: Final = "sandboxes"
#: The guest console's log in a sandbox's run dir (what `vc logs` prints).
CONSOLE_LOG: Final = "console.log"

ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"
ID_RULE: Final = "1-64 characters from [A-Za-z0-9_.-], the first a letter or digit"
_ID_RE: Final = re.compile(ID_PATTERN)


def is_sandbox_id(name: object) -> TypeGuard[str]:
    """Whether ``name`` is a valid sandbox id (see :func:`validate_sandbox_id`)."""
    return isinstance(name, str) and _ID_RE.fullmatch(name) is not None


def validate_sandbox_id(sandbox_id: object) -> str:
    """Return ``sandbox_id`` if it is safe to use as a directory name.

    Raises:
        StoreError: it is not a string of 1-64 characters from ``[A-Za-z0-9_.-]`` starting
            with a letter or digit (so never ``..``, never a ``/``).
    """
    if not is_sandbox_id(sandbox_id):
        raise StoreError(f"invalid sandbox id {sandbox_id!r}: must be {ID_RULE}")
    return sandbox_id


def default_root() -> Path:
    """The store root for this process.

    ``$VC_RUN_ROOT`` if set; else ``/run/virtcontainers`` as root; else
    ``$XDG_RUNTIME_DIR/virtcontainers``; else ``/tmp/virtcontainers-<uid>``. A relative
    ``$XDG_RUNTIME_DIR`` is ignored, as the XDG base directory spec requires.

    Raises:
        StoreError: ``$VC_RUN_ROOT`` is set but not an absolute path (a root that depends on the
            current directory would hide sandboxes from other processes).
    """
    override = os.environ.get(ROOT_ENV)
    if override:
        if not os.path.isabs(override):
            raise StoreError(f"{ROOT_ENV}={override!r} must be an absolute path")
        return Path(override)
    uid = os.geteuid()
    if uid == 0:
        return Path("/run/virtcontainers")
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and os.path.isabs(runtime_dir):
        return Path(runtime_dir) / "virtcontainers"
    return Path(f"/tmp/virtcontainers-{uid}")


def sandbox_dir(root: Path, sandbox_id: str) -> Path:
    """The directory of sandbox ``sandbox_id`` under store root ``root`` (its state and run
    dir). Does not create it.

    Raises:
        StoreError: the id is invalid (see :func:`validate_sandbox_id`).
    """
    return root / SANDBOXES_DIR / validate_sandbox_id(sandbox_id)
