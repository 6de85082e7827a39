"""The reference's constants and defaults, in one place."""

from __future__ import annotations

import os
from enum import StrEnum

from virtcontainers.config.params import Param

__all__ = [
    "DEFAULT_BLOCK_DRIVER",
    "DEFAULT_BRIDGES",
    "DEFAULT_MEMORY_MIB",
    "DEFAULT_MSIZE_9P",
    "DEFAULT_VCPUS",
    "MAX_QEMU_VCPUS_AMD64",
    "MIN_HYPERVISOR_MEMORY_MIB",
    "GUEST_KERNEL_PARAMS",
    "NVDIMM_KERNEL_ROOT_PARAMS",
    "NVDIMM_NO_DAX_KERNEL_ROOT_PARAMS",
    "VIRTIO_BLK_KERNEL_ROOT_PARAMS",
    "VSOCK_AGENT_PORT",
    "VSOCK_LOGS_PORT",
    "BlockDriver",
    "SharedFs",
    "default_max_vcpus",
    "max_qemu_vcpus",
]


class BlockDriver(StrEnum):
    """How block devices reach the guest (the reference's ``config.Virtio*`` strings)."""

    VIRTIO_SCSI = "virtio-scsi"
    VIRTIO_BLOCK = "virtio-blk"
    VIRTIO_BLOCK_CCW = "virtio-blk-ccw"
    VIRTIO_MMIO = "virtio-mmio"
    NVDIMM = "nvdimm"


class SharedFs(StrEnum):
    """How a host directory is shared into the guest."""

    VIRTIO_9P = "virtio-9p"
    VIRTIO_FS = "virtio-fs"


DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MIB = 2048
DEFAULT_BRIDGES = 1
DEFAULT_BLOCK_DRIVER = BlockDriver.VIRTIO_SCSI
DEFAULT_MSIZE_9P = 8192
#: Ports below 1024 are privileged; the agent listens on the first unprivileged one.
VSOCK_AGENT_PORT = 1024
#: Where the agent sends its logs when the VMM has no console (Firecracker).
VSOCK_LOGS_PORT = 1025
MIN_HYPERVISOR_MEMORY_MIB = 256
#: QEMU's vCPU limit for x86_64 guests.
MAX_QEMU_VCPUS_AMD64 = 240


def max_qemu_vcpus() -> int:
    """QEMU's vCPU limit on this architecture, capped by the host's CPU count."""
    return min(MAX_QEMU_VCPUS_AMD64, os.cpu_count() or 1)


def default_max_vcpus(requested: int) -> int:
    """katautils' defaultMaxVCPUs: 0, or at least the host's CPUs, means the host's CPUs;
    never more than QEMU's limit."""
    limit = max_qemu_vcpus()
    return limit if requested <= 0 else min(requested, limit)


#: Kernel parameters the reference gives the guests of QEMU and Cloud Hypervisor alike.
GUEST_KERNEL_PARAMS = (
    Param("noreplace-smp"),
    Param("reboot", "k"),
    Param("cryptomgr.notests"),
    Param("net.ifnames", "0"),
)
NVDIMM_KERNEL_ROOT_PARAMS = (
    Param("root", "/dev/pmem0p1"),
    Param("rootflags", "dax,data=ordered,errors=remount-ro ro"),
    Param("rootfstype", "ext4"),
)
NVDIMM_NO_DAX_KERNEL_ROOT_PARAMS = (
    Param("root", "/dev/pmem0p1"),
    Param("rootflags", "data=ordered,errors=remount-ro ro"),
    Param("rootfstype", "ext4"),
)
VIRTIO_BLK_KERNEL_ROOT_PARAMS = (
    Param("root", "/dev/vda1"),
    Param("rootflags", "data=ordered,errors=remount-ro ro"),
    Param("rootfstype", "ext4"),
)
