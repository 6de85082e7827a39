"""The Cloud Hypervisor driver: one ``cloud-hypervisor`` process per VM, driven over its REST
API on a unix socket in the VM's run dir.

Start: (virtiofsd for each shared directory) → spawn ``cloud-hypervisor --api-socket`` →
``vmm.ping`` by deadline → ``vm.create`` → console watcher connects while ``vm.boot`` runs →
``vm.info`` says Running. An early exit becomes ``LaunchError`` with the VMM's log tail.
Stop: ``vmm.shutdown`` (or, with ``wait_only``, nothing) → up to 3 s for the VMM to exit →
SIGTERM → SIGKILL; the console is drained only after the VMM has exited, then every socket
is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.config.defaults import VSOCK_AGENT_PORT, BlockDriver, SharedFs
from virtcontainers.deadline import Deadline, poll_until
from virtcontainers.devices import (
    AgentSocket,
    BlockDrive,
    ColdPlugDevice,
    CpuDevice,
    FsShare,
    HybridVSock,
    MemoryDevice,
    NetDevice,
    VfioDevice,
    VhostUserDevice,
    VhostUserKind,
)
from virtcontainers.drivers._resize import hotplug_mem_mib
from virtcontainers.drivers._vmm import VmmDriver, check_boot_files
from virtcontainers.drivers.clh import vmconfig
from virtcontainers.drivers.clh.api import BOOT_TIMEOUT, ClhApi, EventHooks, Json
from virtcontainers.drivers.clh.vmconfig import MIB, ClhPaths, FsBackend
from virtcontainers.errors import (
    ConfigError,
    HypervisorError,
    LaunchError,
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
from virtcontainers.process import VmmProcess

__all__ = ["CloudHypervisor"]

log = logging.getLogger(__name__)

CLH_BINARIES = ("cloud-hypervisor",)
#: The reference's grace period for the VMM to exit after ``vmm.shutdown``.
STOP_TIMEOUT = 3.0
#: Block drivers that mean "virtio-blk" to Cloud Hypervisor (it has no SCSI controller; the
#: default virtio-scsi is taken as "the default block device").
_BLOCK_DRIVERS = (BlockDriver.VIRTIO_BLOCK.value, BlockDriver.VIRTIO_SCSI.value)


@register_driver("clh")
class CloudHypervisor(VmmDriver[ClhPaths]):
    """Cloud Hypervisor over its REST API. ``event_hooks`` are passed to the httpx client
    (the contract tests record every request with them)."""

    vmm_name = "cloud-hypervisor"
    vcpu_thread_names = re.compile(r"vcpu(\d+)")
    #: Cloud Hypervisor enforces the NICs' token buckets itself.
    rate_limiter_builtin = True
    capability_flags = Capability.BLOCK_DEVICE | Capability.BLOCK_DEVICE_HOTPLUG | Capability.PAUSE
    capability_flags |= Capability.NET_HOTPLUG | Capability.CPU_HOTPLUG | Capability.SAVE
    capability_flags |= Capability.MEMORY_HOTPLUG | Capability.FS_SHARING | Capability.HYBRID_VSOCK

    def __init__(self, *, event_hooks: EventHooks | None = None) -> None:
        super().__init__(ClhPaths(Path()))
        self._event_hooks = event_hooks
        self._api = ClhApi(self._paths.api, event_hooks=event_hooks)
        self._virtiofsd: list[VmmProcess] = []
        self._cold: list[ColdPlugDevice] = []
        self._vsock = HybridVSock(uds_path="", port=VSOCK_AGENT_PORT)
        self._hot_vcpus: list[str] = []
        self._hot_memory_mb = 0
        self._block_index: dict[int, int] = {}
        self._vm_body: Json = {}
        #: Seconds the VMM gets to exit before SIGTERM (the reference's 3 s).
        self.stop_timeout = STOP_TIMEOUT

    # -- helpers ------------------------------------------------------------------------

    @property
    def api(self) -> ClhApi:
        """The REST client (for diagnostics and features the interface does not wrap)."""
        return self._api

    def _make_paths(self, run_dir: Path) -> ClhPaths:
        return ClhPaths(run_dir)

    def _set_run_dir(self, run_dir: Path) -> None:
        super()._set_run_dir(run_dir)
        self._api = ClhApi(
            self._paths.api, sandbox_id=self.sandbox_id, event_hooks=self._event_hooks
        )

    # -- VM manager ---------------------------------------------------------------------

    async def create_sandbox(
        self, id: str, network_ns: NetworkNamespace, config: HypervisorConfig
    ) -> None:
        """Validate the config and lay out the run dir. No process starts here.

        Raises:
            ConfigError: invalid config; shared fs other than virtio-fs; a block driver Cloud
                Hypervisor lacks; missing kernel/initrd/image file; no cloud-hypervisor
                binary; a network namespace without ``nsenter``.
            AssetError: a custom asset is missing or fails its hash.
        """
        self._require("create", VmState.NEW)
        cfg = self._valid_config(config)
        if cfg.shared_fs.shared_fs and cfg.shared_fs.shared_fs != SharedFs.VIRTIO_FS:
            raise ConfigError(
                f"cloud-hypervisor shares directories with virtio-fs only, "
                f"not {cfg.shared_fs.shared_fs}",
                field="shared_fs.shared_fs",
                allowed=[SharedFs.VIRTIO_FS.value],
            )
        if cfg.storage.block_device_driver not in _BLOCK_DRIVERS:
            raise ConfigError(
                f"cloud-hypervisor has no {cfg.storage.block_device_driver} block devices",
                field="storage.block_device_driver",
                allowed=[BlockDriver.VIRTIO_BLOCK.value],
            )
        if cfg.storage.block_device_driver == BlockDriver.VIRTIO_SCSI:
            log.debug("clh: no virtio-scsi in cloud-hypervisor; disks are virtio-blk")
        if cfg.template.boot_from_template:
            raise ConfigError(
                "booting from a VM template is not supported by the clh driver",
                field="template.boot_from_template",
            )
        check_boot_files(cfg)
        binary = _resolve_binary(cfg)
        cfg.boot.hypervisor_path = binary
        if network_ns.path and shutil.which("nsenter") is None:
            raise ConfigError(
                "running cloud-hypervisor in a network namespace needs nsenter (util-linux)",
                field="network_ns",
            )
        self._config = cfg
        self._netns = network_ns
        self.sandbox_id = id
        self._uuid = str(uuidlib.uuid4())
        self._set_run_dir(self._make_run_dir(id))
        self._vsock = HybridVSock(uds_path=str(self._paths.vsock), port=VSOCK_AGENT_PORT)
        self._set_state(VmState.CREATED)

    def build_argv(self) -> list[str]:
        """``cloud-hypervisor --api-socket path=<run dir>/clh-api.sock [-v]``, inside the
        network namespace when there is one. The VM itself is configured over the API."""
        argv = [self._config.boot.hypervisor_path, "--api-socket", f"path={self._paths.api}"]
        if self._config.debugging.debug:
            argv.append("-v")
        if self._netns.path:
            argv = ["nsenter", f"--net={self._netns.path}", "--", *argv]
        return argv

    def build_vm_config(self) -> Json:
        """The ``vm.create`` body for this VM and its cold-plugged devices."""
        disks, nets, devices, fs = vmconfig.cold_bodies(self._cold, self._config, self._paths)
        return vmconfig.build_vm_config(
            self._config,
            self._paths,
            host_memory_mib=host.host_memory_kib() // 1024,
            vsock=self._vsock,
            disks=disks,
            nets=nets,
            devices=devices,
            fs=fs,
        )

    async def start_sandbox(self, timeout: float) -> None:
        """Launch cloud-hypervisor, create and boot the VM.

        Raises:
            LaunchError: the VMM (or a virtiofsd) exited before the VM ran.
            HypervisorTimeout: not running within ``timeout`` seconds.
            ApiError: the VMM refused the VM config or the boot.
        """
        self._require("start", VmState.CREATED)
        for sock in self._paths.sockets():
            sock.unlink(missing_ok=True)
        self._argv = self.build_argv()
        body = self.build_vm_config()
        deadline = Deadline.after(timeout)

        async def spawn() -> None:
            await self._start_virtiofsd(deadline)
            await self._spawn()

        self._vm_body = body
        await self._start(timeout, spawn)

    async def _until_ready(self, deadline: Deadline, exited: asyncio.Future[None]) -> None:
        """``vmm.ping``, ``vm.create``, the console while ``vm.boot`` runs, ``vm.info``."""
        await self._api.wait_ready(deadline, abort=exited)
        await self._race(
            exited, self._api.create_vm(self._vm_body, timeout=deadline.remaining(0.1))
        )
        self._console = self._new_console()
        # Connect while the VM boots: the serial socket appears during vm.boot, and a
        # socket with no reader drops what the guest prints.
        console = asyncio.ensure_future(self._console.connect(deadline, abort=exited))
        try:
            boot_timeout = min(BOOT_TIMEOUT, deadline.remaining(0.1))
            await self._race(exited, self._api.boot_vm(timeout=boot_timeout))
            await console
        finally:
            if not console.done():
                console.cancel()
                with contextlib.suppress(asyncio.CancelledError, HypervisorError):
                    await console
        info = await self._race(exited, self._api.vm_info(timeout=deadline.remaining(0.1)))
        if info.get("state") != "Running":
            raise self._error(f"VM state after boot is {info.get('state')!r}, not Running")

    async def _start_virtiofsd(self, deadline: Deadline) -> None:
        """One virtiofsd per shared directory, each on its own socket in the run dir."""
        shares = [d for d in self._cold if isinstance(d, FsShare)]
        sf = self._config.shared_fs
        for index, share in enumerate(shares):
            sock = self._paths.virtiofsd_socket(index)
            argv = [
                sf.virtio_fs_daemon,
                f"--socket-path={sock}",
                f"--shared-dir={share.host_path}",
                f"--cache={sf.virtio_fs_cache or 'auto'}",
                *(["--readonly"] if share.read_only else []),
                *sf.virtio_fs_extra_args,
            ]
            proc = await VmmProcess.spawn(argv, log_path=self._paths.virtiofsd_log(index))
            self._virtiofsd.append(proc)

            await self._wait_virtiofsd(proc, sock, share.mount_tag, deadline)

    async def _wait_virtiofsd(
        self, proc: VmmProcess, sock: Path, tag: str, deadline: Deadline
    ) -> None:
        async def listening() -> bool | None:
            if os.path.exists(sock):  # noqa: ASYNC240 (a stat in the run dir; never blocks)
                return True
            if not proc.alive():
                await proc.wait(1.0)
                raise LaunchError(
                    f"virtiofsd for {tag} exited",
                    exit_code=proc.returncode,
                    argv=proc.argv,
                    log_tail=proc.log_tail(),
                    driver="clh",
                    sandbox_id=self.sandbox_id,
                )
            return None

        await poll_until(
            deadline,
            listening,
            on_timeout=lambda: deadline.missed(
                f"virtiofsd socket {sock}", driver="clh", sandbox_id=self.sandbox_id
            ),
        )

    def _polite(self, wait_only: bool) -> Callable[[], Awaitable[None]] | None:
        return None if wait_only else self._shutdown_vmm

    def _stop_steps(self) -> dict[str, float]:
        """``vmm.shutdown``, up to ``stop_timeout`` (3 s) to exit, then SIGTERM, SIGKILL."""
        return {"polite_timeout": self.stop_timeout, "term_timeout": self.stop_timeout}

    async def stop_sandbox(self, wait_only: bool = False) -> None:
        await super().stop_sandbox(wait_only)
        if self._owns_run_dir and not self._paths.unset:
            # A VM that never started left nothing worth keeping: don't leak the empty dir.
            with contextlib.suppress(OSError):
                self._paths.run_dir.rmdir()

    async def _shutdown_vmm(self) -> None:
        with contextlib.suppress(HypervisorError):
            await self._api.shutdown_vmm(timeout=self.stop_timeout)

    async def _close_control(self) -> None:
        await self._api.aclose()

    async def _teardown_extra(self) -> None:
        """virtiofsd exits by itself once the VMM hangs up; SIGTERM covers the rest."""
        for proc in self._virtiofsd:
            await proc.stop(term_timeout=self.stop_timeout)
            proc.close()
        self._virtiofsd = []

    async def pause_sandbox(self) -> None:
        self._require("pause", VmState.RUNNING)
        await self._guarded("pause", self._api.pause_vm())
        self._set_state(VmState.PAUSED)

    async def resume_sandbox(self) -> None:
        self._require("resume", VmState.PAUSED)
        await self._guarded("resume", self._api.resume_vm())
        self._set_state(VmState.RUNNING)

    async def save_sandbox(self) -> None:
        """``vm.snapshot`` into the directory ``template.devices_state_path`` (created 0700
        if missing): Cloud Hypervisor writes ``config.json``, ``state.json`` and the memory
        there. Requires the VM paused.

        Raises:
            ConfigError: no ``devices_state_path``.
        """
        self._require("save", VmState.PAUSED)
        target = self._config.template.devices_state_path
        if not target:
            raise ConfigError(
                "save needs template.devices_state_path", field="template.devices_state_path"
            )
        directory = await asyncio.to_thread(_make_dir, Path(target))
        # The memory is written too: allow what the reference allows a migration (2 min).
        await self._guarded("snapshot", self._api.snapshot_vm(directory.as_uri(), timeout=120.0))

    async def _probe(self) -> str | None:
        await self._api.ping()
        return None

    async def cleanup(self) -> None:
        """Remove the run dir (when the driver made it) or its logs, after stop. Idempotent.

        Raises:
            StateError: the VM is running; HypervisorError: its VMM still runs.
        """
        if self._process is not None and self._process.alive():
            raise self._error("cloud-hypervisor is still running: stop the sandbox first")
        await super().cleanup()

    # -- devices ------------------------------------------------------------------------

    async def add_device(self, device: ColdPlugDevice) -> None:
        """Queue a device for ``vm.create``; only before start.

        Raises:
            UnsupportedError: virtio-serial ports and vhost-vsock (the agent channel is the
                hybrid vsock), vhost-user SCSI.
            ConfigError: a shared directory without ``shared_fs.virtio_fs_daemon``.
        """
        self._require("cold-plug a device", VmState.CREATED)
        if isinstance(device, HybridVSock):
            self._vsock = device
            return
        if not isinstance(device, vmconfig.COLD_PLUG_KINDS) or (
            isinstance(device, VhostUserDevice) and device.type is VhostUserKind.SCSI
        ):
            kind = type(device).__name__
            raise self._unsupported(f"cold-plug of {kind} (the agent: hybrid vsock)")
        if isinstance(device, FsShare) and not self._config.shared_fs.virtio_fs_daemon:
            raise ConfigError(
                "sharing a directory needs shared_fs.virtio_fs_daemon (virtiofsd)",
                field="shared_fs.virtio_fs_daemon",
            )
        self._cold.append(device)

    async def hotplug_add_device(self, device: D) -> D:
        """Hot-plug a disk (``vm.add-disk``), NIC (``vm.add-net``), VFIO device
        (``vm.add-device``), vhost-user device, vCPUs or memory (``vm.resize``).

        PCI devices get ``pci_path`` (the slot on the root bus) from the VMM's reply.
        """
        self._require("hot-plug a device", VmState.RUNNING)
        match device:
            case CpuDevice():
                old, new = await self._resize_vcpus(self._current_vcpus() + device.amount)
                device.amount = new - old
                device.ids = self._hot_vcpus[len(self._hot_vcpus) - device.amount :]
            case MemoryDevice():
                current = await self._current_memory_mb()
                _, added = await self.resize_memory(current + device.size_mb, 0, device.probe)
                device.size_mb = added.size_mb
            case BlockDrive():
                body = vmconfig.disk_config(
                    device, direct=self._config.storage.block_device_cache_direct
                )
                device.pci_path = await self._add_pci("disk", body, device)
                device.index = next(
                    i for i in range(len(self._block_index) + 1) if i not in self._block_index
                )
                self._block_index[device.index] = 1
            case NetDevice():
                body = vmconfig.net_config(device, self._config)
                device.pci_path = await self._add_pci("net", body, device)
            case VfioDevice():
                device.pci_path = await self._add_pci(
                    "device", vmconfig.vfio_config(device), device
                )
            case VhostUserDevice():
                kind, body = _vhost_user_body(device)
                device.pci_path = await self._add_pci(kind, body, device)
        return device

    async def _add_pci(
        self, kind: str, body: Json, device: BlockDrive | NetDevice | VfioDevice | VhostUserDevice
    ) -> str:
        info = await self._guarded(f"hot-plug of {device}", self._api.add(kind, body))
        return vmconfig.pci_path_from_bdf(str(info.get("bdf", "")))

    async def hotplug_remove_device(self, device: D) -> D:
        """Unplug with ``vm.remove-device`` (by the id the driver gave the device), or shrink
        the vCPUs with ``vm.resize``.

        Raises:
            UnsupportedError: memory (Cloud Hypervisor cannot unplug ACPI memory).
            HypervisorError: removing more vCPUs than were hot-added.
            ApiError: the VMM does not know the device.
        """
        self._require("hot-unplug a device", VmState.RUNNING)
        match device:
            case CpuDevice():
                if device.amount > len(self._hot_vcpus):
                    raise self._error(
                        f"unable to remove {device.amount} vCPUs: only "
                        f"{len(self._hot_vcpus)} were hot-added"
                    )
                removed = self._hot_vcpus[len(self._hot_vcpus) - device.amount :]
                await self._resize_vcpus(self._current_vcpus() - device.amount)
                device.ids = removed
            case MemoryDevice():
                raise UnsupportedError("memory hot-unplug", driver="clh")
            case BlockDrive() | NetDevice() | VfioDevice() | VhostUserDevice():
                await self._guarded(
                    f"hot-unplug of {device}", self._api.remove_device(vmconfig.device_id(device))
                )
                if isinstance(device, BlockDrive) and device.index >= 0:
                    self._block_index.pop(device.index, None)
                device.pci_path = ""
        return device

    def _current_vcpus(self) -> int:
        return self._config.resources.num_vcpus + len(self._hot_vcpus)

    async def _current_memory_mb(self) -> int:
        """From ``vm.info``, as the reference does (the VMM is the authority)."""
        info = await self._guarded("vm.info", self._api.vm_info())
        actual = info.get("memory_actual_size")
        if isinstance(actual, int) and actual > 0:
            return actual // MIB
        memory = info.get("config", {}).get("memory", {})
        return int(memory.get("size", 0) + memory.get("hotplugged_size", 0)) // MIB

    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        """``vm.resize`` with ``desired_vcpus``; returns (old, new). Growth past max vCPUs is
        capped with a warning, as in the reference.

        Raises:
            HypervisorError: fewer vCPUs than the VM booted with (only hot-added vCPUs go).
        """
        self._require("resize vCPUs", VmState.RUNNING)
        return await self._resize_vcpus(vcpus)

    async def _resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        boot = self._config.resources.num_vcpus
        current = self._current_vcpus()
        if vcpus < boot:
            raise self._error(
                f"cannot resize to {vcpus} vCPUs: the VM booted with {boot} and only "
                "hot-added vCPUs can be removed"
            )
        max_vcpus = self._config.resources.default_max_vcpus
        if vcpus > max_vcpus:
            log.warning(
                "clh %s: %d vCPUs requested, the maximum is %d; resizing to %d",
                self.sandbox_id,
                vcpus,
                max_vcpus,
                max_vcpus,
            )
            vcpus = max_vcpus
        if vcpus == current:
            return current, current
        await self._guarded("vCPU resize", self._api.resize_vm(desired_vcpus=vcpus))
        self._hot_vcpus = [f"vcpu{i}" for i in range(boot, vcpus)]
        return current, vcpus

    async def resize_memory(
        self, mem_mb: int, memory_block_size_mb: int, probe: bool
    ) -> tuple[int, MemoryDevice]:
        """Grow to ``mem_mb`` MiB with ``vm.resize`` ``desired_ram``, the growth rounded up
        to whole blocks. Returns (MiB after, a MemoryDevice of the size added). Asking for
        less than the VM has changes nothing (logged), as in the reference.

        Raises:
            UnsupportedError: ``probe`` (ACPI announces the memory; there is no probe path).
        """
        self._require("resize memory", VmState.RUNNING)
        if probe:
            raise UnsupportedError("memory hot-plug with probe", driver="clh")
        current = await self._current_memory_mb()
        if mem_mb <= current:
            if mem_mb < current:
                log.warning(
                    "clh %s: memory hot-unplug is not supported; keeping %d MiB (asked %d MiB)",
                    self.sandbox_id,
                    current,
                    mem_mb,
                )
            return current, MemoryDevice(size_mb=0, probe=probe)
        add = hotplug_mem_mib(mem_mb - current, memory_block_size_mb)
        await self._guarded("memory resize", self._api.resize_vm(desired_ram=(current + add) * MIB))
        self._hot_memory_mb += add
        return current + add, MemoryDevice(size_mb=add, probe=probe)

    async def generate_socket(self, id: str) -> AgentSocket:
        """Hybrid vsock: the VMM's vsock unix socket, agent port 1024."""
        return HybridVSock(
            uds_path=self._vsock.uds_path or str(self._paths.vsock),
            port=VSOCK_AGENT_PORT,
            context_id=self._vsock.context_id,
        )

    # -- utilities ----------------------------------------------------------------------

    def _extra_pids(self) -> list[int]:
        """Any virtiofsd, after the VMM."""
        return [p.pid for p in self._virtiofsd if p.alive()]

    def _save_fields(self) -> dict[str, Any]:
        return {
            "block_index_map": dict(self._block_index),
            "hotplugged_vcpus": tuple(self._hot_vcpus),
            "hotplugged_memory": self._hot_memory_mb,
            "virtiofsd_pid": self._virtiofsd[0].pid if self._virtiofsd else 0,
            "api_socket": str(self._paths.api),
        }

    def _load_fields(self, state: HypervisorState) -> None:
        self._vsock = HybridVSock(uds_path=str(self._paths.vsock), port=VSOCK_AGENT_PORT)
        self._hot_vcpus = list(state.hotplugged_vcpus)
        self._hot_memory_mb = state.hotplugged_memory
        self._block_index = dict(state.block_index_map)
        if state.virtiofsd_pid:
            self._virtiofsd = [VmmProcess.adopt(state.virtiofsd_pid)]

    def _identity(self) -> str:
        return str(self._paths.api)

    async def _adopt(self, timeout: float) -> VmState:
        await self._api.wait_ready(Deadline.after(timeout))
        info = await self._api.vm_info()
        states = {"Running": VmState.RUNNING, "Paused": VmState.PAUSED}
        state = states.get(str(info.get("state")))
        if state is None:
            raise self._error(f"cannot adopt a VM in state {info.get('state')!r}")
        return state


def _vhost_user_body(dev: VhostUserDevice) -> tuple[str, Json]:
    match dev.type:
        case VhostUserKind.BLK:
            return "disk", vmconfig.vhost_user_disk(dev)
        case VhostUserKind.NET:
            return "net", vmconfig.vhost_user_net(dev)
        case VhostUserKind.FS:
            backend = FsBackend(dev.tag, dev.socket_path, vmconfig.device_id(dev))
            return "fs", vmconfig.fs_config(backend)
    raise UnsupportedError(f"hot-plug of vhost-user {dev.type.value}", driver="clh")


def _make_dir(path: Path) -> Path:
    path = path.resolve()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _resolve_binary(cfg: HypervisorConfig) -> str:
    binary = cfg.hypervisor_asset_path() or _find_clh()
    if not binary:
        raise ConfigError(
            "no cloud-hypervisor binary found: install it or set boot.hypervisor_path",
            field="boot.hypervisor_path",
        )
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise ConfigError(f"{binary} is not an executable file", field="boot.hypervisor_path")
    return binary


def _find_clh() -> str:
    found = host.find_binary(CLH_BINARIES)
    return str(found) if found else ""
