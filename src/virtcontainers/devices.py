"""Typed models of every device kind the reference passes to a hypervisor.

The reference passes ``interface{}`` plus a ``deviceType`` tag; here each kind is its own
dataclass and the kind is a class attribute, so a driver dispatches with ``match``.
Hot-plug calls return the device as plugged, with the fields the driver filled in
(PCI path, slot, the amount of CPU or memory really added).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

__all__ = [
    "AgentSocket",
    "BlockDrive",
    "ColdPlugDevice",
    "CpuDevice",
    "DeviceKind",
    "FsShare",
    "HotplugDevice",
    "HybridVSock",
    "ImageDevice",
    "MemoryDevice",
    "NetDevice",
    "PortForward",
    "SerialPort",
    "UserNetDevice",
    "VSock",
    "VfioDevice",
    "VhostUserDevice",
    "VhostUserKind",
]


class DeviceKind(Enum):
    """The reference's ``deviceType`` values, in its order."""

    IMAGE = "image"
    FS = "fs"
    NET = "net"
    BLOCK = "block"
    SERIAL_PORT = "serial-port"
    VSOCK_PCI = "vsock-pci"
    VFIO = "vfio"
    VHOST_USER = "vhost-user"
    CPU = "cpu"
    MEMORY = "memory"
    HYBRID_VSOCK = "hybrid-vsock"


@dataclass
class ImageDevice:
    """A guest root filesystem image."""

    kind: ClassVar[DeviceKind] = DeviceKind.IMAGE
    path: str


@dataclass
class FsShare:
    """A host directory shared into the guest (virtio-9p or virtio-fs)."""

    kind: ClassVar[DeviceKind] = DeviceKind.FS
    host_path: str
    mount_tag: str
    read_only: bool = False


@dataclass
class NetDevice:
    """A guest NIC backed by a host tap device (optionally inside a network namespace)."""

    kind: ClassVar[DeviceKind] = DeviceKind.NET
    id: str
    tap_name: str
    mac: str
    netns_path: str = ""
    queues: int = 1
    rx_rate_limiter_max_rate: int = 0
    tx_rate_limiter_max_rate: int = 0
    #: Filled by the driver on hot-plug.
    pci_path: str = ""


@dataclass(frozen=True)
class PortForward:
    """A published port of a user-mode NIC: ``host_ip:host_port`` on the host reaches the
    guest's ``guest_port`` (``protocol`` is "tcp" or "udp")."""

    host_ip: str
    host_port: int
    guest_port: int
    protocol: str = "tcp"


@dataclass
class UserNetDevice:
    """A guest NIC backed by user-mode NAT inside the VMM (QEMU's slirp): no host device,
    no root. The VMM answers as ``gateway`` (the host) and ``dns`` on ``network``; the guest
    is ``guest_address``. ``restrict`` cuts the guest off from everything but ``forwards``."""

    kind: ClassVar[DeviceKind] = DeviceKind.NET
    id: str
    mac: str
    network: str = "10.0.2.0/24"
    gateway: str = "10.0.2.2"
    dns: str = "10.0.2.3"
    guest_address: str = "10.0.2.15"
    forwards: list[PortForward] = field(default_factory=list)
    restrict: bool = False


@dataclass
class BlockDrive:
    """A disk: a host file or block device presented to the guest."""

    kind: ClassVar[DeviceKind] = DeviceKind.BLOCK
    file: str
    id: str
    format: str = "raw"
    read_only: bool = False
    #: Filled by the driver: bus index, PCI path ("bridge/slot"), SCSI address, guest name.
    index: int = -1
    pci_path: str = ""
    scsi_addr: str = ""
    virt_path: str = ""
    is_pmem: bool = False


@dataclass
class SerialPort:
    """A virtio-serial port backed by a host unix socket (agent or console channel)."""

    kind: ClassVar[DeviceKind] = DeviceKind.SERIAL_PORT
    id: str
    name: str
    host_path: str


@dataclass
class VSock:
    """A vhost-vsock PCI device: the guest reaches ``port`` on context ``context_id``."""

    kind: ClassVar[DeviceKind] = DeviceKind.VSOCK_PCI
    context_id: int
    port: int
    vhost_fd: int = -1


@dataclass
class HybridVSock:
    """Firecracker/Cloud Hypervisor vsock: a host unix socket plus ``CONNECT <port>``."""

    kind: ClassVar[DeviceKind] = DeviceKind.HYBRID_VSOCK
    uds_path: str
    port: int
    context_id: int = 3


@dataclass
class VfioDevice:
    """A host PCI device passed through with VFIO."""

    kind: ClassVar[DeviceKind] = DeviceKind.VFIO
    bdf: str
    id: str = ""
    sysfs_dev: str = ""
    vendor_id: str = ""
    device_id: str = ""
    #: Filled by the driver.
    pci_path: str = ""


class VhostUserKind(Enum):
    BLK = "vhost-user-blk-pci"
    SCSI = "vhost-user-scsi-pci"
    NET = "virtio-net-pci"
    FS = "vhost-user-fs-pci"


@dataclass
class VhostUserDevice:
    """A device served by a vhost-user backend process over a unix socket."""

    kind: ClassVar[DeviceKind] = DeviceKind.VHOST_USER
    socket_path: str
    id: str
    type: VhostUserKind
    tag: str = ""
    mac: str = ""
    cache_size_mib: int = 0
    pci_path: str = ""


@dataclass
class CpuDevice:
    """A request for ``amount`` vCPUs; the hot-plug result says how many were really changed."""

    kind: ClassVar[DeviceKind] = DeviceKind.CPU
    amount: int
    #: QOM ids of the CPUs the driver plugged or unplugged.
    ids: list[str] = field(default_factory=list)


@dataclass
class MemoryDevice:
    """A memory DIMM. ``size_mb`` on return is what was really added."""

    kind: ClassVar[DeviceKind] = DeviceKind.MEMORY
    size_mb: int
    slot: int = -1
    addr: int = 0
    probe: bool = False


#: What ``add_device`` (cold plug, before start) accepts.
ColdPlugDevice = (
    ImageDevice
    | FsShare
    | NetDevice
    | UserNetDevice
    | BlockDrive
    | SerialPort
    | VSock
    | HybridVSock
    | VfioDevice
    | VhostUserDevice
)
#: What ``hotplug_add_device`` / ``hotplug_remove_device`` accept.
HotplugDevice = BlockDrive | NetDevice | CpuDevice | MemoryDevice | VfioDevice | VhostUserDevice
#: What ``generate_socket`` returns: the channel the guest agent listens on.
AgentSocket = VSock | HybridVSock | SerialPort
