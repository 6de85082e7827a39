"""The QEMU command line, built from a HypervisorConfig as a list (never a shell string).

Machine types and what each can do:

========  =========  ==============  =================================================
machine   bus        device hotplug  notes
========  =========  ==============  =================================================
q35       PCIe       yes             pci-bridge with SHPC for block/net hot-plug
pc        PCI        yes             ACPI hot-plug on the bridge
microvm   virtio-mmio  no            fastest boot; no PCI, so no device hot-plug
========  =========  ==============  =================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from virtcontainers.config import HypervisorConfig, Param, serialize_params
from virtcontainers.config.defaults import (
    GUEST_KERNEL_PARAMS,
    NVDIMM_KERNEL_ROOT_PARAMS,
    VIRTIO_BLK_KERNEL_ROOT_PARAMS,
    BlockDriver,
)
from virtcontainers.devices import NetDevice, UserNetDevice
from virtcontainers.drivers._runpaths import InRunDir, RunPaths
from virtcontainers.errors import ConfigError

__all__ = [
    "blk_argv",
    "net_argv",
    "AGENT_PORT_NAME",
    "BRIDGE_SLOTS",
    "DEFAULT_MEM_SLOTS",
    "MACHINE_TYPES",
    "TEMPLATE_RAM_ID",
    "QemuPaths",
    "build_argv",
    "kernel_params",
    "machine_type",
    "opt",
]

MACHINE_TYPES = ("q35", "pc", "microvm")
PCI_MACHINES = ("q35", "pc")
#: The guest agent finds its virtio-serial port by this name.
AGENT_PORT_NAME = "vc.agent"
#: The memory backend of a template VM and its clones.
TEMPLATE_RAM_ID = "ram0"
#: Kata's build default for memory slots when the config leaves it at 0.
DEFAULT_MEM_SLOTS = 10
#: Slots 1..30 of each bridge take hot-plugged devices (0 is reserved, 31 is not hot-pluggable
#: on every machine).
BRIDGE_SLOTS = range(1, 31)

# The reference's kernel parameters for QEMU on amd64, minus ``console=hvc0`` (chosen below)
# and ``pci=lastbus=0`` (it hides devices behind our PCI bridges from the boot scan).
_KERNEL_PARAMS = (
    Param("tsc", "reliable"),
    Param("no_timer_check"),
    Param("rcupdate.rcu_expedited", "1"),
    Param("i8042.direct", "1"),
    Param("i8042.dumbkbd", "1"),
    Param("i8042.nopnp", "1"),
    Param("i8042.noaux", "1"),
    *GUEST_KERNEL_PARAMS,
    Param("panic", "1"),
)


@dataclass(frozen=True)
class QemuPaths(RunPaths):
    """Where one VM's host-side files live (all inside its 0700 run dir)."""

    qmp = InRunDir("qmp.sock")
    agent = InRunDir("agent.sock")
    pidfile = InRunDir("qemu.pid")
    vmm_log = InRunDir("qemu.log")

    def sockets(self) -> tuple[Path, ...]:
        return (self.qmp, self.console, self.agent)


def kernel_params(
    cfg: HypervisorConfig, console: str, root_on_nvdimm: bool, *, agent_vsock: bool = False
) -> list[str]:
    """The guest kernel command line: reference defaults, root, console, debug, the agent's
    transport (``vc.agent=vsock`` with a vhost-vsock device; the virtio-serial port is the
    agent's default), user params last."""
    params = list(_KERNEL_PARAMS)
    if cfg.image_asset_path() and not cfg.initrd_asset_path():
        params += NVDIMM_KERNEL_ROOT_PARAMS if root_on_nvdimm else VIRTIO_BLK_KERNEL_ROOT_PARAMS
    params.append(Param("console", console))
    params += [Param("debug")] if cfg.debugging.debug else [Param("quiet")]
    if agent_vsock:
        params.append(Param("vc.agent", "vsock"))
    params += cfg.boot.kernel_params
    return serialize_params(params, "=")


def opt(value: object) -> str:
    """``value`` for a comma-separated QEMU option (``-drive file=…``, ``-chardev path=…``).

    QEMU's option parser ends a value at a comma unless it is doubled, so a path such as
    ``/tmp/a,readonly=off`` would otherwise add an option of its own. Every value we put
    into such a list goes through here.
    """
    return str(value).replace(",", ",,")


