"""What this host can run: memory, CPU flags, KVM, vhost, and the hypervisor binaries.

The reference's host probes (``getHostMemorySizeKb``, ``RunningOnVMM``) plus the checks of
``kata-runtime check``, with one addition the reference lacks: :func:`probe_kvm` does not stop
at "``/dev/kvm`` exists and ``KVM_CREATE_VM`` succeeds". It runs a few instructions on a real
vCPU and times them, because a host can pass every static check and still not run an
ordinary guest (see :class:`KvmState`).

Everything here is synchronous, reads only ``/proc``, ``/sys`` and ``/dev``, and starts
subprocesses only with argv lists and deadlines.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import fcntl
import json
import logging
import mmap
import os
import platform
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from virtcontainers.command import run_captured
from virtcontainers.errors import VirtContainersError
from virtcontainers.fsutil import atomic_write, mkdir_private
from virtcontainers.hypervisor import HypervisorType

__all__ = [
    "BinaryInfo",
    "HostReport",
    "HypervisorVerdict",
    "KvmFacts",
    "KvmState",
    "KvmStatus",
    "VcpuOutcome",
    "VcpuRun",
    "accelerator",
    "classify_kvm",
    "cpu_flags",
    "device_nodes",
    "find_binary",
    "host_memory_kib",
    "host_report",
    "hypervisor_binaries",
    "kernel_modules",
    "probe_kvm",
    "running_on_vmm",
]

log = logging.getLogger(__name__)

PROC_MEMINFO = Path("/proc/meminfo")
PROC_CPUINFO = Path("/proc/cpuinfo")
DEV_KVM = Path("/dev/kvm")

# Architectures where the reference cannot tell whether it runs under a VMM.
_UNKNOWN_VMM_ARCHES = frozenset({"aarch64", "arm64", "ppc64le", "s390x"})


# --------------------------------------------------------------------------- /proc parsing


def _read_text(path: Path) -> str:
    """A /proc file's text. Raises VirtContainersError naming the file when unreadable."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise VirtContainersError(f"cannot read {path}: {exc.strerror or exc}") from exc


def host_memory_kib(meminfo: Path = PROC_MEMINFO) -> int:
    """Total host memory in KiB, from the ``MemTotal:`` line of ``/proc/meminfo``.

    Lines that are not ``MemTotal: <n> kB`` (wrong field count, unit or number) are skipped,
    as in the reference. Raises :class:`VirtContainersError` when the file cannot be read or
    holds no well-formed ``MemTotal`` line.
    """
    for line in _read_text(meminfo).splitlines():
        parts = line.split()
        # Expected: ["MemTotal:", "1234", "kB"]
        if len(parts) < 3 or parts[0] != "MemTotal:" or parts[2] != "kB":
            continue
        # The reference parses an unsigned integer: no sign, no garbage.
        if not parts[1][:1].isdigit():
            continue
        try:
            return int(parts[1], 0)
        except ValueError:
            continue
    raise VirtContainersError(f"unable to get MemTotal from {meminfo}")


def running_on_vmm(cpuinfo: Path = PROC_CPUINFO, machine: str | None = None) -> bool | None:
    """Whether this host is itself a VM, from the ``hypervisor`` flag in ``/proc/cpuinfo``.

    Returns ``None`` ("unknown") on aarch64/ppc64le/s390x, where cpuinfo has no such flag
    (the reference answers ``false`` there and logs that it cannot know). Only the first
    ``flags`` line is read. ``machine`` defaults to :func:`platform.machine`. Raises
    :class:`VirtContainersError` when the file cannot be read or has no ``flags`` line.
    """
    arch = machine if machine is not None else platform.machine()
    if arch in _UNKNOWN_VMM_ARCHES:
        log.info("unable to know if the system is running inside a VM on %s", arch)
        return None
    flags = _first_flags_line(cpuinfo)
    if flags is None:
        raise VirtContainersError(f"couldn't find 'flags' in {cpuinfo}")
    return "hypervisor" in flags


def _first_flags_line(cpuinfo: Path) -> frozenset[str] | None:
    for line in _read_text(cpuinfo).splitlines():
        # Expected: ["flags", ":", ...] or ["flags:", ...]
        fields = line.split()
        if len(fields) < 2 or not fields[0].startswith("flags"):
            continue
        # The first flags line decides; later CPUs repeat it.
        return frozenset(f for f in fields[1:] if f != ":")
    return None


