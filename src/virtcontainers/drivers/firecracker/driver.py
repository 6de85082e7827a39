"""The Firecracker driver: one ``firecracker`` process per VM, configured over its REST API.

Start: spawn ``firecracker --api-sock <run dir>/fc.sock --id <id>`` (or the same through
``jailer`` into a chroot) → wait for the API socket → ``PUT`` logger, metrics, machine
config, boot source, drives (the root image, then the reference's pool of 8 placeholder
drives for block hot-plug), network interfaces and the hybrid vsock → ``InstanceStart`` →
poll ``GET /`` every 10 ms until the state is "Running". All of it runs against one
deadline, and an early exit of Firecracker ends the wait with ``LaunchError``.

Stop (the reference's sequence): SIGTERM, wait up to 15 s, SIGKILL; with ``wait_only`` no
signal at first (the guest is powering off by itself), wait up to 15 s, then SIGKILL. Then
the sockets, FIFOs, placeholder drives and jail are removed; logs stay until
:meth:`FirecrackerHypervisor.cleanup`.

Firecracker has no CPU, memory, network or filesystem hot-plug: those raise
``UnsupportedError``. ``resize_vcpus``/``resize_memory`` to the current size (or memory
below it) return the current values, as the reference's no-op methods did.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Sequence
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
    HybridVSock,
    MemoryDevice,
    NetDevice,
)
from virtcontainers.drivers._vmm import VmmDriver, check_boot_files
from virtcontainers.drivers.firecracker.api import (
    ApiUnreachable,
    FirecrackerApi,
    RequestHook,
    ResponseHook,
)
from virtcontainers.drivers.firecracker.bootcfg import (
    boot_requests,
    kernel_params,
    rate_limiter,
    revert_bytes,
)
from virtcontainers.drivers.firecracker.drives import (
    DISK_POOL_SIZE,
    ROOT_DRIVE_ID,
    DrivePool,
    guest_disk_name,
)
from virtcontainers.drivers.firecracker.fifo import FifoReader
from virtcontainers.drivers.firecracker.jailer import (
    JAILED_API_SOCKET,
    JailLayout,
    jail_id,
    jailer_argv,
    numa_node_cgroups,
)
from virtcontainers.drivers.firecracker.paths import FcPaths, placeholder_id
from virtcontainers.errors import ConfigError, HypervisorTimeout
from virtcontainers.hypervisor import (
    Capability,
    ConsoleUrl,
    D,
    NetworkNamespace,
    VmState,
    register_driver,
)
from virtcontainers.persist.hypervisor_state import HypervisorState

__all__ = [
    "DISK_POOL_SIZE",
    "FcPaths",
    "FirecrackerHypervisor",
    "guest_disk_name",
    "kernel_params",
    "rate_limiter",
    "revert_bytes",
]

log = logging.getLogger(__name__)

#: Firecracker's vCPU limit (machine-config ``vcpu_count`` is 1..32).
MAX_VCPUS = 32
#: The reference polls the instance state every 10 ms after InstanceStart.
_POLL_INTERVAL = 0.01
_GUEST_CID = 3
_SNAPSHOT_TIMEOUT = 120.0


@register_driver("firecracker")
class FirecrackerHypervisor(VmmDriver[FcPaths]):
    """Firecracker, launched directly or through its jailer (``boot.jailer_path``).

    ``request_hooks`` / ``response_hooks`` observe every API exchange (httpx event hooks;
    the contract tests record them).
    """

    vmm_name = "Firecracker"
    wait_only_fallback = "kill"
    vcpu_thread_names = re.compile(r"fc_vcpu ?(\d+)")
    #: Firecracker enforces the NIC token buckets itself.
    rate_limiter_builtin = True
    capability_flags = Capability.BLOCK_DEVICE | Capability.BLOCK_DEVICE_HOTPLUG | Capability.PAUSE
    capability_flags |= Capability.HYBRID_VSOCK | Capability.SAVE

    def __init__(
        self,
        *,
        request_hooks: Sequence[RequestHook] = (),
        response_hooks: Sequence[ResponseHook] = (),
    ) -> None:
        super().__init__(FcPaths(Path()))
        self._api: FirecrackerApi | None = None
        self._request_hooks = tuple(request_hooks)
        self._response_hooks = tuple(response_hooks)
        self._fifos: list[FifoReader] = []
        self._cold: list[BlockDrive | NetDevice] = []
        self._vsock: HybridVSock | None = None
        self._drives = DrivePool(self._error)
        #: Pass ``--daemonize`` to the jailer (off: see :func:`jailer_argv`).
        self.jailer_daemonize = False

    # -- helpers ------------------------------------------------------------------------

    @property
    def jailed(self) -> bool:
        return self._paths.jail is not None

    def _make_paths(self, run_dir: Path) -> FcPaths:
        return FcPaths(run_dir)

    def _client(self) -> FirecrackerApi:
        """The API client, (re)connected lazily after :meth:`disconnect`."""
        if self._api is None:
            self._api = FirecrackerApi(
                self._paths.api_socket,
                sandbox_id=self.sandbox_id,
                event_hooks={"request": self._request_hooks, "response": self._response_hooks},
            )
        return self._api

    def _root_drives(self) -> int:
        """Disks before the placeholder pool (the root image, when there is one)."""
        return 1 if self._config.image_asset_path() else 0

    # -- VM manager ---------------------------------------------------------------------

    async def create_sandbox(
        self, id: str, network_ns: NetworkNamespace, config: HypervisorConfig
    ) -> None:
        """Validate the config and lay out the run dir. No process starts here.

        Raises:
            ConfigError: invalid config (no kernel; image and initrd both or neither;
                memory below 256 MiB; more than 32 vCPUs; a boot file missing), Firecracker
                or the jailer not found.
            AssetError: a custom asset is missing or fails its hash.
        """
        self._require("create", VmState.NEW)
        cfg = self._valid_config(config)
        _check_config(cfg)
        binary = cfg.hypervisor_asset_path() or _find("firecracker")
        if not binary:
            raise ConfigError(
                "no firecracker binary found: install it or set boot.hypervisor_path",
                field="boot.hypervisor_path",
            )
        cfg.boot.hypervisor_path = binary
        jailer = cfg.jailer_asset_path()
        if jailer and not os.access(jailer, os.X_OK):
            raise ConfigError(f"jailer {jailer} is not executable", field="boot.jailer_path")
        self._config = cfg
        self._netns = network_ns
        self.sandbox_id = id
        run_dir = self._make_run_dir(id)
        jail = JailLayout(run_dir / "jail", Path(binary), jail_id(id)) if jailer else None
        self._paths = FcPaths(run_dir, jail)
        self._set_state(VmState.CREATED)

    async def start_sandbox(self, timeout: float) -> None:
        """Launch Firecracker, configure the VM over the API and boot it.

        Raises:
            LaunchError: Firecracker could not be executed or exited during start-up.
            ApiError: Firecracker refused part of the configuration.
            HypervisorTimeout: the VM was not running within ``timeout`` seconds.
        """
        self._require("start", VmState.CREATED)
        self._boot_paths: dict[str, str] = {}

        async def spawn() -> None:
            self._boot_paths = self._prepare_files()
            self._argv = self._build_argv()
            # The jailer joins the netns itself (--netns); a direct launch goes through nsenter.
            await self._spawn(netns=self._netns.path if self._paths.jail is None else "")

        await self._start(timeout, spawn)

    def _prepare_files(self) -> dict[str, str]:
        """Clear stale sockets; link the boot files into the jail; create the placeholder
        drives and the logger/metrics FIFOs. Returns the API paths of the boot files."""
        paths, cfg = self._paths, self._config
        for stale in (paths.api_socket, paths.vsock):
            stale.unlink(missing_ok=True)
        boot = {
            "kernel": cfg.kernel_asset_path(),
            "initrd": cfg.initrd_asset_path(),
            "image": cfg.image_asset_path(),
        }
        if paths.jail is not None:
            paths.jail.prepare()
            names = {"kernel": "vmlinux", "initrd": "initrd", "image": "rootfs.img"}
            boot = {k: paths.jail.link_in(v, names[k]) if v else "" for k, v in boot.items()}
            for drive in self._cold:
                if isinstance(drive, BlockDrive):
                    paths.jail.link_in(drive.file, f"cold-{drive.id}")
        else:
            (paths.run_dir / "drives").mkdir(mode=0o700, exist_ok=True)
        for slot in range(DISK_POOL_SIZE):
            # An empty file: Firecracker needs a backing file for every drive at boot.
            fd = os.open(
                paths.host(paths.placeholder_name(slot)),
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                0o600,
            )
            os.close(fd)
        return boot

    def _build_argv(self) -> list[str]:
        cfg, paths = self._config, self._paths
        if paths.jail is None:
            return [
                cfg.boot.hypervisor_path,
                "--api-sock",
                str(paths.api_socket),
                "--id",
                jail_id(self.sandbox_id),
            ]
        return jailer_argv(
            cfg.jailer_asset_path(),
            paths.jail,
            uid=os.getuid(),
            gid=os.getgid(),
            netns=self._netns.path,
            daemonize=self.jailer_daemonize,
            cgroups=numa_node_cgroups(0),
            firecracker_args=["--api-sock", JAILED_API_SOCKET],
        )

    async def _until_ready(self, deadline: Deadline, exited: asyncio.Future[None]) -> None:
        """API up, the whole configuration, ``InstanceStart``, then "Running"."""
        await self._race(exited, self._boot(self._boot_paths, deadline))

    async def _boot(self, boot: dict[str, str], deadline: Deadline) -> None:
        api = self._client()

        async def answers() -> bool | None:
            try:
                await api.get("/")
            except ApiUnreachable:
                return None
            return True

        def late(what: str) -> HypervisorTimeout:
            return deadline.missed(what, driver=self.driver.value, sandbox_id=self.sandbox_id)

        await poll_until(
            deadline,
            answers,
            interval=_POLL_INTERVAL,
            on_timeout=lambda: late(f"the API on {self._paths.api_socket}"),
        )
        self._open_fifos()
        index = self._root_drives() + DISK_POOL_SIZE
        for device in self._cold:
            if isinstance(device, BlockDrive):
                device.index = index
                device.virt_path = "/dev/" + guest_disk_name(index)
                index += 1
        for path, body in boot_requests(
            self._config, self._paths, boot, self._cold, self._agent_vsock()
        ):
            await api.put(path, body)
        await api.put("/actions", {"action_type": "InstanceStart"})

        async def running() -> bool | None:
            return True if await api.instance_state() == "Running" else None

        await poll_until(
            deadline, running, interval=_POLL_INTERVAL, on_timeout=lambda: late("InstanceStart")
        )

    def _open_fifos(self) -> None:
        """Logger and metrics FIFOs, read before Firecracker is told about them."""
        console = logging.getLogger(f"virtcontainers.firecracker.{self.sandbox_id}")
        for fifo, log_path in (
            (self._paths.log_fifo, self._paths.logger_log),
            (self._paths.metrics_fifo, self._paths.metrics_log),
        ):
            reader = FifoReader(fifo, log_path, console)
            reader.open()
            self._fifos.append(reader)

    def _agent_vsock(self) -> HybridVSock:
        """The VM's one vsock device: a cold-plugged one's CID, always our socket path
        (Firecracker creates it, inside the jail when jailed)."""
        cid = self._vsock.context_id if self._vsock is not None else _GUEST_CID
        return HybridVSock(uds_path=str(self._paths.vsock), port=VSOCK_AGENT_PORT, context_id=cid)

    def _stop_steps(self) -> dict[str, float]:
        """SIGTERM, up to ``stop_timeout`` (15 s), then SIGKILL (the reference's sequence)."""
        return {"term_timeout": self.stop_timeout, "kill_timeout": 5.0}

    async def _close_control(self) -> None:
        if self._api is not None:
            await self._api.aclose()
            self._api = None

    async def _teardown_extra(self) -> None:
        """Drain the FIFOs, remove the placeholder drives and the jail."""
        for reader in self._fifos:
            reader.close()
        self._fifos = []
        if self._paths.jail is not None:
            self._paths.jail.remove()
        else:
            shutil.rmtree(self._paths.run_dir / "drives", ignore_errors=True)
        self._drives.clear()

    async def pause_sandbox(self) -> None:
        """``PATCH /vm {"state": "Paused"}``."""
        self._require("pause", VmState.RUNNING)
        await self._guarded("pause", self._client().patch("/vm", {"state": "Paused"}))
        self._set_state(VmState.PAUSED)

    async def resume_sandbox(self) -> None:
        """``PATCH /vm {"state": "Resumed"}``."""
        self._require("resume", VmState.PAUSED)
        await self._guarded("resume", self._client().patch("/vm", {"state": "Resumed"}))
        self._set_state(VmState.RUNNING)

    async def save_sandbox(self) -> None:
        """A full snapshot: the device state to ``template.devices_state_path`` and the
        guest memory to ``template.memory_path`` (``PUT /snapshot/create``; VM paused).

        Raises:
            ConfigError: either path is not set.
        """
        self._require("save", VmState.PAUSED)
        t = self._config.template
        if not t.devices_state_path or not t.memory_path:
            raise ConfigError(
                "save needs template.devices_state_path and template.memory_path",
                field="template.devices_state_path"
                if not t.devices_state_path
                else "template.memory_path",
            )
        paths = self._paths
        if paths.jail is None:
            state_path, mem_path = t.devices_state_path, t.memory_path
        else:
            # A jailed Firecracker can only write inside its chroot; move the files out.
            state_path, mem_path = "/snapshot.state", "/snapshot.mem"
        body = {"snapshot_type": "Full", "snapshot_path": state_path, "mem_file_path": mem_path}
        await self._guarded(
            "snapshot",
            self._client().put("/snapshot/create", body, timeout=_SNAPSHOT_TIMEOUT),
        )
        if paths.jail is not None:
            shutil.move(paths.jail.host_path(state_path), t.devices_state_path)
            shutil.move(paths.jail.host_path(mem_path), t.memory_path)

    async def _probe(self) -> str | None:
        state = await self._client().instance_state(timeout=5.0)
        if state not in ("Running", "Paused"):
            return f"the VM is in state {state!r}"
        return None

    async def get_sandbox_console(self, sandbox_id: str) -> ConsoleUrl:
        """With ``debug`` the guest's serial console (ttyS0) is Firecracker's stdout, which
        goes to ``firecracker.log``: returned as protocol "file". Without debug the guest
        has no console at all (the reference's choice), so this raises UnsupportedError."""
        if not self._config.debugging.debug:
            raise self._unsupported("a console without debug (the guest has no UART)")
        return ConsoleUrl("file", str(self._paths.vmm_log))

    # -- devices ------------------------------------------------------------------------

    async def add_device(self, device: ColdPlugDevice) -> None:
        """Cold-plug a drive, a NIC or the hybrid vsock; only before start."""
        self._require("cold-plug a device", VmState.CREATED)
        match device:
            case BlockDrive():
                taken = {d.id for d in self._cold} | {ROOT_DRIVE_ID}
                taken |= {placeholder_id(i) for i in range(DISK_POOL_SIZE)}
                if device.id in taken:
                    raise ConfigError(f"drive id {device.id!r} is already in use", field="id")
                self._cold.append(device)
            case NetDevice():
                if any(isinstance(d, NetDevice) and d.id == device.id for d in self._cold):
                    raise ConfigError(f"interface id {device.id!r} is already in use", field="id")
                self._cold.append(device)
            case HybridVSock():
                device.uds_path = str(self._paths.vsock)
                self._vsock = device
            case _:
                raise self._unsupported(f"cold-plug of {type(device).__name__}")

    def _block_only(self, device: object, operation: str) -> BlockDrive:
        """Firecracker hot-plugs block drives only (UnsupportedError for anything else)."""
        self._require(f"{operation} a device", VmState.RUNNING)
        if not isinstance(device, BlockDrive):
            raise self._unsupported(f"{operation} of {type(device).__name__}")
        return device

    async def hotplug_add_device(self, device: D) -> D:
        """Block drives only: swap the file behind a free placeholder drive."""
        drive = self._block_only(device, "hot-plug")
        await self._guarded(f"hot-plug of {drive.id}", self._plug_block(drive))
        return device

    async def _plug_block(self, drive: BlockDrive) -> None:
        if drive.read_only:
            log.warning(
                "firecracker %s: drive %s is plugged writable (PATCH /drives cannot change "
                "is_read_only)",
                self.sandbox_id,
                drive.id,
            )
        swap = self._drives.plug(drive, self._paths)
        try:
            await self._client().patch(
                f"/drives/{swap.drive_id}", {"drive_id": swap.drive_id, "path_on_host": swap.path}
            )
        except BaseException:
            self._drives.undo(swap, self._paths)
            raise
        drive.index = swap.slot
        drive.virt_path = "/dev/" + guest_disk_name(self._root_drives() + swap.slot)

    async def hotplug_remove_device(self, device: D) -> D:
        """Block drives only: swap the placeholder back in."""
        drive = self._block_only(device, "hot-unplug")
        await self._guarded(f"hot-unplug of {drive.id}", self._unplug_block(drive))
        return device

    async def _unplug_block(self, drive: BlockDrive) -> None:
        swap = self._drives.unplug(drive, self._paths)
        await self._client().patch(
            f"/drives/{swap.drive_id}", {"drive_id": swap.drive_id, "path_on_host": swap.path}
        )
        self._drives.unplugged(swap, self._paths)
        drive.virt_path = ""

    async def resize_memory(
        self, mem_mb: int, memory_block_size_mb: int, probe: bool
    ) -> tuple[int, MemoryDevice]:
        """Firecracker cannot hot-plug memory. Asking for the current size or less returns
        ``(current, MemoryDevice(0))`` (the reference's no-op; memory never shrinks);
        asking for more raises UnsupportedError instead of pretending."""
        current = self._config.resources.memory_size
        if mem_mb <= current:
            log.debug(
                "firecracker %s: resize_memory(%d) keeps %d MiB", self.sandbox_id, mem_mb, current
            )
            return current, MemoryDevice(size_mb=0, probe=probe)
        raise self._unsupported(f"memory hot-plug (resize from {current} to {mem_mb} MiB)")

    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        """Firecracker cannot hot-plug vCPUs: the current count returns ``(n, n)`` (the
        reference's no-op); any other count raises UnsupportedError."""
        current = self._config.resources.num_vcpus
        if vcpus == current:
            log.debug("firecracker %s: resize_vcpus(%d) is a no-op", self.sandbox_id, vcpus)
            return current, current
        raise self._unsupported(f"vCPU hot-plug (resize from {current} to {vcpus})")

    async def generate_socket(self, id: str) -> AgentSocket:
        """Hybrid vsock: the host connects to ``vsock.sock`` and sends ``CONNECT 1024``."""
        return self._agent_vsock()

    # -- utilities ----------------------------------------------------------------------

    def _save_fields(self) -> dict[str, Any]:
        return {
            # The reference's block index map is a set of used indexes: placeholder slots.
            "block_index_map": {slot: 1 for slot in sorted(self._drives.slots)},
            "api_socket": str(self._paths.api_socket),
        }

    def _load_fields(self, state: HypervisorState) -> None:
        self._paths = FcPaths.from_api_socket(Path(state.run_dir), state.api_socket)
        self._drives = DrivePool(self._error, slots={slot: "" for slot in state.block_index_map})

    def _identity(self) -> str:
        return self._paths.jail.id if self._paths.jail else str(self._paths.api_socket)

    async def _adopt(self, timeout: float) -> VmState:
        state = await self._client().instance_state(timeout=timeout)
        return VmState.PAUSED if state == "Paused" else VmState.RUNNING


def _check_config(cfg: HypervisorConfig) -> None:
    """What Firecracker itself requires beyond :meth:`HypervisorConfig.valid`."""
    if cfg.image_asset_path() and cfg.initrd_asset_path():
        raise ConfigError(
            "Firecracker boots either a root image or an initrd: set only one",
            field="boot.initrd_path",
        )
    if cfg.resources.num_vcpus > MAX_VCPUS:
        raise ConfigError(
            f"Firecracker supports at most {MAX_VCPUS} vCPUs, not {cfg.resources.num_vcpus}",
            field="resources.num_vcpus",
        )
    if cfg.boot.hypervisor_machine_type:
        log.debug(
            "firecracker: machine type %r ignored (Firecracker has one machine)",
            cfg.boot.hypervisor_machine_type,
        )
    check_boot_files(cfg)


def _find(name: str) -> str:
    found = host.find_binary(host.BINARY_NAMES.get(name, (name,)))
    return str(found) if found else ""
