"""QEMU device plumbing: the cold-plug command line and the QMP hot-plug sequences.

Each hot-plug is the reference's sequence: back-end first (``blockdev-add``, ``netdev_add``
with a passed tap fd, ``object-add`` memory backend, ``chardev-add``), then ``device_add`` on
a free bridge slot; removal is ``device_del``, wait for ``DEVICE_DELETED`` (the guest has to
let go), then the back-end is deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
from dataclasses import dataclass, field

from virtcontainers.config import HypervisorConfig
from virtcontainers.config.defaults import BlockDriver
from virtcontainers.devices import (
    BlockDrive,
    ColdPlugDevice,
    CpuDevice,
    FsShare,
    HybridVSock,
    ImageDevice,
    MemoryDevice,
    NetDevice,
    SerialPort,
    UserNetDevice,
    VfioDevice,
    VhostUserDevice,
    VhostUserKind,
    VSock,
)
from virtcontainers.drivers._resize import cpu_add_amount
from virtcontainers.drivers.qemu.argv import (
    BRIDGE_SLOTS,
    DEFAULT_MEM_SLOTS,
    blk_argv,
    net_argv,
    opt,
)
from virtcontainers.drivers.qemu.qmp import Qmp, as_dict, as_list
from virtcontainers.errors import HypervisorError, HypervisorTimeout, UnsupportedError
from virtcontainers.persist.hypervisor_state import Bridge, HypervisorState

__all__ = ["HotplugState", "cold_plug_argv"]

#: Guests can take long to release a device (memory pressure, TCG): be generous (agent#683).
UNPLUG_TIMEOUT = 30.0


@dataclass
class _Plugged:
    kind: str
    bridge: int
    slot: int
    backend: str = ""


@dataclass
class HotplugState:
    """What has been hot-plugged into one VM, so it can be removed and persisted."""

    vcpus: list[str] = field(default_factory=list)
    dimms: dict[int, int] = field(default_factory=dict)  # slot -> MiB
    devices: dict[str, _Plugged] = field(default_factory=dict)
    block_index: dict[int, int] = field(default_factory=dict)

    @property
    def memory_mb(self) -> int:
        return sum(self.dimms.values())

    def allocate_slot(self, cfg: HypervisorConfig) -> tuple[int, int]:
        used = {(p.bridge, p.slot) for p in self.devices.values()}
        for bridge in range(cfg.devices.default_bridges):
            for slot in BRIDGE_SLOTS:
                if (bridge, slot) not in used:
                    return bridge, slot
        raise HypervisorError("no free PCI bridge slot for hot-plug", driver="qemu")

    def bridges(self, cfg: HypervisorConfig) -> tuple[Bridge, ...]:
        out = []
        for i in range(cfg.devices.default_bridges):
            addrs = {p.slot: dev for dev, p in self.devices.items() if p.bridge == i}
            out.append(Bridge(id=f"pci-bridge-{i}", type="pci", addr=i + 2, device_addr=addrs))
        return tuple(out)

    @classmethod
    def from_state(cls, state: HypervisorState) -> HotplugState:
        hot = cls(vcpus=list(state.hotplugged_vcpus), block_index=dict(state.block_index_map))
        if state.hotplugged_memory:
            hot.dimms[0] = state.hotplugged_memory
        for i, bridge in enumerate(state.bridges):
            for slot, dev in bridge.device_addr.items():
                hot.devices[dev] = _Plugged("pci", i, slot)
        return hot


# -- cold plug ----------------------------------------------------------------------------


def cold_plug_argv(devices: list[ColdPlugDevice], machine: str) -> list[str]:
    """Command-line arguments for devices added before start. Every value is escaped for
    QEMU's comma-separated options (:func:`~virtcontainers.drivers.qemu.argv.opt`)."""
    virtio = "device" if machine == "microvm" else "pci"
    argv: list[str] = []
    for dev in devices:
        match dev:
            case BlockDrive():
                argv += blk_argv(
                    f"drive-{dev.id}", dev.file, virtio, fmt=dev.format,
                    read_only=dev.read_only, device_id=dev.id,
                )  # fmt: skip
            case ImageDevice():
                argv += blk_argv("image-extra", dev.path, virtio, read_only=True)
            case FsShare():
                ro = ",readonly=on" if dev.read_only else ""
                tag, path = opt(dev.mount_tag), opt(dev.host_path)
                argv += [
                    "-fsdev",
                    f"local,id=fs-{tag},path={path},security_model=none,multidevs=remap{ro}",
                    "-device", f"virtio-9p-{virtio},fsdev=fs-{tag},mount_tag={tag}",
                ]  # fmt: skip
            case NetDevice() | UserNetDevice():
                argv += net_argv(dev, virtio)
            case SerialPort():
                i, path, name = opt(dev.id), opt(dev.host_path), opt(dev.name)
                argv += [
                    "-chardev", f"socket,id=char-{i},path={path},server=on,wait=off",
                    "-device", f"virtserialport,bus=vcserial.0,chardev=char-{i},name={name}",
                ]  # fmt: skip
            case VSock():
                argv += ["-device", f"vhost-vsock-{virtio},guest-cid={dev.context_id}"]
            case VfioDevice():
                argv += [
                    "-device",
                    f"vfio-pci,host={opt(dev.bdf)}" + (f",id={opt(dev.id)}" if dev.id else ""),
                ]
            case VhostUserDevice():
                i = opt(dev.id)
                argv += [
                    "-chardev", f"socket,id=char-{i},path={opt(dev.socket_path)}",
                    "-device", f"{dev.type.value},chardev=char-{i},id={i}",
                ]  # fmt: skip
            case HybridVSock():
                raise UnsupportedError("hybrid vsock (use vhost-vsock)", driver="qemu")
    return argv