#: CPU flags ``kata-runtime check`` looks at, and ``hypervisor`` (we run inside a VM).
CHECKED_CPU_FLAGS = ("vmx", "svm", "lm", "sse4_1", "hypervisor")


def cpu_flags(cpuinfo: Path = PROC_CPUINFO) -> dict[str, bool]:
    """Presence of :data:`CHECKED_CPU_FLAGS` (empty dict when cpuinfo has no flags line)."""
    try:
        flags = _first_flags_line(cpuinfo)
    except VirtContainersError:
        return {}
    if flags is None:
        return {}
    return {name: name in flags for name in CHECKED_CPU_FLAGS}


#: Kernel modules of interest. ``kvm_pvm`` is not in the reference: it explains a /dev/kvm
#: that cannot run ordinary guests (see :class:`KvmState`).
CHECKED_MODULES = ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm", "vhost", "vhost_net", "vhost_vsock")

#: Device nodes of interest.
CHECKED_DEVICES = (
    "/dev/kvm",
    "/dev/vhost-net",
    "/dev/vhost-vsock",
    "/dev/net/tun",
    "/dev/acrn_hsm",
    "/dev/acrn_vhm",
)


def kernel_modules(
    names: Iterable[str] = CHECKED_MODULES, sys_module: Path = Path("/sys/module")
) -> dict[str, bool]:
    """Which modules are loaded, from ``/sys/module/<name>`` (no ``lsmod``).

    Built-in code shows up there too when it has parameters, which kvm and vhost do.
    """
    return {name: (sys_module / name).is_dir() for name in names}


def device_nodes(paths: Iterable[str] = CHECKED_DEVICES) -> dict[str, bool]:
    """Which device nodes exist."""
    return {p: os.path.exists(p) for p in paths}


# --------------------------------------------------------------------------- KVM


class KvmState(enum.StrEnum):
    """How far KVM gets on this host, worst first.

    ``PRESENT_NOT_USABLE`` is the case a static check misses: ``/dev/kvm`` opens and
    ``KVM_CREATE_VM`` succeeds, but a vCPU does not run guest code at hardware speed. The
    known instance is a host that is itself a PVM guest (``kvm_pvm`` module, no vmx/svm
    flag): its KVM runs PVM-aware guest kernels natively, but anything else goes through
    the instruction emulator, about a thousand times slower, and an ordinary Linux guest
    appears to hang in its decompressor. QEMU must use TCG there.
    """

    ABSENT = "absent"
    NO_ACCESS = "no-access"
    CREATE_VM_FAILS = "create-vm-fails"
    PRESENT_NOT_USABLE = "present-not-usable"
    USABLE = "usable"


class VcpuOutcome(enum.StrEnum):
    """What the test vCPU did."""

    RAN = "ran"  # reached the final OUT + HLT; timing in ``ns_per_iteration``
    TIMEOUT = "timeout"  # the child was still in KVM_RUN at the deadline
    SETUP_FAILED = "setup-failed"  # an ioctl before KVM_RUN failed
    BAD_EXIT = "bad-exit"  # KVM_RUN returned an exit we did not program (fail entry, ...)


@dataclass(frozen=True)
class VcpuRun:
    """The result of running the test program on one vCPU."""

    outcome: VcpuOutcome
    ns_per_iteration: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class KvmFacts:
    """The low-level observations :func:`classify_kvm` decides from.

    Gathered by :func:`probe_kvm`; built by hand in tests.
    """

    device_present: bool
    open_errno: int | None = None
    api_version: int | None = None
    create_vm_error: str | None = None
    vcpu: VcpuRun | None = None
    pvm_module: bool = False


@dataclass(frozen=True)
class KvmStatus:
    """The verdict on KVM, with a sentence a human can act on."""

    state: KvmState
    detail: str
    ns_per_iteration: float | None = None

    @property
    def usable(self) -> bool:
        return self.state is KvmState.USABLE

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "usable": self.usable,
            "detail": self.detail,
            "ns_per_iteration": (
                round(self.ns_per_iteration, 3) if self.ns_per_iteration is not None else None
            ),
        }


