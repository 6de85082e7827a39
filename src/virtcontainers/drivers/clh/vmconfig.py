"""The Cloud Hypervisor ``VmConfig`` (``PUT /vm.create`` body) and device bodies, built from a
HypervisorConfig and typed devices. Pure functions: no I/O, so unit tests pin them exactly.

Field names and shapes follow ``cloud-hypervisor.yaml`` (OpenAPI 3); the contract tests
validate everything built here against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from virtcontainers.config import HypervisorConfig, Param, serialize_params
from virtcontainers.config.defaults import GUEST_KERNEL_PARAMS, VIRTIO_BLK_KERNEL_ROOT_PARAMS
from virtcontainers.devices import (
    BlockDrive,
    FsShare,
    HybridVSock,
    ImageDevice,
    NetDevice,
    VfioDevice,
    VhostUserDevice,
    VhostUserKind,
)
from virtcontainers.drivers._runpaths import InRunDir, RunPaths
from virtcontainers.drivers.clh.api import Json
from virtcontainers.errors import HypervisorError

__all__ = [
    "MIB",
    "ClhPaths",
    "FsBackend",
    "build_vm_config",
    "device_id",
    "disk_config",
    "hotplug_size_mib",
    "kernel_cmdline",
    "net_config",
    "pci_path_from_bdf",
    "rate_limiter",
    "vfio_config",
]

MIB = 1 << 20
#: What Cloud Hypervisor takes cold (``vm.create``); vhost-user SCSI excepted.
COLD_PLUG_KINDS = (BlockDrive, ImageDevice, NetDevice, VfioDevice, VhostUserDevice, FsShare)
#: Cloud Hypervisor hot-plugs ACPI memory in 128 MiB blocks; the hot-plug area is sized in them.
MEMORY_ALIGN_MIB = 128
#: The reference's token-bucket refill time for rate limiters (``DefaultRateLimiterRefillTime``).
RATE_LIMITER_REFILL_MS = 1000
#: virtio-net queue size (Cloud Hypervisor's default).
NET_QUEUE_SIZE = 256
FS_QUEUE_SIZE = 1024

# The reference's kernel parameters for Cloud Hypervisor on amd64. The serial port (8250,
# built into every kernel) is the console: it works from the first kernel message, unlike
# hvc0 whose driver may be a module. ``vc.agent=vsock`` makes the guest agent listen on vsock.
_KERNEL_PARAMS = (
    Param("console", "ttyS0"),
    Param("panic", "1"),
    Param("no_timer_check"),
    *GUEST_KERNEL_PARAMS,
    Param("vc.agent", "vsock"),
)


@dataclass(frozen=True)
class ClhPaths(RunPaths):
    """Where one VM's host-side files live (all inside its 0700 run dir)."""

    api = InRunDir("clh-api.sock")
    vsock = InRunDir("clh-vsock.sock")
    vmm_log = InRunDir("clh.log")

    def virtiofsd_socket(self, index: int) -> Path:
        return self.run_dir / f"virtiofsd-{index}.sock"

    def virtiofsd_log(self, index: int) -> Path:
        return self.run_dir / f"virtiofsd-{index}.log"

    def sockets(self) -> tuple[Path, ...]:
        """Every socket the VMM or the driver may leave behind (the vsock's ``<path>_<port>``
        listeners for guest-initiated connections included)."""
        found = [self.api, self.vsock, self.console]
        if not self.unset and self.run_dir.is_dir():
            found += sorted(self.run_dir.glob("clh-vsock.sock_*"))
            found += sorted(self.run_dir.glob("virtiofsd-*.sock"))
        return tuple(found)

    def logs(self) -> tuple[Path, ...]:
        found = [self.console_log, self.vmm_log]
        if not self.unset and self.run_dir.is_dir():
            found += sorted(self.run_dir.glob("virtiofsd-*.log"))
        return tuple(found)


@dataclass(frozen=True)
class FsBackend:
    """A virtio-fs share served by a vhost-user socket (a virtiofsd we started, or given)."""

    tag: str
    socket: str
    id: str


