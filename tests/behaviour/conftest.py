"""One behavioural suite, run against every driver that can run here.

A harness knows how to make a bootable config for its driver and how to kill its VMM
behind the driver's back. Drivers that cannot run on this host skip with the reason.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.behaviour.harness import Harness
from tests.integration.conftest import guest_image  # noqa: F401  (fixture)
from tests.integration.qemu_helpers import guest_config, wait_for_console
from virtcontainers.config import HypervisorConfig
from virtcontainers.drivers.mock import MockHypervisor
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.guest.image import GuestImage
from virtcontainers.hypervisor import Hypervisor


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


def _qemu(request: pytest.FixtureRequest) -> Harness:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    return QemuHarness(request.getfixturevalue("guest_image"))


Maker = Callable[[pytest.FixtureRequest], Harness]


def _discover() -> dict[str, tuple[Maker, list[pytest.MarkDecorator]]]:
    """mock and qemu, plus every ``tests/behaviour/harness_<driver>.py`` module, which
    defines ``NAME``, ``MARKS`` and ``make_harness(request) -> Harness``."""
    found: dict[str, tuple[Maker, list[pytest.MarkDecorator]]] = {
        "mock": (lambda request: MockHarness(), []),
        "qemu": (_qemu, [pytest.mark.integration]),
    }
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("harness_"):
            module = importlib.import_module(f"tests.behaviour.{info.name}")
            found[module.NAME] = (module.make_harness, list(module.MARKS))
    return found


HARNESSES = _discover()


@pytest.fixture(params=[pytest.param(n, marks=m) for n, (_, m) in sorted(HARNESSES.items())])
def harness(request: pytest.FixtureRequest) -> Harness:
    return HARNESSES[request.param][0](request)


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
