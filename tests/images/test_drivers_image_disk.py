"""Every driver attaches an image's root disk read-only through its cold-plug path.

Firecracker and Cloud Hypervisor run against their simulators and every request is
validated against the published API documents (as the contract tests do); ACRN runs its fake
``acrn-dm`` and the real argv is read back from /proc. The QEMU side boots for real in
``test_image_sandbox.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from openapi_core import OpenAPI

from tests.behaviour.harness_acrn import fake_config, write_fakes
from tests.behaviour.harness_clh import sim_config as clh_sim_config
from tests.behaviour.harness_firecracker import sim_config as fc_sim_config
from tests.contract.test_clh_contract import Recorder as ClhRecorder
from tests.contract.test_clh_contract import validate
from tests.contract.test_firecracker_contract import Contract
from tests.contract.test_firecracker_contract import Recorder as FcRecorder
from virtcontainers.config import HypervisorConfig
from virtcontainers.drivers.acrn import AcrnHypervisor
from virtcontainers.drivers.clh import CloudHypervisor
from virtcontainers.drivers.firecracker import FirecrackerHypervisor
from virtcontainers.hypervisor import Hypervisor, NetworkNamespace
from virtcontainers.images import StoredImage
from virtcontainers.images.sandbox_image import SandboxImage


async def _boot(hv: Hypervisor, cfg: HypervisorConfig, image: StoredImage, tmp: Path) -> None:
    """What Sandbox.start does for an image sandbox, up to the VMM running."""
    sandbox_image = SandboxImage.from_stored(image, "busybox")
    cfg = sandbox_image.configure(cfg)
    await hv.create_sandbox("img", NetworkNamespace(), cfg)
    for drive in sandbox_image.devices(tmp):
        await hv.add_device(drive)
    await hv.start_sandbox(timeout=20)


async def test_firecracker_puts_the_image_drive_read_only(
    busybox_image: StoredImage, contract: Contract, tmp_path: Path
) -> None:
    rec = FcRecorder()
    hv = FirecrackerHypervisor(response_hooks=[rec])
    try:
        await _boot(hv, fc_sim_config(tmp_path / "fc"), busybox_image, tmp_path)
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
    for ex in rec.exchanges:
        contract.check_request(ex.method, ex.path, ex.body)
        contract.check_reply(ex.method, ex.path, ex.status, ex.reply)
    drive = next(ex.body for ex in rec.exchanges if ex.path == "/drives/vc-image")
    assert isinstance(drive, dict)
    assert drive["is_read_only"] is True
    assert drive["is_root_device"] is False
    assert drive["path_on_host"] == str(busybox_image.disk)
    boot = next(ex.body for ex in rec.exchanges if ex.path == "/boot-source")
    assert isinstance(boot, dict)
    assert "vc.rootfs=tmpfs" in boot["boot_args"].split()


async def test_cloud_hypervisor_creates_the_vm_with_a_read_only_image_disk(
    busybox_image: StoredImage, spec: OpenAPI, tmp_path: Path
) -> None:
    rec = ClhRecorder()
    hv = CloudHypervisor(event_hooks=rec.hooks)
    try:
        await _boot(hv, clh_sim_config(tmp_path / "clh"), busybox_image, tmp_path)
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
    for ex in rec.exchanges:
        validate(spec, ex)
    create = json.loads(next(ex.body for ex in rec.exchanges if ex.path.endswith("/vm.create")))
    disks = [d for d in create["disks"] if d["path"] == str(busybox_image.disk)]
    assert len(disks) == 1
    assert disks[0]["readonly"] is True
    assert "vc.rootfs=tmpfs" in create["payload"]["cmdline"].split()


async def test_acrn_passes_the_image_disk_read_only_on_the_command_line(
    busybox_image: StoredImage, tmp_path: Path
) -> None:
    fake = write_fakes(tmp_path / "bin")
    hv = AcrnHypervisor(uuid_pool_dir=tmp_path / "pool")
    hv.stop_timeout = 5.0
    try:
        await _boot(hv, fake_config(tmp_path, fake), busybox_image, tmp_path)
        argv = Path(f"/proc/{hv.get_pids()[0]}/cmdline").read_bytes().split(b"\0")
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
        fake.remove()
    slots = [a.decode() for a in argv if a.endswith(b",ro")]
    assert [s.split(",", 1)[1] for s in slots] == [f"virtio-blk,{busybox_image.disk},ro"]
    cmdline = argv[argv.index(b"-B") + 1].decode()
    assert "vc.rootfs=tmpfs" in cmdline.split()
