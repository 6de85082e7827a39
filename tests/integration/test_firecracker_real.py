"""The Firecracker driver against a real ``firecracker`` booting the project's guest image.

Runs only where Firecracker is installed and KVM really runs a vCPU
(``virtcontainers.host.probe_kvm().usable``); elsewhere (this project's build machines:
no Firecracker package, KVM only for PVM guests) every test skips with the reason. The
simulator-based tests (tests/unit/test_firecracker_*.py, tests/contract, the behavioural
suite) cover the same paths without a guest.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from virtcontainers.agent.client import AgentClient
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import BlockDrive, HybridVSock
from virtcontainers.drivers.firecracker import FirecrackerHypervisor
from virtcontainers.errors import AgentError, HypervisorError
from virtcontainers.guest.image import GuestImage
from virtcontainers.host import probe_kvm
from virtcontainers.hypervisor import NetworkNamespace, VmState

pytestmark = pytest.mark.integration

_ELF = b"\x7fELF"


def _firecracker() -> str:
    path = shutil.which("firecracker")
    if path is None:
        pytest.skip("firecracker is not on PATH (no package for this host)")
    status = probe_kvm()
    if not status.usable:
        pytest.skip(f"KVM is not usable here: {status.detail}")
    return path


#: Compressed bzImage payloads, by magic: the tool that decompresses each to stdout.
_DECOMPRESSORS = (
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),  # lz4 legacy (Debian 12's kernels)
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"]),
    (b"\xfd7zXZ\x00", ["xz", "-dc"]),
    (b"\x1f\x8b", ["gzip", "-dc"]),
)


def _vmlinux(kernel: Path, tmp: Path) -> Path:
    """Firecracker on x86_64 boots an uncompressed ELF kernel: extract it from a bzImage
    (payload offset and length are in the boot protocol header)."""
    data = kernel.read_bytes()
    if data.startswith(_ELF):
        return kernel
    setup_sects = data[0x1F1] or 4
    protected_mode = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", data, 0x248)
    payload = data[protected_mode + offset : protected_mode + offset + length]
    for magic, tool in _DECOMPRESSORS:
        if payload.startswith(magic):
            if shutil.which(tool[0]) is None:
                pytest.skip(f"{tool[0]} is needed to extract vmlinux from {kernel}")
            done = subprocess.run(tool, input=payload, capture_output=True, check=False)
            if done.stdout.startswith(_ELF):
                out = tmp / "vmlinux"
                out.write_bytes(done.stdout)
                return out
    pytest.skip(f"cannot extract an ELF vmlinux from {kernel}")


@pytest.fixture
def real_config(request: pytest.FixtureRequest, tmp_path: Path) -> HypervisorConfig:
    binary = _firecracker()  # skip before building the guest image
    image: GuestImage = request.getfixturevalue("guest_image")
    cfg = HypervisorConfig()
    cfg.boot.hypervisor_path = binary
    cfg.boot.kernel_path = str(_vmlinux(image.kernel, tmp_path))
    cfg.boot.initrd_path = str(image.initrd)
    cfg.resources.num_vcpus = 1
    cfg.resources.memory_size = 512
    cfg.debugging.debug = True  # the serial console goes to firecracker.log
    return cfg


async def _agent(sock: HybridVSock, timeout: float = 60.0) -> AgentClient:
    """Connect once the guest agent listens (the VMM closes CONNECTs until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await AgentClient.connect_hybrid_vsock(sock.uds_path, sock.port, timeout=5)
        except AgentError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_boot_agent_hotplug_pause_and_stop(
    real_config: HypervisorConfig, tmp_path: Path
) -> None:
    hv = FirecrackerHypervisor()
    await hv.create_sandbox("fc-real", NetworkNamespace(), real_config)
    await hv.start_sandbox(timeout=30)
    pid = hv.get_pids()[0]
    run_dir = hv.paths.run_dir
    try:
        await hv.check()
        threads = await hv.get_thread_ids()
        assert sorted(threads) == [0]
        sock = await hv.generate_socket("fc-real")
        assert isinstance(sock, HybridVSock)
        client = await _agent(sock)
        try:
            await client.ping()
            disk = tmp_path / "disk.img"
            disk.write_bytes(b"\0" * (8 << 20))
            drive = await hv.hotplug_add_device(BlockDrive(file=str(disk), id="d0"))
            assert drive.virt_path == "/dev/vda"
            await hv.hotplug_remove_device(drive)
        finally:
            await client.close()
        await hv.pause_sandbox()
        await hv.check()
        await hv.resume_sandbox()
    finally:
        await hv.stop_sandbox()
    assert hv.state is VmState.STOPPED
    assert not Path(f"/proc/{pid}").exists()
    assert {p.name for p in run_dir.iterdir()} <= {
        "firecracker.log",
        "fc-logger.log",
        "fc-metrics.log",
    }
    await hv.cleanup()


async def test_crash_is_detected(real_config: HypervisorConfig) -> None:
    hv = FirecrackerHypervisor()
    await hv.create_sandbox("fc-crash", NetworkNamespace(), real_config)
    await hv.start_sandbox(timeout=30)
    os.kill(hv.get_pids()[0], signal.SIGKILL)
    with pytest.raises(HypervisorError, match="not running") as exc:
        await hv.check()
    assert type(exc.value) is HypervisorError
    await hv.stop_sandbox()
    assert hv.get_pids() == []
    await hv.cleanup()
