"""The QEMU driver: a real VM per sandbox, controlled over QMP.

Start: build argv → spawn QEMU → connect the console watcher (QEMU waits for it) → connect
QMP, all against one deadline; an early exit becomes ``LaunchError`` with the log tail.
Stop: QMP ``quit`` → SIGTERM → SIGKILL, or with ``wait_only`` wait for the guest to power
off first; the console watcher is closed only after QEMU has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.config.defaults import VSOCK_AGENT_PORT
from virtcontainers.deadline import Deadline, poll_until
from virtcontainers.devices import (
    AgentSocket,
    BlockDrive,
    ColdPlugDevice,
    CpuDevice,
    HybridVSock,
    MemoryDevice,
    NetDevice,
    SerialPort,
    VfioDevice,
    VhostUserDevice,
    VSock,
)
from virtcontainers.drivers._resize import ResizeByHotplug
from virtcontainers.drivers._vmm import VmmDriver, check_boot_files
from virtcontainers.drivers.qemu import hotplug, vsock
from virtcontainers.drivers.qemu.argv import (
    AGENT_PORT_NAME,
    PCI_MACHINES,
    QemuPaths,
    build_argv,
    machine_type,
)
from virtcontainers.drivers.qemu.qmp import Qmp, as_dict, as_list
from virtcontainers.errors import (
    ConfigError,
    HypervisorError,
    HypervisorTimeout,
    UnsupportedError,
)
from virtcontainers.hypervisor import (
    Capability,
    D,
    NetworkNamespace,
    VmState,
    register_driver,
)
from virtcontainers.persist.hypervisor_state import HypervisorState

__all__ = ["QemuHypervisor"]

log = logging.getLogger(__name__)

QEMU_BINARIES = ("qemu-system-x86_64", "qemu-kvm")


@register_driver("qemu")
class QemuHypervisor(VmmDriver[QemuPaths], ResizeByHotplug):
    """QEMU with KVM when a vCPU really runs under it, TCG otherwise."""

    vmm_name = "QEMU"

    def __init__(self) -> None:
        super().__init__(QemuPaths(Path()))
        self._qmp: Qmp | None = None
        self._cold: list[ColdPlugDevice] = []
        self._hot: hotplug.HotplugState = hotplug.HotplugState()
        self._agent_vsock: VSock | None = None

    # -- helpers ------------------------------------------------------------------------

    @property
    def machine(self) -> str:
        return self._config.boot.hypervisor_machine_type or "q35"

    def _qmp_or_fail(self) -> Qmp:
        if self._qmp is None:
            raise self._error("QMP is not connected")
        return self._qmp

    async def qmp(self, command: str, arguments: dict[str, object] | None = None) -> object:
        """Run a raw QMP command on the running VM (diagnostics, features we don't wrap).

        Raises:
            ApiError: QEMU refused the command.
            HypervisorError: the VM is not running.
        """
        self._require("run a QMP command", VmState.RUNNING, VmState.PAUSED)
        return await self._guarded(command, self._qmp_or_fail().execute(command, arguments))

    # -- VM manager ---------------------------------------------------------------------

    async def create_sandbox(
        self, id: str, network_ns: NetworkNamespace, config: HypervisorConfig
    ) -> None:
        """Validate the config and lay out the run dir. No process starts here.

        Raises:
            ConfigError: invalid config, unknown machine type, QEMU binary not found.
            AssetError: a custom asset is missing or fails its hash.
        """
        self._require("create", VmState.NEW)
        cfg = self._valid_config(config)
        machine_type(cfg)
        check_boot_files(cfg)
        _check_template_files(cfg)
        binary = cfg.hypervisor_asset_path() or _find_qemu()
        if not binary:
            raise ConfigError(
                "no QEMU binary found: install qemu-system-x86 or set boot.hypervisor_path",
                field="boot.hypervisor_path",
            )
        cfg.boot.hypervisor_path = binary
        self._config = cfg
        self._netns = network_ns
        self.sandbox_id = id
        self._uuid = str(uuidlib.uuid4())
        self._set_run_dir(self._make_run_dir(id))
        self._set_state(VmState.CREATED)

    def _make_paths(self, run_dir: Path) -> QemuPaths:
        return QemuPaths(run_dir)

    async def start_sandbox(self, timeout: float) -> None:
        """Launch QEMU and wait until the console and QMP are connected.

        Raises:
            LaunchError: QEMU exited before it was ready (exit code, argv and log tail).
            HypervisorTimeout: QEMU did not become ready within ``timeout`` seconds.
        """
        self._require("start", VmState.CREATED)
        cid = self._reserve_guest_cid()
        self._agent_vsock = VSock(context_id=cid.cid, port=VSOCK_AGENT_PORT) if cid else None
        self._argv = build_argv(
            self._config,
            binary=self._config.boot.hypervisor_path,
            sandbox_id=self.sandbox_id,
            uuid=self._uuid,
            paths=self._paths,
            accel=host.accelerator(),
            host_memory_mb=host.host_memory_kib() // 1024,
            vsock=(cid.cid, cid.fd) if cid else None,
        ) + hotplug.cold_plug_argv(self._cold, self.machine)
        for sock in self._paths.sockets():
            sock.unlink(missing_ok=True)

        async def spawn() -> None:
            try:
                await self._spawn(pass_fds=(cid.fd,) if cid else (), netns=self._netns.path)
            finally:
                if cid is not None:
                    cid.close()  # QEMU holds the CID through its own copy of the descriptor

        await self._start(timeout, spawn)

    def _reserve_guest_cid(self) -> vsock.GuestCid | None:
        """A kernel-reserved guest CID when the host has vhost-vsock (and the caller did not
        cold-plug a vsock device of its own); None: the agent uses virtio-serial."""
        if any(isinstance(d, VSock) for d in self._cold):
            return None
        if not host.device_nodes([vsock.VHOST_VSOCK_DEVICE])[vsock.VHOST_VSOCK_DEVICE]:
            return None
        try:
            return vsock.allocate_guest_cid()
        except HypervisorError as exc:
            log.warning("qemu %s: %s; the agent uses virtio-serial", self.sandbox_id, exc)
            return None

    async def _until_ready(self, deadline: Deadline, exited: asyncio.Future[None]) -> None:
        """The console first (QEMU waits for it: ``wait=on``), then QMP, then a template
        clone's incoming migration."""
        self._console = self._new_console()
        await self._console.connect(deadline, abort=exited)
        self._qmp = Qmp(self._paths.qmp, sandbox_id=self.sandbox_id)
        await self._qmp.connect(deadline, abort=exited)
        if self._config.template.boot_from_template:
            await self._guarded(
                "the restore from the template", self._incoming(self._qmp, deadline)
            )

    async def _incoming(self, qmp: Qmp, deadline: Deadline) -> None:
        """Load a template's device state into this ``-incoming defer`` clone, then run it.

        The state file goes in as a read-only descriptor (``getfd`` + ``fd:`` URI): QEMU
        never opens a path, and ``-sandbox spawn=deny`` rules out ``exec:`` anyway. The
        RAM is not in the stream (``x-ignore-shared``): it is the template's memory file,
        mapped privately.
        """
        await qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
        )
        path = self._config.template.devices_state_path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(
                f"cannot open the template's device state {path}: {exc.strerror}",
                field="template.devices_state_path",
            ) from exc
        await _give_fd(qmp, fd, "migin")
        await qmp.execute("migrate-incoming", {"uri": "fd:migin"})
        await self._wait_migration(qmp, deadline.remaining(1.0), "restoring")
        await qmp.execute("cont")

    def _stop_steps(self) -> dict[str, float]:
        return {"kill_timeout": self.stop_timeout}

    def _polite(self, wait_only: bool) -> Callable[[], Awaitable[None]] | None:
        return self._quit if self._qmp is not None else None

    async def _quit(self) -> None:
        qmp = self._qmp_or_fail()
        with contextlib.suppress(HypervisorError):
            await qmp.execute("quit", timeout=2.0)

    async def _close_control(self) -> None:
        if self._qmp is not None:
            await self._qmp.disconnect()
            self._qmp = None

    async def _teardown_extra(self) -> None:
        with contextlib.suppress(OSError):
            self._paths.pidfile.unlink(missing_ok=True)

    async def pause_sandbox(self) -> None:
        self._require("pause", VmState.RUNNING)
        await self._qmp_or_fail().execute("stop")
        self._set_state(VmState.PAUSED)

    async def resume_sandbox(self) -> None:
        self._require("resume", VmState.PAUSED)
        await self._qmp_or_fail().execute("cont")
        self._set_state(VmState.RUNNING)

    async def save_sandbox(self) -> None:
        """Migrate the device state to ``template.devices_state_path`` (VM templating).

        The state goes through a file descriptor we open (no ``exec:`` shell URI, which
        ``-sandbox on`` forbids anyway). Requires the VM paused.
        """
        self._require("save", VmState.PAUSED)
        target = self._config.template.devices_state_path
        if not target:
            raise ConfigError(
                "save needs template.devices_state_path", field="template.devices_state_path"
            )
        qmp = self._qmp_or_fail()
        if self._config.template.boot_to_be_template:
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
            )
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        await _give_fd(qmp, fd, "migfile")
        await qmp.execute("migrate", {"uri": "fd:migfile"})
        await self._wait_migration(qmp)

    async def _wait_migration(self, qmp: Qmp, timeout: float = 120.0, what: str = "saving") -> None:
        async def completed() -> bool | None:
            info = as_dict(await qmp.execute("query-migrate"))
            status = info.get("status")
            if status in ("failed", "cancelled"):
                raise self._error(f"{what} the VM state failed: {info}")
            return True if status == "completed" else None

        await poll_until(
            Deadline.after(timeout),
            completed,
            on_timeout=lambda: HypervisorTimeout(f"{what} the VM state", timeout, driver="qemu"),
        )

    async def _probe(self) -> str | None:
        info = as_dict(await self._qmp_or_fail().execute("query-status", timeout=5.0))
        status = info.get("status")
        if status in ("internal-error", "guest-panicked"):
            return f"guest is in state {status}"
        return None

    # -- devices ------------------------------------------------------------------------

    async def add_device(self, device: ColdPlugDevice) -> None:
        """Queue a device for the command line; only before start."""
        self._require("cold-plug a device", VmState.CREATED)
        if isinstance(device, HybridVSock):
            raise UnsupportedError("hybrid vsock (QEMU uses vhost-vsock)", driver="qemu")
        self._cold.append(device)

    async def hotplug_add_device(self, device: D) -> D:
        self._require("hot-plug a device", VmState.RUNNING)
        self._require_pci(f"hot-plug of {type(device).__name__}")
        await self._guarded(f"hot-plug of {device}", self._plug(device))
        return device

    async def _plug(self, device: D) -> None:
        qmp, hot, cfg = self._qmp_or_fail(), self._hot, self._config
        match device:
            case CpuDevice():
                await hotplug.add_cpus(qmp, hot, device, cfg)
            case MemoryDevice():
                host_mb = host.host_memory_kib() // 1024
                await hotplug.add_memory(qmp, hot, device, cfg, host_mb)
            case BlockDrive():
                await hotplug.add_block(qmp, hot, device, cfg)
            case NetDevice():
                await hotplug.add_net(qmp, hot, device, cfg)
            case VfioDevice():
                await hotplug.add_vfio(qmp, hot, device, cfg)
            case VhostUserDevice():
                await hotplug.add_vhost_user(qmp, hot, device)

    async def hotplug_remove_device(self, device: D) -> D:
        self._require("hot-unplug a device", VmState.RUNNING)
        self._require_pci(f"hot-unplug of {type(device).__name__}")
        match device:
            case CpuDevice():
                work = hotplug.remove_cpus(self._qmp_or_fail(), self._hot, device)
            case MemoryDevice():
                raise UnsupportedError("memory hot-unplug", driver="qemu")
            case BlockDrive() | NetDevice() | VfioDevice() | VhostUserDevice():
                work = hotplug.remove_pci(self._qmp_or_fail(), self._hot, device)
        await self._guarded(f"hot-unplug of {device}", work)
        return device

    def _require_pci(self, operation: str) -> None:
        if self.machine not in PCI_MACHINES:
            raise UnsupportedError(f"{operation} on machine {self.machine}", driver="qemu")

    def _current_vcpus(self) -> int:
        return self._config.resources.num_vcpus + len(self._hot.vcpus)

    def _current_memory_mb(self) -> int:
        return self._config.resources.memory_size + self._hot.memory_mb

    async def generate_socket(self, id: str) -> AgentSocket:
        """The agent's channel: the vhost-vsock device with the CID reserved at start where
        the host has vhost-vsock (or a cold-plugged vsock device), else virtio-serial."""
        if self._agent_vsock is not None:
            return self._agent_vsock
        for device in self._cold:
            if isinstance(device, VSock):
                return device
        return SerialPort(id="agent0", name=AGENT_PORT_NAME, host_path=str(self._paths.agent))

    # -- utilities ----------------------------------------------------------------------

    def _capability_flags(self) -> Capability:
        flags = Capability.BLOCK_DEVICE | Capability.MULTI_QUEUE | Capability.PAUSE
        flags |= Capability.SAVE
        if self.machine in PCI_MACHINES:
            flags |= (
                Capability.BLOCK_DEVICE_HOTPLUG
                | Capability.NET_HOTPLUG
                | Capability.CPU_HOTPLUG
                | Capability.MEMORY_HOTPLUG
                | Capability.FS_SHARING
            )
        return flags

    async def get_thread_ids(self) -> dict[int, int]:
        self._require("get thread ids", VmState.RUNNING, VmState.PAUSED)
        out: dict[int, int] = {}
        for cpu in map(as_dict, as_list(await self._qmp_or_fail().execute("query-cpus-fast"))):
            index, tid = cpu.get("cpu-index"), cpu.get("thread-id")
            if isinstance(index, int) and isinstance(tid, int):
                out[index] = tid
        return out

    def _save_fields(self) -> dict[str, Any]:
        return {
            "block_index_map": dict(self._hot.block_index),
            "bridges": self._hot.bridges(self._config),
            "hotplugged_vcpus": tuple(self._hot.vcpus),
            "hotplugged_memory": self._hot.memory_mb,
            "hotplug_vfio_on_root_bus": self._config.devices.hotplug_vfio_on_root_bus,
            "pcie_root_port": self._config.devices.pcie_root_port,
            "api_socket": str(self._paths.qmp),
        }

    def _load_fields(self, state: HypervisorState) -> None:
        self._hot = hotplug.HotplugState.from_state(state)

    def _identity(self) -> str:
        return str(self._paths.qmp)

    async def _adopt(self, timeout: float) -> VmState:
        """QMP, then the console from here on too. If the starting process still holds the
        console, QEMU keeps this connection pending until that one closes: nothing is read
        twice."""
        self._qmp = Qmp(self._paths.qmp, sandbox_id=self.sandbox_id)
        await self._qmp.connect(Deadline.after(timeout))
        console = self._new_console()
        with contextlib.suppress(HypervisorTimeout):
            await console.connect(Deadline.after(1.0))
            self._console = console
        status = as_dict(await self._qmp.execute("query-status"))
        return VmState.PAUSED if status.get("status") == "paused" else VmState.RUNNING


async def _give_fd(qmp: Qmp, fd: int, name: str) -> None:
    """Pass ``fd`` to QEMU as ``name`` (``getfd``), then close our copy."""
    try:
        qmp.send_fd(fd)
        await qmp.execute("getfd", {"fdname": name})
    finally:
        os.close(fd)


def _check_template_files(cfg: HypervisorConfig) -> None:
    """A clone needs the template's memory file (big enough) and device state file."""
    t = cfg.template
    if not t.boot_from_template:
        return
    try:
        size = os.stat(t.memory_path).st_size
    except OSError as exc:
        raise ConfigError(
            f"template memory file {t.memory_path}: {exc.strerror}", field="template.memory_path"
        ) from exc
    if size < cfg.resources.memory_size << 20:
        raise ConfigError(
            f"template memory file {t.memory_path} holds {size >> 20} MiB, "
            f"the VM wants {cfg.resources.memory_size} MiB",
            field="template.memory_path",
        )
    if not os.path.isfile(t.devices_state_path):
        raise ConfigError(
            f"template device state {t.devices_state_path} does not exist",
            field="template.devices_state_path",
        )


def _find_qemu() -> str:
    found = host.find_binary(QEMU_BINARIES)
    return str(found) if found else ""
