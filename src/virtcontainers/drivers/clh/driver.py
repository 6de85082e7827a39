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
import tempfile
import uuid as uuidlib
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.config.defaults import VSOCK_AGENT_PORT, BlockDriver, SharedFs
from virtcontainers.console import ConsoleWatcher
from virtcontainers.deadline import Deadline, poll_until
from virtcontainers.devices import (
    AgentSocket,
    BlockDrive,
    ColdPlugDevice,
    CpuDevice,
    FsShare,
    HybridVSock,
    ImageDevice,
    MemoryDevice,
    NetDevice,
    SerialPort,
    VfioDevice,
    VhostUserDevice,
    VhostUserKind,
    VSock,
)
from virtcontainers.drivers._grpc import decode_vm, encode_vm
from virtcontainers.drivers._resize import hotplug_mem_mib
from virtcontainers.drivers.clh import vmconfig
from virtcontainers.drivers.clh.api import BOOT_TIMEOUT, ClhApi, EventHooks, Json
from virtcontainers.drivers.clh.vmconfig import MIB, ClhPaths, FsBackend
from virtcontainers.errors import (
    ApiError,
    ConfigError,
    HypervisorError,
    HypervisorTimeout,
    LaunchError,
    StateError,
    UnsupportedError,
)
from virtcontainers.hypervisor import (
    Capabilities,
    Capability,
    ConsoleUrl,
    D,
    Hypervisor,
    HypervisorType,
    NetworkNamespace,
    VmState,
    register_driver,
)
from virtcontainers.persist.hypervisor_state import HypervisorState
from virtcontainers.process import VmmProcess, process_matches

__all__ = ["CloudHypervisor"]

log = logging.getLogger(__name__)
T = TypeVar("T")

CLH_BINARIES = ("cloud-hypervisor",)
#: The reference's grace period for the VMM to exit after ``vmm.shutdown``.
STOP_TIMEOUT = 3.0
#: How long to drain the console after the VMM exited (it closes the socket on exit).
_CONSOLE_DRAIN_TIMEOUT = 5.0
_VCPU_COMM = re.compile(r"vcpu(\d+)")
#: Block drivers that mean "virtio-blk" to Cloud Hypervisor (it has no SCSI controller; the
#: default virtio-scsi is taken as "the default block device").
_BLOCK_DRIVERS = (BlockDriver.VIRTIO_BLOCK.value, BlockDriver.VIRTIO_SCSI.value)


