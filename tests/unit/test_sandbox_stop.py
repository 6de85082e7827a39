"""Sandbox.stop: only a VMM that is gone may be treated as gone (issue 8)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from virtcontainers.config import HypervisorConfig
from virtcontainers.errors import StateError
from virtcontainers.hypervisor import VmState
from virtcontainers.persist import HypervisorState, StateStore
from virtcontainers.process import process_matches
from virtcontainers.sandbox import Sandbox


def _config(tmp_path: Path) -> HypervisorConfig:
    config = HypervisorConfig()
    config.boot.kernel_path = str(tmp_path / "vmlinuz")
    config.boot.initrd_path = str(tmp_path / "initrd")
    return config


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "vc")


@pytest.fixture
def stand_in(store: StateStore) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A live process that looks like the sandbox's VMM (its run dir is in its argv)."""
    run_dir = store.root / "sandboxes" / "sb"
    argv = [sys.executable, "-c", "import time; time.sleep(300)", str(run_dir)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        yield str(run_dir), proc
    finally:
        proc.kill()
        proc.wait()


async def test_stop_propagates_a_control_error_while_the_vmm_runs(
    tmp_path: Path, store: StateStore, stand_in: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """The VMM runs, but the driver refuses the record (it says the VM is a QEMU one, the
    sandbox a mock one): before the fix stop took that for "already gone", recorded the
    sandbox stopped and left the VMM running."""
    run_dir, vmm = stand_in
    sandbox = await Sandbox.create(_config(tmp_path), id="sb", hypervisor="mock", store=store)
    store.update(
        "sb",
        lambda d: msgspec.structs.replace(
            d,
            state=VmState.RUNNING,
            hypervisor=HypervisorState(pid=vmm.pid, type="qemu", run_dir=run_dir, sandbox_id="sb"),
        ),
    )
    sandbox = await Sandbox.attach("sb", store=store)
    with pytest.raises(StateError, match="load a state"):
        await sandbox.stop()
    assert process_matches(vmm.pid, run_dir), "the VMM must still run"
    assert store.load("sb").state == VmState.RUNNING, "not recorded as stopped"


async def test_stop_of_a_vmm_that_is_gone_is_not_an_error(
    tmp_path: Path, store: StateStore, stand_in: tuple[str, subprocess.Popen[bytes]]
) -> None:
    run_dir, vmm = stand_in
    await Sandbox.create(_config(tmp_path), id="sb", hypervisor="mock", store=store)
    store.update(
        "sb",
        lambda d: msgspec.structs.replace(
            d,
            state=VmState.RUNNING,
            hypervisor=HypervisorState(pid=vmm.pid, type="qemu", run_dir=run_dir, sandbox_id="sb"),
        ),
    )
    (Path(run_dir) / "qmp.sock").touch()
    vmm.kill()
    vmm.wait()
    sandbox = await Sandbox.attach("sb", store=store)
    await sandbox.stop()
    assert not (Path(run_dir) / "qmp.sock").exists(), "leftover sockets are removed"
    assert store.load("sb").state in (VmState.STOPPED, VmState.FAILED)