# The test program is a counted loop; on hardware virtualization one iteration (dec + jnz)
# takes about a cycle, under the instruction emulator about a microsecond (1.05 us measured
# on the PVM build machine). 50 ns sits 50x above the first and 20x below the second; the
# best of a few runs is used so that a preempted vCPU thread on a busy host does not count.
PROBE_ITERATIONS = 200_000
NATIVE_NS_PER_ITERATION_MAX = 50.0
_PROBE_RUNS = 3
_KVM_API_VERSION = 12
_PROBE_PORT = 0xE9
_PROBE_BYTE = 0x4B  # "K"

_PVM_HINT = (
    " The kvm_pvm module is loaded: this host is a PVM VM, whose KVM runs only PVM-aware"
    " guest kernels."
)


def classify_kvm(facts: KvmFacts) -> KvmStatus:
    """Decide the :class:`KvmStatus` from gathered facts (pure: no I/O)."""
    hint = _PVM_HINT if facts.pvm_module else ""
    if not facts.device_present:
        return KvmStatus(KvmState.ABSENT, "/dev/kvm does not exist (no KVM module loaded).")
    if facts.open_errno is not None:
        reason = os.strerror(facts.open_errno)
        if facts.open_errno in (errno.EACCES, errno.EPERM):
            return KvmStatus(
                KvmState.NO_ACCESS,
                f"/dev/kvm exists but cannot be opened ({reason}): run as root or join the"
                " group owning /dev/kvm (usually 'kvm').",
            )
        return KvmStatus(
            KvmState.ABSENT, f"/dev/kvm exists but has no working driver behind it ({reason})."
        )
    if facts.api_version is not None and facts.api_version != _KVM_API_VERSION:
        return KvmStatus(
            KvmState.CREATE_VM_FAILS,
            f"KVM API version {facts.api_version}, expected {_KVM_API_VERSION}.",
        )
    if facts.create_vm_error is not None:
        return KvmStatus(
            KvmState.CREATE_VM_FAILS,
            f"/dev/kvm opens but KVM_CREATE_VM fails: {facts.create_vm_error}."
            " Hardware virtualization may be disabled in the firmware or taken by another"
            " hypervisor." + hint,
        )
    run = facts.vcpu
    prefix = "KVM is present but not usable for ordinary guests: KVM_CREATE_VM succeeds, but"
    if run is None:
        return KvmStatus(KvmState.PRESENT_NOT_USABLE, f"{prefix} no vCPU was tested.{hint}")
    if run.outcome is VcpuOutcome.TIMEOUT:
        return KvmStatus(
            KvmState.PRESENT_NOT_USABLE,
            f"{prefix} a test vCPU did not finish a {PROBE_ITERATIONS}-iteration loop in time"
            f" ({run.detail}).{hint}",
        )
    if run.outcome is not VcpuOutcome.RAN or run.ns_per_iteration is None:
        return KvmStatus(
            KvmState.PRESENT_NOT_USABLE, f"{prefix} a test vCPU failed: {run.detail}.{hint}"
        )
    speed = run.ns_per_iteration
    if speed > NATIVE_NS_PER_ITERATION_MAX:
        return KvmStatus(
            KvmState.PRESENT_NOT_USABLE,
            f"{prefix} a test vCPU runs guest code at {speed:.0f} ns per loop iteration"
            f" (hardware virtualization: about 1 ns), so guest code is emulated and an"
            f" ordinary kernel effectively hangs at boot.{hint}",
            ns_per_iteration=speed,
        )
    return KvmStatus(
        KvmState.USABLE,
        f"KVM is usable: a test vCPU runs guest code at {speed:.2f} ns per loop iteration.",
        ns_per_iteration=speed,
    )


# ioctl numbers from <linux/kvm.h> (x86_64).
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
_KVM_EXIT_NAMES = {
    0: "UNKNOWN",
    1: "EXCEPTION",
    2: "IO",
    5: "HLT",
    6: "MMIO",
    8: "SHUTDOWN (triple fault)",
    9: "FAIL_ENTRY",
    17: "INTERNAL_ERROR",
}

_SREGS_SIZE = 312
_REGS_SIZE = 144
_SEGMENT = struct.Struct("=QIHBBBBBBBBBx")  # struct kvm_segment, 24 bytes
_GUEST_MEM = 0x200000
_CODE_ADDR = 0x1000


