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
import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from virtcontainers import host
from virtcontainers.config import HypervisorConfig, Param, serialize_params
from virtcontainers.config.defaults import VIRTIO_BLK_KERNEL_ROOT_PARAMS, VSOCK_AGENT_PORT
from virtcontainers.devices import (
    AgentSocket,
    BlockDrive,
    ColdPlugDevice,
    CpuDevice,
    HybridVSock,
    MemoryDevice,
    NetDevice,
)
from virtcontainers.drivers._grpc import decode_vm, encode_vm
from virtcontainers.drivers.firecracker.api import (
    ApiUnreachable,
    FirecrackerApi,
    RequestHook,
    ResponseHook,
)
from virtcontainers.drivers.firecracker.fifo import FifoReader
from virtcontainers.drivers.firecracker.jailer import (
    JAILED_API_SOCKET,
    JailLayout,
    jail_id,
    jailer_argv,
    numa_node_cgroups,
)
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
    Hypervisor,
    HypervisorType,
    NetworkNamespace,
    VmState,
    register_driver,
)
from virtcontainers.persist.hypervisor_state import HypervisorState
from virtcontainers.process import DEFAULT_STOP_TIMEOUT, VmmProcess, process_matches

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
T = TypeVar("T")

_DRIVER = "firecracker"
#: The reference's pool of placeholder drives, swapped by ``PATCH /drives`` for hot-plug.
DISK_POOL_SIZE = 8
#: Firecracker's vCPU limit (machine-config ``vcpu_count`` is 1..32).
MAX_VCPUS = 32
#: The reference polls the instance state every 10 ms after InstanceStart.
_POLL_INTERVAL = 0.01
_ROOT_DRIVE_ID = "rootfs"
_GUEST_CID = 3
#: Refill time of the network token buckets, in ms (the reference's value).
_REFILL_TIME_MS = 1000
_SNAPSHOT_TIMEOUT = 120.0

# The reference's Firecracker kernel parameters (virtio-mmio devices, no PCI, no ACPI).
_KERNEL_PARAMS = (
    Param("pci", "off"),
    Param("reboot", "k"),
    Param("panic", "1"),
    Param("iommu", "off"),
    Param("net.ifnames", "0"),
    Param("random.trust_cpu", "on"),
    # Firecracker's x86 guests had no ACPI tables in the reference's era
    # ("ACPI BIOS Error (bug)" otherwise).
    Param("acpi", "off"),
)


def kernel_params(cfg: HypervisorConfig) -> str:
    """The guest kernel command line.

    Like the reference: the serial console only when debugging (``console=ttyS0``),
    otherwise no UART at all (``8250.nr_uarts=0``, faster boots). ``vc.agent=vsock`` tells
    our guest agent to listen on vsock port 1024. The user's parameters come last so they
    override ours.
    """
    params = list(_KERNEL_PARAMS)
    if cfg.image_asset_path():
        params += VIRTIO_BLK_KERNEL_ROOT_PARAMS
    if cfg.debugging.debug:
        params += [Param("console", "ttyS0"), Param("debug")]
    else:
        params += [Param("8250.nr_uarts", "0"), Param("quiet")]
    params.append(Param("vc.agent", "vsock"))
    params += cfg.boot.kernel_params
    return " ".join(serialize_params(params, "="))


def revert_bytes(num: int) -> int:
    """The reference's conversion of a 1000-scaled quantity into a 1024-scaled one."""
    high, low = divmod(num, 1000)
    if high == 0:
        return num
    return 1024 * revert_bytes(high) + low