@register_driver(HypervisorType.CLH)
class CloudHypervisor(Hypervisor):
    """Cloud Hypervisor over its REST API. ``event_hooks`` are passed to the httpx client
    (the contract tests record every request with them)."""

    def __init__(self, *, event_hooks: EventHooks | None = None) -> None:
        super().__init__()
        self._config = HypervisorConfig()
        self._netns = NetworkNamespace()
        self._uuid = ""
        self._paths = ClhPaths(Path())
        self._owns_run_dir = False
        self._event_hooks = event_hooks
        self._api = ClhApi(self._paths.api, event_hooks=event_hooks)
        self._argv: list[str] = []
        self._process: VmmProcess | None = None
        self._virtiofsd: list[VmmProcess] = []
        self._console: ConsoleWatcher | None = None
        self._cold: list[ColdPlugDevice] = []
        self._vsock = HybridVSock(uds_path="", port=VSOCK_AGENT_PORT)
        self._hot_vcpus: list[str] = []
        self._hot_memory_mb = 0
        self._block_index: dict[int, int] = {}
        #: Seconds the VMM gets to exit before SIGTERM (the reference's 3 s).
        self.stop_timeout = STOP_TIMEOUT

    # -- helpers ------------------------------------------------------------------------

    @property
    def paths(self) -> ClhPaths:
        return self._paths

    @property
    def argv(self) -> list[str]:
        return list(self._argv)

    @property
    def api(self) -> ClhApi:
        """The REST client (for diagnostics and features the interface does not wrap)."""
        return self._api

    def _error(self, message: str) -> HypervisorError:
        return HypervisorError(message, driver="clh", sandbox_id=self.sandbox_id)

    def _set_paths(self, run_dir: Path) -> None:
        self._paths = ClhPaths(run_dir)
        self._api = ClhApi(
            self._paths.api, sandbox_id=self.sandbox_id, event_hooks=self._event_hooks
        )

    async def _call(self, operation: str, work: Awaitable[T]) -> T:
        """Await an API call; when it fails because the VMM died, mark the VM failed and say
        so (rather than surfacing a bare "connection refused")."""
        try:
            return await work
        except (ApiError, HypervisorTimeout):
            raise
        except HypervisorError as exc:
            proc = self._process
            if proc is not None and await proc.wait(0.5):
                self._set_state(VmState.FAILED)
                raise self._error(
                    f"cloud-hypervisor exited (code {proc.returncode}) during {operation}"
                ) from exc
            raise

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
        cfg = config.copy()
        cfg.valid()
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
        _check_boot_files(cfg)
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
        if self._sandbox is not None:
            run_dir = self._sandbox.run_dir
            run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        else:
            run_dir = Path(tempfile.mkdtemp(prefix=f"vc-clh-{id[:16]}-"))
            self._owns_run_dir = True
        self._set_paths(run_dir)
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
        disks: list[Json] = []
        nets: list[Json] = []
        devices: list[Json] = []
        fs: list[FsBackend] = []
        direct = self._config.storage.block_device_cache_direct
        for dev in self._cold:
            match dev:
                case ImageDevice():
                    disks.append({"path": dev.path, "readonly": True, "id": "image"})
                case BlockDrive():
                    disks.append(vmconfig.disk_config(dev, direct=direct))
                case NetDevice():
                    nets.append(vmconfig.net_config(dev, self._config))
                case VfioDevice():
                    devices.append(vmconfig.vfio_config(dev))
                case VhostUserDevice(type=VhostUserKind.BLK):
                    disks.append(vmconfig.vhost_user_disk(dev))
                case VhostUserDevice(type=VhostUserKind.NET):
                    nets.append(vmconfig.vhost_user_net(dev))
                case VhostUserDevice(type=VhostUserKind.FS):
                    fs.append(FsBackend(dev.tag, dev.socket_path, vmconfig.device_id(dev)))
        shares = [d for d in self._cold if isinstance(d, FsShare)]
        for index, share in enumerate(shares):
            sock = str(self._paths.virtiofsd_socket(index))
            fs.append(FsBackend(share.mount_tag, sock, f"fs-{index}"))
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
        deadline = Deadline.after(timeout)
        for sock in self._paths.sockets():
            sock.unlink(missing_ok=True)
        self._argv = self.build_argv()
        body = self.build_vm_config()
        try:
            await self._start_virtiofsd(deadline)
            self._process = await VmmProcess.spawn(self._argv, log_path=self._paths.vmm_log)
        except OSError as exc:
            await self._abort_start()
            raise LaunchError(
                f"cannot execute {exc.filename or self._argv[0]}: {exc.strerror or exc}",
                exit_code=None,
                argv=self._argv,
                log_tail="",
                driver="clh",
                sandbox_id=self.sandbox_id,
            ) from exc
        except BaseException:
            await self._abort_start()
            raise
        exited = asyncio.ensure_future(self._exited_early())
        try:
            await self._api.wait_ready(deadline, abort=exited)
            await self._launch_step(
                exited, self._api.create_vm(body, timeout=deadline.remaining(0.1))
            )
            self._console = ConsoleWatcher(
                self._paths.console,
                self._paths.console_log,
                logging.getLogger(f"virtcontainers.console.{self.sandbox_id}"),
            )
            # Connect while the VM boots: the serial socket appears during vm.boot, and a
            # socket with no reader drops what the guest prints.
            console = asyncio.ensure_future(self._console.connect(deadline, abort=exited))
            try:
                await self._launch_step(
                    exited, self._api.boot_vm(timeout=min(BOOT_TIMEOUT, deadline.remaining(0.1)))
                )
                await console
            finally:
                if not console.done():
                    console.cancel()
                    with contextlib.suppress(asyncio.CancelledError, HypervisorError):
                        await console
            info = await self._launch_step(
                exited, self._api.vm_info(timeout=deadline.remaining(0.1))
            )
            if info.get("state") != "Running":
                raise self._error(f"VM state after boot is {info.get('state')!r}, not Running")
        except BaseException as exc:
            await self._abort_start()
            if isinstance(exc, HypervisorTimeout) and not isinstance(exc, LaunchError):
                raise HypervisorTimeout(
                    f"starting cloud-hypervisor ({exc.operation})",
                    timeout,
                    driver="clh",
                    sandbox_id=self.sandbox_id,
                ) from exc
            raise
        finally:
            exited.cancel()
            with contextlib.suppress(asyncio.CancelledError, LaunchError):
                await exited
        self._set_state(VmState.RUNNING)

    async def _launch_step(self, exited: asyncio.Future[None], work: Awaitable[T]) -> T:
        """One API call during start; a VMM that died meanwhile becomes LaunchError."""
        task = asyncio.ensure_future(work)
        waiters: list[asyncio.Future[Any]] = [task, exited]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            try:
                return task.result()
            except (ApiError, HypervisorTimeout):
                raise
            except HypervisorError:
                # Connection refused/reset: most likely the VMM is exiting right now.
                proc = self._process
                if proc is not None and await proc.wait(1.0):
                    exited.cancel()
                    raise self._launch_error("cloud-hypervisor exited during start-up") from None
                raise
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, HypervisorError):
            await task
        exited.result()  # raises the LaunchError
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch_error(self, message: str) -> LaunchError:
        proc = self._process
        return LaunchError(
            message,
            exit_code=proc.returncode if proc else None,
            argv=self._argv,
            log_tail=proc.log_tail() if proc else "",
            driver="clh",
            sandbox_id=self.sandbox_id,
        )

    async def _exited_early(self) -> None:
        """Resolves with LaunchError as soon as the VMM exits during start-up."""
        assert self._process is not None
        await self._process.wait(None)
        raise self._launch_error("cloud-hypervisor exited during start-up")

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
            on_timeout=lambda: HypervisorTimeout(
                f"virtiofsd socket {sock}",
                deadline.seconds,
                driver="clh",
                sandbox_id=self.sandbox_id,
            ),
        )

    async def _abort_start(self) -> None:
        if self._process is not None:
            await self._process.stop(term_timeout=2.0, kill_timeout=5.0)
        await self._teardown()
        self._set_state(VmState.FAILED)

    async def stop_sandbox(self, wait_only: bool = False) -> None:
        """Stop the VMM and remove its sockets; logs stay until :meth:`cleanup`. Idempotent.

        Without ``wait_only``: ``vmm.shutdown``, up to ``stop_timeout`` (3 s) for the VMM to
        exit, then SIGTERM, then SIGKILL. With ``wait_only`` (the guest is powering off by
        itself) no shutdown request is sent: the VMM gets ``stop_timeout`` to exit, then is
        forced. The console is drained to end-of-file only after the VMM has exited.
        """
        if self.state in (VmState.STOPPED, VmState.NEW):
            self._set_state(VmState.STOPPED)
            return
        proc = self._process
        if proc is not None:
            if wait_only and not await proc.wait(self.stop_timeout):
                log.warning(
                    "clh %s: VMM did not exit within %.0f s; stopping it",
                    self.sandbox_id,
                    self.stop_timeout,
                )
            await proc.stop(
                polite=None if wait_only else self._shutdown_vmm,
                polite_timeout=self.stop_timeout,
                term_timeout=self.stop_timeout,
            )
        await self._teardown()
        if self._owns_run_dir:
            # A VM that never started left nothing worth keeping: don't leak the empty dir.
            with contextlib.suppress(OSError):
                self._paths.run_dir.rmdir()
        self._set_state(VmState.STOPPED)

    async def _shutdown_vmm(self) -> None:
        with contextlib.suppress(HypervisorError):
            await self._api.shutdown_vmm(timeout=self.stop_timeout)

    async def _teardown(self) -> None:
        """After the VMM is gone: drain the console, stop virtiofsd, close the API client,
        remove every socket."""
        if self._console is not None:
            await self._console.wait_closed(_CONSOLE_DRAIN_TIMEOUT)
            self._console = None
        # virtiofsd exits by itself once the VMM hangs up; SIGTERM covers the rest.
        for proc in self._virtiofsd:
            await proc.stop(term_timeout=self.stop_timeout)
            proc.close()
        self._virtiofsd = []
        await self._api.aclose()
        if self._process is not None:
            self._process.close()
            self._process = None
        for path in self._paths.sockets():
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    async def pause_sandbox(self) -> None:
        self._require("pause", VmState.RUNNING)
        await self._call("pause", self._api.pause_vm())
        self._set_state(VmState.PAUSED)

    async def resume_sandbox(self) -> None:
        self._require("resume", VmState.PAUSED)
        await self._call("resume", self._api.resume_vm())
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
        await self._call("snapshot", self._api.snapshot_vm(directory.as_uri(), timeout=120.0))

    async def check(self) -> None:
        """Raises HypervisorError unless the VMM process is alive and answers ``vmm.ping``."""
        if self.state is VmState.FAILED:
            raise self._error("the VM has failed")
        self._require("check", VmState.RUNNING, VmState.PAUSED)
        if self._process is None or not self._process.alive():
            code = self._process.returncode if self._process else None
            self._set_state(VmState.FAILED)
            raise self._error(f"cloud-hypervisor is not running (exit code {code})")
        await self._call("check", self._api.ping())

    async def disconnect(self) -> None:
        """Close the API connection; the next call opens a new one."""
        await self._api.aclose()

    async def cleanup(self) -> None:
        """Remove the run dir (when the driver made it) or its logs, after stop. Idempotent."""
        if self.state not in (VmState.STOPPED, VmState.FAILED, VmState.NEW, VmState.CREATED):
            raise StateError("clean up", self.state.value, ["stopped", "failed"], driver="clh")
        if self._process is not None and self._process.alive():
            raise self._error("cloud-hypervisor is still running: stop the sandbox first")
        if self._owns_run_dir and self._paths.run_dir != Path():
            shutil.rmtree(self._paths.run_dir, ignore_errors=True)
            return
        for path in (
            *self._paths.sockets(),
            self._paths.console_log,
            self._paths.vmm_log,
            *self._paths.run_dir.glob("virtiofsd-*.log"),
        ):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    async def get_sandbox_console(self, sandbox_id: str) -> ConsoleUrl:
        """The serial port's unix socket (the driver's console watcher is connected to it;
        Cloud Hypervisor serves one client at a time)."""
        return ConsoleUrl("unix", str(self._paths.console))

    # -- devices ------------------------------------------------------------------------

    async def add_device(self, device: ColdPlugDevice) -> None:
        """Queue a device for ``vm.create``; only before start.

        Raises:
            UnsupportedError: virtio-serial ports, vhost-vsock, vhost-user SCSI.
            ConfigError: a shared directory without ``shared_fs.virtio_fs_daemon``.
        """
        self._require("cold-plug a device", VmState.CREATED)
        match device:
            case SerialPort():
                raise UnsupportedError("virtio-serial ports", driver="clh")
            case VSock():
                raise UnsupportedError("vhost-vsock (use hybrid vsock)", driver="clh")
            case VhostUserDevice(type=VhostUserKind.SCSI):
                raise UnsupportedError("vhost-user SCSI", driver="clh")
            case HybridVSock():
                self._vsock = device
                return
            case FsShare():
                if not self._config.shared_fs.virtio_fs_daemon:
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
        info = await self._call(f"hot-plug of {device}", self._api.add(kind, body))
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
                await self._call(
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
        info = await self._call("vm.info", self._api.vm_info())
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
        await self._call("vCPU resize", self._api.resize_vm(desired_vcpus=vcpus))
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
        await self._call("memory resize", self._api.resize_vm(desired_ram=(current + add) * MIB))
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

    def capabilities(self) -> Capabilities:
        return Capabilities(
            Capability.BLOCK_DEVICE
            | Capability.BLOCK_DEVICE_HOTPLUG
            | Capability.NET_HOTPLUG
            | Capability.FS_SHARING
            | Capability.HYBRID_VSOCK
            | Capability.CPU_HOTPLUG
            | Capability.MEMORY_HOTPLUG
            | Capability.PAUSE
            | Capability.SAVE
        )

    def is_rate_limiter_builtin(self) -> bool:
        """Cloud Hypervisor enforces the NICs' token buckets itself."""
        return True

    def hypervisor_config(self) -> HypervisorConfig:
        return self._config.copy()

    async def get_thread_ids(self) -> dict[int, int]:
        """vCPU index -> host thread id, from the VMM's tasks named ``vcpuN``."""
        self._require("get thread ids", VmState.RUNNING, VmState.PAUSED)
        if self._process is None:
            return {}
        return await asyncio.to_thread(vcpu_threads, self._process.pid)

    def get_pids(self) -> list[int]:
        """The VMM first, then any virtiofsd."""
        if self._process is None or not self._process.alive():
            return []
        return [self._process.pid, *(p.pid for p in self._virtiofsd if p.alive())]

    async def to_grpc(self) -> bytes:
        self._require("serialize", VmState.RUNNING, VmState.PAUSED)
        return encode_vm(self.save(), self.state, self._argv)

    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        """Adopt a running VM serialized by :meth:`to_grpc` (same host)."""
        self._require("adopt a VM", VmState.NEW)
        vm = decode_vm(data, driver="clh")
        cfg = config.copy()
        cfg.valid()
        self._config = cfg
        self.load(vm.state)
        self._argv = list(vm.argv)
        await self.reattach()

    def save(self) -> HypervisorState:
        return HypervisorState(
            pid=self._process.pid if self._process else 0,
            type=HypervisorType.CLH.value,
            uuid=self._uuid,
            block_index_map=dict(self._block_index),
            hotplugged_vcpus=tuple(self._hot_vcpus),
            hotplugged_memory=self._hot_memory_mb,
            virtiofsd_pid=self._virtiofsd[0].pid if self._virtiofsd else 0,
            api_socket=str(self._paths.api),
            run_dir=str(self._paths.run_dir),
            sandbox_id=self.sandbox_id,
        )

    def load(self, state: HypervisorState) -> None:
        """Restore bookkeeping from a persisted state (then :meth:`reattach` to the VM)."""
        if state.type and state.type != HypervisorType.CLH.value:
            raise StateError("load a state", state.type, ["clh"], driver="clh")
        self.sandbox_id = state.sandbox_id
        self._uuid = state.uuid
        self._set_paths(Path(state.run_dir))
        self._vsock = HybridVSock(uds_path=str(self._paths.vsock), port=VSOCK_AGENT_PORT)
        self._hot_vcpus = list(state.hotplugged_vcpus)
        self._hot_memory_mb = state.hotplugged_memory
        self._block_index = dict(state.block_index_map)
        if state.pid:
            self._process = VmmProcess.adopt(state.pid, log_path=self._paths.vmm_log)
        if state.virtiofsd_pid:
            self._virtiofsd = [VmmProcess.adopt(state.virtiofsd_pid)]

    async def reattach(self, timeout: float = 10.0) -> None:
        """Connect to a VMM started by another process (after :meth:`load`).

        Raises:
            HypervisorError: the pid is gone or is not this VM's cloud-hypervisor.
        """
        proc = self._process
        if proc is None or not process_matches(proc.pid, str(self._paths.api)):
            raise self._error("the VM's cloud-hypervisor process is gone")
        await self._api.wait_ready(Deadline.after(timeout))
        info = await self._api.vm_info()
        states = {"Running": VmState.RUNNING, "Paused": VmState.PAUSED}
        state = states.get(str(info.get("state")))
        if state is None:
            raise self._error(f"cannot adopt a VM in state {info.get('state')!r}")
        self._set_state(state)


def vcpu_threads(pid: int) -> dict[int, int]:
    """vCPU index -> thread id from ``/proc/<pid>/task/*/comm`` (Cloud Hypervisor names its
    vCPU threads ``vcpu0``, ``vcpu1``, ...)."""
    out: dict[int, int] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread exited meanwhile
        match = _VCPU_COMM.fullmatch(comm)
        if match:
            out[int(match.group(1))] = int(task.name)
    return dict(sorted(out.items()))


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


def _check_boot_files(cfg: HypervisorConfig) -> None:
    for label, path in (
        ("kernel", cfg.kernel_asset_path()),
        ("initrd", cfg.initrd_asset_path()),
        ("image", cfg.image_asset_path()),
    ):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{label} {path} does not exist", field=f"boot.{label}_path")


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