# -- CPUs ---------------------------------------------------------------------------------


async def add_cpus(qmp: Qmp, hot: HotplugState, dev: CpuDevice, cfg: HypervisorConfig) -> None:
    """Hot-add vCPUs from ``query-hotpluggable-cpus``, capped at max vCPUs."""
    current = cfg.resources.num_vcpus + len(hot.vcpus)
    want = cpu_add_amount(current, dev.amount, cfg.resources.default_max_vcpus)
    added: list[str] = []
    if want:
        slots = await qmp.execute("query-hotpluggable-cpus")
        free = (
            [s for s in slots if isinstance(s, dict) and "qom-path" not in s]
            if isinstance(slots, list)
            else []
        )
        # QEMU lists the highest socket first; plug in ascending order.
        free.reverse()
        for slot in free[:want]:
            props = slot.get("props")
            driver = slot.get("type")
            if not isinstance(props, dict) or not isinstance(driver, str):
                continue
            ids = [props.get(k, 0) for k in ("socket-id", "core-id", "thread-id")]
            cpu_id = "cpu-{}-{}-{}".format(*ids)
            await qmp.execute("device_add", {"driver": driver, "id": cpu_id, **props})
            added.append(cpu_id)
            hot.vcpus.append(cpu_id)
    dev.amount = len(added)
    dev.ids = added


async def remove_cpus(qmp: Qmp, hot: HotplugState, dev: CpuDevice) -> None:
    """Hot-remove the newest hot-added vCPUs. Boot vCPUs can't be removed."""
    if dev.amount > len(hot.vcpus):
        raise HypervisorError(
            f"unable to remove {dev.amount} vCPUs: only {len(hot.vcpus)} were hot-added",
            driver="qemu",
        )
    removed: list[str] = []
    for cpu_id in reversed(hot.vcpus[len(hot.vcpus) - dev.amount :]):
        await _unplug(qmp, cpu_id)
        hot.vcpus.remove(cpu_id)
        removed.append(cpu_id)
    dev.ids = removed


# -- memory -------------------------------------------------------------------------------


async def add_memory(
    qmp: Qmp, hot: HotplugState, dev: MemoryDevice, cfg: HypervisorConfig, host_mb: int
) -> None:
    """A ``pc-dimm`` on a memory backend in the next free slot, capped by host memory."""
    if dev.size_mb <= 0:
        raise HypervisorError(f"cannot hot-plug {dev.size_mb} MiB of memory", driver="qemu")
    current = cfg.resources.memory_size + hot.memory_mb
    if current + dev.size_mb > host_mb:
        raise HypervisorError(
            f"unable to hot-plug {dev.size_mb} MiB memory: the VM has {current} MiB and the "
            f"maximum is {host_mb} MiB",
            driver="qemu",
        )
    devices = await qmp.execute("query-memory-devices")
    used = (
        {
            d["data"]["slot"]
            for d in devices
            if isinstance(d, dict) and isinstance(d.get("data"), dict) and "slot" in d["data"]
        }
        if isinstance(devices, list)
        else set()
    )
    slots = cfg.resources.mem_slots or DEFAULT_MEM_SLOTS
    free = [s for s in range(slots) if s not in used and s not in hot.dimms]
    if not free:
        raise HypervisorError(f"no free memory slot (of {slots})", driver="qemu")
    slot = free[0]
    backend: dict[str, object] = {"id": f"mem{slot}", "size": dev.size_mb << 20}
    if cfg.resources.file_backed_mem_root_dir:
        backend |= {
            "qom-type": "memory-backend-file",
            "mem-path": cfg.resources.file_backed_mem_root_dir,
            "share": True,
        }
    else:
        backend["qom-type"] = "memory-backend-ram"
    await qmp.execute("object-add", backend)
    try:
        await qmp.execute(
            "device_add", {"driver": "pc-dimm", "id": f"dimm{slot}", "memdev": f"mem{slot}"}
        )
    except HypervisorError:
        with contextlib.suppress(HypervisorError):
            await qmp.execute("object-del", {"id": f"mem{slot}"})
        raise
    hot.dimms[slot] = dev.size_mb
    dev.slot = slot
    for d in as_list(await qmp.execute("query-memory-devices")):
        data = as_dict(as_dict(d).get("data"))
        if data.get("id") == f"dimm{slot}":
            addr = data.get("addr")
            dev.addr = addr if isinstance(addr, int) else 0


