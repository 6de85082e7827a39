"""The ACRN driver: ``acrn-dm`` on an ACRN service VM, controlled with ``acrnctl``.

ACRN is a type-1 hypervisor. A user VM is run by its device model, ``acrn-dm``, a process in
the service VM that talks to the hypervisor through ``/dev/acrn_hsm`` (``/dev/acrn_vhm`` before
Linux 5.12). There is no control socket of the kind QEMU or Firecracker have: the VM is
described entirely by the ``acrn-dm`` command line, and the few runtime operations go through
``acrnctl``, which reaches ``acrn-dm``'s monitor by VM name.

What follows from that (and from the reference, Kata's ``acrn.go`` of 2021):

* **UUIDs.** ACRN only launches VMs whose UUID is one of 8 fixed values (the vSeed is derived
  from it). :class:`UuidPool` hands them out under a lock, remembers which sandbox holds which
  in ``<store root>/acrn-uuids.json``, and also counts any running process whose argv carries a
  pool UUID (another runtime's ``acrn-dm``), so a stale file never double-books a UUID. The
  reference kept this table in memory only (its store calls were commented out).
* **No hot-plug.** ACRN cannot add PCI devices to a running VM. The reference therefore starts
  every VM with 8 virtio-blk devices backed by the ``nodisk`` keyword; "hot-plugging" a disk is
  ``acrnctl blkrescan <vm> <slot>,<file>``, which gives one of them a backend and tells the
  guest its capacity changed. ``acrn-dm`` refuses to replace a real backend, so a slot can be
  filled once: removing a disk forgets it here and retires the slot, but ``acrn-dm`` keeps the
  file open and the guest keeps seeing the disk until the VM stops. No CPU, memory, network or
  VFIO hot-plug.
* **Stop** is SIGINT (``acrn-dm``'s orderly shutdown), 15 s, then SIGKILL; with ``wait_only``
  only wait, as the reference's ``signal 0`` polling did. The console watcher is drained only
  after ``acrn-dm`` has exited, so the guest's last lines are kept.
* **Readiness.** ``acrn-dm`` serves the console socket once its devices are set up; start is
  done when the watcher is connected and ``acrn-dm`` is still alive (the reference just slept
  for the whole timeout). Unlike QEMU's ``wait=on`` the guest does not wait for the watcher,
  so the first ``hvc0`` lines can be missed; the legacy UART (``-l com1,stdio``, the kernel's
  ``console=ttyS0``) goes to ``acrn-dm``'s stdout, i.e. the VMM log, from the first line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.config.defaults import BlockDriver
from virtcontainers.deadline import Deadline
from virtcontainers.devices import (
    AgentSocket,
    BlockDrive,
    ColdPlugDevice,
    MemoryDevice,
    SerialPort,
    VSock,
)
from virtcontainers.drivers._vmm import VmmDriver
from virtcontainers.drivers.acrn.argv import (
    AGENT_PORT_NAME,
    BLK_POOL_SIZE,
    DUMMY_SLOTS,
    AcrnPaths,
    build_argv,
    check_disk_path,
    device_option,
)
from virtcontainers.drivers.acrn.uuids import UuidPool
from virtcontainers.errors import ApiError, ConfigError, HypervisorError, HypervisorTimeout
from virtcontainers.hypervisor import (
    Capability,
    D,
    Hypervisor,
    NetworkNamespace,
    VmState,
    register_driver,
)
from virtcontainers.persist.hypervisor_state import HypervisorState

__all__ = [
    "ACRN_DEVICE_NODES",
    "DEFAULT_ACRNCTL",
    "DEFAULT_ACRN_DM",
    "AcrnHypervisor",
    "acrn_host_problem",
]

log = logging.getLogger(__name__)

_DRIVER = "acrn"

#: acrn-dm's default install paths (the reference's ``acrnPath`` / ``acrnctlPath``).
DEFAULT_ACRN_DM = "/usr/bin/acrn-dm"
DEFAULT_ACRNCTL = "/usr/bin/acrnctl"
#: Device nodes of the hypervisor service module; one exists only in an ACRN service VM.
ACRN_DEVICE_NODES = ("/dev/acrn_hsm", "/dev/acrn_vhm")
#: The reference's ``MaxAcrnVCPUs``.
MAX_ACRN_VCPUS = 8
#: sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_ACRNCTL_TIMEOUT = 10.0
_SIGTERM_TIMEOUT = 3.0

# -- host facts ----------------------------------------------------------------------------


def acrn_host_problem() -> str:
    """Why this host cannot run ACRN VMs, or "" when it is an ACRN service VM."""
    nodes = host.device_nodes(ACRN_DEVICE_NODES)
    if any(nodes.values()):
        return ""
    return "this host is not an ACRN service VM (no /dev/acrn_hsm or /dev/acrn_vhm)"


def _resolve_binary(configured: str, default: str, name: str) -> str:
    """The configured path, else acrn-dm's install path, else one on $PATH; "" if none."""
    if configured:
        return configured
    if os.path.isfile(default) and os.access(default, os.X_OK):
        return default
    found = shutil.which(name)
    return found or ""


