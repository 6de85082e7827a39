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
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.config.defaults import BlockDriver
from virtcontainers.config.params import Param, serialize_params
from virtcontainers.console import ConsoleWatcher
from virtcontainers.deadline import Deadline
from virtcontainers.devices import (
    AgentSocket,
    BlockDrive,
    ColdPlugDevice,
    MemoryDevice,
    NetDevice,
    SerialPort,
    VSock,
)
from virtcontainers.errors import (
    ApiError,
    ConfigError,
    HypervisorError,
    HypervisorTimeout,
    LaunchError,
    StateError,
    StoreError,
    UnsupportedError,
)
from virtcontainers.fsutil import atomic_write, flock, mkdir_private, open_private
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
    "ACRN_UUIDS",
    "AGENT_PORT_NAME",
    "AcrnArgv",
    "AcrnHypervisor",
    "AcrnPaths",
    "BLK_POOL_SIZE",
    "DUMMY_SLOTS",
    "NODISK",
    "UuidPool",
    "acrn_host_problem",
    "build_argv",
    "kernel_parameters",
]

log = logging.getLogger(__name__)

_DRIVER = HypervisorType.ACRN.value

#: The only UUIDs ACRN launches a post-launched VM with (the reference's ``acrnUUIDsToIdx``).
ACRN_UUIDS: tuple[str, ...] = (
    "a7ada506-1ab0-4b6b-a0da-e513ca9b8c2f",
    "dbeae168-26e4-4084-9227-622193e56325",
    "18ed60cd-e9ea-4bf4-8f87-8523fc8347a3",
    "3f90b6f8-449a-4e72-b99c-063a889fc422",
    "1ae8587b-e599-4b59-8260-6d14ac166a55",
    "75f3b94b-49ed-48fc-b019-577ef45adf2b",
    "ca62cf3c-8359-47e8-a3f7-de2d682dfb02",
    "e3189497-c3f6-4b97-9e2c-18ac0ab9064d",
)
#: Placeholder virtio-blk devices created at boot, filled later by ``acrnctl blkrescan``.
BLK_POOL_SIZE = 8
#: ``acrn-dm``'s keyword for "a virtio-blk device with no backend yet". It matches anywhere
#: in the option string (``strstr``), so a real path containing it would be taken as empty.
NODISK = "nodisk"
#: acrn-dm's default install paths (the reference's ``acrnPath`` / ``acrnctlPath``).
DEFAULT_ACRN_DM = "/usr/bin/acrn-dm"
DEFAULT_ACRNCTL = "/usr/bin/acrnctl"
#: Device nodes of the hypervisor service module; one exists only in an ACRN service VM.
ACRN_DEVICE_NODES = ("/dev/acrn_hsm", "/dev/acrn_vhm")
#: The guest agent finds its virtio-serial port by this name (as with QEMU, drivers/qemu/argv).
AGENT_PORT_NAME = "vc.agent"
#: The reference's ``MaxAcrnVCPUs``.
MAX_ACRN_VCPUS = 8
#: PCI slot 2 is reserved for GVT-g graphics in ACRN; the reference skips it.
_GVTG_RESERVED_SLOT = 2
_MAX_PCI_SLOT = 31
#: sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_CONSOLE_DRAIN_TIMEOUT = 5.0
_ACRNCTL_TIMEOUT = 10.0
_SIGTERM_TIMEOUT = 3.0

# -- kernel command line (the reference's acrn_arch_base.go) ---------------------------------

