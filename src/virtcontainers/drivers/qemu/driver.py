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
import shutil
import tempfile
import uuid as uuidlib
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.console import ConsoleWatcher
from virtcontainers.deadline import Deadline, poll_until
from virtcontainers.devices import (
    AgentSocket,
    BlockDrive,
    ColdPlugDevice,
    CpuDevice,
    HotplugDevice,
    HybridVSock,
    MemoryDevice,
    NetDevice,
    SerialPort,
    VfioDevice,
    VhostUserDevice,
    VSock,
)
from virtcontainers.drivers._grpc import decode_vm, encode_vm
from virtcontainers.drivers._resize import ResizeByHotplug
from virtcontainers.drivers.qemu import hotplug
from virtcontainers.drivers.qemu.argv import (
    AGENT_PORT_NAME,
    MACHINE_TYPES,
    PCI_MACHINES,
    QemuPaths,
    build_argv,
)
from virtcontainers.drivers.qemu.qmp import Qmp, as_dict, as_list
from virtcontainers.errors import (
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
    HypervisorType,
    NetworkNamespace,
    VmState,
    register_driver,
)
from virtcontainers.persist.hypervisor_state import HypervisorState
from virtcontainers.process import DEFAULT_STOP_TIMEOUT, VmmProcess, process_matches

__all__ = ["QemuHypervisor"]

log = logging.getLogger(__name__)
T = TypeVar("T")

QEMU_BINARIES = ("qemu-system-x86_64", "qemu-kvm")
#: How long to drain the console after QEMU exited (it closes the socket on exit).
_CONSOLE_DRAIN_TIMEOUT = 5.0