def machine_type(cfg: HypervisorConfig) -> str:
    """The configured machine type (q35 by default). Raises ConfigError for an unknown one."""
    machine = cfg.boot.hypervisor_machine_type or "q35"
    if machine not in MACHINE_TYPES:
        raise ConfigError(
            f"unknown machine type {machine!r}",
            field="boot.hypervisor_machine_type",
            allowed=MACHINE_TYPES,
        )
    return machine


def build_argv(
    cfg: HypervisorConfig,
    *,
    binary: str,
    sandbox_id: str,
    uuid: str,
    paths: QemuPaths,
    accel: str,
    host_memory_mb: int,
    vsock: tuple[int, int] | None = None,
) -> list[str]:
    """The full argv for a validated ``cfg``.

    ``vsock`` is ``(guest CID, vhost fd)``: the agent's channel is then a vhost-vsock device
    on that descriptor (see :mod:`~virtcontainers.drivers.qemu.vsock`) and the guest is told
    ``vc.agent=vsock``; without it the agent uses the virtio-serial port.

    Raises:
        ConfigError: unknown machine type, or an unsupported combination (e.g. a rootfs image
            on microvm with nvdimm).
    """
    machine = machine_type(cfg)
    r = cfg.resources
    pci = machine in PCI_MACHINES
    image = cfg.image_asset_path()
    use_nvdimm = (
        bool(image)
        and not cfg.initrd_asset_path()
        and pci
        and (
            not cfg.boot.disable_image_nvdimm
            or cfg.storage.block_device_driver == BlockDriver.NVDIMM
        )
    )
    # hvc0 needs virtio_console built into the kernel; Debian's is a module, so the serial
    # port (built in everywhere) carries the console unless the user asks for hvc0.
    wants_hvc0 = any(p.key == "console" and p.value == "hvc0" for p in cfg.boot.kernel_params)
    console = "hvc0" if wants_hvc0 else "ttyS0"

    machine_opts = [machine, f"accel={accel}"]
    if use_nvdimm:
        machine_opts.append("nvdimm=on")
    if machine == "microvm":
        machine_opts += ["x-option-roms=off", "pit=off", "pic=off", "rtc=on", "isa-serial=on"]
    if cfg.boot.machine_accelerators:
        machine_opts.append(cfg.boot.machine_accelerators)
    tpl = cfg.template
    templating = tpl.boot_to_be_template or tpl.boot_from_template
    if templating:
        # Guest RAM comes from a file: shared with the file for the template (its pages are
        # the template), private copy-on-write mappings for the clones (QEMU 7.2 syntax).
        machine_opts.append(f"memory-backend={TEMPLATE_RAM_ID}")

    cpu = "host" if accel == "kvm" else "max"
    if cfg.boot.cpu_features:
        cpu += "," + cfg.boot.cpu_features

    slots = r.mem_slots or DEFAULT_MEM_SLOTS
    maxmem = max(host_memory_mb, r.memory_size)
    if use_nvdimm:
        maxmem += _image_mib(image) + r.mem_offset
    memory = f"{r.memory_size}M"
    if pci:
        memory += f",slots={slots},maxmem={maxmem}M"

    argv = [
        binary,
        "-name", f"sandbox-{opt(sandbox_id)}",
        "-uuid", uuid,
        "-machine", ",".join(machine_opts),
        "-cpu", cpu,
        "-m", memory,
        "-smp", f"{r.num_vcpus},cores=1,threads=1,sockets={r.default_max_vcpus},"
        f"maxcpus={r.default_max_vcpus}",
        # Console first: wait=on keeps the guest from running until the watcher is connected,
        # so not a byte of the boot log is dropped.
        "-chardev", f"socket,id=console,path={opt(paths.console)},server=on,wait=on",
        "-chardev", f"socket,id=qmp,path={opt(paths.qmp)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=agent,path={opt(paths.agent)},server=on,wait=off",
        "-pidfile", str(paths.pidfile),
        "-no-reboot",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]  # fmt: skip
    virtio = "pci" if pci else "device"
    argv += ["-device", f"virtio-serial-{virtio},id=vcserial"]
    if console == "hvc0":
        argv += ["-device", "virtconsole,bus=vcserial.0,chardev=console,id=console0"]
    else:
        argv += ["-serial", "chardev:console"]
    argv += [
        "-device",
        f"virtserialport,bus=vcserial.0,chardev=agent,name={AGENT_PORT_NAME},id=agent0",
    ]
    if vsock is not None:
        cid, vhostfd = vsock
        argv += ["-device", f"vhost-vsock-{virtio},id=vsock0,guest-cid={cid},vhostfd={vhostfd}"]
    if pci:
        bus = "pcie.0" if machine == "q35" else "pci.0"
        for i in range(cfg.devices.default_bridges):
            # SHPC lets q35 guests hot-plug behind a conventional bridge; pc uses ACPI.
            shpc = "on" if machine == "q35" else "off"
            argv += [
                "-device",
                f"pci-bridge,bus={bus},id=pci-bridge-{i},chassis_nr={i + 1},shpc={shpc},"
                f"addr={i + 2:#x}",
            ]
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
        rng = cfg.boot.entropy_source or "/dev/urandom"
        argv += ["-object", f"rng-random,id=rng0,filename={opt(rng)}"]
        argv += ["-device", "virtio-rng-pci,rng=rng0"]
    if templating:
        share = "on" if tpl.boot_to_be_template else "off"
        argv += [
            "-object",
            f"memory-backend-file,id={TEMPLATE_RAM_ID},size={r.memory_size}M,"
            f"mem-path={opt(tpl.memory_path)},share={share}",
        ]
    if tpl.boot_from_template:
        # Wait for ``migrate-incoming`` (the device state) instead of booting.
        argv += ["-incoming", "defer"]
    if cfg.resources.mem_prealloc:
        argv += ["-mem-prealloc"]
    if cfg.boot.firmware_path or cfg.firmware_asset_path():
        argv += ["-bios", cfg.firmware_asset_path()]
    argv += ["-kernel", cfg.kernel_asset_path()]
    initrd = cfg.initrd_asset_path()
    if initrd:
        argv += ["-initrd", initrd]
    elif use_nvdimm:
        argv += [
            "-object",
            f"memory-backend-file,id=mem0,mem-path={opt(image)},size={_image_mib(image)}M,readonly=on",
            "-device", "nvdimm,id=nv0,memdev=mem0,unarmed=on",
        ]  # fmt: skip
    else:
        argv += blk_argv("image", image, virtio, read_only=True)
    params = kernel_params(cfg, console, use_nvdimm, agent_vsock=vsock is not None)
    argv += ["-append", " ".join(params)]
    argv += serialize_params(cfg.boot.hypervisor_params, "")
    return argv