_KERNEL_PARAMS = (
    Param("tsc", "reliable"),
    Param("no_timer_check"),
    Param("nohpet"),
    Param("console", "tty0"),
    Param("console", "ttyS0"),
    Param("console", "hvc0"),
    Param("log_buf_len", "16M"),
    Param("consoleblank", "0"),
    Param("iommu", "off"),
    Param("i915.avail_planes_per_pipe", "0x070F00"),
    Param("i915.enable_hangcheck", "0"),
    Param("i915.nuclear_pageflip", "1"),
    Param("i915.enable_guc_loading", "0"),
    Param("i915.enable_guc_submission", "0"),
    Param("i915.enable_guc", "0"),
)
#: ACRN boots a rootfs image on the first virtio-blk device.
_KERNEL_ROOT_PARAMS = (Param("root", "/dev/vda1 rw rootwait"),)
_KERNEL_PARAMS_NON_DEBUG = (Param("quiet"), Param("systemd.show_status", "false"))
_KERNEL_PARAMS_DEBUG = (
    Param("debug"),
    Param("systemd.show_status", "true"),
    Param("systemd.log_level", "debug"),
    Param("systemd.log_target", "kmsg"),
    Param("printk.devkmsg", "on"),
)
_DEFAULT_KERNEL_PARAMS = (Param("panic", "1"),)


def kernel_parameters(cfg: HypervisorConfig) -> str:
    """The guest command line, in the reference's order: ACRN's defaults, the root image,
    the (non-)debug set, ``panic=1``, ``maxcpus``, then the configured params (the kernel
    honours the last value of a repeated key, so the user's win)."""
    params: list[Param] = [*_KERNEL_PARAMS, *_KERNEL_ROOT_PARAMS]
    params += _KERNEL_PARAMS_DEBUG if cfg.debugging.debug else _KERNEL_PARAMS_NON_DEBUG
    params += _DEFAULT_KERNEL_PARAMS
    params.append(Param("maxcpus", str(cfg.resources.default_max_vcpus)))
    params += cfg.boot.kernel_params
    return " ".join(serialize_params(params, "="))


# -- the acrn-dm command line -------------------------------------------------------------