def _probe_program(iterations: int) -> bytes:
    """64-bit guest code: count ``iterations`` down, ``out 0xE9, 'K'``, ``hlt``."""
    return (
        b"\xb9"  # mov ecx, imm32
        + iterations.to_bytes(4, "little")
        + b"\xff\xc9"  # loop: dec ecx
        + b"\x75\xfc"  # jnz loop
        + bytes([0xB0, _PROBE_BYTE])  # mov al, 'K'
        + bytes([0xE6, _PROBE_PORT])  # out 0xE9, al
        + b"\xf4"  # hlt
    )


def _run_vcpu_probe(iterations: int, runs: int) -> dict[str, Any]:
    """Create a VM in long mode, run :func:`_probe_program` and time it (in the child)."""
    kvm = os.open(DEV_KVM, os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    mem = mmap.mmap(
        -1,
        _GUEST_MEM,
        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
    )
    host_addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    region = struct.pack("=IIQQQ", 0, 0, 0, _GUEST_MEM, host_addr)
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
    # Identity-map the first 2 MiB with one large page: PML4 -> PDPT -> PD (PS bit).
    struct.pack_into("=Q", mem, 0x2000, 0x3000 | 0x3)
    struct.pack_into("=Q", mem, 0x3000, 0x4000 | 0x3)
    struct.pack_into("=Q", mem, 0x4000, 0x0 | 0x83)
    code = _probe_program(iterations)
    mem[_CODE_ADDR : _CODE_ADDR + len(code)] = code

    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
    kvm_run = mmap.mmap(vcpu, run_size, flags=mmap.MAP_SHARED)
    sregs = bytearray(_SREGS_SIZE)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    # Segments: cs (64-bit code), then ds, es, fs, gs, ss (flat data).
    _SEGMENT.pack_into(sregs, 0, 0, 0xFFFFFFFF, 0x8, 11, 1, 0, 0, 1, 1, 1, 0, 0)
    for index in range(1, 6):
        _SEGMENT.pack_into(sregs, index * 24, 0, 0xFFFFFFFF, 0x10, 3, 1, 0, 1, 1, 0, 1, 0, 0)
    # After 8 segments and 2 descriptor tables: cr0, cr2, cr3, cr4, cr8, efer.
    # cr0 = PE|MP|ET|NE|WP|AM|PG, cr4 = PAE, efer = LME|LMA.
    struct.pack_into("=QQQQQQ", sregs, 8 * 24 + 2 * 16, 0x80050033, 0, 0x2000, 0x20, 0, 0x500)
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))

    timings: list[float] = []
    for _ in range(runs):
        regs = bytearray(_REGS_SIZE)
        struct.pack_into("=Q", regs, 7 * 8, 0x8000)  # rsp
        struct.pack_into("=Q", regs, 16 * 8, _CODE_ADDR)  # rip
        struct.pack_into("=Q", regs, 17 * 8, 0x2)  # rflags (bit 1 is reserved, always set)
        fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
        saw_out = False
        started = time.perf_counter()
        while True:
            try:
                fcntl.ioctl(vcpu, KVM_RUN, 0)
            except InterruptedError:
                continue
            reason = struct.unpack_from("=I", kvm_run, 8)[0]
            if reason == KVM_EXIT_IO:
                _direction, size, port, _count, offset = struct.unpack_from("=BBHIQ", kvm_run, 32)
                value = kvm_run[offset] if size >= 1 else None
                if port != _PROBE_PORT or value != _PROBE_BYTE:
                    return {"outcome": "bad-exit", "detail": f"unexpected OUT to port {port:#x}"}
                saw_out = True
                continue
            if reason == KVM_EXIT_HLT and saw_out:
                break
            name = _KVM_EXIT_NAMES.get(reason, str(reason))
            return {"outcome": "bad-exit", "detail": f"unexpected KVM exit {name}"}
        timings.append(time.perf_counter() - started)
        if timings[-1] * 1e9 / iterations <= NATIVE_NS_PER_ITERATION_MAX:
            break
    return {"outcome": "ran", "ns_per_iteration": min(timings) * 1e9 / iterations}


