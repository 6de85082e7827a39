"""Every request the Cloud Hypervisor driver can send, and every reply of the simulator,
validated against the published API document (``shared/specs/cloud-hypervisor.yaml``) with
openapi-core.

Traffic is recorded with httpx event hooks while the driver runs a full life against the
simulator: cold-plugged disk, NIC (rate-limited), VFIO device and virtio-fs share; boot;
vCPU and memory resize; disk, NIC, VFIO and vhost-user-fs hot-plug and removal; pause,
snapshot, resume; error replies; shutdown.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from tests.behaviour.harness_clh import sim_config
from virtcontainers.devices import (
    BlockDrive,
    FsShare,
    NetDevice,
    VfioDevice,
    VhostUserDevice,
    VhostUserKind,
)
from virtcontainers.drivers.clh import CloudHypervisor
from virtcontainers.drivers.clh import api as clh_api
from virtcontainers.errors import ApiError
from virtcontainers.hypervisor import NetworkNamespace

#: Every endpoint the driver's API client can call.
DRIVER_ENDPOINTS = {
    ("GET", "/api/v1/vmm.ping"),
    ("PUT", "/api/v1/vmm.shutdown"),
    ("PUT", "/api/v1/vm.create"),
    ("PUT", "/api/v1/vm.boot"),
    ("GET", "/api/v1/vm.info"),
    ("PUT", "/api/v1/vm.pause"),
    ("PUT", "/api/v1/vm.resume"),
    ("PUT", "/api/v1/vm.snapshot"),
    ("PUT", "/api/v1/vm.resize"),
    ("PUT", "/api/v1/vm.add-disk"),
    ("PUT", "/api/v1/vm.add-net"),
    ("PUT", "/api/v1/vm.add-device"),
    ("PUT", "/api/v1/vm.add-fs"),
    ("PUT", "/api/v1/vm.remove-device"),
}


@dataclass
class Exchange:
    method: str
    path: str
    body: bytes
    status: int
    reply: bytes
    reply_type: str


class Recorder:
    """httpx event hooks that keep every request and its reply."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    async def on_request(self, request: httpx.Request) -> None:
        return None

    async def on_response(self, response: httpx.Response) -> None:
        await response.aread()
        req = response.request
        self.exchanges.append(
            Exchange(
                req.method,
                req.url.path,
                req.content,
                response.status_code,
                response.content,
                response.headers.get("content-type", ""),
            )
        )

    @property
    def hooks(self) -> clh_api.EventHooks:
        return {"request": [self.on_request], "response": [self.on_response]}


@pytest.fixture
def spec(shared_dir: Path) -> OpenAPI:
    path = shared_dir / "specs" / "cloud-hypervisor.yaml"
    if not path.is_file():
        pytest.skip(f"{path} is absent: no Cloud Hypervisor API document to check against")
    return OpenAPI.from_file_path(str(path))


def mock_request(method: str, path: str, body: bytes) -> MockRequest:
    return MockRequest("http://localhost", method, path, data=body or None)


def validate(spec: OpenAPI, ex: Exchange) -> None:
    request = mock_request(ex.method, ex.path, ex.body)
    spec.validate_request(request)
    response = MockResponse(ex.reply, status_code=ex.status, content_type=ex.reply_type)
    spec.validate_response(request, response)


def fake_virtiofsd(tmp: Path) -> Path:
    """A stand-in virtiofsd: binds ``--socket-path`` and waits for SIGTERM."""
    script = tmp / "virtiofsd"
    script.write_text(
        "#!/usr/bin/env python3\n"
        "import signal, socket, sys, os\n"
        "path = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--socket-path=')][0]\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(1)\n"
        "signal.signal(signal.SIGTERM, lambda *a: (os.unlink(path), sys.exit(0)))\n"
        "signal.pause()\n"
    )
    script.chmod(0o755)
    return script


async def run_full_life(tmp: Path, recorder: Recorder) -> None:
    cfg = sim_config(tmp)
    cfg.shared_fs.shared_fs = "virtio-fs"
    cfg.shared_fs.virtio_fs_daemon = str(fake_virtiofsd(tmp))
    cfg.template.devices_state_path = str(tmp / "snapshot")
    cfg.network.rx_rate_limiter_max_rate = 8_000_000
    disk = tmp / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    (tmp / "share").mkdir()
    hv = CloudHypervisor(event_hooks=recorder.hooks)
    await hv.create_sandbox("contract", NetworkNamespace(), cfg)
    await hv.add_device(BlockDrive(file=str(disk), id="cold0", read_only=True))
    await hv.add_device(NetDevice(id="eth0", tap_name="tap0", mac="02:00:00:00:00:01", queues=2))
    await hv.add_device(VfioDevice(bdf="0000:3b:00.0", id="gpu0"))
    await hv.add_device(FsShare(host_path=str(tmp / "share"), mount_tag="kataShared"))
    await hv.start_sandbox(timeout=30)
    try:
        await hv.check()
        assert await hv.resize_vcpus(3) == (1, 3)
        assert await hv.resize_vcpus(2) == (3, 2)
        await hv.resize_memory(512 + 100, 128, probe=False)
        drive = await hv.hotplug_add_device(BlockDrive(file=str(disk), id="hot0"))
        with pytest.raises(ApiError) as dup:
            await hv.hotplug_add_device(BlockDrive(file=str(disk), id="hot0"))
        assert dup.value.status == 409
        nic = await hv.hotplug_add_device(
            NetDevice(
                id="eth1", tap_name="tap1", mac="02:00:00:00:00:02", tx_rate_limiter_max_rate=1000
            )
        )
        vfio = await hv.hotplug_add_device(VfioDevice(bdf="0000:3c:00.0", id="nic1"))
        fs = await hv.hotplug_add_device(
            VhostUserDevice(
                socket_path=str(tmp / "vfsd.sock"), id="fs1", type=VhostUserKind.FS, tag="extra"
            )
        )
        for dev in (drive, nic, vfio, fs):
            await hv.hotplug_remove_device(dev)
        with pytest.raises(ApiError) as gone:
            await hv.hotplug_remove_device(drive)
        assert gone.value.status == 404
        with pytest.raises(ApiError) as wrong_state:
            await hv.api.resume_vm()  # running, not paused
        assert wrong_state.value.status == 405
        await hv.pause_sandbox()
        await hv.save_sandbox()
        await hv.resume_sandbox()
        await hv.api.vm_info()
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


