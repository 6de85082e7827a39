"""The Cloud Hypervisor driver with the real ``cloud-hypervisor`` booting the project's guest.

Skips (with the reason) unless ``cloud-hypervisor`` is installed and KVM really runs a vCPU
here (:func:`virtcontainers.host.probe_kvm`); the project's build machines have neither, so
these run on real hosts only.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.qemu_helpers import guest_config, wait_for_console
from virtcontainers import host
from virtcontainers.agent.client import AgentClient
from virtcontainers.devices import BlockDrive, HybridVSock
from virtcontainers.drivers.clh import CloudHypervisor
from virtcontainers.errors import AgentError
from virtcontainers.guest.image import GuestImage
from virtcontainers.hypervisor import NetworkNamespace, VmState

pytestmark = pytest.mark.integration


@pytest.fixture
def clh_image(request: pytest.FixtureRequest) -> GuestImage:
    binary = shutil.which("cloud-hypervisor")
    if binary is None:
        pytest.skip("cloud-hypervisor is not installed (not on PATH)")
    kvm = host.probe_kvm()
    if not kvm.usable:
        pytest.skip(f"KVM cannot run a guest here: {kvm.detail}")
    image: GuestImage = request.getfixturevalue("guest_image")
    return image


@pytest.fixture
async def real_vm(clh_image: GuestImage, tmp_path: Path) -> AsyncIterator[CloudHypervisor]:
    cfg = guest_config(clh_image, tmp_path)
    hv = CloudHypervisor()
    await hv.create_sandbox("clh-real", NetworkNamespace(), cfg)
    await hv.start_sandbox(timeout=30)
    try:
        yield hv
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


async def _agent(hv: CloudHypervisor, timeout: float = 30.0) -> AgentClient:
    sock = await hv.generate_socket(hv.sandbox_id)
    assert isinstance(sock, HybridVSock)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await AgentClient.connect_hybrid_vsock(sock.uds_path, sock.port, timeout=5)
        except AgentError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)  # the agent is not listening yet


async def test_boots_to_the_agent_and_stops_clean(real_vm: CloudHypervisor) -> None:
    await wait_for_console(real_vm.paths.console_log, "vc-init: ready")
    await real_vm.check()
    assert sorted(await real_vm.get_thread_ids()) == [0]
    client = await _agent(real_vm)
    try:
        result = await client.exec(["uname", "-r"])
        assert result.exit_code == 0
    finally:
        await client.close()
    await real_vm.pause_sandbox()
    await real_vm.resume_sandbox()


async def test_hotplug_and_resize_on_a_real_guest(real_vm: CloudHypervisor, tmp_path: Path) -> None:
    await wait_for_console(real_vm.paths.console_log, "vc-init: ready")
    assert await real_vm.resize_vcpus(2) == (1, 2)
    new_mb, dimm = await real_vm.resize_memory(512 + 128, 128, probe=False)
    assert (new_mb, dimm.size_mb) == (640, 128)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (8 << 20))
    drive = await real_vm.hotplug_add_device(BlockDrive(file=str(disk), id="d0"))
    assert len(drive.pci_path) == 2
    await real_vm.hotplug_remove_device(drive)


async def test_guest_powers_off_and_wait_only_keeps_the_last_console_lines(
    clh_image: GuestImage, tmp_path: Path
) -> None:
    hv = CloudHypervisor()
    await hv.create_sandbox("clh-off", NetworkNamespace(), guest_config(clh_image, tmp_path))
    await hv.start_sandbox(timeout=30)
    client = await _agent(hv)
    await client.shutdown()
    await client.close()
    await hv.stop_sandbox(wait_only=True)
    assert hv.state is VmState.STOPPED
    assert "reboot: Power down" in hv.paths.console_log.read_text(errors="replace")
    await hv.cleanup()
