"""Host probes: /proc parsing, the KVM verdict from injected facts, binaries, the report."""

from __future__ import annotations

import errno
import json
import logging
import stat
import sys
from pathlib import Path

import pytest

from virtcontainers import host
from virtcontainers.errors import VirtContainersError
from virtcontainers.host import (
    BinaryInfo,
    KvmFacts,
    KvmState,
    KvmStatus,
    VcpuOutcome,
    VcpuRun,
    classify_kvm,
    find_binary,
    host_memory_kib,
    hypervisor_verdicts,
    running_on_vmm,
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- meminfo


def test_meminfo_reads_memtotal(tmp_path: Path) -> None:
    meminfo = write(tmp_path, "meminfo", "MemTotal:       24684084 kB\nMemFree: 1 kB\n")
    assert host_memory_kib(meminfo) == 24684084


@pytest.mark.parametrize(
    "bad_line",
    [
        "MemTotal:",
        "MemTotal: 123",
        "MemTotal: 123 MB",
        "MemTotal: abc kB",
        "MemTotal: -5 kB",
        "MemTotal 123 kB",
        "memtotal: 123 kB",
        "",
    ],
)
def test_meminfo_skips_malformed_lines(tmp_path: Path, bad_line: str) -> None:
    meminfo = write(tmp_path, "meminfo", f"{bad_line}\nMemTotal: 2048 kB\n")
    assert host_memory_kib(meminfo) == 2048


def test_meminfo_without_memtotal_fails(tmp_path: Path) -> None:
    meminfo = write(tmp_path, "meminfo", "MemFree: 1 kB\nMemTotal: lots kB\n")
    with pytest.raises(VirtContainersError, match="unable to get MemTotal"):
        host_memory_kib(meminfo)


def test_meminfo_unreadable_fails(tmp_path: Path) -> None:
    with pytest.raises(VirtContainersError, match="cannot read"):
        host_memory_kib(tmp_path / "missing")


def test_meminfo_of_this_host_is_positive() -> None:
    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo")
    assert host_memory_kib() > 0


# --------------------------------------------------------------------------- cpuinfo

FLAGS_VM = "flags\t\t: fpu vme lm sse4_1 hypervisor avx\n"
FLAGS_METAL = "flags\t\t: fpu vme lm sse4_1 vmx avx\n"


def test_hypervisor_flag_means_vmm(tmp_path: Path) -> None:
    cpuinfo = write(tmp_path, "cpuinfo", "processor\t: 0\n" + FLAGS_VM)
    assert running_on_vmm(cpuinfo, machine="x86_64") is True


def test_no_hypervisor_flag_means_bare_metal(tmp_path: Path) -> None:
    cpuinfo = write(tmp_path, "cpuinfo", "processor\t: 0\n" + FLAGS_METAL)
    assert running_on_vmm(cpuinfo, machine="x86_64") is False


def test_flags_colon_glued_to_name(tmp_path: Path) -> None:
    cpuinfo = write(tmp_path, "cpuinfo", "flags: fpu hypervisor\n")
    assert running_on_vmm(cpuinfo, machine="x86_64") is True


def test_first_flags_line_decides(tmp_path: Path) -> None:
    cpuinfo = write(tmp_path, "cpuinfo", FLAGS_METAL + FLAGS_VM)
    assert running_on_vmm(cpuinfo, machine="x86_64") is False


def test_vmx_flags_line_is_not_the_flags_line(tmp_path: Path) -> None:
    cpuinfo = write(tmp_path, "cpuinfo", "vmx flags\t: vnmi ept hypervisor\n" + FLAGS_METAL)
    assert running_on_vmm(cpuinfo, machine="x86_64") is False


def test_no_flags_line_fails(tmp_path: Path) -> None:
    cpuinfo = write(tmp_path, "cpuinfo", "processor\t: 0\nflags\n")
    with pytest.raises(VirtContainersError, match="couldn't find 'flags'"):
        running_on_vmm(cpuinfo, machine="x86_64")


def test_unreadable_cpuinfo_fails(tmp_path: Path) -> None:
    with pytest.raises(VirtContainersError, match="cannot read"):
        running_on_vmm(tmp_path / "missing", machine="x86_64")


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", "s390x"])
def test_unknown_on_arches_without_the_flag(tmp_path: Path, machine: str) -> None:
    # The file is not even read there.
    assert running_on_vmm(tmp_path / "missing", machine=machine) is None


def test_cpu_flags(tmp_path: Path) -> None:
    cpuinfo = write(tmp_path, "cpuinfo", FLAGS_VM)
    assert host.cpu_flags(cpuinfo) == {
        "vmx": False,
        "svm": False,
        "lm": True,
        "sse4_1": True,
        "hypervisor": True,
    }
    assert host.cpu_flags(write(tmp_path, "empty", "processor: 0\n")) == {}


def test_kernel_modules_from_sys_module(tmp_path: Path) -> None:
    (tmp_path / "kvm").mkdir()
    (tmp_path / "vhost_net").mkdir()
    assert host.kernel_modules(["kvm", "kvm_intel", "vhost_net"], tmp_path) == {
        "kvm": True,
        "kvm_intel": False,
        "vhost_net": True,
    }


# --------------------------------------------------------------------------- KVM verdict


def ran(ns: float) -> VcpuRun:
    return VcpuRun(VcpuOutcome.RAN, ns_per_iteration=ns)


def test_kvm_absent() -> None:
    status = classify_kvm(KvmFacts(device_present=False))
    assert status.state is KvmState.ABSENT
    assert not status.usable


@pytest.mark.parametrize("err", [errno.EACCES, errno.EPERM])
def test_kvm_no_access(err: int) -> None:
    status = classify_kvm(KvmFacts(device_present=True, open_errno=err))
    assert status.state is KvmState.NO_ACCESS
    assert "kvm" in status.detail


def test_kvm_node_without_driver_is_absent() -> None:
    status = classify_kvm(KvmFacts(device_present=True, open_errno=errno.ENXIO))
    assert status.state is KvmState.ABSENT


def test_kvm_create_vm_fails() -> None:
    facts = KvmFacts(device_present=True, api_version=12, create_vm_error="Device busy")
    status = classify_kvm(facts)
    assert status.state is KvmState.CREATE_VM_FAILS
    assert "Device busy" in status.detail


def test_kvm_wrong_api_version() -> None:
    status = classify_kvm(KvmFacts(device_present=True, api_version=11))
    assert status.state is KvmState.CREATE_VM_FAILS


def test_kvm_native_speed_is_usable() -> None:
    status = classify_kvm(KvmFacts(device_present=True, api_version=12, vcpu=ran(0.4)))
    assert status.state is KvmState.USABLE
    assert status.usable
    assert status.ns_per_iteration == pytest.approx(0.4)


def test_kvm_threshold_is_inclusive() -> None:
    limit = host.NATIVE_NS_PER_ITERATION_MAX
    facts = KvmFacts(device_present=True, api_version=12, vcpu=ran(limit))
    assert classify_kvm(facts).usable


def test_kvm_emulated_speed_is_not_usable() -> None:
    # What the PVM build machine measures: ~1 us per iteration.
    facts = KvmFacts(device_present=True, api_version=12, vcpu=ran(1050.0), pvm_module=True)
    status = classify_kvm(facts)
    assert status.state is KvmState.PRESENT_NOT_USABLE
    assert "present but not usable for ordinary guests" in status.detail
    assert "PVM" in status.detail


def test_pvm_hint_only_with_the_module() -> None:
    facts = KvmFacts(device_present=True, api_version=12, vcpu=ran(1050.0))
    assert "PVM" not in classify_kvm(facts).detail


@pytest.mark.parametrize(
    "run",
    [
        VcpuRun(VcpuOutcome.TIMEOUT, detail="killed after 5 s"),
        VcpuRun(VcpuOutcome.SETUP_FAILED, detail="Invalid argument (errno 22)"),
        VcpuRun(VcpuOutcome.BAD_EXIT, detail="unexpected KVM exit FAIL_ENTRY"),
        VcpuRun(VcpuOutcome.RAN, ns_per_iteration=None),
        None,
    ],
)
def test_vcpu_failures_are_not_usable(run: VcpuRun | None) -> None:
    status = classify_kvm(KvmFacts(device_present=True, api_version=12, vcpu=run))
    assert status.state is KvmState.PRESENT_NOT_USABLE
    if run is not None and run.detail:
        assert run.detail in status.detail


def test_probe_program_encodes_the_count_and_ends_in_hlt() -> None:
    code = host._probe_program(200_000)
    assert code[0] == 0xB9
    assert int.from_bytes(code[1:5], "little") == 200_000
    assert code.endswith(b"\xe6\xe9\xf4")  # out 0xE9, al; hlt


def test_probe_kvm_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []

    def gather(timeout: float) -> KvmFacts:
        calls.append(timeout)
        return KvmFacts(device_present=False)

    monkeypatch.setattr(host, "_gather_kvm_facts", gather)
    monkeypatch.setattr(host, "_kvm_cache", None)
    first = host.probe_kvm(1.0)
    assert host.probe_kvm(1.0) is first
    assert calls == [1.0]
    host.probe_kvm(2.0, refresh=True)
    assert calls == [1.0, 2.0]


@pytest.mark.parametrize(
    ("state", "expected"),
    [(KvmState.USABLE, "kvm"), (KvmState.PRESENT_NOT_USABLE, "tcg"), (KvmState.ABSENT, "tcg")],
)
def test_accelerator(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    state: KvmState,
    expected: str,
) -> None:
    monkeypatch.setenv("VC_RUN_ROOT", str(tmp_path))
    monkeypatch.setattr(host, "probe_kvm", lambda: KvmStatus(state, "because"))
    monkeypatch.setattr(host, "_tcg_warned", False)
    with caplog.at_level(logging.WARNING, logger="virtcontainers.host"):
        assert host.accelerator() == expected
        assert host.accelerator() == expected
    warnings = [r for r in caplog.records if "falling back to TCG" in r.getMessage()]
    assert len(warnings) == (0 if expected == "kvm" else 1)


def test_accelerator_remembers_the_verdict_for_this_boot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VC_RUN_ROOT", str(tmp_path))
    calls: list[int] = []

    def probe() -> KvmStatus:
        calls.append(1)
        return KvmStatus(KvmState.PRESENT_NOT_USABLE, "emulated", 1100.0)

    monkeypatch.setattr(host, "probe_kvm", probe)
    assert host.accelerator() == "tcg"
    assert host.accelerator() == "tcg"
    assert len(calls) == 1
    cache = tmp_path / "kvm-probe.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    doc = json.loads(cache.read_text())
    doc["boot_id"] = "another-boot"
    cache.write_text(json.dumps(doc))
    assert host.accelerator() == "tcg"
    assert len(calls) == 2


# --------------------------------------------------------------------------- vCPU child


def fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_vcpu_child_result_is_parsed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    exe = fake_python(tmp_path, """echo '{"outcome": "ran", "ns_per_iteration": 0.5}'""")
    monkeypatch.setattr(sys, "executable", exe)
    assert host._test_vcpu(5.0) == VcpuRun(VcpuOutcome.RAN, ns_per_iteration=0.5)


def test_vcpu_child_killed_at_deadline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", fake_python(tmp_path, "exec sleep 30"))
    run = host._test_vcpu(0.3)
    assert run.outcome is VcpuOutcome.TIMEOUT


def test_vcpu_child_garbage_is_a_setup_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    exe = fake_python(tmp_path, "echo 'Traceback: boom' >&2; exit 3")
    monkeypatch.setattr(sys, "executable", exe)
    run = host._test_vcpu(5.0)
    assert run.outcome is VcpuOutcome.SETUP_FAILED
    assert "boom" in run.detail


# --------------------------------------------------------------------------- binaries


def make_exe(directory: Path, name: str, body: str = "echo 'Tool version 1.2.3'") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_find_binary_path_then_extra_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    on_path = make_exe(tmp_path / "bin", "tool-b")
    extra = make_exe(tmp_path / "libexec", "tool-a")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    # A name on $PATH wins over an earlier name only found in the extra dirs.
    assert find_binary(["tool-a", "tool-b"], [str(tmp_path / "libexec")]) == on_path
    assert find_binary(["tool-a"], [str(tmp_path / "libexec")]) == extra
    assert find_binary(["nothing"], [str(tmp_path / "libexec")]) is None


def test_find_binary_skips_non_executables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    plain = tmp_path / "bin" / "tool"
    plain.parent.mkdir()
    plain.write_text("not a program")
    monkeypatch.setenv("PATH", str(plain.parent))
    assert find_binary(["tool"], []) is None
    assert find_binary([str(plain)], []) is None
    plain.chmod(0o755)
    assert find_binary([str(plain)], []) == plain


def test_binary_version(tmp_path: Path) -> None:
    good = make_exe(tmp_path, "good", "echo; echo 'QEMU emulator version 7.2.0'; echo more")
    assert host.binary_version(good) == ("QEMU emulator version 7.2.0", None)
    bad = make_exe(tmp_path, "bad", "echo 'unknown option' >&2; exit 2")
    version, error = host.binary_version(bad)
    assert version is None
    assert error is not None
    assert "unknown option" in error
    slow = make_exe(tmp_path, "slow", "exec sleep 30")
    version, error = host.binary_version(slow, timeout=0.3)
    assert version is None
    assert error is not None
    assert "did not answer" in error


def test_hypervisor_binaries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    make_exe(tmp_path, "firecracker", "echo 'Firecracker v1.7.0'")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(host, "EXTRA_BINARY_DIRS", ())
    found = host.hypervisor_binaries(
        {"firecracker": ("firecracker",), "acrn-dm": ("acrn-dm",)}, timeout=5.0
    )
    assert found["firecracker"].version == "Firecracker v1.7.0"
    assert found["acrn-dm"].path is None


# --------------------------------------------------------------------------- verdicts

USABLE = KvmStatus(KvmState.USABLE, "ok", 0.5)
NOT_USABLE = KvmStatus(KvmState.PRESENT_NOT_USABLE, "emulated", 1000.0)
ALL_TOOLS = ("qemu", "firecracker", "jailer", "cloud-hypervisor", "acrn-dm", "acrnctl")


def binaries(*present: str) -> dict[str, BinaryInfo]:
    return {
        t: BinaryInfo(t, Path(f"/usr/bin/{t}") if t in present else None, "v1") for t in ALL_TOOLS
    }


def test_qemu_falls_back_to_tcg() -> None:
    verdicts = hypervisor_verdicts(NOT_USABLE, binaries("qemu", "firecracker"), {})
    assert verdicts["qemu"].can_run
    assert verdicts["qemu"].accelerator == "tcg"
    assert not verdicts["firecracker"].can_run
    assert "needs usable KVM" in verdicts["firecracker"].reason


def test_everything_with_kvm() -> None:
    devices = {"/dev/acrn_hsm": True}
    verdicts = hypervisor_verdicts(USABLE, binaries(*ALL_TOOLS), devices)
    assert {k: (v.can_run, v.accelerator) for k, v in verdicts.items()} == {
        "qemu": (True, "kvm"),
        "firecracker": (True, "kvm"),
        "clh": (True, "kvm"),
        "acrn": (True, "acrn"),
    }


def test_missing_binaries_are_named() -> None:
    verdicts = hypervisor_verdicts(USABLE, binaries(), {})
    assert not any(v.can_run for v in verdicts.values())
    assert "qemu binary not found" in verdicts["qemu"].reason
    assert "cloud-hypervisor binary not found" in verdicts["clh"].reason


def test_acrn_needs_a_service_vm() -> None:
    verdicts = hypervisor_verdicts(USABLE, binaries("acrn-dm", "acrnctl"), {})
    assert not verdicts["acrn"].can_run
    assert "service VM" in verdicts["acrn"].reason


def test_broken_binary_cannot_run() -> None:
    bins = binaries()
    bins["qemu"] = BinaryInfo("qemu", Path("/usr/bin/qemu"), None, "'--version' exited with 1")
    assert not hypervisor_verdicts(USABLE, bins, {})["qemu"].can_run


def test_report_to_dict_is_json() -> None:
    report = host.HostReport(
        arch="x86_64",
        kernel="6.1",
        memory_kib=1024,
        running_on_vmm=None,
        cpu_flags={"lm": True},
        modules={"kvm": False},
        devices={"/dev/kvm": False},
        kvm=NOT_USABLE,
        binaries=binaries("qemu"),
        hypervisors=hypervisor_verdicts(NOT_USABLE, binaries("qemu"), {}),
    )
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["kvm"]["state"] == "present-not-usable"
    assert doc["hypervisors"]["qemu"]["accelerator"] == "tcg"
    assert doc["binaries"]["qemu"]["path"] == "/usr/bin/qemu"
    assert doc["any_can_run"] is True
