"""One behavioural suite, run against every driver that can run here.

A harness knows how to make a bootable config for its driver and how to kill its VMM
behind the driver's back. Drivers that cannot run on this host skip with the reason.
"""

from __future__ import annotations

import abc
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.conftest import guest_image  # noqa: F401  (fixture)
from tests.integration.qemu_helpers import guest_config, wait_for_console
from virtcontainers.config import HypervisorConfig
from virtcontainers.drivers.mock import MockHypervisor
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.guest.image import GuestImage
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

    async def guest_ready(self, hv: Hypervisor) -> None:  # noqa: B027 (optional hook)
        """Wait until the guest OS is up (hot-unplug needs the guest's cooperation)."""


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


class QemuHarness(Harness):
    """Real QEMU (TCG here) booting the project's guest image, held up by a console shell."""

    name = "qemu"

    def __init__(self, image: GuestImage) -> None:
        self.image = image

    def config(self, tmp: Path) -> HypervisorConfig:
        return guest_config(self.image, tmp)

    def new(self, tmp: Path) -> Hypervisor:
        return QemuHypervisor()

    def kill_vmm(self, hv: Hypervisor) -> None:
        os.kill(hv.get_pids()[0], signal.SIGKILL)

    async def guest_ready(self, hv: Hypervisor) -> None:
        assert isinstance(hv, QemuHypervisor)
        await wait_for_console(hv.paths.console_log, "vc-init: ready")


@pytest.fixture(params=["mock", pytest.param("qemu", marks=pytest.mark.integration)])
def harness(request: pytest.FixtureRequest) -> Harness:
    if request.param == "qemu":
        if shutil.which("qemu-system-x86_64") is None:
            pytest.skip("qemu-system-x86_64 is not installed")
        return QemuHarness(request.getfixturevalue("guest_image"))
    return MockHarness()


@pytest.fixture
async def running(harness: Harness, tmp_path: Path) -> AsyncIterator[Hypervisor]:
    """A started VM, stopped afterwards whatever the test did."""
    from virtcontainers.hypervisor import NetworkNamespace

    hv = harness.new(tmp_path)
    await hv.create_sandbox("behave", NetworkNamespace(), harness.config(tmp_path))
    await hv.start_sandbox(timeout=60)
    try:
        await harness.guest_ready(hv)
        yield hv
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
