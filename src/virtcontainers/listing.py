"""What ``vc ps`` shows, read from the store without importing drivers, configs or asyncio.

``vc ps`` runs often and must start fast; :class:`SandboxInfo` is re-exported by
:mod:`virtcontainers.sandbox`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from virtcontainers.errors import StoreError
from virtcontainers.lifecycle import VmState
from virtcontainers.persist.document import SandboxDocument
from virtcontainers.persist.records import ExitRecord, json_object
from virtcontainers.persist.store import StateStore
from virtcontainers.procfs import process_matches

__all__ = ["SandboxInfo", "list_sandboxes", "sandbox_info", "warn_unreadable"]

#: What ``vc ps`` says of a record that says the VM runs when its VMM is gone and nobody
#: recorded its end (the process that owned it died with it, or the host rebooted).
GONE = ExitRecord(reason="the VMM is gone; nobody recorded how it ended")


@dataclass(frozen=True)
class SandboxInfo:
    """What ``vc ps`` shows. ``state`` is checked against the live process, not just read:
    a record saying RUNNING or PAUSED whose VMM is gone shows EXITED."""

    id: str
    state: VmState
    hypervisor: str
    pid: int
    created_at: float
    run_dir: str
    #: The sandbox server: "running", "dead" (the VM may run on: `vc stop`/`vc rm` clean up)
    #: or "" (none: created, stopped, or run in a library process).
    server: str = ""
    #: How the VM ended, when it did (reason, time, exit code where known).
    exit: ExitRecord | None = None
    #: vCPUs and memory (MiB) now: the boot size plus what was hot-plugged.
    vcpus: int = 0
    memory_mb: int = 0
    #: Ids of hot-plugged devices (disks, NICs, ...), in plug order.
    devices: tuple[str, ...] = ()
    #: Mode, published ports, egress policy, and (while it runs) the addresses and names
    #: (``virtcontainers.persist.records.NetworkRecord``).
    network: dict[str, object] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready (``vc ps --json``)."""
        out = dataclasses.asdict(self)
        out["state"] = self.state.value
        out["exit"] = None if self.exit is None else json_object(self.exit)
        return out


def warn_unreadable(sandbox_id: str, exc: StoreError) -> None:
    """Log that the record of ``sandbox_id`` is skipped, and why (a warning)."""
    import logging  # here: what scripts poll loads logging only when it has a warning

    logging.getLogger(__name__).warning("skipping sandbox %s: %s", sandbox_id, exc)


def list_sandboxes(
    store: StateStore | None = None,
    *,
    on_unreadable: Callable[[str, StoreError], None] = warn_unreadable,
) -> list[SandboxInfo]:
    """Every recorded sandbox, with its state checked against the live VMM process.

    A record that cannot be read (corrupt, or from a newer version) is left out and passed
    to ``on_unreadable`` with its ``StoreError`` (default: :func:`warn_unreadable`).

    Raises:
        StoreError: the store's root is unusable.
    """
    store = store or StateStore()
    out = []
    for sandbox_id in store.list():
        try:
            doc = store.load(sandbox_id)
        except StoreError as exc:
            on_unreadable(sandbox_id, exc)
            continue
        info = _info(doc)
        if not info.state.live and doc.network.has_host_side:
            _sweep_network(doc)
        out.append(info)
    return out


def sandbox_info(sandbox_id: str, store: StateStore | None = None) -> SandboxInfo:
    """What ``vc ps`` shows of one sandbox, read from its record (no drivers, no asyncio).

    Raises:
        StoreError: no such sandbox, an invalid id, or an unreadable record.
    """
    return _info((store or StateStore()).load(sandbox_id))


def _sweep_network(doc: SandboxDocument) -> None:
    """The VMM is gone (a crash, or a host reboot) but its record still names a tap network:
    nothing of it may outlive the VM. The keeper normally removed it already; this is the
    backstop. Imported here only: most listings have nothing to sweep."""
    from virtcontainers.network import Attachment

    Attachment.from_record(doc.network, doc.id, doc.hypervisor.run_dir).sweep()


def _info(doc: SandboxDocument) -> SandboxInfo:
    state, exit_record = doc.state, doc.exit
    pid = doc.hypervisor.pid
    if state.live and not (pid and process_matches(pid, doc.hypervisor.run_dir)):
        state, exit_record, pid = VmState.EXITED, exit_record or GONE, 0
    server = ""
    owner = doc.owner_pid
    if owner and state.live:
        alive = process_matches(owner, "virtcontainers.server") and process_matches(owner, doc.id)
        server = "running" if alive else "dead"
    resources = doc.config.get("resources")
    boot_vcpus = boot_mem = 0
    if isinstance(resources, dict):
        boot_vcpus = int(resources.get("num_vcpus", 0) or 0)
        boot_mem = int(resources.get("memory_size", 0) or 0)
    return SandboxInfo(
        id=doc.id,
        state=state,
        hypervisor=doc.hypervisor_type,
        pid=pid,
        created_at=doc.created_at,
        run_dir=doc.hypervisor.run_dir,
        server=server,
        exit=exit_record,
        vcpus=boot_vcpus + len(doc.hypervisor.hotplugged_vcpus),
        memory_mb=boot_mem + doc.hypervisor.hotplugged_memory,
        devices=tuple(str(record.spec.get("id", "")) for record in doc.hotplugged),
        network=_network(doc),
    )


def _network(doc: SandboxDocument) -> dict[str, object]:
    """The record's network, with a tap network's names and addresses (netns, veth) spelt
    out for ``vc ps --json``. Imported here only: most sandboxes have no tap network."""
    if doc.network.tap is None:
        return json_object(doc.network)
    from virtcontainers.network import Attachment

    return Attachment.from_record(doc.network, doc.id, doc.hypervisor.run_dir).to_dict()