def _vcpu_probe_child() -> None:
    """Entry point of the probe child: print one JSON line describing the run."""
    iterations = int(sys.argv[1])
    runs = int(sys.argv[2])
    try:
        result = _run_vcpu_probe(iterations, runs)
    except OSError as exc:
        result = {"outcome": "setup-failed", "detail": f"{exc.strerror or exc} (errno {exc.errno})"}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _test_vcpu(timeout: float) -> VcpuRun:
    """Run the vCPU probe in a child process, killed at the deadline.

    A child, because a vCPU that does not make progress would hold KVM_RUN forever.
    """
    argv = [
        sys.executable,
        "-c",
        "from virtcontainers.host import _vcpu_probe_child; _vcpu_probe_child()",
        str(PROBE_ITERATIONS),
        str(_PROBE_RUNS),
    ]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except OSError as exc:
        return VcpuRun(VcpuOutcome.SETUP_FAILED, detail=f"cannot start the probe: {exc}")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=2.0)
        return VcpuRun(VcpuOutcome.TIMEOUT, detail=f"killed after {timeout:g} s")
    try:
        result = json.loads(out.strip().splitlines()[-1])
        outcome = VcpuOutcome(result["outcome"])
    except (ValueError, IndexError, KeyError):
        tail = (err or out).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return VcpuRun(VcpuOutcome.SETUP_FAILED, detail=f"probe child failed: {tail[0]}")
    ns = result.get("ns_per_iteration")
    return VcpuRun(
        outcome,
        ns_per_iteration=float(ns) if ns is not None else None,
        detail=str(result.get("detail", "")),
    )


def _gather_kvm_facts(timeout: float) -> KvmFacts:
    device = DEV_KVM
    pvm = (Path("/sys/module") / "kvm_pvm").is_dir()
    if not device.exists():
        return KvmFacts(device_present=False, pvm_module=pvm)
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmFacts(device_present=True, open_errno=exc.errno or errno.EIO, pvm_module=pvm)
    try:
        api = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        if api != _KVM_API_VERSION:
            return KvmFacts(device_present=True, api_version=api, pvm_module=pvm)
        try:
            vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        except OSError as exc:
            return KvmFacts(
                device_present=True,
                api_version=api,
                create_vm_error=exc.strerror or str(exc),
                pvm_module=pvm,
            )
        os.close(vm_fd)
    finally:
        os.close(fd)
    return KvmFacts(device_present=True, api_version=api, vcpu=_test_vcpu(timeout), pvm_module=pvm)


_kvm_lock = threading.Lock()
_kvm_cache: KvmStatus | None = None
_tcg_warned = False


def probe_kvm(timeout: float = 5.0, *, refresh: bool = False) -> KvmStatus:
    """Whether KVM can run an ordinary guest here. Cached for the process.

    Steps: ``/dev/kvm`` exists → opens → ``KVM_GET_API_VERSION`` is 12 → ``KVM_CREATE_VM``
    succeeds → a vCPU set up in 64-bit mode runs a counted loop at hardware speed (in a child
    process killed after ``timeout`` seconds). Takes a few milliseconds on a KVM host and
    under a second where the vCPU is emulated (the first call blocks: from async code use
    ``asyncio.to_thread``). Never raises; failures are the verdict.
    """
    global _kvm_cache
    with _kvm_lock:
        if _kvm_cache is None or refresh:
            _kvm_cache = classify_kvm(_gather_kvm_facts(timeout))
            log.debug("KVM probe: %s: %s", _kvm_cache.state, _kvm_cache.detail)
        return _kvm_cache


def _boot_cached_status() -> KvmStatus:
    """probe_kvm(), remembered for this host boot in ``<run root>/kvm-probe.json``.

    The probe costs about a second of CPU where the vCPU is emulated; every ``vc`` command
    would pay it. KVM's usability can't change without a reboot (or a module reload, which
    ``vc check`` always probes afresh), so the verdict is kept per boot id.
    """
    from virtcontainers.persist.store import default_root

    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        root = default_root()
    except (OSError, VirtContainersError):
        return probe_kvm()
    path = root / "kvm-probe.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached = json.loads(path.read_text())
        if cached["boot_id"] == boot_id:
            return KvmStatus(KvmState(cached["state"]), str(cached["detail"]), cached["ns"])
    status = probe_kvm()
    doc = {"boot_id": boot_id, "state": status.state.value, "detail": status.detail,
           "ns": status.ns_per_iteration}  # fmt: skip
    with contextlib.suppress(OSError):
        mkdir_private(root)
        atomic_write(path, json.dumps(doc).encode(), tmp_prefix=".kvm-probe.")
    return status


