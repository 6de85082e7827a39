"""The behavioural suite against the Firecracker driver, with the simulator as the VMM.

The driver's real launch path runs: ``boot.hypervisor_path`` points at an executable
wrapper that starts :mod:`virtcontainers.testing.fc_sim`, so spawn, API-socket wait, the
whole REST configuration, InstanceStart, placeholder-drive hot-plug, pause/resume and the
SIGTERM/SIGKILL stop are exercised. No guest runs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.behaviour.harness import Harness
from virtcontainers.config import HypervisorConfig
from virtcontainers.drivers.firecracker import FirecrackerHypervisor
from virtcontainers.hypervisor import Hypervisor
from virtcontainers.testing.fc_sim import write_launcher

NAME = "firecracker-sim"
MARKS: list[pytest.MarkDecorator] = []


def sim_config(tmp: Path, *launcher_args: str) -> HypervisorConfig:
    """A config the driver accepts: dummy kernel/initrd, the simulator as Firecracker."""
    tmp.mkdir(parents=True, exist_ok=True)
    kernel, initrd = tmp / "vmlinux", tmp / "initrd.img"
    kernel.write_bytes(b"not a kernel: the simulator only checks the file exists")
    initrd.write_bytes(b"not an initrd")
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = str(kernel)
    cfg.boot.initrd_path = str(initrd)
    cfg.boot.hypervisor_path = str(write_launcher(tmp / "firecracker", *launcher_args))
    cfg.resources.num_vcpus = 1
    cfg.resources.default_max_vcpus = 4
    cfg.resources.memory_size = 512
    cfg.resources.mem_slots = 4
    return cfg


class FirecrackerSimHarness(Harness):
    name = NAME

    def config(self, tmp: Path) -> HypervisorConfig:
        return sim_config(tmp)

    def new(self, tmp: Path) -> Hypervisor:
        return FirecrackerHypervisor()

    def kill_vmm(self, hv: Hypervisor) -> None:
        os.kill(hv.get_pids()[0], signal.SIGKILL)


def make_harness(request: pytest.FixtureRequest) -> Harness:
    return FirecrackerSimHarness()
