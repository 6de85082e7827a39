"""The ``acrn-dm`` command line, built from a HypervisorConfig as a list (pure: reads
nothing from the host), and the kernel command line ACRN guests get."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from virtcontainers.config import HypervisorConfig
from virtcontainers.config.params import Param, serialize_params
from virtcontainers.devices import BlockDrive, ColdPlugDevice, NetDevice, SerialPort, VSock
from virtcontainers.drivers._runpaths import InRunDir, RunPaths
from virtcontainers.errors import ConfigError, UnsupportedError

__all__ = [
    "AGENT_PORT_NAME",
    "AcrnArgv",
    "AcrnPaths",
    "BLK_POOL_SIZE",
    "DUMMY_SLOTS",
    "NODISK",
    "build_argv",
    "check_disk_path",
    "device_option",
    "kernel_parameters",
]

#: Placeholder virtio-blk devices created at boot, filled later by ``acrnctl blkrescan``.
BLK_POOL_SIZE = 8
#: ``acrn-dm``'s keyword for "a virtio-blk device with no backend yet". It matches anywhere
#: in the option string (``strstr``), so a real path containing it would be taken as empty.
NODISK = "nodisk"
#: The guest agent finds its virtio-serial port by this name (as with QEMU, drivers/qemu/argv).
AGENT_PORT_NAME = "vc.agent"
#: PCI slot 2 is reserved for GVT-g graphics in ACRN; the reference skips it.
_GVTG_RESERVED_SLOT = 2
_MAX_PCI_SLOT = 31
_DRIVER = "acrn"

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
class AcrnPaths(RunPaths):
    """Where one VM keeps its sockets and logs."""

    agent = InRunDir("agent.sock")
    vmm_log = InRunDir("acrn-dm.log")

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


def check_disk_path(path: str, field_name: str) -> None:
    _check_option_value(path, "disk file", field_name)
    if NODISK in path:
        raise ConfigError(
            f"disk file {path!r}: acrn-dm takes any path containing {NODISK!r} for an "
            "empty placeholder",
            field=field_name,
        )


def device_option(device: ColdPlugDevice) -> str:
    """The ``-s <slot>,<option>`` tail for a cold-plugged device."""
    match device:
        case NetDevice():
            _check_option_value(device.tap_name, "tap name", "NetDevice.tap_name")
            _check_option_value(device.mac, "MAC address", "NetDevice.mac")
            return f"virtio-net,{device.tap_name},mac={device.mac}"
        case BlockDrive():
            check_disk_path(device.file, "BlockDrive.file")
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
        *(device_option(d) for d in cold),
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