def accelerator() -> Literal["kvm", "tcg"]:
    """The QEMU accelerator to use: ``kvm`` only when :func:`probe_kvm` says USABLE.

    Logs a warning (once per process) when falling back to TCG.
    """
    global _tcg_warned
    status = _boot_cached_status()
    if status.usable:
        return "kvm"
    if not _tcg_warned:
        _tcg_warned = True
        log.warning("falling back to TCG (software emulation, much slower): %s", status.detail)
    return "tcg"


# --------------------------------------------------------------------------- binaries

#: Where distributions and Kata's static tarball put the VMMs, searched after ``$PATH``.
EXTRA_BINARY_DIRS = ("/usr/libexec", "/usr/local/bin", "/opt/kata/bin")

#: Binary names per tool, first found wins. ``qemu-kvm`` is RHEL's name in /usr/libexec.
BINARY_NAMES: Mapping[str, tuple[str, ...]] = {
    "qemu": ("qemu-system-x86_64", "qemu-kvm"),
    "firecracker": ("firecracker",),
    "jailer": ("jailer",),
    "cloud-hypervisor": ("cloud-hypervisor",),
    "acrn-dm": ("acrn-dm",),
    "acrnctl": ("acrnctl",),
}


def find_binary(names: Iterable[str], extra_dirs: Iterable[str] = EXTRA_BINARY_DIRS) -> Path | None:
    """The first executable among ``names``, on ``$PATH`` and then in ``extra_dirs``.

    A name with a slash is taken as a path.
    """
    names = list(names)
    dirs = list(extra_dirs)
    for name in names:
        if "/" in name:
            if os.path.isfile(name) and os.access(name, os.X_OK):
                return Path(name)
            continue
        found = shutil.which(name)
        if found:
            return Path(found)
    for directory in dirs:
        for name in names:
            found = shutil.which(name, path=directory)
            if found:
                return Path(found)
    return None


@dataclass(frozen=True)
class BinaryInfo:
    """A VMM binary: where it is and what ``--version`` says."""

    name: str
    path: Path | None
    version: str | None = None
    error: str | None = None

    @property
    def found(self) -> bool:
        return self.path is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "found": self.found,
            "path": str(self.path) if self.path else None,
            "version": self.version,
            "error": self.error,
        }


