"""The behavioural suite against the Cloud Hypervisor driver, with the simulator as the VMM.

The driver's real launch path runs: ``boot.hypervisor_path`` points at an executable
wrapper that starts :mod:`virtcontainers.testing.clh_sim`, so spawn, ping, create, boot,
hot-plug, resize, pause, shutdown and signal handling are all exercised. No guest runs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.behaviour.harness import Harness
from virtcontainers.config import HypervisorConfig
from virtcontainers.drivers.clh import CloudHypervisor
from virtcontainers.hypervisor import Hypervisor
from virtcontainers.testing.clh_sim import write_wrapper

NAME = "clh-sim"
MARKS: list[pytest.MarkDecorator] = []


def sim_config(tmp: Path) -> HypervisorConfig:
    """A config the driver accepts: dummy kernel/initrd, the simulator as the VMM."""
    tmp.mkdir(parents=True, exist_ok=True)
    kernel, initrd = tmp / "vmlinuz", tmp / "initrd.img"
    kernel.write_bytes(b"not a kernel: the simulator only checks the file exists")
    initrd.write_bytes(b"not an initrd")
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = str(kernel)
    cfg.boot.initrd_path = str(initrd)
    cfg.boot.hypervisor_path = str(write_wrapper(tmp / "cloud-hypervisor"))
    cfg.resources.num_vcpus = 1
    cfg.resources.default_max_vcpus = 4
    cfg.resources.memory_size = 512
    cfg.resources.mem_slots = 4
    return cfg


class ClhSimHarness(Harness):
    name = NAME

    def config(self, tmp: Path) -> HypervisorConfig:
        return sim_config(tmp)

    def new(self, tmp: Path) -> Hypervisor:
        return CloudHypervisor()

    def kill_vmm(self, hv: Hypervisor) -> None:
        os.kill(hv.get_pids()[0], signal.SIGKILL)


def make_harness(request: pytest.FixtureRequest) -> Harness:
    return ClhSimHarness()