def kernel_cmdline(cfg: HypervisorConfig) -> str:
    """Our parameters, the virtio-blk root when booting an image, then the user's."""
    params = list(_KERNEL_PARAMS)
    if cfg.image_asset_path():
        params += VIRTIO_BLK_KERNEL_ROOT_PARAMS
    if cfg.debugging.debug:
        params.append(Param("debug"))
    else:
        params.append(Param("quiet"))
    params += cfg.boot.kernel_params
    return " ".join(serialize_params(params, "="))


def hotplug_size_mib(memory_mib: int, host_memory_mib: int) -> int:
    """The hot-plug area: the rest of the host's memory (as the reference sizes it), in
    whole 128 MiB blocks; 0 when the host has no room left."""
    room = host_memory_mib - memory_mib
    return max(0, room - room % MEMORY_ALIGN_MIB)


def device_id(device: BlockDrive | NetDevice | VfioDevice | VhostUserDevice | ImageDevice) -> str:
    """The id the VMM knows a device by. Deterministic from our device, so a process that
    reattached can still remove it. (Ids starting with ``_`` are the VMM's own.)"""
    match device:
        case BlockDrive():
            return f"disk-{device.id}"
        case NetDevice():
            return f"net-{device.id}"
        case VfioDevice():
            return f"vfio-{device.id or device.bdf}"
        case VhostUserDevice():
            return f"vhu-{device.id}"
        case ImageDevice():
            return "rootfs"