def rate_limiter(bits_per_second: int) -> dict[str, object] | None:
    """A Firecracker RateLimiter for a limit in bits/s (0 = none).

    Kata's limits are bits with a 1000 scale; Firecracker's token bucket holds bytes with a
    1024 scale and refills every second.
    """
    if bits_per_second <= 0:
        return None
    size = revert_bytes(bits_per_second // 8)
    return {"bandwidth": {"size": size, "refill_time": _REFILL_TIME_MS}}


def guest_disk_name(index: int) -> str:
    """``vda``, ``vdb`` ... ``vdz``, ``vdaa`` ...: the guest's name of the index-th disk."""
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return "vd" + letters


def placeholder_id(slot: int) -> str:
    return f"drive_{slot}"


@dataclass(frozen=True)
class FcPaths:
    """Where one VM's files live. Firecracker opens files by *API paths*: host paths, or
    chroot-relative paths when jailed; the host reaches them at :meth:`host`."""

    run_dir: Path
    jail: JailLayout | None = None

    def host(self, name: str) -> Path:
        """Host path of a file Firecracker itself opens."""
        if self.jail is not None:
            return self.jail.root / name
        return self.run_dir / name

    def api(self, name: str) -> str:
        """The path Firecracker is told for that file."""
        if self.jail is not None:
            return "/" + name
        return str(self.run_dir / name)

    @property
    def api_socket(self) -> Path:
        if self.jail is not None:
            return self.jail.host_path(JAILED_API_SOCKET)
        return self.run_dir / "fc.sock"

    @property
    def vsock(self) -> Path:
        return self.host("vsock.sock")

    @property
    def log_fifo(self) -> Path:
        return self.host("fc-log.fifo")

    @property
    def metrics_fifo(self) -> Path:
        return self.host("fc-metrics.fifo")

    @property
    def vmm_log(self) -> Path:
        """Firecracker's stdout/stderr (and the guest's serial console when debugging)."""
        return self.run_dir / "firecracker.log"

    @property
    def logger_log(self) -> Path:
        return self.run_dir / "fc-logger.log"

    @property
    def metrics_log(self) -> Path:
        return self.run_dir / "fc-metrics.log"

    def placeholder_name(self, slot: int) -> str:
        return placeholder_id(slot) if self.jail is not None else f"drives/{placeholder_id(slot)}"

    def logs(self) -> tuple[Path, ...]:
        return (self.vmm_log, self.logger_log, self.metrics_log)


@register_driver(HypervisorType.FIRECRACKER)
class FirecrackerHypervisor(Hypervisor):
    """Firecracker, launched directly or through its jailer (``boot.jailer_path``).

    ``request_hooks`` / ``response_hooks`` observe every API exchange (httpx event hooks;
    the contract tests record them).
    """

    def __init__(
        self,
        *,
        request_hooks: Sequence[RequestHook] = (),
        response_hooks: Sequence[ResponseHook] = (),
    ) -> None:
        super().__init__()
        self._config = HypervisorConfig()
        self._netns = NetworkNamespace()
        self._paths = FcPaths(Path())
        self._owns_run_dir = False
        self._argv: list[str] = []
        self._process: VmmProcess | None = None
        self._api: FirecrackerApi | None = None
        self._request_hooks = tuple(request_hooks)
        self._response_hooks = tuple(response_hooks)
        self._fifos: list[FifoReader] = []
        self._cold: list[BlockDrive | NetDevice] = []
        self._vsock: HybridVSock | None = None
        #: Placeholder slot -> id of the drive swapped in ("" when restored from a state).
        self._slots: dict[int, str] = {}
        #: Jail-relative names of files linked in for hot-plugged drives, by slot.
        self._jail_links: dict[int, str] = {}
        self.stop_timeout = DEFAULT_STOP_TIMEOUT
        #: Pass ``--daemonize`` to the jailer (off: see :func:`jailer_argv`).
        self.jailer_daemonize = False

    # -- helpers ------------------------------------------------------------------------

    @property
    def paths(self) -> FcPaths:
        return self._paths

    @property
    def argv(self) -> list[str]:
        return list(self._argv)

    @property
    def jailed(self) -> bool:
        return self._paths.jail is not None

    def _error(self, message: str) -> HypervisorError:
        return HypervisorError(message, driver=_DRIVER, sandbox_id=self.sandbox_id)

    def _unsupported(self, operation: str) -> UnsupportedError:
        return UnsupportedError(operation, driver=_DRIVER, sandbox_id=self.sandbox_id)

    def _client(self) -> FirecrackerApi:
        """The API client, (re)connected lazily after :meth:`disconnect`."""
        if self._api is None:
            self._api = FirecrackerApi(
                self._paths.api_socket,
                sandbox_id=self.sandbox_id,
                request_hooks=self._request_hooks,
                response_hooks=self._response_hooks,
            )
        return self._api

    async def _guarded(self, operation: str, work: Awaitable[T]) -> T:
        """Run ``work`` but fail fast when Firecracker dies meanwhile."""
        proc = self._process
        task = asyncio.ensure_future(work)
        if proc is None:
            return await task
        died = asyncio.ensure_future(proc.wait(None))
        try:
            await asyncio.wait({task, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, HypervisorError):
                    await task
        if not task.cancelled():
            return task.result()
        self._set_state(VmState.FAILED)
        raise self._error(f"Firecracker exited (code {proc.returncode}) during {operation}")

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
        cfg = config.copy()
        cfg.valid()
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
        if self._sandbox is not None:
            run_dir = self._sandbox.run_dir
            run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        else:
            run_dir = Path(tempfile.mkdtemp(prefix=f"vc-fc-{id[:16]}-"))
            self._owns_run_dir = True
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
        try:
            api_paths = self._prepare_files()
            self._argv = self._build_argv()
            self._process = await VmmProcess.spawn(self._argv, log_path=self._paths.vmm_log)
        except OSError as exc:
            await self._abort_start()
            raise LaunchError(
                f"cannot execute Firecracker: {exc}",
                exit_code=None,
                argv=self._argv,
                log_tail="",
                driver=_DRIVER,
                sandbox_id=self.sandbox_id,
            ) from exc
        except BaseException:
            await self._abort_start()
            raise
        exited = asyncio.ensure_future(self._exited_early())
        try:
            async with asyncio.timeout(timeout):
                await _race(self._boot(api_paths), exited)
        except BaseException as exc:
            await self._abort_start()
            if isinstance(exc, TimeoutError):
                raise HypervisorTimeout(
                    "starting Firecracker", timeout, driver=_DRIVER, sandbox_id=self.sandbox_id
                ) from exc
            raise
        finally:
            exited.cancel()
            with contextlib.suppress(asyncio.CancelledError, LaunchError):
                await exited
        self._set_state(VmState.RUNNING)

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

    async def _boot(self, boot: dict[str, str]) -> None:
        api = self._client()
        await self._wait_api(api)
        await self._configure(api, boot)
        await api.put("/actions", {"action_type": "InstanceStart"})
        while True:
            if await api.instance_state() == "Running":
                return
            await asyncio.sleep(_POLL_INTERVAL)

    async def _wait_api(self, api: FirecrackerApi) -> None:
        """Poll until the API socket answers (the caller bounds this by its deadline)."""
        while True:
            try:
                await api.get("/")
                return
            except ApiUnreachable:
                await asyncio.sleep(_POLL_INTERVAL)

    async def _configure(self, api: FirecrackerApi, boot: dict[str, str]) -> None:
        """The reference's configuration order: logger and metrics first (so the rest is
        logged), machine, boot source, root drive, placeholder pool, devices, vsock."""
        cfg, paths = self._config, self._paths
        console = logging.getLogger(f"virtcontainers.firecracker.{self.sandbox_id}")
        for fifo, log_path in (
            (paths.log_fifo, paths.logger_log),
            (paths.metrics_fifo, paths.metrics_log),
        ):
            reader = FifoReader(fifo, log_path, console)
            reader.open()
            self._fifos.append(reader)
        await api.put(
            "/logger",
            {
                "log_path": paths.api(paths.log_fifo.name),
                "level": "Debug" if cfg.debugging.debug else "Warning",
                "show_level": True,
                "show_log_origin": True,
            },
        )
        await api.put("/metrics", {"metrics_path": paths.api(paths.metrics_fifo.name)})
        await api.put(
            "/machine-config",
            {
                "vcpu_count": cfg.resources.num_vcpus,
                "mem_size_mib": cfg.resources.memory_size,
                "smt": False,
            },
        )
        source: dict[str, object] = {
            "kernel_image_path": boot["kernel"],
            "boot_args": kernel_params(cfg),
        }
        if boot["initrd"]:
            source["initrd_path"] = boot["initrd"]
        await api.put("/boot-source", source)
        if boot["image"]:
            # A regular, read-only drive; the kernel mounts it by root=/dev/vda1, which
            # allows a partitioned image (the reference's choice over is_root_device).
            await api.put(
                f"/drives/{_ROOT_DRIVE_ID}",
                {
                    "drive_id": _ROOT_DRIVE_ID,
                    "path_on_host": boot["image"],
                    "is_root_device": False,
                    "is_read_only": True,
                },
            )
        for slot in range(DISK_POOL_SIZE):
            await api.put(
                f"/drives/{placeholder_id(slot)}",
                {
                    "drive_id": placeholder_id(slot),
                    "path_on_host": paths.api(paths.placeholder_name(slot)),
                    "is_root_device": False,
                    "is_read_only": False,
                },
            )
        index = self._root_drives() + DISK_POOL_SIZE
        for device in self._cold:
            if isinstance(device, BlockDrive):
                await api.put(f"/drives/{device.id}", self._cold_drive_body(device))
                device.index = index
                device.virt_path = "/dev/" + guest_disk_name(index)
                index += 1
            else:
                await api.put(f"/network-interfaces/{device.id}", self._net_body(device))
        vsock = self._agent_vsock()
        await api.put(
            "/vsock", {"guest_cid": vsock.context_id, "uds_path": paths.api("vsock.sock")}
        )

    def _cold_drive_body(self, drive: BlockDrive) -> dict[str, object]:
        path = f"/cold-{drive.id}" if self.jailed else drive.file
        return {
            "drive_id": drive.id,
            "path_on_host": path,
            "is_root_device": False,
            "is_read_only": drive.read_only,
        }

    def _net_body(self, dev: NetDevice) -> dict[str, object]:
        net = self._config.network
        body: dict[str, object] = {"iface_id": dev.id, "host_dev_name": dev.tap_name}
        if dev.mac:
            body["guest_mac"] = dev.mac
        # The device's own limit wins over the VM-wide one.
        for key, device_rate, vm_rate in (
            ("rx_rate_limiter", dev.rx_rate_limiter_max_rate, net.rx_rate_limiter_max_rate),
            ("tx_rate_limiter", dev.tx_rate_limiter_max_rate, net.tx_rate_limiter_max_rate),
        ):
            limiter = rate_limiter(device_rate or vm_rate)
            if limiter is not None:
                body[key] = limiter
        return body

    def _agent_vsock(self) -> HybridVSock:
        """The VM's one vsock device: a cold-plugged one's CID, always our socket path
        (Firecracker creates it, inside the jail when jailed)."""
        cid = self._vsock.context_id if self._vsock is not None else _GUEST_CID
        return HybridVSock(uds_path=str(self._paths.vsock), port=VSOCK_AGENT_PORT, context_id=cid)

    async def _exited_early(self) -> None:
        """Resolves with LaunchError as soon as Firecracker exits during start-up."""
        assert self._process is not None
        await self._process.wait(None)
        raise LaunchError(
            "Firecracker exited during start-up",
            exit_code=self._process.returncode,
            argv=self._argv,
            log_tail=self._process.log_tail(),
            driver=_DRIVER,
            sandbox_id=self.sandbox_id,
        )

    async def _abort_start(self) -> None:
        if self._process is not None:
            with contextlib.suppress(HypervisorError):
                await self._process.stop(term_timeout=2.0, kill_timeout=5.0)
        await self._teardown()
        self._set_state(VmState.FAILED)

    async def stop_sandbox(self, wait_only: bool = False) -> None:
        """Stop Firecracker and remove its sockets, FIFOs, drives and jail; logs stay until
        :meth:`cleanup`. Idempotent.

        Normal stop: SIGTERM, up to ``stop_timeout`` (15 s) for it to exit, then SIGKILL.
        ``wait_only``: the guest is powering off by itself; send nothing (the reference's
        signal 0), wait up to ``stop_timeout``, then SIGKILL.

        Raises:
            HypervisorTimeout: the process survived SIGKILL (state becomes FAILED).
        """
        if self.state in (VmState.STOPPED, VmState.NEW):
            self._set_state(VmState.STOPPED)
            return
        proc = self._process
        try:
            if proc is not None:
                await self._end_process(proc, wait_only)
        except BaseException:
            self._set_state(VmState.FAILED)
            raise
        finally:
            await self._teardown()
        self._set_state(VmState.STOPPED)

    async def _end_process(self, proc: VmmProcess, wait_only: bool) -> None:
        if not wait_only:
            how = await proc.stop(term_timeout=self.stop_timeout, kill_timeout=5.0)
            log.debug("firecracker %s: stopped (%s)", self.sandbox_id, how)
            return
        if await proc.wait(self.stop_timeout):
            log.debug("firecracker %s: exited by itself", self.sandbox_id)
            return
        log.warning(
            "firecracker %s: guest did not power off within %.0f s; sending SIGKILL",
            self.sandbox_id,
            self.stop_timeout,
        )
        proc.send_signal(signal.SIGKILL)
        if not await proc.wait(5.0):
            raise HypervisorTimeout(
                f"pid {proc.pid} exiting after SIGKILL",
                5.0,
                driver=_DRIVER,
                sandbox_id=self.sandbox_id,
            )

    async def _teardown(self) -> None:
        """After Firecracker is gone: drain the FIFOs, drop the API client, remove sockets,
        placeholder drives and the jail."""
        for reader in self._fifos:
            reader.close()
        self._fifos = []
        if self._api is not None:
            await self._api.aclose()
            self._api = None
        if self._process is not None:
            self._process.close()
            self._process = None
        paths = self._paths
        if paths.run_dir == Path():
            return
        for path in (paths.api_socket, paths.vsock, paths.log_fifo, paths.metrics_fifo):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        if paths.jail is not None:
            paths.jail.remove()
        else:
            shutil.rmtree(paths.run_dir / "drives", ignore_errors=True)
        self._jail_links.clear()

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

    async def check(self) -> None:
        """Raises HypervisorError unless Firecracker is alive and reports Running/Paused."""
        if self.state is VmState.FAILED:
            raise self._error("the VM has failed")
        self._require("check", VmState.RUNNING, VmState.PAUSED)
        proc = self._process
        if proc is None or not proc.alive():
            code = proc.returncode if proc else None
            self._set_state(VmState.FAILED)
            raise self._error(f"Firecracker is not running (exit code {code})")
        try:
            state = await self._client().instance_state(timeout=5.0)
        except HypervisorError:
            # A dying Firecracker drops its connections a moment before it is a zombie.
            if not await proc.wait(1.0):
                raise
            self._set_state(VmState.FAILED)
            raise self._error("Firecracker is not running (it exited during the check)") from None
        if state not in ("Running", "Paused"):
            raise self._error(f"the VM is in state {state!r}")

    async def disconnect(self) -> None:
        """Close the API connection; the next call reconnects."""
        if self._api is not None:
            await self._api.aclose()
            self._api = None

    async def cleanup(self) -> None:
        """Remove what is left after stop (logs, and the run dir if we created it)."""
        if self.state not in (VmState.STOPPED, VmState.FAILED, VmState.NEW, VmState.CREATED):
            raise StateError("clean up", self.state.value, ["stopped", "failed"], driver=_DRIVER)
        if self._paths.run_dir == Path():
            return
        if self._owns_run_dir:
            shutil.rmtree(self._paths.run_dir, ignore_errors=True)
        else:
            for path in self._paths.logs():
                path.unlink(missing_ok=True)

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
                taken = {d.id for d in self._cold} | {_ROOT_DRIVE_ID}
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

    async def hotplug_add_device(self, device: D) -> D:
        """Block drives only: swap the file behind a free placeholder drive."""
        self._require("hot-plug a device", VmState.RUNNING)
        match device:
            case BlockDrive():
                await self._guarded(f"hot-plug of {device.id}", self._plug_block(device))
            case CpuDevice():
                raise self._unsupported("CPU hot-plug")
            case MemoryDevice():
                raise self._unsupported("memory hot-plug")
            case NetDevice():
                raise self._unsupported("network hot-plug")
            case _:
                raise self._unsupported(f"hot-plug of {type(device).__name__}")
        return device

    async def _plug_block(self, drive: BlockDrive) -> None:
        if drive.id in self._slots.values():
            raise self._error(f"drive {drive.id!r} is already plugged")
        free = next((s for s in range(DISK_POOL_SIZE) if s not in self._slots), None)
        if free is None:
            raise self._error(f"all {DISK_POOL_SIZE} hot-plug drive slots are in use")
        if drive.read_only:
            log.warning(
                "firecracker %s: drive %s is plugged writable (PATCH /drives cannot change "
                "is_read_only)",
                self.sandbox_id,
                drive.id,
            )
        drive_id = placeholder_id(free)
        path = drive.file
        jail = self._paths.jail
        if jail is not None:
            name = f"hotplug-{free}"
            try:
                path = jail.link_in(drive.file, name)
            except ConfigError as exc:
                raise self._error(f"cannot hot-plug {drive.id}: {exc}") from exc
            self._jail_links[free] = name
        self._slots[free] = drive.id
        try:
            await self._client().patch(
                f"/drives/{drive_id}", {"drive_id": drive_id, "path_on_host": path}
            )
        except BaseException:
            del self._slots[free]
            if jail is not None:
                jail.unlink(self._jail_links.pop(free))
            raise
        drive.index = free
        drive.virt_path = "/dev/" + guest_disk_name(self._root_drives() + free)

    async def hotplug_remove_device(self, device: D) -> D:
        """Block drives only: swap the placeholder back in."""
        self._require("hot-unplug a device", VmState.RUNNING)
        match device:
            case BlockDrive():
                await self._guarded(f"hot-unplug of {device.id}", self._unplug_block(device))
            case CpuDevice():
                raise self._unsupported("CPU hot-unplug")
            case MemoryDevice():
                raise self._unsupported("memory hot-unplug")
            case NetDevice():
                raise self._unsupported("network hot-unplug")
            case _:
                raise self._unsupported(f"hot-unplug of {type(device).__name__}")
        return device

    async def _unplug_block(self, drive: BlockDrive) -> None:
        slot: int | None = None
        # By index (the caller's record of our answer; survives save/load), else by id.
        if self._slots.get(drive.index) in (drive.id, ""):
            slot = drive.index
        else:
            slot = next((s for s, i in self._slots.items() if i == drive.id), None)
        if slot is None:
            raise self._error(f"drive {drive.id!r} is not plugged")
        drive_id = placeholder_id(slot)
        await self._client().patch(
            f"/drives/{drive_id}",
            {
                "drive_id": drive_id,
                "path_on_host": self._paths.api(self._paths.placeholder_name(slot)),
            },
        )
        del self._slots[slot]
        if self._paths.jail is not None and slot in self._jail_links:
            self._paths.jail.unlink(self._jail_links.pop(slot))
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

    def capabilities(self) -> Capabilities:
        return Capabilities(
            Capability.BLOCK_DEVICE
            | Capability.BLOCK_DEVICE_HOTPLUG
            | Capability.HYBRID_VSOCK
            | Capability.PAUSE
            | Capability.SAVE
        )

    def hypervisor_config(self) -> HypervisorConfig:
        return self._config.copy()

    def is_rate_limiter_builtin(self) -> bool:
        """Firecracker enforces the NIC token buckets itself."""
        return True

    async def get_thread_ids(self) -> dict[int, int]:
        """vCPU index -> tid, from the ``fc_vcpu N`` thread names in /proc/<pid>/task."""
        self._require("get thread ids", VmState.RUNNING, VmState.PAUSED)
        if self._process is None:
            return {}
        return vcpu_threads(self._process.pid)

    def get_pids(self) -> list[int]:
        if self._process is None or not self._process.alive():
            return []
        return [self._process.pid]

    async def to_grpc(self) -> bytes:
        self._require("serialize", VmState.RUNNING, VmState.PAUSED)
        return encode_vm(self.save(), self.state, self._argv)

    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        """Adopt a running Firecracker serialized by :meth:`to_grpc` (same host)."""
        self._require("adopt a VM", VmState.NEW)
        vm = decode_vm(data, driver="firecracker")
        cfg = config.copy()
        cfg.valid()
        self._config = cfg
        self.load(vm.state)
        self._argv = list(vm.argv)
        await self.reattach()

    def save(self) -> HypervisorState:
        return HypervisorState(
            pid=self._process.pid if self._process else 0,
            type=HypervisorType.FIRECRACKER.value,
            # The reference's block index map is a set of used indexes: placeholder slots.
            block_index_map={slot: 1 for slot in sorted(self._slots)},
            api_socket=str(self._paths.api_socket),
            run_dir=str(self._paths.run_dir),
            sandbox_id=self.sandbox_id,
        )

    def load(self, state: HypervisorState) -> None:
        """Restore bookkeeping from a persisted state (then :meth:`reattach` to the VM)."""
        if state.type and state.type != HypervisorType.FIRECRACKER.value:
            raise StateError("load a state", state.type, ["firecracker"], driver=_DRIVER)
        self.sandbox_id = state.sandbox_id
        run_dir = Path(state.run_dir)
        api_socket = Path(state.api_socket)
        jail: JailLayout | None = None
        if state.api_socket and api_socket != run_dir / "fc.sock":
            # <chroot base>/<exec name>/<id>/root/run/firecracker.socket
            instance = api_socket.parents[2]
            jail = JailLayout(instance.parents[1], Path(instance.parent.name), instance.name)
        self._paths = FcPaths(run_dir, jail)
        self._slots = {slot: "" for slot in state.block_index_map}
        if state.pid:
            self._process = VmmProcess.adopt(state.pid, log_path=self._paths.vmm_log)

    async def reattach(self, timeout: float = 10.0) -> None:
        """Connect to a Firecracker started by another process (after :meth:`load`).

        Raises:
            HypervisorError: the pid is gone or is not this VM's Firecracker.
        """
        proc = self._process
        needle = self._paths.jail.id if self._paths.jail else str(self._paths.api_socket)
        if proc is None or not process_matches(proc.pid, needle):
            raise self._error("the VM's Firecracker process is gone")
        state = await self._client().instance_state(timeout=timeout)
        self._set_state(VmState.PAUSED if state == "Paused" else VmState.RUNNING)


_VCPU_THREAD = re.compile(r"fc_vcpu ?(\d+)")


def vcpu_threads(pid: int) -> dict[int, int]:
    """vCPU index -> tid of Firecracker's ``fc_vcpu N`` threads."""
    out: dict[int, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                comm = (task / "comm").read_text().strip()
            except OSError:
                continue
            match = _VCPU_THREAD.fullmatch(comm)
            if match:
                out[int(match.group(1))] = int(task.name)
    return out


async def _race(work: Awaitable[T], exited: asyncio.Future[None]) -> T:
    """Await ``work`` unless ``exited`` fails first (then its LaunchError is raised)."""
    task = asyncio.ensure_future(work)
    waiters: set[asyncio.Future[object]] = {task, exited}  # type: ignore[arg-type]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        exited.result()
        raise AssertionError("unreachable: exited without an error")  # pragma: no cover
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, HypervisorError):
                await task


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
    for label, path in (
        ("kernel", cfg.kernel_asset_path()),
        ("initrd", cfg.initrd_asset_path()),
        ("image", cfg.image_asset_path()),
    ):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{label} {path} does not exist", field=f"boot.{label}_path")


def _find(name: str) -> str:
    found = host.find_binary(host.BINARY_NAMES.get(name, (name,)))
    return str(found) if found else ""