# -- PCI devices --------------------------------------------------------------------------


async def add_block(qmp: Qmp, hot: HotplugState, dev: BlockDrive, cfg: HypervisorConfig) -> None:
    """``blockdev-add`` then virtio-blk-pci on a bridge, or scsi-hd on the virtio-scsi bus."""
    if dev.id in hot.devices:
        raise HypervisorError(f"device {dev.id} is already plugged", driver="qemu")
    node = f"drive-{dev.id}"
    s = cfg.storage
    await qmp.execute(
        "blockdev-add",
        {
            "driver": dev.format,
            "node-name": node,
            "read-only": dev.read_only,
            "cache": {
                "direct": s.block_device_cache_direct,
                "no-flush": s.block_device_cache_noflush,
            },
            "file": {"driver": "file", "filename": dev.file},
        },
    )
    index = next(i for i in range(len(hot.block_index) + 1) if i not in hot.block_index)
    try:
        if s.block_device_driver == BlockDriver.VIRTIO_SCSI:
            await qmp.execute(
                "device_add",
                {"driver": "scsi-hd", "id": dev.id, "drive": node, "bus": "scsi0.0",
                 "channel": 0, "scsi-id": index, "lun": 0},
            )  # fmt: skip
            dev.scsi_addr = f"{index}:0"
            hot.devices[dev.id] = _Plugged("scsi", -1, -1, node)
        else:
            bridge, slot = hot.allocate_slot(cfg)
            await qmp.execute(
                "device_add",
                {"driver": "virtio-blk-pci", "id": dev.id, "drive": node,
                 "bus": f"pci-bridge-{bridge}", "addr": f"{slot:#x}"},
            )  # fmt: skip
            dev.pci_path = f"{bridge + 2:02x}/{slot:02x}"
            hot.devices[dev.id] = _Plugged("block", bridge, slot, node)
    except HypervisorError:
        with contextlib.suppress(HypervisorError):
            await qmp.execute("blockdev-del", {"node-name": node})
        raise
    hot.block_index[index] = 1
    dev.index = index


async def add_net(qmp: Qmp, hot: HotplugState, dev: NetDevice, cfg: HypervisorConfig) -> None:
    """Open the tap (inside the device's network namespace), pass its fd, plug virtio-net."""
    if dev.id in hot.devices:
        raise HypervisorError(f"device {dev.id} is already plugged", driver="qemu")
    fd = open_tap(dev.tap_name, dev.netns_path)
    fdname = f"fd-{dev.id}"
    try:
        qmp.send_fd(fd)
        await qmp.execute("getfd", {"fdname": fdname})
    finally:
        os.close(fd)
    backend = f"netdev-{dev.id}"
    await qmp.execute("netdev_add", {"type": "tap", "id": backend, "fd": fdname})
    bridge, slot = hot.allocate_slot(cfg)
    try:
        await qmp.execute(
            "device_add",
            {"driver": "virtio-net-pci", "id": dev.id, "netdev": backend, "mac": dev.mac,
             "bus": f"pci-bridge-{bridge}", "addr": f"{slot:#x}"},
        )  # fmt: skip
    except HypervisorError:
        with contextlib.suppress(HypervisorError):
            await qmp.execute("netdev_del", {"id": backend})
        raise
    dev.pci_path = f"{bridge + 2:02x}/{slot:02x}"
    hot.devices[dev.id] = _Plugged("net", bridge, slot, backend)


