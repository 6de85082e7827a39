"""The ACRN driver with a real ``acrn-dm`` on an ACRN service VM.

Skips (with the reason) unless: ``acrn-dm`` is installed, the host is an ACRN service VM
(``/dev/acrn_hsm`` or ``/dev/acrn_vhm``), we are root, and a guest kernel and rootfs image
exist: ``$VC_ACRN_KERNEL`` / ``$VC_ACRN_IMAGE``, else Kata's install paths. The project's own
guest image is an initramfs, which ACRN cannot boot (the driver needs a rootfs image).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import BlockDrive
from virtcontainers.drivers.acrn import (
    DEFAULT_ACRN_DM,
    AcrnHypervisor,
    UuidPool,
    acrn_host_problem,
)
from virtcontainers.errors import UnsupportedError
from virtcontainers.hypervisor import Capability, NetworkNamespace, VmState

pytestmark = pytest.mark.integration

KATA_KERNEL = "/usr/share/kata-containers/vmlinuz.container"
KATA_IMAGE = "/usr/share/kata-containers/kata-containers.img"


def _acrn_dm() -> str:
    if os.access(DEFAULT_ACRN_DM, os.X_OK):
        return DEFAULT_ACRN_DM
    return shutil.which("acrn-dm") or ""


def _requirements() -> tuple[str, str]:
    """(kernel, image), or skip saying what is missing."""
    if not _acrn_dm():
        pytest.skip("acrn-dm is not installed (ACRN is not packaged for Debian)")
    problem = acrn_host_problem()
    if problem:
        pytest.skip(problem)
    if os.geteuid() != 0:
        pytest.skip("acrn-dm needs root to open the hypervisor service module")
    kernel = os.environ.get("VC_ACRN_KERNEL", KATA_KERNEL)
    image = os.environ.get("VC_ACRN_IMAGE", KATA_IMAGE)
    for label, path in (("kernel", kernel), ("rootfs image", image)):
        if not os.path.isfile(path):
            pytest.skip(f"no guest {label} at {path} (set VC_ACRN_KERNEL / VC_ACRN_IMAGE)")
    return kernel, image


@pytest.fixture
def acrn_config() -> HypervisorConfig:
    kernel, image = _requirements()
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = kernel
    cfg.boot.image_path = image
    cfg.resources.num_vcpus = 1
    cfg.resources.default_max_vcpus = 1
    cfg.resources.memory_size = 512
    return cfg


@pytest.fixture
async def acrn_vm(acrn_config: HypervisorConfig, tmp_path: Path) -> AsyncIterator[AcrnHypervisor]:
    hv = AcrnHypervisor(uuid_pool_dir=tmp_path / "pool")
    await hv.create_sandbox("acrn-it", NetworkNamespace(), acrn_config)
    await hv.start_sandbox(timeout=30)
    try:
        yield hv
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


async def _wait_for_output(hv: AcrnHypervisor, timeout: float = 30.0) -> None:
    """The kernel speaks on COM1 (the VMM log) and hvc0 (the console log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in (hv.paths.console_log, hv.paths.vmm_log):
            if path.exists() and "Linux version" in path.read_text(errors="replace"):
                return
        await asyncio.sleep(0.2)
    pytest.fail("the guest kernel printed nothing within 30 s")


async def test_real_boot_check_pause_hotplug_stop(acrn_vm: AcrnHypervisor, tmp_path: Path) -> None:
    hv = acrn_vm
    (pid,) = hv.get_pids()
    await _wait_for_output(hv)
    await hv.check()
    if Capability.PAUSE in hv.capabilities():
        await hv.pause_sandbox()
        await hv.check()
        await hv.resume_sandbox()
    else:
        with pytest.raises(UnsupportedError):
            await hv.pause_sandbox()
    if Capability.BLOCK_DEVICE_HOTPLUG in hv.capabilities():
        disk = tmp_path / "disk.img"
        disk.write_bytes(b"\0" * (8 << 20))
        drive = await hv.hotplug_add_device(BlockDrive(file=str(disk), id="d0"))
        assert drive.pci_path == "05"
        await hv.hotplug_remove_device(drive)
    await hv.stop_sandbox()
    assert hv.state is VmState.STOPPED
    assert not Path(f"/proc/{pid}").exists()
    assert not hv.paths.console.exists()
    assert UuidPool(tmp_path / "pool").in_use() == {}
