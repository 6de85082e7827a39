"""The interface's contract, checked against every driver that can run here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.behaviour.harness import Harness
from virtcontainers.devices import BlockDrive, CpuDevice, MemoryDevice
from virtcontainers.errors import (
    ApiError,
    ConfigError,
    HypervisorError,
    StateError,
    UnsupportedError,
)
from virtcontainers.hypervisor import Capability, Hypervisor, NetworkNamespace, VmState
from virtcontainers.persist.hypervisor_state import HypervisorState


async def test_lifecycle(harness: Harness, tmp_path: Path) -> None:
    hv = harness.new(tmp_path)
    assert hv.state is VmState.NEW
    await hv.create_sandbox("life", NetworkNamespace(), harness.config(tmp_path))
    assert hv.state is VmState.CREATED
    assert hv.get_pids() == []
    await hv.start_sandbox(timeout=60)
    assert hv.state is VmState.RUNNING
    assert hv.get_pids()
    await hv.check()
    await hv.pause_sandbox()
    assert hv.state is VmState.PAUSED
    await hv.check()
    await hv.resume_sandbox()
    assert hv.state is VmState.RUNNING
    threads = await hv.get_thread_ids()
    assert sorted(threads) == ([0] if harness.vcpu_threads else [])
    await hv.stop_sandbox()
    assert hv.state is VmState.STOPPED
    assert hv.get_pids() == []
    await hv.stop_sandbox()  # idempotent
    await hv.cleanup()


async def test_illegal_transitions_raise_state_error(harness: Harness, tmp_path: Path) -> None:
    hv = harness.new(tmp_path)
    with pytest.raises(StateError) as exc:
        await hv.start_sandbox(timeout=5)
    assert exc.value.state == "new"
    assert "created" in exc.value.required
    await hv.create_sandbox("illegal", NetworkNamespace(), harness.config(tmp_path))
    with pytest.raises(StateError):
        await hv.pause_sandbox()
    with pytest.raises(StateError):
        await hv.hotplug_add_device(CpuDevice(1))
    with pytest.raises(StateError):
        await hv.create_sandbox("again", NetworkNamespace(), harness.config(tmp_path))
    await hv.stop_sandbox()
    with pytest.raises(StateError):
        await hv.start_sandbox(timeout=5)
    await hv.cleanup()


async def test_resume_while_running_and_cold_plug_after_start(running: Hypervisor) -> None:
    with pytest.raises(StateError):
        await running.resume_sandbox()
    with pytest.raises(StateError):
        await running.add_device(BlockDrive(file="/dev/null", id="late"))


async def test_bad_config_is_refused_before_start(harness: Harness, tmp_path: Path) -> None:
    cfg = harness.config(tmp_path)
    cfg.boot.kernel_path = ""
    with pytest.raises(ConfigError, match="kernel"):
        await harness.new(tmp_path).create_sandbox("bad", NetworkNamespace(), cfg)
    cfg = harness.config(tmp_path)
    cfg.resources.memory_size = 128
    with pytest.raises(ConfigError, match="256"):
        await harness.new(tmp_path).create_sandbox("bad", NetworkNamespace(), cfg)


async def test_resize_vcpus_reference_semantics(running: Hypervisor) -> None:
    if Capability.CPU_HOTPLUG not in running.capabilities():
        with pytest.raises(UnsupportedError):
            await running.resize_vcpus(2)
        return
    assert await running.resize_vcpus(2) == (1, 2)
    assert sorted(await running.get_thread_ids()) == [0, 1]
    assert await running.resize_vcpus(2) == (2, 2)
    # Growth past max vCPUs (4) is capped, not an error.
    assert await running.resize_vcpus(9) == (2, 4)
    assert await running.resize_vcpus(3) == (4, 3)
    # Only hot-added vCPUs can go: below the boot count fails.
    with pytest.raises(HypervisorError):
        await running.resize_vcpus(0)
    assert len(running.save().hotplugged_vcpus) == 2


async def test_resize_memory_grows_in_blocks_and_never_shrinks(running: Hypervisor) -> None:
    if Capability.MEMORY_HOTPLUG not in running.capabilities():
        pytest.skip("driver has no memory hot-plug")
    new_mb, dimm = await running.resize_memory(512 + 200, 128, probe=False)
    assert dimm.size_mb == 256  # 200 MiB rounded up to two 128 MiB blocks
    assert new_mb == 768
    assert running.save().hotplugged_memory == 256
    assert await running.resize_memory(512, 128, probe=False) == (768, MemoryDevice(0))
    with pytest.raises(UnsupportedError):
        await running.hotplug_remove_device(MemoryDevice(size_mb=128))


async def test_block_hotplug_round_trip(running: Hypervisor, tmp_path: Path) -> None:
    if Capability.BLOCK_DEVICE_HOTPLUG not in running.capabilities():
        with pytest.raises(UnsupportedError):
            await running.hotplug_add_device(BlockDrive(file="/dev/null", id="d0"))
        return
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    drive = await running.hotplug_add_device(BlockDrive(file=str(disk), id="d0"))
    # Where the guest finds it: a PCI slot, a SCSI address, or (virtio-mmio) its /dev name.
    assert drive.pci_path or drive.scsi_addr or drive.virt_path
    # The VMM refuses (ApiError: QEMU, Firecracker, Cloud Hypervisor) or the driver does
    # (the mock, ACRN: no API to ask); never a state guard, a missing capability or a timeout.
    refused = (ApiError, HypervisorError)
    with pytest.raises(HypervisorError) as twice:
        await running.hotplug_add_device(BlockDrive(file=str(disk), id="d0"))
    assert type(twice.value) in refused, repr(twice.value)
    await running.hotplug_remove_device(drive)
    with pytest.raises(HypervisorError) as gone:
        await running.hotplug_remove_device(drive)
    assert type(gone.value) in refused, repr(gone.value)


async def test_state_round_trips_through_save_and_load(
    harness: Harness, running: Hypervisor, tmp_path: Path
) -> None:
    if Capability.CPU_HOTPLUG in running.capabilities():
        await running.resize_vcpus(2)
    state = running.save()
    assert HypervisorState.from_dict(state.to_dict()) == state
    assert state.pid == running.get_pids()[0]
    other = harness.new(tmp_path)
    other.load(state)
    assert other.save().hotplugged_vcpus == state.hotplugged_vcpus
    assert other.save().pid == state.pid


async def test_vmm_crash_is_detected_and_stop_still_cleans_up(
    harness: Harness, running: Hypervisor
) -> None:
    harness.kill_vmm(running)
    with pytest.raises(HypervisorError) as exc:
        await running.check()
    # The VMM's death itself, not a refused request or a state guard.
    assert not isinstance(exc.value, ApiError | StateError | UnsupportedError)
    await running.stop_sandbox()
    assert running.state is VmState.STOPPED
    assert running.get_pids() == []
