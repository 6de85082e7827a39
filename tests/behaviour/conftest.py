"""One behavioural suite, run against every driver that can run here.

A harness knows how to make a bootable config for its driver and how to kill its VMM
behind the driver's back. Drivers that cannot run on this host skip with the reason.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from virtcontainers.config import HypervisorConfig
from virtcontainers.drivers.mock import MockHypervisor
from virtcontainers.hypervisor import Hypervisor


class Harness(abc.ABC):
    name: str

    @abc.abstractmethod
    def config(self, tmp: Path) -> HypervisorConfig:
        """A valid, bootable config: 1 vCPU, max 4, 512 MiB, 4 memory slots."""

    @abc.abstractmethod
    def new(self, tmp: Path) -> Hypervisor: ...

    @abc.abstractmethod
    def kill_vmm(self, hv: Hypervisor) -> None:
        """Make the VMM die as if it crashed."""


class MockHarness(Harness):
    name = "mock"

    def config(self, tmp: Path) -> HypervisorConfig:
        cfg = HypervisorConfig()
        cfg.boot.kernel_path = "/nonexistent/vmlinuz"  # the mock boots nothing
        cfg.boot.initrd_path = "/nonexistent/initrd"
        cfg.resources.num_vcpus = 1
        cfg.resources.default_max_vcpus = 4
        cfg.resources.memory_size = 512
        cfg.resources.mem_slots = 4
        return cfg

    def new(self, tmp: Path) -> Hypervisor:
        return MockHypervisor(host_memory_mb=4096)

    def kill_vmm(self, hv: Hypervisor) -> None:
        assert isinstance(hv, MockHypervisor)
        hv.crash()


HARNESSES: dict[str, Callable[[], Harness]] = {"mock": MockHarness}


@pytest.fixture(params=sorted(HARNESSES))
def harness(request: pytest.FixtureRequest) -> Harness:
    return HARNESSES[request.param]()


@pytest.fixture
async def running(harness: Harness, tmp_path: Path) -> AsyncIterator[Hypervisor]:
    """A started VM, stopped afterwards whatever the test did."""
    from virtcontainers.hypervisor import NetworkNamespace

    hv = harness.new(tmp_path)
    await hv.create_sandbox("behave", NetworkNamespace(), harness.config(tmp_path))
    await hv.start_sandbox(timeout=60)
    try:
        yield hv
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
