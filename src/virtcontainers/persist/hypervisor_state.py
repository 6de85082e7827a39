"""HypervisorState: what a driver persists so another process can reattach to its VM."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Bridge", "HypervisorState"]


@dataclass(frozen=True)
class Bridge:
    """A PCI bridge and the devices plugged on it (slot -> device id)."""

    id: str
    type: str
    addr: int
    device_addr: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HypervisorState:
    """The reference's persisted hypervisor fields, plus the run directory we derive paths from.

    ``hotplugged_vcpus`` holds QOM ids of hot-added CPUs; ``hotplugged_memory`` is MiB.
    """

    pid: int = 0
    type: str = ""
    block_index_map: dict[int, int] = field(default_factory=dict)
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
        d = asdict(self)
        d["block_index_map"] = {str(k): v for k, v in self.block_index_map.items()}
        d["bridges"] = [
            {**asdict(b), "device_addr": {str(k): v for k, v in b.device_addr.items()}}
            for b in self.bridges
        ]
        d["hotplugged_vcpus"] = list(self.hotplugged_vcpus)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HypervisorState:
        """Inverse of :meth:`to_dict`. Raises KeyError/TypeError/ValueError on a bad shape."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["block_index_map"] = {
            int(k): int(v) for k, v in dict(values.get("block_index_map", {})).items()
        }
        values["bridges"] = tuple(
            Bridge(
                id=str(b["id"]),
                type=str(b["type"]),
                addr=int(b["addr"]),
                device_addr={int(k): str(v) for k, v in dict(b.get("device_addr", {})).items()},
            )
            for b in values.get("bridges", [])
        )
        values["hotplugged_vcpus"] = tuple(str(v) for v in values.get("hotplugged_vcpus", []))
        return cls(**values)
