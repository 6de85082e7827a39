"""What ``vc ps`` shows, read from the store without importing drivers, configs or asyncio.

``vc ps`` runs often and must start fast; :class:`SandboxInfo` is re-exported by
:mod:`virtcontainers.sandbox`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from virtcontainers.errors import StoreError
from virtcontainers.persist.store import SandboxDocument, StateStore
from virtcontainers.procfs import process_matches

__all__ = ["SandboxInfo", "list_sandboxes"]

log = logging.getLogger(__name__)

#: The lifecycle values (``VmState``) of a sandbox whose VM should be up.
_LIVE = ("running", "paused")


@dataclass(frozen=True)
class SandboxInfo:
    """What ``vc ps`` shows. ``state`` is checked against the live process, not just read."""

    id: str
    state: str
    hypervisor: str
    pid: int
    created_at: float
    run_dir: str
    #: The sandbox server: "running", "dead" (the VM may run on: `vc stop`/`vc rm` clean up)
    #: or "" (none: created, stopped, or run in a library process).
    server: str = ""
    #: How the VM ended, when it did: {"reason", "time", "exit_code"}.
    exit: dict[str, object] | None = None
    #: vCPUs and memory (MiB) now: the boot size plus what was hot-plugged.
    vcpus: int = 0
    memory_mb: int = 0
    #: Ids of hot-plugged devices (disks, NICs, ...), in plug order.
    devices: tuple[str, ...] = ()
    #: Mode, published ports, egress policy, and (while it runs) the addresses and names
    #: (``virtcontainers.network.Attachment.to_dict``).
    network: dict[str, object] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def list_sandboxes(store: StateStore | None = None) -> list[SandboxInfo]:
    """Every recorded sandbox, with its state checked against the live VMM process."""
    store = store or StateStore()
    out = []
    for sandbox_id in store.list():
        try:
            doc = store.load(sandbox_id)
        except StoreError as exc:
            log.warning("skipping sandbox %s: %s", sandbox_id, exc)
            continue
        info = _info(doc)
        if info.state not in _LIVE and ("tap" in info.network or "keeper_pid" in info.network):
            _sweep_network(doc)
        out.append(info)
    return out


def _sweep_network(doc: SandboxDocument) -> None:
    """The VMM is gone (a crash, or a host reboot) but its record still names a tap network:
    nothing of it may outlive the VM. The keeper normally removed it already; this is the
    backstop. Imported here only: most listings have nothing to sweep."""
    from virtcontainers.network import Attachment

    data = json.loads(doc.extra.get("network", "{}") or "{}")
    Attachment.from_dict(data, doc.id, doc.hypervisor.run_dir).sweep()


def _info(doc: SandboxDocument) -> SandboxInfo:
    state = doc.state
    pid = doc.hypervisor.pid
    if state in (_LIVE) and not (pid and process_matches(pid, doc.hypervisor.run_dir)):
        state = "exited"
    server = ""
    owner = int(doc.extra.get("owner_pid", "0") or 0)
    if owner and state in (_LIVE):
        alive = process_matches(owner, "virtcontainers.server") and process_matches(owner, doc.id)
        server = "running" if alive else "dead"
    exit_info = json.loads(doc.extra["exit"]) if "exit" in doc.extra else None
    resources = doc.config.get("resources")
    boot_vcpus = boot_mem = 0
    if isinstance(resources, dict):
        boot_vcpus = int(resources.get("num_vcpus", 0) or 0)
        boot_mem = int(resources.get("memory_size", 0) or 0)
    plugged = json.loads(doc.extra.get("hotplugged", "[]"))
    return SandboxInfo(
        id=doc.id,
        state=state,
        hypervisor=doc.hypervisor_type,
        pid=pid if state != "exited" else 0,
        created_at=doc.created_at,
        run_dir=doc.hypervisor.run_dir,
        server=server,
        exit=exit_info,
        vcpus=boot_vcpus + len(doc.hypervisor.hotplugged_vcpus),
        memory_mb=boot_mem + doc.hypervisor.hotplugged_memory,
        devices=tuple(str(json.loads(d).get("id", "")) for d in plugged),
        network=json.loads(doc.extra.get("network", "{}") or "{}"),
    )


def _append_json(extra: Mapping[str, str], entry: str) -> str:
    """``extra["hotplugged"]``: a JSON list of JSON device documents, one more appended."""
    return json.dumps([*json.loads(extra.get("hotplugged", "[]")), entry])