@dataclass(frozen=True)
class AcrnPaths:
    """Where one VM keeps its sockets and logs."""

    run_dir: Path

    @property
    def console(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def agent(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.run_dir / "acrn-dm.log"

    def sockets(self) -> tuple[Path, ...]:
        return (self.console, self.agent)


@dataclass(frozen=True)
class AcrnArgv:
    """A built command line and the PCI slot of each placeholder disk (pool index -> slot)."""

    argv: list[str]
    dummy_slots: dict[int, int]


def _slot(position: int) -> int:
    """PCI slot of the device at ``position`` in the device list: slot 2 is skipped."""
    return position if position < _GVTG_RESERVED_SLOT else position + 1


#: Pool index (1..8; 0 is the root image, as in the reference) -> PCI slot of each
#: placeholder. They follow hostbridge, lpc, console and image in the device list.
DUMMY_SLOTS: dict[int, int] = {i: _slot(3 + i) for i in range(1, BLK_POOL_SIZE + 1)}


def _check_option_value(value: str, what: str, field_name: str) -> None:
    # acrn-dm splits device options on commas; a comma in a path would silently change them.
    if not value or "," in value:
        raise ConfigError(f"{what} {value!r} must be non-empty without commas", field=field_name)


def _check_disk_path(path: str, field_name: str) -> None:
    _check_option_value(path, "disk file", field_name)
    if NODISK in path:
        raise ConfigError(
            f"disk file {path!r}: acrn-dm takes any path containing {NODISK!r} for an "
            "empty placeholder",
            field=field_name,
        )


def _device_option(device: ColdPlugDevice) -> str:
    """The ``-s <slot>,<option>`` tail for a cold-plugged device."""
    match device:
        case NetDevice():
            _check_option_value(device.tap_name, "tap name", "NetDevice.tap_name")
            _check_option_value(device.mac, "MAC address", "NetDevice.mac")
            return f"virtio-net,{device.tap_name},mac={device.mac}"
        case BlockDrive():
            _check_disk_path(device.file, "BlockDrive.file")
            return f"virtio-blk,{device.file}" + (",ro" if device.read_only else "")
        case SerialPort():
            _check_option_value(device.name, "serial port name", "SerialPort.name")
            _check_option_value(device.host_path, "serial port socket", "SerialPort.host_path")
            return f"virtio-console,socket:{device.name}={device.host_path}"
        case VSock():
            if device.context_id < 3:
                raise ConfigError(
                    f"vsock context id {device.context_id} is reserved (guests start at 3)",
                    field="VSock.context_id",
                )
            return f"vhost-vsock,cid={device.context_id}"
    raise UnsupportedError(f"cold-plug of {type(device).__name__}", driver=_DRIVER)


def build_argv(
    cfg: HypervisorConfig,
    *,
    binary: str,
    name: str,
    uuid: str,
    paths: AcrnPaths,
    cold: Sequence[ColdPlugDevice] = (),
) -> AcrnArgv:
    """The ``acrn-dm`` command line for ``cfg`` (pure: reads nothing from the host).

    Order as in the reference: ``-U <uuid> -A -m <MiB>M``, the PCI devices (hostbridge,
    LPC with COM1 on stdio, the console, the root image, 8 ``nodisk`` placeholders, the agent
    port, then cold-plugged devices; slot 2 skipped), ``-k <kernel> -B <cmdline>``, the name.
    There is no vCPU option: ``acrn-dm`` dropped ``-c`` and ACRN sizes a post-launched VM from
    its static scenario configuration; the guest gets ``maxcpus=`` on its command line.

    Raises:
        ConfigError: a device option that acrn-dm would misparse; more devices than slots.
        UnsupportedError: a cold-plugged device kind ACRN cannot take.
    """
    image = cfg.image_asset_path()
    devices: list[str] = [
        "0,hostbridge",
        "0,lpc",
        f"virtio-console,@socket:console0={paths.console}",
        f"virtio-blk,{image}",
        *([f"virtio-blk,{NODISK}"] * BLK_POOL_SIZE),
        f"virtio-console,socket:{AGENT_PORT_NAME}={paths.agent}",
        *(_device_option(d) for d in cold),
    ]
    if _slot(len(devices) - 1) > _MAX_PCI_SLOT:
        raise ConfigError(
            f"{len(cold)} cold-plugged devices do not fit in the PCI slots left "
            f"(at most {_MAX_PCI_SLOT - _slot(len(devices) - len(cold) - 1)})",
            field="devices",
        )
    argv = [binary, "-U", uuid, "-A", "-m", f"{cfg.resources.memory_size}M"]
    for position, option in enumerate(devices):
        slot = _slot(position)
        if option.startswith("0,"):  # hostbridge and lpc take slot:function
            argv += ["-s", f"{slot}:{option}"]
            if option == "0,lpc":
                # The legacy UART on the LPC bus, to acrn-dm's stdout (our VMM log).
                argv += ["-l", "com1,stdio"]
        else:
            argv += ["-s", f"{slot},{option}"]
    argv += ["-k", cfg.kernel_asset_path(), "-B", kernel_parameters(cfg), name]
    return AcrnArgv(argv, dict(DUMMY_SLOTS))


# -- the UUID pool -------------------------------------------------------------------------


def _running_pool_uuids() -> dict[str, int]:
    """UUID -> pid of every live process whose argv has ``-U``/``--uuid`` with a pool UUID."""
    found: dict[str, int] = {}
    pool = set(ACRN_UUIDS)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for flag, value in itertools.pairwise(argv):
            if flag in ("-U", "--uuid") and value in pool:
                found[value] = int(entry.name)
    return found


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _Claim:
    sandbox_id: str
    owner_pid: int
    vmm_pid: int = 0


class UuidPool:
    """The 8 ACRN UUIDs, shared by every process on the host through ``<dir>/acrn-uuids.json``.

    A UUID is taken when the file says so and the claim is live (its ``acrn-dm`` runs, or it
    has none yet and the process that claimed it runs), or when any process runs with it on
    its command line. Dead claims are dropped on the next allocation.
    """

    FILE = "acrn-uuids.json"

    def __init__(
        self, directory: Path, *, scan: Callable[[], dict[str, int]] = _running_pool_uuids
    ) -> None:
        self.directory = directory
        self.path = directory / self.FILE
        self._scan = scan

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, _Claim]]:
        try:
            mkdir_private(self.directory)
            fd = open_private(self.directory / ".acrn-uuids.lock")
        except OSError as exc:
            raise StoreError(f"cannot open the ACRN UUID pool: {exc}", path=str(self.path)) from exc
        try:
            flock(fd)
            claims = self._read()
            before = {k: (v.sandbox_id, v.owner_pid, v.vmm_pid) for k, v in claims.items()}
            yield claims
            after = {k: (v.sandbox_id, v.owner_pid, v.vmm_pid) for k, v in claims.items()}
            if after != before:
                self._write(claims)
        finally:
            os.close(fd)  # releases the flock

    def _read(self) -> dict[str, _Claim]:
        try:
            raw = json.loads(self.path.read_text())
            return {
                str(u): _Claim(str(c["sandbox_id"]), int(c["owner_pid"]), int(c["vmm_pid"]))
                for u, c in dict(raw["claims"]).items()
                if u in ACRN_UUIDS
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Rebuilding is safe: live acrn-dm processes are found by the argv scan anyway.
            log.warning("ignoring unreadable ACRN UUID pool %s: %s", self.path, exc)
            return {}

    def _write(self, claims: dict[str, _Claim]) -> None:
        doc = {
            "version": 1,
            "claims": {
                u: {"sandbox_id": c.sandbox_id, "owner_pid": c.owner_pid, "vmm_pid": c.vmm_pid}
                for u, c in claims.items()
            },
        }
        try:
            atomic_write(self.path, json.dumps(doc, indent=1).encode(), tmp_prefix=".acrn-uuids.")
        except OSError as exc:
            raise StoreError(
                f"cannot write the ACRN UUID pool: {exc}", path=str(self.path)
            ) from exc

    @staticmethod
    def _live(claim: _Claim) -> bool:
        return _pid_alive(claim.vmm_pid) if claim.vmm_pid else _pid_alive(claim.owner_pid)

    def in_use(self) -> dict[str, str]:
        """UUID -> holder (a sandbox id, or ``pid N`` for a process we did not start)."""
        with self._locked() as claims:
            return self._taken(claims)

    def _taken(self, claims: dict[str, _Claim]) -> dict[str, str]:
        for u in [u for u, c in claims.items() if not self._live(c)]:
            log.info("ACRN UUID %s: dropping the stale claim of %s", u, claims[u].sandbox_id)
            del claims[u]
        taken = {u: c.sandbox_id for u, c in claims.items()}
        for u, pid in self._scan().items():
            taken.setdefault(u, f"pid {pid}")
        return taken

    def allocate(self, sandbox_id: str) -> str:
        """Claim the first free UUID for ``sandbox_id``.

        Raises:
            HypervisorError: all 8 are in use (the message lists the holders).
            StoreError: the pool file cannot be written.
        """
        with self._locked() as claims:
            taken = self._taken(claims)
            for u in ACRN_UUIDS:
                if u not in taken:
                    claims[u] = _Claim(sandbox_id, os.getpid())
                    return u
        holders = ", ".join(f"{u[:8]}…={h}" for u, h in taken.items())
        raise HypervisorError(
            f"all {len(ACRN_UUIDS)} ACRN VM UUIDs are in use ({holders})",
            driver=_DRIVER,
            sandbox_id=sandbox_id,
        )

    def set_vmm_pid(self, uuid: str, sandbox_id: str, pid: int) -> None:
        """Record the ``acrn-dm`` holding ``uuid`` (the claim then lives as long as it does)."""
        with self._locked() as claims:
            claim = claims.get(uuid)
            if claim is not None and claim.sandbox_id == sandbox_id:
                claim.vmm_pid = pid

    def release(self, uuid: str, sandbox_id: str) -> None:
        """Give ``uuid`` back if ``sandbox_id`` holds it. Idempotent."""
        with self._locked() as claims:
            claim = claims.get(uuid)
            if claim is not None and claim.sandbox_id == sandbox_id:
                del claims[uuid]


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
    _check_disk_path(cfg.image_asset_path(), "boot.image_path")
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


@register_driver(HypervisorType.ACRN)
class AcrnHypervisor(Hypervisor):
    """One ACRN user VM run by ``acrn-dm``.

    ``uuid_pool_dir`` is where the UUID pool file lives (default: the state store root, shared
    by every virtcontainers process on the host).
    """

    def __init__(self, *, uuid_pool_dir: Path | None = None) -> None:
        super().__init__()
        self._pool_dir = uuid_pool_dir
        self._pool: UuidPool | None = None
        self._config = HypervisorConfig()
        self._netns = NetworkNamespace()
        self._uuid = ""
        self._name = ""
        self._ctl = ""
        self._paths = AcrnPaths(Path())
        self._owns_run_dir = False
        self._argv: list[str] = []
        self._process: VmmProcess | None = None
        self._console: ConsoleWatcher | None = None
        self._cold: list[ColdPlugDevice] = []
        self._blocks = _BlockSlots()
        #: The reference's 15 s grace period before SIGKILL.
        self.stop_timeout = DEFAULT_STOP_TIMEOUT

    # -- helpers ------------------------------------------------------------------------

    @property
    def paths(self) -> AcrnPaths:
        return self._paths

    @property
    def argv(self) -> list[str]:
        return list(self._argv)

    @property
    def vm_name(self) -> str:
        """The name ``acrnctl`` knows the VM by (the reference's ``sandbox-<id>``)."""
        return self._name

    @property
    def uuid(self) -> str:
        return self._uuid

    def _error(self, message: str) -> HypervisorError:
        return HypervisorError(message, driver=_DRIVER, sandbox_id=self.sandbox_id)

    def _unsupported(self, operation: str) -> UnsupportedError:
        return UnsupportedError(operation, driver=_DRIVER, sandbox_id=self.sandbox_id)

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
        deadline = Deadline.after(timeout)
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
        try:
            self._process = await VmmProcess.spawn(self._argv, log_path=self._paths.vmm_log)
        except OSError as exc:
            await self._teardown()
            self._set_state(VmState.FAILED)
            raise LaunchError(
                f"cannot execute acrn-dm: {exc}",
                exit_code=None,
                argv=self._argv,
                log_tail="",
                driver=_DRIVER,
                sandbox_id=self.sandbox_id,
            ) from exc
        self._uuid_pool().set_vmm_pid(self._uuid, self.sandbox_id, self._process.pid)
        exited = asyncio.ensure_future(self._exited_early())
        try:
            self._console = ConsoleWatcher(
                self._paths.console,
                self._paths.console_log,
                logging.getLogger(f"virtcontainers.console.{self.sandbox_id}"),
            )
            await self._console.connect(deadline, abort=exited)
            if not self._process.alive():
                await exited  # raises LaunchError
        except BaseException as exc:
            await self._abort_start()
            if isinstance(exc, HypervisorTimeout):
                raise HypervisorTimeout(
                    "starting acrn-dm", timeout, driver=_DRIVER, sandbox_id=self.sandbox_id
                ) from exc
            raise
        finally:
            exited.cancel()
            with contextlib.suppress(asyncio.CancelledError, LaunchError):
                await exited
        self._set_state(VmState.RUNNING)

    async def _exited_early(self) -> None:
        """Resolves with LaunchError as soon as acrn-dm exits during start-up."""
        assert self._process is not None
        await self._process.wait(None)
        problem = acrn_host_problem()
        raise LaunchError(
            "acrn-dm exited during start-up" + (f"; {problem}" if problem else ""),
            exit_code=self._process.returncode,
            argv=self._argv,
            log_tail=self._process.log_tail(),
            driver=_DRIVER,
            sandbox_id=self.sandbox_id,
        )

    async def _abort_start(self) -> None:
        if self._process is not None:
            await self._process.stop(term_timeout=2.0, kill_timeout=5.0)
        await self._teardown()
        self._set_state(VmState.FAILED)

    async def stop_sandbox(self, wait_only: bool = False) -> None:
        """Stop ``acrn-dm`` and clean up; logs stay until :meth:`cleanup`. Idempotent.

        Normal stop: SIGINT (acrn-dm's orderly exit), ``stop_timeout`` (15 s), SIGTERM, then
        SIGKILL. ``wait_only``: the guest is powering itself off; only wait up to
        ``stop_timeout`` for acrn-dm to exit, then SIGKILL it (the reference's signal-0 wait).
        Either way the console is drained to end-of-file only after acrn-dm has exited, and
        the VM's UUID goes back to the pool.

        Raises:
            HypervisorTimeout: acrn-dm survived SIGKILL (its UUID then stays taken).
        """
        if self.state in (VmState.STOPPED, VmState.NEW):
            self._set_state(VmState.STOPPED)
            return
        proc = self._process
        if proc is not None:
            if wait_only:
                if not await proc.wait(self.stop_timeout):
                    log.warning(
                        "acrn %s: the guest did not power off within %.0f s; killing acrn-dm",
                        self.sandbox_id,
                        self.stop_timeout,
                    )
                    proc.send_signal(signal.SIGKILL)
                    if not await proc.wait(self.stop_timeout):
                        self._set_state(VmState.FAILED)
                        raise HypervisorTimeout(
                            f"acrn-dm (pid {proc.pid}) exiting after SIGKILL",
                            self.stop_timeout,
                            driver=_DRIVER,
                            sandbox_id=self.sandbox_id,
                        )
            else:

                async def interrupt() -> None:
                    proc.send_signal(signal.SIGINT)

                try:
                    how = await proc.stop(
                        polite=interrupt,
                        polite_timeout=self.stop_timeout,
                        term_timeout=_SIGTERM_TIMEOUT,
                        kill_timeout=self.stop_timeout,
                    )
                except HypervisorTimeout:
                    self._set_state(VmState.FAILED)
                    raise
                log.debug("acrn %s: acrn-dm ended (%s)", self.sandbox_id, how)
        await self._teardown()
        self._set_state(VmState.STOPPED)

    async def _teardown(self) -> None:
        """After acrn-dm is gone: drain the console to EOF, remove sockets, free the UUID."""
        if self._console is not None:
            await self._console.wait_closed(_CONSOLE_DRAIN_TIMEOUT)
            self._console = None
        if self._process is not None:
            self._process.close()
            self._process = None
        for path in self._paths.sockets():
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
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

    async def save_sandbox(self) -> None:
        """Always UnsupportedError: acrn-dm cannot save device state (no VM templating)."""
        raise self._unsupported("saving the VM state (VM templating)")

    async def check(self) -> None:
        """Raise HypervisorError unless acrn-dm is alive and, when acrnctl is installed,
        ``acrnctl list`` shows the VM. The message says when the host is not an ACRN
        service VM at all."""
        if self.state is VmState.FAILED:
            raise self._failure("the VM has failed")
        self._require("check", VmState.RUNNING, VmState.PAUSED)
        proc = self._process
        if proc is None or not proc.alive():
            code = proc.returncode if proc is not None else None
            self._set_state(VmState.FAILED)
            raise self._failure(f"acrn-dm is not running (exit code {code})")
        if not self._ctl_path():
            return
        try:
            listing = await self.acrnctl("list")
        except HypervisorError as exc:
            raise self._failure(f"acrnctl list failed: {exc}") from exc
        names = {line.split()[0] for line in listing.splitlines() if line.split()}
        if self._name not in names:
            if not await proc.wait(0.5):
                raise self._failure(f"acrnctl list does not show {self._name}")
            self._set_state(VmState.FAILED)
            raise self._failure("acrn-dm exited during the check")

    def _failure(self, message: str) -> HypervisorError:
        problem = acrn_host_problem()
        return self._error(f"{message}; {problem}" if problem else message)

    async def disconnect(self) -> None:
        """Nothing to drop: the driver holds no control connection to acrn-dm (acrnctl runs
        per call). The console watcher stays, it belongs to the VM's lifetime."""

    async def cleanup(self) -> None:
        """Remove the run dir (or, in a sandbox's run dir, our logs) after stop. Idempotent."""
        if self.state not in (VmState.STOPPED, VmState.FAILED, VmState.NEW, VmState.CREATED):
            raise StateError("clean up", self.state.value, ["stopped", "failed"], driver=_DRIVER)
        if self._owns_run_dir and self._paths.run_dir != Path():
            shutil.rmtree(self._paths.run_dir, ignore_errors=True)
        elif self._paths.run_dir != Path():
            for path in (self._paths.console_log, self._paths.vmm_log):
                path.unlink(missing_ok=True)

    async def get_sandbox_console(self, sandbox_id: str) -> ConsoleUrl:
        return ConsoleUrl("unix", str(self._paths.console))

    # -- devices ------------------------------------------------------------------------

    async def add_device(self, device: ColdPlugDevice) -> None:
        """Queue a device for the command line (before start): NetDevice (tap), BlockDrive,
        SerialPort, VSock. Others raise UnsupportedError; a device acrn-dm would misparse
        raises ConfigError."""
        self._require("cold-plug a device", VmState.CREATED)
        _device_option(device)  # validates now rather than at start
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
        _device_option(device)  # the same path rules as cold plug
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

    def capabilities(self) -> Capabilities:
        """Block devices always; block hot-plug and pause when acrnctl is available (the
        reference declared block device and block hot-plug support)."""
        flags = Capability.BLOCK_DEVICE
        if self._ctl_path():
            flags |= Capability.BLOCK_DEVICE_HOTPLUG | Capability.PAUSE
        return Capabilities(flags)

    def hypervisor_config(self) -> HypervisorConfig:
        return self._config.copy()

    async def get_thread_ids(self) -> dict[int, int]:
        """Always ``{}``, as in the reference: ACRN runs vCPUs on physical CPUs it partitions
        itself, so no host thread of the service VM is a vCPU."""
        self._require("get thread ids", VmState.RUNNING, VmState.PAUSED)
        return {}

    def get_pids(self) -> list[int]:
        if self._process is None or not self._process.alive():
            return []
        return [self._process.pid]

    async def to_grpc(self) -> bytes:
        raise self._unsupported("serializing the VM for a VM cache")

    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        raise self._unsupported("adopting a VM from a VM cache")

    def save(self) -> HypervisorState:
        # The reference's block index map: which placeholders are taken (pool index -> slot).
        taken = set(self._blocks.plugged.values()) | self._blocks.retired
        used = {i: self._blocks.slots[i] for i in sorted(taken)}
        return HypervisorState(
            pid=self._process.pid if self._process else 0,
            type=_DRIVER,
            uuid=self._uuid,
            block_index_map=used,
            run_dir=str(self._paths.run_dir),
            sandbox_id=self.sandbox_id,
        )

    def load(self, state: HypervisorState) -> None:
        """Restore bookkeeping from a persisted state (then :meth:`reattach`)."""
        if state.type and state.type != _DRIVER:
            raise StateError("load a state", state.type, [_DRIVER], driver=_DRIVER)
        self.sandbox_id = state.sandbox_id
        self._uuid = state.uuid
        self._name = f"sandbox-{state.sandbox_id}"
        self._paths = AcrnPaths(Path(state.run_dir))
        # Drive ids are not persisted: taken placeholders stay out of the pool for good.
        self._blocks = _BlockSlots(slots=dict(DUMMY_SLOTS), retired=set(state.block_index_map))
        if state.pid:
            self._process = VmmProcess.adopt(state.pid, log_path=self._paths.vmm_log)

    async def reattach(self) -> None:
        """Take over an acrn-dm started by another process (after :meth:`load`).

        The console is not reconnected (acrn-dm serves one client). Disks plugged before are
        kept out of the pool but cannot be unplugged by id.

        Raises:
            HypervisorError: the pid is gone or is not this VM's acrn-dm.
        """
        proc = self._process
        if proc is None or not process_matches(proc.pid, self._uuid) or not self._uuid:
            raise self._error("the VM's acrn-dm process is gone")
        self._set_state(VmState.RUNNING)
