"""``vc check`` on the real host, asserting only what holds on any host."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from virtcontainers.host import KvmState

VC = Path(sys.executable).parent / "vc"


def run_vc(*args: str) -> subprocess.CompletedProcess[str]:
    if not VC.exists():
        pytest.skip(f"{VC} is not installed (pip install -e .)")
    return subprocess.run(
        [str(VC), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"COLUMNS": "160", "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"},
    )


@pytest.fixture(scope="module")
def report() -> tuple[int, dict[str, Any]]:
    proc = run_vc("check", "--json")
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_json_shape(report: tuple[int, dict[str, Any]]) -> None:
    _code, doc = report
    assert doc["kvm"]["state"] in {s.value for s in KvmState}
    assert set(doc["hypervisors"]) == {"qemu", "firecracker", "clh", "acrn"}
    assert doc["memory_kib"] > 0


def test_exit_code_matches_verdicts(report: tuple[int, dict[str, Any]]) -> None:
    code, doc = report
    assert doc["any_can_run"] == any(v["can_run"] for v in doc["hypervisors"].values())
    assert code == (0 if doc["any_can_run"] else 1)


def test_accelerators_follow_kvm(report: tuple[int, dict[str, Any]]) -> None:
    _code, doc = report
    kvm_usable = doc["kvm"]["state"] == KvmState.USABLE
    assert doc["kvm"]["usable"] == kvm_usable
    for name in ("firecracker", "clh"):
        if doc["hypervisors"][name]["can_run"]:
            assert kvm_usable
    qemu = doc["hypervisors"]["qemu"]
    if qemu["can_run"]:
        assert qemu["accelerator"] == ("kvm" if kvm_usable else "tcg")


def test_qemu_available_when_installed(report: tuple[int, dict[str, Any]]) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    code, doc = report
    assert doc["binaries"]["qemu"]["found"]
    assert doc["binaries"]["qemu"]["version"].startswith("QEMU emulator version")
    assert doc["hypervisors"]["qemu"]["can_run"]
    assert code == 0


def test_human_output(report: tuple[int, dict[str, Any]]) -> None:
    code, doc = report
    proc = run_vc("check")
    assert proc.returncode == code
    assert "Hypervisors" in proc.stdout
    assert doc["kvm"]["state"] in proc.stdout


def test_help_explains_the_kvm_states() -> None:
    proc = run_vc("check", "--help")
    assert proc.returncode == 0
    for state in KvmState:
        assert state.value in proc.stdout