def _check_boot_files(cfg: HypervisorConfig) -> None:
    check_disk_path(cfg.image_asset_path(), "boot.image_path")
    for label, path in (("kernel", cfg.kernel_asset_path()), ("image", cfg.image_asset_path())):
        if not os.path.isfile(path):
            raise ConfigError(f"{label} {path} does not exist", field=f"boot.{label}_path")


def _check_executable(path: str, field_name: str) -> None:
    if not os.path.isabs(path):
        raise ConfigError(f"{path!r} must be an absolute path", field=field_name)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ConfigError(f"{path} does not exist or is not executable", field=field_name)


# -- the driver ----------------------------------------------------------------------------


@dataclass
class _BlockSlots:
    """The placeholder disks: which pool index holds which drive, and which are spent."""

    slots: dict[int, int] = field(default_factory=dict)  # pool index -> PCI slot
    plugged: dict[str, int] = field(default_factory=dict)  # drive id -> pool index
    #: Filled once and given up: acrn-dm cannot give a slot a new backend.
    retired: set[int] = field(default_factory=set)

    def free_index(self) -> int | None:
        used = set(self.plugged.values()) | self.retired
        return next((i for i in sorted(self.slots) if i not in used), None)


@register_driver("acrn")
class AcrnHypervisor(VmmDriver[AcrnPaths]):
    """One ACRN user VM run by ``acrn-dm``.

    ``uuid_pool_dir`` is where the UUID pool file lives (default: the state store root, shared
    by every virtcontainers process on the host).
    """

    vmm_name = "acrn-dm"
    wait_only_fallback = "kill"

    def __init__(self, *, uuid_pool_dir: Path | None = None) -> None:
        super().__init__(AcrnPaths(Path()))
        self._pool_dir = uuid_pool_dir
        self._pool: UuidPool | None = None
        self._name = ""
        self._ctl = ""
        self._cold: list[ColdPlugDevice] = []
        self._blocks = _BlockSlots()

    # -- helpers ------------------------------------------------------------------------

    def _make_paths(self, run_dir: Path) -> AcrnPaths:
        return AcrnPaths(run_dir)

    @property
    def vm_name(self) -> str:
        """The name ``acrnctl`` knows the VM by (the reference's ``sandbox-<id>``)."""
        return self._name

    @property
    def uuid(self) -> str:
        return self._uuid

    def _uuid_pool(self) -> UuidPool:
        if self._pool is None:
            from virtcontainers.persist.store import default_root

            self._pool = UuidPool(self._pool_dir or default_root())
        return self._pool

    def _ctl_path(self) -> str:
        if self._ctl:
            return self._ctl
        return _resolve_binary(self._config.hypervisor_ctl_asset_path(), DEFAULT_ACRNCTL, "acrnctl")

    async def acrnctl(self, *args: str, timeout: float = _ACRNCTL_TIMEOUT) -> str:
        """Run ``acrnctl <args>`` (argv, no shell) and return its output.

        Raises:
            UnsupportedError: no acrnctl binary.
            ApiError: it exited non-zero (the reply holds its output).
            HypervisorTimeout: it did not finish within ``timeout`` seconds.
        """
        ctl = self._ctl_path()
        if not ctl:
            raise self._unsupported(f"acrnctl {args[0] if args else ''} (acrnctl not found)")
        argv = [ctl, *args]
        request = " ".join(argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise ApiError(
                f"cannot run acrnctl: {exc}",
                request=request,
                reply="",
                driver=_DRIVER,
                sandbox_id=self.sandbox_id,
            ) from exc
        try:
            async with asyncio.timeout(timeout):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise HypervisorTimeout(
                request, timeout, driver=_DRIVER, sandbox_id=self.sandbox_id
            ) from None
        reply = out.decode(errors="replace")
        if proc.returncode != 0:
            raise ApiError(
                f"acrnctl exited with code {proc.returncode}: {reply.strip()}",
                request=request,
                reply=reply,
                status=proc.returncode,
                driver=_DRIVER,
                sandbox_id=self.sandbox_id,
            )
        return reply

    # -- VM manager ---------------------------------------------------------------------

    async def create_sandbox(
        self, id: str, network_ns: NetworkNamespace, config: HypervisorConfig
    ) -> None:
        """Validate the config, claim one of the 8 ACRN UUIDs and lay out the run dir.

        No process starts here.

        Raises:
            ConfigError: invalid config (no kernel, no image, memory below 256 MiB, a block
                driver other than virtio-blk, vCPUs over ACRN's 8), missing files or binaries,
                socket paths too long.
            AssetError: a custom asset is missing or fails its hash.
            HypervisorError: all 8 ACRN UUIDs are in use.
        """
        self._require("create", VmState.NEW)
        cfg = config.copy()
        driver = cfg.storage.block_device_driver
        if driver and driver != BlockDriver.VIRTIO_BLOCK:
            raise ConfigError(
                f"ACRN only supports the virtio-blk block driver, not {driver!r}",
                field="storage.block_device_driver",
                allowed=[BlockDriver.VIRTIO_BLOCK.value],
            )
        cfg.storage.block_device_driver = BlockDriver.VIRTIO_BLOCK.value
        if cfg.resources.default_max_vcpus <= 0:
            cfg.resources.default_max_vcpus = min(MAX_ACRN_VCPUS, os.cpu_count() or 1)
        cfg.valid()
        if not cfg.image_asset_path():
            raise ConfigError(
                "ACRN boots from a rootfs image: set boot.image_path (an initrd is not enough)",
                field="boot.image_path",
            )
        if cfg.initrd_asset_path():
            log.warning("acrn %s: ignoring the initrd; ACRN boots the rootfs image", id)
        r = cfg.resources
        if r.num_vcpus > MAX_ACRN_VCPUS or r.default_max_vcpus > MAX_ACRN_VCPUS:
            raise ConfigError(
                f"ACRN runs at most {MAX_ACRN_VCPUS} vCPUs per VM "
                f"(num_vcpus {r.num_vcpus}, default_max_vcpus {r.default_max_vcpus})",
                field="resources.default_max_vcpus",
            )
        _check_boot_files(cfg)
        binary = _resolve_binary(cfg.hypervisor_asset_path(), DEFAULT_ACRN_DM, "acrn-dm")
        if not binary:
            raise ConfigError(
                f"no acrn-dm found ({DEFAULT_ACRN_DM} or $PATH): set boot.hypervisor_path",
                field="boot.hypervisor_path",
            )
        _check_executable(binary, "boot.hypervisor_path")
        cfg.boot.hypervisor_path = binary
        ctl = _resolve_binary(cfg.hypervisor_ctl_asset_path(), DEFAULT_ACRNCTL, "acrnctl")
        if ctl:
            _check_executable(ctl, "boot.hypervisor_ctl_path")
        else:
            log.warning("acrn %s: no acrnctl; pause, resume and block hot-plug unavailable", id)
        cfg.boot.hypervisor_ctl_path = ctl

        if self._sandbox is not None:
            run_dir = self._sandbox.run_dir
            owns = False
        else:
            run_dir = Path(tempfile.mkdtemp(prefix=f"vc-acrn-{id[:16]}-"))
            owns = True
        paths = AcrnPaths(run_dir)
        for sock in paths.sockets():
            if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
                if owns:
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise ConfigError(
                    f"socket path {sock} is longer than {_MAX_SOCKET_PATH} bytes",
                    field="run_dir",
                )
        try:
            uuid = self._uuid_pool().allocate(id)
        except BaseException:
            if owns:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._config = cfg
        self._netns = network_ns
        self.sandbox_id = id
        self._uuid = uuid
        self._name = f"sandbox-{id}"
        self._ctl = ctl
        self._paths = paths
        self._owns_run_dir = owns
        self._set_state(VmState.CREATED)

    async def start_sandbox(self, timeout: float) -> None:
        """Launch ``acrn-dm`` and wait until its console socket accepts the watcher.

        Raises:
            LaunchError: acrn-dm exited before it was ready (exit code, argv, log tail, and
                whether the host is an ACRN service VM at all).
            HypervisorTimeout: the console did not come up within ``timeout`` seconds.
        """
        self._require("start", VmState.CREATED)
        built = build_argv(
            self._config,
            binary=self._config.boot.hypervisor_path,
            name=self._name,
            uuid=self._uuid,
            paths=self._paths,
            cold=self._cold,
        )
        self._argv = built.argv
        self._blocks = _BlockSlots(slots=dict(built.dummy_slots))
        for sock in self._paths.sockets():
            sock.unlink(missing_ok=True)

        async def spawn() -> None:
            proc = await self._spawn(netns=self._netns.path)
            self._uuid_pool().set_vmm_pid(self._uuid, self.sandbox_id, proc.pid)

        await self._start(timeout, spawn)

    async def _until_ready(self, deadline: Deadline, exited: asyncio.Future[None]) -> None:
        """The console socket accepts the watcher and acrn-dm still runs."""
        self._console = self._new_console()
        await self._console.connect(deadline, abort=exited)
        if self._process is not None and not self._process.alive():
            await exited  # raises LaunchError

    def _polite(self, wait_only: bool) -> Callable[[], Awaitable[None]] | None:
        proc = self._process

        async def interrupt() -> None:
            if proc is not None:
                proc.send_signal(signal.SIGINT)  # acrn-dm's orderly exit

        return interrupt

    def _stop_steps(self) -> dict[str, float]:
        """SIGINT, ``stop_timeout`` (15 s), SIGTERM (3 s), then SIGKILL."""
        return {
            "polite_timeout": self.stop_timeout,
            "term_timeout": _SIGTERM_TIMEOUT,
            "kill_timeout": self.stop_timeout,
        }

    async def _teardown_extra(self) -> None:
        """Free the UUID and the placeholder bookkeeping."""
        if self._uuid:
            self._uuid_pool().release(self._uuid, self.sandbox_id)
        self._blocks = _BlockSlots()

    async def pause_sandbox(self) -> None:
        """``acrnctl pause <vm>``. Raises UnsupportedError without acrnctl, ApiError if it fails."""
        self._require("pause", VmState.RUNNING)
        await self.acrnctl("pause", self._name)
        self._set_state(VmState.PAUSED)

    async def resume_sandbox(self) -> None:
        """``acrnctl continue <vm>``."""
        self._require("resume", VmState.PAUSED)
        await self.acrnctl("continue", self._name)
        self._set_state(VmState.RUNNING)

    async def _probe(self) -> str | None:
        """``acrnctl list`` shows the VM (when acrnctl is installed)."""
        if not self._ctl_path():
            return None
        try:
            listing = await self.acrnctl("list")
        except HypervisorError as exc:
            raise self._failure(f"acrnctl list failed: {exc}") from exc
        names = {line.split()[0] for line in listing.splitlines() if line.split()}
        if self._name not in names:
            # Raised as an error: check() then tells "acrn-dm just exited" from "not listed".
            raise self._failure(f"acrnctl list does not show {self._name}")
        return None

    def _failure(self, message: str) -> HypervisorError:
        problem = acrn_host_problem()
        return self._error(f"{message}; {problem}" if problem else message)

    # -- devices ------------------------------------------------------------------------

    async def add_device(self, device: ColdPlugDevice) -> None:
        """Queue a device for the command line (before start): NetDevice (tap), BlockDrive,
        SerialPort, VSock. Others raise UnsupportedError; a device acrn-dm would misparse
        raises ConfigError."""
        self._require("cold-plug a device", VmState.CREATED)
        device_option(device)  # validates now rather than at start
        self._cold.append(device)

    async def hotplug_add_device(self, device: D) -> D:
        """Give ``device`` (a BlockDrive) to a free placeholder disk with ``acrnctl blkrescan``.

        Fills ``index`` (pool index), ``pci_path`` (the slot, hex) and ``virt_path``
        (``/dev/vdX`` by probe order). Every other kind raises UnsupportedError.

        Raises:
            HypervisorError: a drive with this id is plugged, or all 8 placeholders are used.
            ApiError: acrnctl refused (e.g. the file cannot be opened by acrn-dm).
        """
        self._require("hot-plug a device", VmState.RUNNING)
        if not isinstance(device, BlockDrive):
            raise self._unsupported(f"hot-plug of {type(device).__name__}")
        if not self._ctl_path():
            raise self._unsupported("block hot-plug without acrnctl")
        device_option(device)  # the same path rules as cold plug
        if device.id in self._blocks.plugged:
            raise self._error(f"a drive with id {device.id!r} is already plugged")
        index = self._blocks.free_index()
        if index is None:
            raise self._error(
                f"all {BLK_POOL_SIZE} placeholder disks are in use or spent "
                "(acrn-dm cannot reuse a slot that had a backend)"
            )
        slot = self._blocks.slots[index]
        await self.acrnctl("blkrescan", self._name, f"{slot},{device.file}")
        self._blocks.plugged[device.id] = index
        device.index = index
        device.pci_path = f"{slot:02x}"
        # vda is the root image and the placeholders follow it in slot (probe) order.
        device.virt_path = f"/dev/vd{chr(ord('a') + index)}"
        return device

    async def hotplug_remove_device(self, device: D) -> D:
        """Forget a hot-plugged BlockDrive and retire its placeholder.

        acrn-dm cannot detach or replace a backend, so the file stays open and the guest keeps
        the disk until the VM stops (the reference returned success without doing anything).
        Every other kind raises UnsupportedError.

        Raises:
            HypervisorError: no drive with this id is plugged.
        """
        self._require("hot-unplug a device", VmState.RUNNING)
        if not isinstance(device, BlockDrive):
            raise self._unsupported(f"hot-unplug of {type(device).__name__}")
        index = self._blocks.plugged.pop(device.id, None)
        if index is None:
            raise self._error(f"no hot-plugged drive with id {device.id!r}")
        self._blocks.retired.add(index)
        log.warning(
            "acrn %s: drive %s unplugged here, but acrn-dm keeps %s open and the guest keeps "
            "%s until the VM stops (ACRN has no block hot-unplug)",
            self.sandbox_id,
            device.id,
            device.file,
            device.virt_path,
        )
        device.pci_path = ""
        return device

    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        """ACRN has no vCPU hot-plug: asking for the current count returns (n, n); any other
        count raises UnsupportedError (the reference answered (0, 0) and did nothing)."""
        self._require("resize vCPUs", VmState.RUNNING, VmState.PAUSED)
        current = self._config.resources.num_vcpus
        if vcpus != current:
            raise self._unsupported(f"vCPU resize from {current} to {vcpus} (no CPU hot-plug)")
        return current, current

    async def resize_memory(
        self, mem_mb: int, memory_block_size_mb: int, probe: bool
    ) -> tuple[int, MemoryDevice]:
        """No memory hot-plug: growing raises UnsupportedError; shrinking is logged and the
        size returned unchanged (as every driver does for memory hot-unplug)."""
        self._require("resize memory", VmState.RUNNING, VmState.PAUSED)
        current = self._config.resources.memory_size
        if mem_mb > current:
            raise self._unsupported(f"memory resize from {current} to {mem_mb} MiB")
        if mem_mb < current:
            log.warning(
                "acrn %s: memory hot-unplug is not supported; keeping %d MiB (asked %d MiB)",
                self.sandbox_id,
                current,
                mem_mb,
            )
        return current, MemoryDevice(size_mb=0, probe=probe)

    async def generate_socket(self, id: str) -> AgentSocket:
        """The agent channel: a cold-plugged VSock if one was added, else the virtio-serial
        port ``vc.agent`` that every ACRN VM gets on its command line (acrn-dm serves its
        unix socket). The 2021 reference returned a vhost-vsock it never put on the acrn-dm
        command line; Kata 1.x used a virtio-console port as here."""
        for device in self._cold:
            if isinstance(device, VSock):
                return device
        return SerialPort(id="agent0", name=AGENT_PORT_NAME, host_path=str(self._paths.agent))

    # -- utilities ----------------------------------------------------------------------

    def _capability_flags(self) -> Capability:
        """Block devices always; block hot-plug and pause when acrnctl is available (the
        reference declared block device and block hot-plug support)."""
        flags = Capability.BLOCK_DEVICE
        if self._ctl_path():
            flags |= Capability.BLOCK_DEVICE_HOTPLUG | Capability.PAUSE
        return flags

    # The reference's ACRN is not served by the VM cache: keep the interface's UnsupportedError
    # (adopting a VM from another process is :meth:`reattach`, which ACRN does support).
    to_grpc = Hypervisor.to_grpc
    from_grpc = Hypervisor.from_grpc

    def _save_fields(self) -> dict[str, Any]:
        # The reference's block index map: which placeholders are taken (pool index -> slot).
        taken = set(self._blocks.plugged.values()) | self._blocks.retired
        return {"block_index_map": {i: self._blocks.slots[i] for i in sorted(taken)}}

    def _load_fields(self, state: HypervisorState) -> None:
        self._name = f"sandbox-{state.sandbox_id}"
        # Drive ids are not persisted: taken placeholders stay out of the pool for good.
        self._blocks = _BlockSlots(slots=dict(DUMMY_SLOTS), retired=set(state.block_index_map))
        self._ctl = _resolve_binary(
            self._config.hypervisor_ctl_asset_path(), DEFAULT_ACRNCTL, "acrnctl"
        )

    def _identity(self) -> str:
        return self._uuid or str(self._paths.agent)

    async def _adopt(self, timeout: float) -> VmState:
        """acrn-dm holds no control socket to connect to; the console is not reconnected
        (acrn-dm serves one client). Paused is read from ``acrnctl list`` when available.
        Disks plugged before are kept out of the pool but cannot be unplugged by id."""
        if not self._uuid:
            raise self._error("the VM's acrn-dm process is gone (no UUID recorded)")
        if self._ctl_path():
            listing = await self.acrnctl("list", timeout=timeout)
            for line in listing.splitlines():
                words = line.split()
                if words and words[0] == self._name and "paused" in (w.lower() for w in words):
                    return VmState.PAUSED
        return VmState.RUNNING