def rate_limiter(bits_per_second: int) -> Json | None:
    """A bandwidth token bucket for ``bits_per_second`` (the API counts bytes), refilled
    every second as in the reference; None for unlimited."""
    if bits_per_second <= 0:
        return None
    return {
        "bandwidth": {"size": bits_per_second // 8, "refill_time": RATE_LIMITER_REFILL_MS},
    }


def disk_config(drive: BlockDrive, *, direct: bool = False) -> Json:
    body: Json = {"path": drive.file, "readonly": drive.read_only, "id": device_id(drive)}
    if direct:
        body["direct"] = True
    return body


def net_config(dev: NetDevice, cfg: HypervisorConfig) -> Json:
    """A tap-backed NIC. Cloud Hypervisor has one rate limiter per NIC for both directions:
    the stricter of the device's (else the VM's) rx/tx limits is used."""
    body: Json = {
        "tap": dev.tap_name,
        "mac": dev.mac,
        "id": device_id(dev),
        # The API counts rx and tx queues separately.
        "num_queues": 2 * max(1, dev.queues),
        "queue_size": NET_QUEUE_SIZE,
    }
    rates = [dev.rx_rate_limiter_max_rate, dev.tx_rate_limiter_max_rate]
    if not any(rates):
        rates = [cfg.network.rx_rate_limiter_max_rate, cfg.network.tx_rate_limiter_max_rate]
    limits = [r for r in rates if r > 0]
    limiter = rate_limiter(min(limits)) if limits else None
    if limiter is not None:
        body["rate_limiter_config"] = limiter
    return body


def vfio_config(dev: VfioDevice) -> Json:
    path = dev.sysfs_dev or f"/sys/bus/pci/devices/{dev.bdf}/"
    return {"path": path, "id": device_id(dev)}


def vhost_user_disk(dev: VhostUserDevice) -> Json:
    return {"vhost_user": True, "vhost_socket": dev.socket_path, "id": device_id(dev)}


def vhost_user_net(dev: VhostUserDevice) -> Json:
    body: Json = {"vhost_user": True, "vhost_socket": dev.socket_path, "id": device_id(dev)}
    if dev.mac:
        body["mac"] = dev.mac
    return body


def fs_config(fs: FsBackend) -> Json:
    return {
        "tag": fs.tag,
        "socket": fs.socket,
        "num_queues": 1,
        "queue_size": FS_QUEUE_SIZE,
        "id": fs.id,
    }


def pci_path_from_bdf(bdf: str) -> str:
    """``0000:00:0a.0`` -> ``0a``: the slot on the root bus, as the reference accepts it.

    Raises:
        HypervisorError: any other shape (a device behind a bridge, a function > 0).
    """
    parts = bdf.split(":")
    if len(parts) == 3 and parts[0] == "0000" and parts[1] == "00":
        slot, _, function = parts[2].partition(".")
        if function == "0" and len(slot) == 2 and all(c in "0123456789abcdef" for c in slot):
            return slot
    raise HypervisorError(f"unexpected PCI address {bdf!r} from cloud-hypervisor", driver="clh")


def cold_bodies(
    cold: Sequence[object], cfg: HypervisorConfig, paths: ClhPaths
) -> tuple[list[Json], list[Json], list[Json], list[FsBackend]]:
    """The ``disks``, ``net``, ``devices`` and ``fs`` entries for cold-plugged devices (a
    shared directory is served by the virtiofsd the driver starts on its run-dir socket)."""
    disks: list[Json] = []
    nets: list[Json] = []
    devices: list[Json] = []
    fs: list[FsBackend] = []
    direct = cfg.storage.block_device_cache_direct
    for dev in cold:
        match dev:
            case ImageDevice():
                disks.append({"path": dev.path, "readonly": True, "id": "image"})
            case BlockDrive():
                disks.append(disk_config(dev, direct=direct))
            case NetDevice():
                nets.append(net_config(dev, cfg))
            case VfioDevice():
                devices.append(vfio_config(dev))
            case VhostUserDevice(type=VhostUserKind.BLK):
                disks.append(vhost_user_disk(dev))
            case VhostUserDevice(type=VhostUserKind.NET):
                nets.append(vhost_user_net(dev))
            case VhostUserDevice(type=VhostUserKind.FS):
                fs.append(FsBackend(dev.tag, dev.socket_path, device_id(dev)))
    shares = [d for d in cold if isinstance(d, FsShare)]
    for index, share in enumerate(shares):
        sock = str(paths.virtiofsd_socket(index))
        fs.append(FsBackend(share.mount_tag, sock, f"fs-{index}"))
    return disks, nets, devices, fs


def build_vm_config(
    cfg: HypervisorConfig,
    paths: ClhPaths,
    *,
    host_memory_mib: int,
    vsock: HybridVSock,
    disks: list[Json],
    nets: list[Json],
    devices: list[Json],
    fs: list[FsBackend],
) -> Json:
    """The ``vm.create`` body. The console is off and the serial port goes to a socket in the
    run dir (the console watcher reads it); the agent is reached over hybrid vsock."""
    r = cfg.resources
    memory: Json = {
        "size": r.memory_size * MIB,
        # vhost-user devices (virtio-fs) need guest memory the backend can map.
        "shared": True,
        "hugepages": r.huge_pages,
        "hotplug_method": "VirtioMem" if r.virtio_mem else "Acpi",
    }
    hotplug = hotplug_size_mib(r.memory_size, host_memory_mib)
    if hotplug:
        memory["hotplug_size"] = hotplug * MIB
    payload: Json = {"kernel": cfg.kernel_asset_path(), "cmdline": kernel_cmdline(cfg)}
    if cfg.initrd_asset_path():
        payload["initramfs"] = cfg.initrd_asset_path()
    if cfg.firmware_asset_path():
        payload["firmware"] = cfg.firmware_asset_path()
    all_disks: list[Json] = []
    image = cfg.image_asset_path()
    if image:
        all_disks.append({"path": image, "readonly": True, "id": "rootfs"})
    all_disks += disks
    body: Json = {
        "cpus": {"boot_vcpus": r.num_vcpus, "max_vcpus": r.default_max_vcpus},
        "memory": memory,
        "payload": payload,
        "rng": {"src": cfg.boot.entropy_source or "/dev/urandom"},
        "serial": {"mode": "Socket", "socket": str(paths.console)},
        "console": {"mode": "Off"},
        "vsock": {"cid": vsock.context_id, "socket": vsock.uds_path},
    }
    if all_disks:
        body["disks"] = all_disks
    if nets:
        body["net"] = nets
    if devices:
        body["devices"] = devices
    if fs:
        body["fs"] = [fs_config(f) for f in fs]
    if cfg.devices.iommu:
        body["iommu"] = True
    if cfg.if_pv_panic_enabled():
        body["pvpanic"] = True
    return body