@register_driver(HypervisorType.QEMU)
class QemuHypervisor(ResizeByHotplug):
    """QEMU with KVM when a vCPU really runs under it, TCG otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self._config = HypervisorConfig()
        self._netns = NetworkNamespace()
        self._uuid = ""
        self._paths = QemuPaths(Path())
        self._owns_run_dir = False
        self._argv: list[str] = []
        self._process: VmmProcess | None = None
        self._qmp: Qmp | None = None
        self._console: ConsoleWatcher | None = None
        self._cold: list[ColdPlugDevice] = []
        self._hot: hotplug.HotplugState = hotplug.HotplugState()
        self.stop_timeout = DEFAULT_STOP_TIMEOUT

    # -- helpers ------------------------------------------------------------------------

    @property
    def machine(self) -> str:
        return self._config.boot.hypervisor_machine_type or "q35"

    @property
    def paths(self) -> QemuPaths:
        return self._paths

    @property
    def argv(self) -> list[str]:
        return list(self._argv)

    def _error(self, message: str) -> HypervisorError:
        return HypervisorError(message, driver="qemu", sandbox_id=self.sandbox_id)

    async def _guarded(self, operation: str, work: Awaitable[T]) -> T:
        """Run ``work`` but fail fast if QEMU dies meanwhile (instead of waiting for a QMP
        reply or an event that will never come)."""
        proc = self._process
        task = asyncio.ensure_future(work)
        if proc is None:
            return await task
        died = asyncio.ensure_future(proc.wait(None))
        try:
            await asyncio.wait({task, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, HypervisorError):
            await task
        self._set_state(VmState.FAILED)
        raise self._error(f"QEMU exited (code {proc.returncode}) during {operation}")

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
        cfg = config.copy()
        cfg.valid()
        machine = cfg.boot.hypervisor_machine_type or "q35"
        if machine not in MACHINE_TYPES:
            raise ConfigError(
                f"unknown machine type {machine!r}",
                field="boot.hypervisor_machine_type",
                allowed=MACHINE_TYPES,
            )
        _check_boot_files(cfg)
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
        if self._sandbox is not None:
            run_dir = self._sandbox.run_dir
            run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        else:
            run_dir = Path(tempfile.mkdtemp(prefix=f"vc-qemu-{id[:16]}-"))
            self._owns_run_dir = True
        self._paths = QemuPaths(run_dir)
        self._set_state(VmState.CREATED)

    async def start_sandbox(self, timeout: float) -> None:
        """Launch QEMU and wait until the console and QMP are connected.

        Raises:
            LaunchError: QEMU exited before it was ready (exit code, argv and log tail).
            HypervisorTimeout: QEMU did not become ready within ``timeout`` seconds.
        """
        self._require("start", VmState.CREATED)
        deadline = Deadline.after(timeout)
        self._argv = build_argv(
            self._config,
            binary=self._config.boot.hypervisor_path,
            sandbox_id=self.sandbox_id,
            uuid=self._uuid,
            paths=self._paths,
            accel=host.accelerator(),
            host_memory_mb=host.host_memory_kib() // 1024,
        ) + hotplug.cold_plug_argv(self._cold, self.machine)
        for sock in self._paths.sockets():
            sock.unlink(missing_ok=True)
        try:
            self._process = await VmmProcess.spawn(self._argv, log_path=self._paths.vmm_log)
        except OSError as exc:
            raise LaunchError(
                f"cannot execute QEMU: {exc}",
                exit_code=None,
                argv=self._argv,
                log_tail="",
                driver="qemu",
                sandbox_id=self.sandbox_id,
            ) from exc
        exited = asyncio.ensure_future(self._exited_early())
        try:
            self._console = ConsoleWatcher(
                self._paths.console,
                self._paths.console_log,
                logging.getLogger(f"virtcontainers.console.{self.sandbox_id}"),
            )
            await self._console.connect(deadline, abort=exited)
            self._qmp = Qmp(self._paths.qmp, sandbox_id=self.sandbox_id)
            await self._qmp.connect(deadline, abort=exited)
            if self._config.template.boot_from_template:
                await self._guarded(
                    "the restore from the template", self._incoming(self._qmp, deadline)
                )
        except BaseException as exc:
            await self._abort_start()
            if isinstance(exc, HypervisorTimeout):
                raise HypervisorTimeout(
                    "starting QEMU", timeout, driver="qemu", sandbox_id=self.sandbox_id
                ) from exc
            raise
        finally:
            exited.cancel()
            with contextlib.suppress(asyncio.CancelledError, LaunchError):
                await exited
        self._set_state(VmState.RUNNING)

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
        try:
            qmp.send_fd(fd)
            await qmp.execute("getfd", {"fdname": "migin"})
        finally:
            os.close(fd)
        await qmp.execute("migrate-incoming", {"uri": "fd:migin"})
        await self._wait_migration(qmp, deadline.remaining(1.0), "restoring")
        await qmp.execute("cont")

    async def _exited_early(self) -> None:
        """Resolves with LaunchError as soon as QEMU exits during start-up."""
        assert self._process is not None
        await self._process.wait(None)
        raise LaunchError(
            "QEMU exited during start-up",
            exit_code=self._process.returncode,
            argv=self._argv,
            log_tail=self._process.log_tail(),
            driver="qemu",
            sandbox_id=self.sandbox_id,
        )

    async def _abort_start(self) -> None:
        if self._process is not None:
            await self._process.stop(term_timeout=2.0, kill_timeout=5.0)
        await self._teardown()
        self._set_state(VmState.FAILED)

    async def stop_sandbox(self, wait_only: bool = False) -> None:
        """Stop QEMU and remove its sockets and pidfile; logs stay until :meth:`cleanup`.

        ``wait_only``: the guest is powering the VM off itself (e.g. the agent's shutdown):
        wait up to ``stop_timeout`` seconds for QEMU to exit, then force it. Either way the
        console is drained to end-of-file only after QEMU has exited.
        """
        if self.state in (VmState.STOPPED, VmState.NEW):
            self._set_state(VmState.STOPPED)
            return
        proc = self._process
        if proc is not None:
            exited_by_itself = wait_only and await proc.wait(self.stop_timeout)
            if not exited_by_itself:
                if wait_only:
                    log.warning(
                        "qemu %s: guest did not power off within %.0f s; stopping it",
                        self.sandbox_id,
                        self.stop_timeout,
                    )
                await proc.stop(
                    polite=self._quit if self._qmp is not None else None,
                    kill_timeout=self.stop_timeout,
                )
        await self._teardown()
        self._set_state(VmState.STOPPED)

    async def _quit(self) -> None:
        qmp = self._qmp_or_fail()
        with contextlib.suppress(HypervisorError):
            await qmp.execute("quit", timeout=2.0)

    async def _teardown(self) -> None:
        """After QEMU is gone: drain the console to EOF, drop QMP, remove sockets."""
        if self._console is not None:
            await self._console.wait_closed(_CONSOLE_DRAIN_TIMEOUT)
            self._console = None
        if self._qmp is not None:
            await self._qmp.disconnect()
            self._qmp = None
        if self._process is not None:
            self._process.close()
            self._process = None
        for path in (*self._paths.sockets(), self._paths.pidfile):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

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
        try:
            qmp.send_fd(fd)
            await qmp.execute("getfd", {"fdname": "migfile"})
        finally:
            os.close(fd)
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

    async def check(self) -> None:
        """Raises HypervisorError when QEMU is gone or the guest crashed."""
        if self.state is VmState.FAILED:
            raise self._error("the VM has failed")
        self._require("check", VmState.RUNNING, VmState.PAUSED)
        if self._process is None or not self._process.alive():
            code = self._process.returncode if self._process else None
            self._set_state(VmState.FAILED)
            raise self._error(f"QEMU is not running (exit code {code})")
        try:
            info = as_dict(await self._qmp_or_fail().execute("query-status", timeout=5.0))
        except HypervisorError:
            # A dying QEMU closes its sockets a moment before it becomes a zombie.
            if not await self._process.wait(1.0):
                raise
            self._set_state(VmState.FAILED)
            raise self._error("QEMU is not running (it exited during the check)") from None
        status = info.get("status")
        if status in ("internal-error", "guest-panicked"):
            raise self._error(f"guest is in state {status}")

    async def disconnect(self) -> None:
        if self._qmp is not None:
            await self._qmp.disconnect()
            self._qmp = None

    async def cleanup(self) -> None:
        """Remove the run dir's contents (logs included) after stop. Idempotent."""
        if self.state not in (VmState.STOPPED, VmState.FAILED, VmState.NEW, VmState.CREATED):
            raise StateError("clean up", self.state.value, ["stopped", "failed"], driver="qemu")
        if self._owns_run_dir and self._paths.run_dir != Path():
            shutil.rmtree(self._paths.run_dir, ignore_errors=True)
        else:
            for path in (self._paths.console_log, self._paths.vmm_log):
                path.unlink(missing_ok=True)

    async def get_sandbox_console(self, sandbox_id: str) -> ConsoleUrl:
        return ConsoleUrl("unix", str(self._paths.console))

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

    async def _plug(self, device: HotplugDevice) -> None:
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
        """The agent's channel: vhost-vsock where the host has it, else virtio-serial."""
        if host.device_nodes(["/dev/vhost-vsock"])["/dev/vhost-vsock"]:
            return VSock(context_id=0, port=1024)
        return SerialPort(id="agent0", name=AGENT_PORT_NAME, host_path=str(self._paths.agent))

    # -- utilities ----------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
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
        return Capabilities(flags)

    def hypervisor_config(self) -> HypervisorConfig:
        return self._config.copy()

    async def get_thread_ids(self) -> dict[int, int]:
        self._require("get thread ids", VmState.RUNNING, VmState.PAUSED)
        out: dict[int, int] = {}
        for cpu in map(as_dict, as_list(await self._qmp_or_fail().execute("query-cpus-fast"))):
            index, tid = cpu.get("cpu-index"), cpu.get("thread-id")
            if isinstance(index, int) and isinstance(tid, int):
                out[index] = tid
        return out

    def get_pids(self) -> list[int]:
        if self._process is None or not self._process.alive():
            return []
        return [self._process.pid]

    async def to_grpc(self) -> bytes:
        self._require("serialize", VmState.RUNNING, VmState.PAUSED)
        return encode_vm(self.save(), self.state, self._argv)

    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        """Adopt a running QEMU serialized by :meth:`to_grpc` (same host)."""
        self._require("adopt a VM", VmState.NEW)
        vm = decode_vm(data, driver="qemu")
        cfg = config.copy()
        cfg.valid()
        self._config = cfg
        if vm.vm_state not in (VmState.RUNNING, VmState.PAUSED):
            raise self._error(f"cannot adopt a VM that is {vm.vm_state}")
        self.load(vm.state)
        await self.reattach()

    def save(self) -> HypervisorState:
        return HypervisorState(
            pid=self._process.pid if self._process else 0,
            type=HypervisorType.QEMU.value,
            uuid=self._uuid,
            block_index_map=dict(self._hot.block_index),
            bridges=self._hot.bridges(self._config),
            hotplugged_vcpus=tuple(self._hot.vcpus),
            hotplugged_memory=self._hot.memory_mb,
            hotplug_vfio_on_root_bus=self._config.devices.hotplug_vfio_on_root_bus,
            pcie_root_port=self._config.devices.pcie_root_port,
            api_socket=str(self._paths.qmp),
            run_dir=str(self._paths.run_dir),
            sandbox_id=self.sandbox_id,
        )

    def load(self, state: HypervisorState) -> None:
        """Restore bookkeeping from a persisted state (then :meth:`reattach` to the VM)."""
        if state.type and state.type != HypervisorType.QEMU.value:
            raise StateError("load a state", state.type, ["qemu"], driver="qemu")
        self.sandbox_id = state.sandbox_id
        self._uuid = state.uuid
        self._paths = QemuPaths(Path(state.run_dir))
        self._hot = hotplug.HotplugState.from_state(state)
        if state.pid:
            self._process = VmmProcess.adopt(state.pid, log_path=self._paths.vmm_log)

    async def reattach(self, timeout: float = 10.0) -> None:
        """Connect to a QEMU started by another process (after :meth:`load`).

        Raises:
            HypervisorError: the pid is gone or is not this VM's QEMU.
        """
        proc = self._process
        if proc is None or not process_matches(proc.pid, str(self._paths.qmp)):
            raise self._error("the VM's QEMU process is gone")
        self._qmp = Qmp(self._paths.qmp, sandbox_id=self.sandbox_id)
        await self._qmp.connect(Deadline.after(timeout))
        # Log the console from here on too. If the starting process still holds the console,
        # QEMU keeps this connection pending until that one closes: nothing is read twice.
        console = ConsoleWatcher(
            self._paths.console,
            self._paths.console_log,
            logging.getLogger(f"virtcontainers.console.{self.sandbox_id}"),
        )
        with contextlib.suppress(HypervisorTimeout):
            await console.connect(Deadline.after(1.0))
            self._console = console
        status = as_dict(await self._qmp.execute("query-status"))
        paused = status.get("status") == "paused"
        self._set_state(VmState.PAUSED if paused else VmState.RUNNING)


def _check_boot_files(cfg: HypervisorConfig) -> None:
    for label, path in (
        ("kernel", cfg.kernel_asset_path()),
        ("initrd", cfg.initrd_asset_path()),
        ("image", cfg.image_asset_path()),
    ):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{label} {path} does not exist", field=f"boot.{label}_path")


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