async def test_every_request_and_reply_matches_the_spec(spec: OpenAPI, tmp_path: Path) -> None:
    recorder = Recorder()
    await run_full_life(tmp_path, recorder)
    seen = {(ex.method, ex.path) for ex in recorder.exchanges}
    assert seen >= DRIVER_ENDPOINTS, f"not exercised: {DRIVER_ENDPOINTS - seen}"
    for ex in recorder.exchanges:
        try:
            validate(spec, ex)
        except Exception as exc:
            pytest.fail(f"{ex.method} {ex.path} {ex.body[:300]!r} -> {ex.status}: {exc!r}")
    errors = [ex for ex in recorder.exchanges if ex.status >= 400]
    assert {ex.status for ex in errors} == {404, 405, 409}
    assert all(ex.reply for ex in errors), "error replies carry a text body"


def test_driver_endpoints_list_is_complete() -> None:
    """A new endpoint in the API client must be added to the contract run above."""
    source = Path(clh_api.__file__).read_text()
    literal = {m for m in re.findall(r'"(vmm?\.[a-z-]+)"', source)}
    adds = {f"vm.add-{k}" for k in ("disk", "net", "device", "fs")}
    assert "vm.add-{kind}" not in literal
    called = {p.removeprefix("/api/v1/") for _, p in DRIVER_ENDPOINTS}
    assert literal | adds <= called


async def test_vm_create_body_is_what_the_spec_describes(spec: OpenAPI, tmp_path: Path) -> None:
    recorder = Recorder()
    await run_full_life(tmp_path, recorder)
    create = next(ex for ex in recorder.exchanges if ex.path.endswith("/vm.create"))
    body = json.loads(create.body)
    assert body["cpus"] == {"boot_vcpus": 1, "max_vcpus": 4}
    assert body["memory"]["size"] == 512 << 20
    assert body["memory"]["hotplug_method"] == "Acpi"
    assert body["vsock"]["cid"] == 3
    assert body["vsock"]["socket"].endswith("/clh-vsock.sock")
    assert "vc.agent=vsock" in body["payload"]["cmdline"]
    assert body["console"] == {"mode": "Off"}
    assert body["serial"]["mode"] == "Socket"
    assert body["disks"] == [
        {"path": str(tmp_path / "disk.img"), "readonly": True, "id": "disk-cold0"}
    ]
    (net,) = body["net"]
    assert net["num_queues"] == 4
    assert net["rate_limiter_config"] == {"bandwidth": {"size": 1_000_000, "refill_time": 1000}}
    assert body["devices"] == [{"path": "/sys/bus/pci/devices/0000:3b:00.0/", "id": "vfio-gpu0"}]
    assert body["fs"][0]["tag"] == "kataShared"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/vm.create", {"cpus": {"boot_vcpus": 1, "max_vcpus": 1}}),  # no payload
        (
            "/api/v1/vm.create",
            {"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 0, "max_vcpus": 1}},
        ),
        ("/api/v1/vm.create", {"payload": {"kernel": "/k"}, "vsock": {"cid": 2, "socket": "/s"}}),
        ("/api/v1/vm.create", {"payload": {"kernel": "/k"}, "memory": {"size": "512M"}}),
        ("/api/v1/vm.resize", {"desired_vcpus": "two"}),
        ("/api/v1/vm.add-disk", {"path": "/d", "readonly": "yes"}),
        ("/api/v1/vm.add-fs", {"tag": "t"}),  # socket, num_queues, queue_size required
        ("/api/v1/vm.remove-device", {"id": 7}),
    ],
)
def test_a_wrong_body_is_rejected(spec: OpenAPI, path: str, body: dict[str, object]) -> None:
    with pytest.raises(Exception, match=r"(?i)invalid|required|valid"):
        spec.validate_request(mock_request("PUT", path, json.dumps(body).encode()))


def test_an_undocumented_reply_is_rejected(spec: OpenAPI) -> None:
    request = mock_request("GET", "/api/v1/vm.info", b"")
    bad = MockResponse(json.dumps({"state": "Booting"}).encode(), status_code=200)
    with pytest.raises(Exception):  # noqa: B017, PT011 - any validation error will do
        spec.validate_response(request, bad)
