"""The harness interface each driver's behavioural-suite adapter implements."""

from __future__ import annotations

import abc
from pathlib import Path

from virtcontainers.config import HypervisorConfig
from virtcontainers.hypervisor import Hypervisor


class Harness(abc.ABC):
    name: str
    #: Whether each vCPU is a host thread (get_thread_ids maps them); not so on ACRN.
    vcpu_threads: bool = True

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