async def add_vfio(qmp: Qmp, hot: HotplugState, dev: VfioDevice, cfg: HypervisorConfig) -> None:
    """vfio-pci for a host device, on a bridge or (``hotplug_vfio_on_root_bus``) the root."""
    dev_id = dev.id or f"vfio-{dev.bdf.replace(':', '-').replace('.', '-')}"
    args: dict[str, object] = {"driver": "vfio-pci", "id": dev_id, "host": dev.bdf}
    if cfg.devices.hotplug_vfio_on_root_bus:
        await qmp.execute("device_add", args)
        hot.devices[dev_id] = _Plugged("vfio", -1, -1)
    else:
        bridge, slot = hot.allocate_slot(cfg)
        await qmp.execute(
            "device_add", args | {"bus": f"pci-bridge-{bridge}", "addr": f"{slot:#x}"}
        )
        hot.devices[dev_id] = _Plugged("vfio", bridge, slot)
        dev.pci_path = f"{bridge + 2:02x}/{slot:02x}"
    dev.id = dev_id


async def add_vhost_user(qmp: Qmp, hot: HotplugState, dev: VhostUserDevice) -> None:
    """A unix-socket chardev to the vhost-user back-end, then the front-end device."""
    chardev = f"char-{dev.id}"
    await qmp.execute(
        "chardev-add",
        {"id": chardev, "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": dev.socket_path}}, "server": False}}},
    )  # fmt: skip
    args: dict[str, object] = {"driver": dev.type.value, "id": dev.id, "chardev": chardev}
    if dev.type is VhostUserKind.NET:
        await qmp.execute(
            "netdev_add", {"type": "vhost-user", "id": f"netdev-{dev.id}", "chardev": chardev}
        )
        args = {
            "driver": "virtio-net-pci",
            "id": dev.id,
            "netdev": f"netdev-{dev.id}",
            "mac": dev.mac,
        }
    elif dev.type is VhostUserKind.FS:
        args |= {"tag": dev.tag, "cache-size": f"{dev.cache_size_mib}M"}
    try:
        await qmp.execute("device_add", args)
    except HypervisorError:
        with contextlib.suppress(HypervisorError):
            await qmp.execute("chardev-remove", {"id": chardev})
        raise
    hot.devices[dev.id] = _Plugged("vhost-user", -1, -1, chardev)


async def remove_pci(
    qmp: Qmp, hot: HotplugState, dev: BlockDrive | NetDevice | VfioDevice | VhostUserDevice
) -> None:
    """``device_del``, wait for the guest to release it, then drop the back-end."""
    dev_id = dev.id
    plugged = hot.devices.get(dev_id)
    if plugged is None:
        raise HypervisorError(f"device {dev_id} is not plugged", driver="qemu")
    await _unplug(qmp, dev_id)
    del hot.devices[dev_id]
    if plugged.kind in ("block", "scsi"):
        await qmp.execute("blockdev-del", {"node-name": plugged.backend})
        if isinstance(dev, BlockDrive) and dev.index >= 0:
            hot.block_index.pop(dev.index, None)
    elif plugged.kind == "net":
        await qmp.execute("netdev_del", {"id": plugged.backend})
    elif plugged.kind == "vhost-user":
        await qmp.execute("chardev-remove", {"id": plugged.backend})


async def _unplug(qmp: Qmp, dev_id: str) -> None:
    if not await qmp.device_del(dev_id, timeout=UNPLUG_TIMEOUT):
        raise HypervisorTimeout(f"guest releasing device {dev_id}", UNPLUG_TIMEOUT, driver="qemu")


# -- taps ---------------------------------------------------------------------------------

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000


def open_tap(name: str, netns_path: str = "") -> int:
    """Open (creating if needed) tap ``name``, inside ``netns_path`` when given.

    Namespaces are per thread, so the open happens on a short-lived thread that joins the
    namespace; the fd stays valid in ours.
    """
    if len(name.encode()) >= 16:
        raise HypervisorError(f"tap name {name!r} is longer than 15 bytes", driver="qemu")
    result: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            if netns_path:
                _setns(netns_path)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            ifr = struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
            try:
                fcntl.ioctl(fd, _TUNSETIFF, ifr)
            except OSError:
                os.close(fd)
                raise
            result.append(fd)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    t = threading.Thread(target=work, name=f"tap-{name}")
    t.start()
    t.join()
    if errors:
        exc = errors[0]
        raise HypervisorError(f"cannot open tap {name}: {exc}", driver="qemu") from exc
    return result[0]


def _setns(path: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)
