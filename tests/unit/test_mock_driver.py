"""Mock-specific behaviour: limits the real drivers also enforce, and serialization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.behaviour.conftest import MockHarness
from virtcontainers.devices import MemoryDevice, NetDevice
from virtcontainers.drivers.mock import MockHypervisor
from virtcontainers.errors import ConfigError, HypervisorError, StateError
from virtcontainers.hypervisor import HypervisorType, NetworkNamespace, VmState, new_hypervisor


async def _running(tmp_path: Path, host_mb: int = 4096, slots: int = 4) -> MockHypervisor:
    cfg = MockHarness().config(tmp_path)
    cfg.resources.mem_slots = slots
    hv = MockHypervisor(host_memory_mb=host_mb)
    await hv.create_sandbox("m", NetworkNamespace(), cfg)
    await hv.start_sandbox(timeout=1)
    return hv


def test_registry_builds_the_mock_and_rejects_unknown_names() -> None:
    assert isinstance(new_hypervisor("mock"), MockHypervisor)
    with pytest.raises(ConfigError, match="Unknown hypervisor type xen"):
        new_hypervisor("xen")
    assert HypervisorType.parse("clh") is HypervisorType.CLH
    assert str(HypervisorType.FIRECRACKER) == "firecracker"


async def test_memory_hotplug_is_capped_by_host_memory(tmp_path: Path) -> None:
    hv = await _running(tmp_path, host_mb=1024)
    await hv.hotplug_add_device(MemoryDevice(size_mb=512))
    with pytest.raises(HypervisorError, match="host allows 1024 MiB"):
        await hv.hotplug_add_device(MemoryDevice(size_mb=1))


async def test_memory_hotplug_uses_the_next_free_slot_until_none_is_left(tmp_path: Path) -> None:
    hv = await _running(tmp_path, slots=2)
    assert (await hv.hotplug_add_device(MemoryDevice(size_mb=128))).slot == 0
    assert (await hv.hotplug_add_device(MemoryDevice(size_mb=128))).slot == 1
    with pytest.raises(HypervisorError, match="no free memory slot"):
        await hv.hotplug_add_device(MemoryDevice(size_mb=128))


async def test_net_hotplug_gets_distinct_pci_slots(tmp_path: Path) -> None:
    hv = await _running(tmp_path)
    a = await hv.hotplug_add_device(NetDevice(id="n0", tap_name="tap0", mac="02:00:00:00:00:01"))
    b = await hv.hotplug_add_device(NetDevice(id="n1", tap_name="tap1", mac="02:00:00:00:00:02"))
    assert a.pci_path != b.pci_path
    assert set(hv.hot_devices()) == {"NetDevice:n0", "NetDevice:n1"}


async def test_save_sandbox_needs_pause_and_writes_the_device_state(tmp_path: Path) -> None:
    hv = await _running(tmp_path)
    with pytest.raises(StateError):
        await hv.save_sandbox()
    await hv.pause_sandbox()
    with pytest.raises(ConfigError, match="devices_state_path"):
        await hv.save_sandbox()
    hv._config.template.devices_state_path = str(tmp_path / "state.json")
    await hv.save_sandbox()
    assert json.loads((tmp_path / "state.json").read_text())["type"] == "mock"


async def test_grpc_round_trip_adopts_the_running_vm(tmp_path: Path) -> None:
    hv = await _running(tmp_path)
    await hv.resize_vcpus(3)
    blob = await hv.to_grpc()
    other = MockHypervisor()
    await other.from_grpc(hv.hypervisor_config(), blob)
    assert other.state is VmState.RUNNING
    assert await other.resize_vcpus(1) == (3, 1)
    with pytest.raises(HypervisorError, match="invalid serialized VM"):
        await MockHypervisor().from_grpc(hv.hypervisor_config(), b"{not json")
