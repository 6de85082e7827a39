"""The runtime's state directory: one record per container under ``--root``.

Layout (``<root>`` is ``--root``, default ``/run/vc-runtime``; every directory 0700, every
file 0600)::

    <root>/<id>/state.json      the record (written atomically; readers never see half)
    <root>/<id>/shim.sock       the container process's control socket (start, kill)
    <root>/<id>/rootfs.img      the bundle's root file system as a read-only disk
    <root>/<id>/mount-N.img     snapshots of host directories bind-mounted into the container
    <root>/vm/sandboxes/<sid>/  the sandbox VM's run dir (virtcontainers' state store)

The sandbox id is a short hash of the container id: the VM's socket paths must stay under
the 108 bytes of a unix socket address even for CRI-O's 64-digit ids.

The status shown is the record's, checked against the container process: a record that
says created/running whose process is gone (killed, crashed) reads as ``stopped``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from pathlib import Path

import msgspec

from virtcontainers import procfs
from virtcontainers.errors import ContainerError, ContainerNotFoundError
from virtcontainers.fsutil import atomic_write, mkdir_private

__all__ = ["DEFAULT_ROOT", "OCI_VERSION", "ContainerState", "StateDir", "Status"]

DEFAULT_ROOT = Path("/run/vc-runtime")
#: The runtime-spec version this runtime implements (``state``'s ``ociVersion``).
OCI_VERSION = "1.0.2"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


class Status:
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class ContainerState(msgspec.Struct, omit_defaults=True):
    """One container's record. ``pid`` is the host-side container process (what conmon
    waits for); ``guest_pid`` the process in the VM."""

    id: str
    bundle: str
    status: str
    sandbox_id: str
    created: str = ""
    pid: int = 0
    guest_pid: int = 0
    exit_code: int | None = None
    annotations: dict[str, str] = {}
    error: str = ""

    def oci(self) -> dict[str, object]:
        """The runtime-spec ``state`` document."""
        doc: dict[str, object] = {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "status": self.status,
            "pid": self.pid if self.status in (Status.CREATED, Status.RUNNING, Status.PAUSED)
            else 0,
            "bundle": self.bundle,
            "annotations": self.annotations,
        }  # fmt: skip
        if self.created:
            doc["created"] = self.created
        return doc


class StateDir:
    """``--root``: where the records live."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def check_id(container_id: str) -> str:
        """Raises ContainerError: the id cannot name a directory safely."""
        if not _ID_RE.fullmatch(container_id):
            raise ContainerError(
                f"invalid container id {container_id!r}: 1-128 characters from "
                "[A-Za-z0-9_.+-], starting with a letter or digit",
                id=container_id,
            )
        return container_id

    def path(self, container_id: str) -> Path:
        return self.root / self.check_id(container_id)

    @property
    def vm_root(self) -> Path:
        """The virtcontainers state store of the sandbox VMs."""
        return self.root / "vm"

    def vm_run_dir(self, sandbox_id: str) -> Path:
        """The sandbox's run dir in :attr:`vm_root` (``StateStore.sandbox_dir``'s layout)."""
        return self.vm_root / "sandboxes" / sandbox_id

    @staticmethod
    def sandbox_id(container_id: str) -> str:
        return "oci-" + hashlib.sha256(container_id.encode()).hexdigest()[:12]

    def create(self, container_id: str, bundle: Path, annotations: dict[str, str]) -> Path:
        """Make the container's directory and its first record (status ``creating``).

        Raises:
            ContainerError: the id is invalid or already used.
        """
        mkdir_private(self.root)
        directory = self.path(container_id)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            raise ContainerError(f"container {container_id} already exists",
                                 id=container_id) from None  # fmt: skip
        state = ContainerState(
            id=container_id,
            bundle=str(bundle),
            status=Status.CREATING,
            sandbox_id=self.sandbox_id(container_id),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            annotations=annotations,
        )
        self.save(state)
        return directory

    def save(self, state: ContainerState) -> None:
        atomic_write(self.path(state.id) / "state.json", msgspec.json.encode(state))

    def load(self, container_id: str) -> ContainerState:
        """The record, with the status checked against the container process.

        Raises:
            ContainerNotFoundError: no such container. ContainerError: unreadable record.
        """
        path = self.path(container_id) / "state.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ContainerNotFoundError(container_id) from None
        try:
            state = msgspec.json.decode(data, type=ContainerState)
        except msgspec.MsgspecError as exc:
            raise ContainerError(f"{path}: unreadable record: {exc}", id=container_id) from None
        if state.status != Status.STOPPED and not self.alive(state):
            state.status = Status.STOPPED
        return state

    @staticmethod
    def alive(state: ContainerState) -> bool:
        """Whether the container process still runs (its argv names the container)."""
        if state.status == Status.CREATING:
            return True  # create is still working; it has no process to check yet
        return bool(state.pid) and procfs.process_matches(state.pid, state.id)

    def update(self, container_id: str, **changes: object) -> ContainerState:
        """Change fields of the raw record (no liveness check)."""
        path = self.path(container_id) / "state.json"
        state = msgspec.json.decode(path.read_bytes(), type=ContainerState)
        state = msgspec.structs.replace(state, **changes)
        self.save(state)
        return state

    def ids(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(p.name for p in self.root.iterdir() if (p / "state.json").exists())
        return []
