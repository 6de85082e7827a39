"""``vc check``: can this host run a VM sandbox, and with which hypervisor."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from virtcontainers.host import HostReport, KvmState, host_report

_YES = "[green]yes[/]"
_NO = "[red]no[/]"
_OPTIONAL_NO = "[yellow]no[/]"
_UNKNOWN = "[yellow]unknown[/]"


def _yes_no(value: bool | None, *, optional: bool = False) -> str:
    if value is None:
        return _UNKNOWN
    if value:
        return _YES
    return _OPTIONAL_NO if optional else _NO


def _host_table(report: HostReport) -> Table:
    flags = report.cpu_flags
    mods = report.modules
    devs = report.devices
    table = Table(title="Host", title_justify="left", show_lines=False)
    table.add_column("Check", no_wrap=True)
    table.add_column("OK", no_wrap=True)
    table.add_column("Details")

    table.add_row("Architecture", _YES, escape(f"{report.arch}, kernel {report.kernel}"))
    memory = (
        f"{report.memory_kib / 1024 / 1024:.1f} GiB ({report.memory_kib} KiB)"
        if report.memory_kib is not None
        else "MemTotal unreadable"
    )
    table.add_row("Host memory", _yes_no(report.memory_kib is not None), memory)
    table.add_row(
        "Running inside a VM",
        _yes_no(report.running_on_vmm) if report.running_on_vmm is not None else _UNKNOWN,
        "cpuinfo 'hypervisor' flag" if report.running_on_vmm is not None else "not knowable here",
    )
    virt = [f for f in ("vmx", "svm") if flags.get(f)]
    table.add_row(
        "CPU virtualization",
        _yes_no(bool(virt)),
        f"flag {virt[0]}" if virt else "no vmx/svm flag: no hardware virtualization visible",
    )
    needed = [f for f in ("lm", "sse4_1") if flags.get(f)]
    table.add_row("CPU lm, sse4_1", _yes_no(len(needed) == 2), ", ".join(needed) or "missing")
    loaded = [m for m in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm") if mods.get(m)]
    table.add_row("KVM modules", _yes_no(bool(loaded)), ", ".join(loaded) or "none loaded")

    kvm = report.kvm
    kvm_ok = {
        KvmState.USABLE: _YES,
        KvmState.PRESENT_NOT_USABLE: "[yellow]no[/]",
    }.get(kvm.state, _NO)
    table.add_row("KVM", kvm_ok, escape(f"{kvm.state.value}: {kvm.detail}"))

    vhost_net = bool(devs.get("/dev/vhost-net"))
    table.add_row(
        "vhost-net",
        _yes_no(vhost_net, optional=True),
        "/dev/vhost-net" if vhost_net else "no /dev/vhost-net: QEMU networking without vhost",
    )
    vsock = bool(devs.get("/dev/vhost-vsock"))
    table.add_row(
        "vhost-vsock",
        _yes_no(vsock, optional=True),
        "/dev/vhost-vsock"
        if vsock
        else "no /dev/vhost-vsock: the QEMU agent channel uses virtio-serial",
    )
    tun = bool(devs.get("/dev/net/tun"))
    table.add_row("TUN/TAP", _yes_no(tun, optional=True), "/dev/net/tun")
    for error in report.errors:
        table.add_row("Probe error", _NO, escape(error))
    return table


def _hypervisor_table(report: HostReport) -> Table:
    binary_of = {"qemu": "qemu", "firecracker": "firecracker", "clh": "cloud-hypervisor"}
    binary_of["acrn"] = "acrn-dm"
    table = Table(title="Hypervisors", title_justify="left")
    table.add_column("Driver", no_wrap=True)
    table.add_column("Can run", no_wrap=True)
    table.add_column("Accel", no_wrap=True)
    table.add_column("Why")
    table.add_column("Binary")
    for name, verdict in report.hypervisors.items():
        info = report.binaries.get(binary_of.get(name, name))
        binary = ""
        if info is not None and info.path is not None:
            binary = f"{info.path}\n{info.version or info.error or ''}".strip()
        table.add_row(
            name,
            _yes_no(verdict.can_run),
            verdict.accelerator or "-",
            escape(verdict.reason),
            escape(binary),
        )
    return table


def _summary(report: HostReport) -> str:
    kvm = report.kvm
    if kvm.usable:
        kvm_line = "KVM is usable."
    elif kvm.state is KvmState.PRESENT_NOT_USABLE:
        kvm_line = "KVM is present but not usable for ordinary guests."
    else:
        kvm_line = f"KVM is not available ({kvm.state.value})."
    runnable = [n for n, v in report.hypervisors.items() if v.can_run]
    if not runnable:
        return f"{kvm_line} No hypervisor can run a guest here."
    parts = []
    for name in runnable:
        accel = report.hypervisors[name].accelerator
        parts.append(
            f"{name.upper() if name == 'qemu' else name}/{accel.upper()}" if accel else name
        )
    return f"{kvm_line} Available: {', '.join(parts)}."


@click.command()
@click.option(
    "--json",
    "json_output",
    is_flag=True,
    help="Print the report as one JSON document (for scripts).",
)
@click.option(
    "--kvm-timeout", type=click.FloatRange(min=0.5), default=5.0,
    help="Seconds the KVM test vCPU may run before KVM is declared not usable.",
)  # fmt: skip
def check(json_output: bool, kvm_timeout: float) -> None:
    """Check whether this host can run VM sandboxes, and with which hypervisor.

    Exit code 0 when at least one hypervisor can run a guest here, else 1.

    Host table, one line per check:

    Host memory: MemTotal from /proc/meminfo (the cap for memory hotplug).

    Running inside a VM: the 'hypervisor' cpuinfo flag; nested hosts often lack usable KVM.

    CPU virtualization: vmx (Intel) or svm (AMD), which hardware KVM needs.

    CPU lm, sse4_1: 64-bit mode and SSE4.1, which guest kernels need.

    KVM modules: kvm, kvm_intel, kvm_amd, kvm_pvm, as listed in /sys/module.

    \b
    KVM: the real test, from /dev/kvm up to running a test vCPU. One of:
    absent: no /dev/kvm.
    no-access: no permission to open /dev/kvm.
    create-vm-fails: KVM_CREATE_VM is refused.
    present-not-usable: a VM is created but its vCPU does not run guest code at
    hardware speed (e.g. on a PVM host): ordinary guest kernels hang; QEMU falls back to TCG.
    usable: guests run under KVM.

    vhost-net, vhost-vsock, TUN/TAP: optional; without vhost-vsock QEMU's agent uses
    virtio-serial.

    Hypervisors table, one line per driver: can it run a guest here, with which
    accelerator (kvm, or tcg: QEMU's slower software emulation), why not, and its binary and
    '--version'. QEMU runs with TCG even without usable KVM; Firecracker and Cloud Hypervisor
    need usable KVM; ACRN needs an ACRN service VM (/dev/acrn_hsm or /dev/acrn_vhm).
    """
    report = host_report(kvm_timeout=kvm_timeout)
    if json_output:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        console = Console()
        console.print(_host_table(report))
        console.print(_hypervisor_table(report))
        console.print(escape(_summary(report)), highlight=False)
    sys.exit(0 if report.any_can_run else 1)
