"""resize_vcpus / resize_memory in terms of hot-plug, with the reference's semantics.

QEMU, ACRN and the mock grow and shrink a VM by hot-plugging CPUs and DIMMs; the arithmetic
and the return values are the same for all of them, so it lives here once.
"""

from __future__ import annotations

import logging
import math

from virtcontainers.devices import CpuDevice, MemoryDevice
from virtcontainers.hypervisor import Hypervisor

log = logging.getLogger(__name__)


def hotplug_mem_mib(mem_mb: int, block_size_mb: int) -> int:
    """Round ``mem_mb`` up to whole memory blocks (0 block size: no rounding)."""
    if block_size_mb <= 0:
        return mem_mb
    return math.ceil(mem_mb / block_size_mb) * block_size_mb


def cpu_add_amount(current: int, requested: int, max_vcpus: int) -> int:
    """How many vCPUs to add: capped at ``max_vcpus`` with a warning, as the reference does."""
    if current + requested > max_vcpus:
        log.warning(
            "cannot hot-plug %d vCPUs: the VM has %d and the maximum is %d; adding %d",
            requested,
            current,
            max_vcpus,
            max(0, max_vcpus - current),
        )
        return max(0, max_vcpus - current)
    return requested


class ResizeByHotplug(Hypervisor):
    """Implements resize_* on top of the driver's own hotplug_add/remove_device."""

    def _current_vcpus(self) -> int:
        raise NotImplementedError

    def _current_memory_mb(self) -> int:
        raise NotImplementedError

    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        """Returns (vCPUs before, vCPUs after). Growth past max vCPUs is capped, not an error;
        shrinking below the boot vCPUs fails (only hot-added vCPUs can be removed)."""
        current = self._current_vcpus()
        new = current
        if vcpus > current:
            added = await self.hotplug_add_device(CpuDevice(vcpus - current))
            new += added.amount
        elif vcpus < current:
            removed = await self.hotplug_remove_device(CpuDevice(current - vcpus))
            new -= removed.amount
        return current, new

    async def resize_memory(
        self, mem_mb: int, memory_block_size_mb: int, probe: bool
    ) -> tuple[int, MemoryDevice]:
        """Returns (MiB after, the DIMM added). Growth is rounded up to whole blocks.

        Shrinking is not possible (memory hot-unplug is unsupported): as in the reference it
        is logged and the size is returned unchanged.
        """
        current = self._current_memory_mb()
        if mem_mb > current:
            want = hotplug_mem_mib(mem_mb - current, memory_block_size_mb)
            added = await self.hotplug_add_device(MemoryDevice(size_mb=want, probe=probe))
            return current + added.size_mb, added
        if mem_mb < current:
            log.warning(
                "%s: memory hot-unplug is not supported; keeping %d MiB (asked %d MiB)",
                self.driver,
                current,
                mem_mb,
            )
        return current, MemoryDevice(size_mb=0, probe=probe)
