"""Tap mode through every other driver: the NIC the network package makes reaches the VMM's
API (requests checked against the published specs) or argv, and the VMM runs inside the
sandbox's network namespace. Real netns/tap/veth (root); simulated VMMs."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from openapi_core import OpenAPI

from tests.behaviour import harness_acrn, harness_clh, harness_firecracker
from tests.contract.test_clh_contract import Recorder as ClhRecorder
from tests.contract.test_clh_contract import validate
from tests.contract.test_firecracker_contract import Contract, Recorder
from virtcontainers.devices import HybridVSock, NetDevice
from virtcontainers.drivers.acrn import AcrnHypervisor
from virtcontainers.drivers.clh import CloudHypervisor
from virtcontainers.drivers.firecracker import FirecrackerHypervisor
from virtcontainers.hypervisor import Hypervisor, NetworkNamespace
from virtcontainers.network import Attachment, NetworkSpec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="tap mode needs root")


@pytest.fixture
async def tap_net(tmp_path: Path) -> AsyncIterator[Attachment]:
    att = Attachment(NetworkSpec.build("tap"), sandbox_id="drivers", run_dir=str(tmp_path))
    await att.setup()
    try:
        yield att
    finally:
        await att.teardown()
        assert att.leftovers() == []


def _nic(att: Attachment) -> NetDevice:
    [nic] = att.devices()
    assert isinstance(nic, NetDevice)
    return nic


def _in_netns(pid: int, att: Attachment) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(att.netns_path).st_ino


async def _life(hv: Hypervisor, att: Attachment) -> list[int]:
    """Create, plug the attachment's NIC, start, record the VMM pids, stop."""
    pids: list[int] = []
    try:
        await hv.start_sandbox(timeout=30)
        pids = hv.get_pids()
        assert pids
        assert _in_netns(pids[0], att), "the VMM does not run inside the sandbox netns"
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
    return pids


async def test_firecracker_gets_the_tap_in_network_interfaces(
    tap_net: Attachment, tmp_path: Path, shared_dir: Path
) -> None:
    path = shared_dir / "specs" / "firecracker.yaml"
    contract = Contract(yaml.safe_load(path.read_text()))
    cfg = harness_firecracker.sim_config(tmp_path / "fc")
    cfg.boot.kernel_params += tap_net.kernel_params()
    rec = Recorder()
    hv = FirecrackerHypervisor(response_hooks=[rec])
    await hv.create_sandbox("netfc", NetworkNamespace(tap_net.netns_path, True), cfg)
    for device in tap_net.devices():
        await hv.add_device(device)
    await hv.add_device(HybridVSock(uds_path="", port=1024, context_id=3))
    await _life(hv, tap_net)
    for ex in rec.exchanges:
        contract.check_request(ex.method, ex.path, ex.body)
        contract.check_reply(ex.method, ex.path, ex.status, ex.reply)
    nics = [ex.body for ex in rec.exchanges if ex.path.startswith("/network-interfaces/")]
    assert nics == [{"iface_id": "net0", "host_dev_name": "tap0", "guest_mac": _nic(tap_net).mac}]
    boot = next(ex.body for ex in rec.exchanges if ex.path == "/boot-source")
    assert isinstance(boot, dict)
    assert tap_net.kernel_params()[0].value in str(boot["boot_args"])


async def test_cloud_hypervisor_gets_the_tap_in_vm_create(
    tap_net: Attachment, tmp_path: Path, shared_dir: Path
) -> None:
    spec = OpenAPI.from_file_path(str(shared_dir / "specs" / "cloud-hypervisor.yaml"))
    cfg = harness_clh.sim_config(tmp_path / "clh")
    cfg.boot.kernel_params += tap_net.kernel_params()
    rec = ClhRecorder()
    hv = CloudHypervisor(event_hooks=rec.hooks)
    await hv.create_sandbox("netclh", NetworkNamespace(tap_net.netns_path, True), cfg)
    for device in tap_net.devices():
        await hv.add_device(device)
    await _life(hv, tap_net)
    for ex in rec.exchanges:
        validate(spec, ex)
    create = next(ex for ex in rec.exchanges if ex.path.endswith("/vm.create"))
    body = json.loads(create.body)
    assert [(n["tap"], n["mac"]) for n in body["net"]] == [("tap0", _nic(tap_net).mac)]
    assert tap_net.kernel_params()[0].value in body["payload"]["cmdline"]


async def test_acrn_gets_the_tap_in_its_argv(
    tap_net: Attachment, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    fake = harness_acrn.write_fakes(tmp_path / "fake-acrn")
    request.addfinalizer(fake.remove)
    cfg = harness_acrn.fake_config(tmp_path, fake)
    hv = AcrnHypervisor(uuid_pool_dir=tmp_path / "uuid-pool")
    await hv.create_sandbox("netacrn", NetworkNamespace(tap_net.netns_path, True), cfg)
    for device in tap_net.devices():
        await hv.add_device(device)
    try:
        await hv.start_sandbox(timeout=30)
        pid = hv.get_pids()[0]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        nic = f"virtio-net,tap0,mac={_nic(tap_net).mac}".encode()
        assert any(a.endswith(nic) for a in argv), argv
        assert _in_netns(pid, tap_net)
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