def blk_argv(
    node: str, file: str, virtio: str, *, fmt: str = "raw", read_only: bool, device_id: str = ""
) -> list[str]:
    """``-drive`` (no interface of its own) on ``file`` as block node ``node``, and the
    virtio-blk front-end that shows it to the guest (with ``device_id``, its ``id``)."""
    ro = ",readonly=on" if read_only else ""
    dev_id = f",id={opt(device_id)}" if device_id else ""
    return [
        "-drive", f"id={opt(node)},file={opt(file)},format={opt(fmt)},if=none{ro}",
        "-device", f"virtio-blk-{virtio},drive={opt(node)}{dev_id}",
    ]  # fmt: skip


def net_argv(dev: NetDevice | UserNetDevice, virtio: str) -> list[str]:
    """``-netdev`` + ``-device`` for a cold-plugged NIC: a tap (opened by name, so QEMU must
    run in the tap's network namespace) or slirp user-mode NAT with its port forwards."""
    i, mac = opt(dev.id), opt(dev.mac)
    nd = f"netdev-{i}"
    match dev:
        case NetDevice():
            backend = f"tap,id={nd},ifname={opt(dev.tap_name)},script=no,downscript=no"
        case UserNetDevice():
            opts = [
                f"user,id={nd}", f"net={opt(dev.network)}", f"host={opt(dev.gateway)}",
                f"dns={opt(dev.dns)}", f"dhcpstart={opt(dev.guest_address)}", "ipv6=off",
            ]  # fmt: skip
            if dev.restrict:
                opts.append("restrict=on")
            opts += [
                f"hostfwd={opt(f.protocol)}:{opt(f.host_ip)}:{f.host_port}-"
                f"{opt(dev.guest_address)}:{f.guest_port}"
                for f in dev.forwards
            ]
            backend = ",".join(opts)
    # romfile= : no iPXE option ROM; we boot a kernel directly, and it saves a file lookup.
    rom = ",romfile=" if virtio == "pci" else ""
    return [
        "-netdev", backend,
        "-device", f"virtio-net-{virtio},netdev={nd},mac={mac},id={i}{rom}",
    ]  # fmt: skip


def _image_mib(path: str) -> int:
    try:
        size = Path(path).stat().st_size
    except OSError:
        return 0
    return -(-size // (1 << 20))
