"""HypervisorState: what a driver persists so another process can reattach to its VM.

msgspec Structs (see ``persist/document.py`` for why msgspec): decoding checks every type and
refuses unknown fields, so a damaged record fails loudly instead of reattaching to the wrong
thing. Change one with :func:`msgspec.structs.replace`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from virtcontainers.persist.records import json_object

__all__ = ["Bridge", "HypervisorState"]


class Bridge(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A PCI bridge and the devices plugged on it (slot -> device id)."""

    id: str
    type: str
    addr: int
    device_addr: dict[int, str] = {}


class HypervisorState(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The reference's persisted hypervisor fields, plus the run directory we derive paths from.

    ``hotplugged_vcpus`` holds QOM ids of hot-added CPUs; ``hotplugged_memory`` is MiB.
    """

    pid: int = 0
    type: str = ""
    block_index_map: dict[int, int] = {}
    uuid: str = ""
    bridges: tuple[Bridge, ...] = ()
    hotplugged_vcpus: tuple[str, ...] = ()
    hotplugged_memory: int = 0
    virtiofsd_pid: int = 0
    hotplug_vfio_on_root_bus: bool = False
    pcie_root_port: int = 0
    api_socket: str = ""
    #: Not in the reference: where the driver keeps its sockets and logs.
    run_dir: str = ""
    #: Not in the reference: the sandbox id this VM belongs to.
    sandbox_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (dict keys become strings)."""
        return json_object(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HypervisorState:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a missing, unknown or mistyped field (``msgspec.ValidationError``).
        """
        return msgspec.json.decode(msgspec.json.encode(data), type=cls)