def binary_version(path: Path, timeout: float = 5.0) -> tuple[str | None, str | None]:
    """``(first line of '<path> --version', error)``; exactly one of them is None."""
    try:
        proc = run_captured([str(path), "--version"], timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"'--version' did not answer within {timeout:g} s"
    except OSError as exc:
        return None, f"cannot run: {exc.strerror or exc}"
    lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode != 0:
        tail = lines[-1] if lines else ""
        return None, f"'--version' exited with {proc.returncode}: {tail}".rstrip(": ")
    if not lines:
        return None, "'--version' printed nothing"
    return lines[0], None


def hypervisor_binaries(
    names: Mapping[str, Iterable[str]] = BINARY_NAMES, timeout: float = 5.0
) -> dict[str, BinaryInfo]:
    """Every tool of :data:`BINARY_NAMES`: path and version, or why not."""
    result: dict[str, BinaryInfo] = {}
    for tool, candidates in names.items():
        path = find_binary(candidates)
        if path is None:
            result[tool] = BinaryInfo(tool, None, error="not found")
            continue
        version, error = binary_version(path, timeout)
        result[tool] = BinaryInfo(tool, path, version, error)
    return result


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class HypervisorVerdict:
    """Can this driver run a guest here, and why (not)."""

    can_run: bool
    reason: str
    accelerator: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HostReport:
    """Everything ``vc check`` shows. :meth:`to_dict` is the ``--json`` document."""

    arch: str
    kernel: str
    memory_kib: int | None
    running_on_vmm: bool | None
    cpu_flags: dict[str, bool]
    modules: dict[str, bool]
    devices: dict[str, bool]
    kvm: KvmStatus
    binaries: dict[str, BinaryInfo]
    hypervisors: dict[str, HypervisorVerdict]
    errors: list[str] = field(default_factory=list)

    @property
    def any_can_run(self) -> bool:
        return any(v.can_run for v in self.hypervisors.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "kernel": self.kernel,
            "memory_kib": self.memory_kib,
            "running_on_vmm": self.running_on_vmm,
            "cpu_flags": dict(self.cpu_flags),
            "modules": dict(self.modules),
            "devices": dict(self.devices),
            "kvm": self.kvm.to_dict(),
            "binaries": {k: b.to_dict() for k, b in self.binaries.items()},
            "hypervisors": {k: v.to_dict() for k, v in self.hypervisors.items()},
            "any_can_run": self.any_can_run,
            "errors": list(self.errors),
        }


def hypervisor_verdicts(
    kvm: KvmStatus, binaries: Mapping[str, BinaryInfo], devices: Mapping[str, bool]
) -> dict[str, HypervisorVerdict]:
    """Per driver: can it run a guest, given KVM, the binaries and the device nodes (pure)."""

    def missing(tool: str) -> str | None:
        info = binaries.get(tool)
        if info is None or info.path is None:
            return f"{tool} binary not found"
        if info.error is not None:
            return f"{tool} at {info.path} is broken: {info.error}"
        return None

    no_kvm = f"needs usable KVM (KVM is {kvm.state.value})"
    verdicts: dict[str, HypervisorVerdict] = {}

    problem = missing("qemu")
    if problem:
        verdicts[HypervisorType.QEMU] = HypervisorVerdict(False, problem)
    elif kvm.usable:
        verdicts[HypervisorType.QEMU] = HypervisorVerdict(True, "QEMU with KVM", "kvm")
    else:
        verdicts[HypervisorType.QEMU] = HypervisorVerdict(
            True, "QEMU with TCG (software emulation; KVM not usable)", "tcg"
        )

    kvm_only = (
        (HypervisorType.FIRECRACKER, "firecracker"),
        (HypervisorType.CLH, "cloud-hypervisor"),
    )
    for kind, tool in kvm_only:
        problems = [p for p in (missing(tool), None if kvm.usable else no_kvm) if p]
        if problems:
            verdicts[kind] = HypervisorVerdict(False, "; ".join(problems))
        else:
            verdicts[kind] = HypervisorVerdict(True, f"{tool} with KVM", "kvm")

    # ACRN is a type-1 hypervisor: acrn-dm drives it through the service VM's HSM device
    # (/dev/acrn_hsm, /dev/acrn_vhm before Linux 5.12), not through KVM.
    problems = [p for p in (missing("acrn-dm"), missing("acrnctl")) if p]
    if not (devices.get("/dev/acrn_hsm") or devices.get("/dev/acrn_vhm")):
        problems.append("not an ACRN service VM (no /dev/acrn_hsm or /dev/acrn_vhm)")
    if problems:
        verdicts[HypervisorType.ACRN] = HypervisorVerdict(False, "; ".join(problems))
    else:
        verdicts[HypervisorType.ACRN] = HypervisorVerdict(True, "ACRN service VM", "acrn")
    return {str(k): v for k, v in verdicts.items()}


def host_report(kvm_timeout: float = 5.0) -> HostReport:
    """Probe everything. Never raises: unreadable probes land in ``errors``."""
    errors: list[str] = []
    memory: int | None = None
    vmm: bool | None = None
    try:
        memory = host_memory_kib()
    except VirtContainersError as exc:
        errors.append(str(exc))
    try:
        vmm = running_on_vmm()
    except VirtContainersError as exc:
        errors.append(str(exc))
    kvm = probe_kvm(kvm_timeout)
    binaries = hypervisor_binaries()
    devices = device_nodes()
    uname = platform.uname()
    return HostReport(
        arch=uname.machine,
        kernel=uname.release,
        memory_kib=memory,
        running_on_vmm=vmm,
        cpu_flags=cpu_flags(),
        modules=kernel_modules(),
        devices=devices,
        kvm=kvm,
        binaries=binaries,
        hypervisors=hypervisor_verdicts(kvm, binaries, devices),
        errors=errors,
    )
