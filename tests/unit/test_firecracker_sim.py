"""The Firecracker simulator's own rules (it must refuse what Firecracker refuses, or the
driver tests that run against it prove nothing), and the Kata configuration file."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.behaviour.harness_firecracker import sim_config
from virtcontainers.config.kata import load_kata_config
from virtcontainers.drivers.firecracker import FirecrackerHypervisor
from virtcontainers.hypervisor import HypervisorType, NetworkNamespace, VmState


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[tuple[httpx.Client, Path]]:
    """A simulator started with ``python -m``, and a client on its API socket."""
    sock = tmp_path / "api.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtcontainers.testing.fc_sim", "--api-sock", str(sock),
         "--id", "sim1", "--seccomp-level", "0", "--boot-timer"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, "the simulator exited"
        assert time.monotonic() < deadline, "the simulator did not create its socket"
        time.sleep(0.01)
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://x")
    try:
        yield client, tmp_path
    finally:
        client.close()
        proc.terminate()
        assert proc.wait(10) == 0


def _fault(reply: httpx.Response) -> str:
    assert reply.status_code == 400, reply.text
    return str(reply.json()["fault_message"])


def _configure(api: httpx.Client, tmp: Path) -> None:
    kernel = tmp / "vmlinux"
    kernel.write_bytes(b"k")
    assert api.put("/boot-source", json={"kernel_image_path": str(kernel)}).status_code == 204
    body = {"vcpu_count": 2, "mem_size_mib": 256}
    assert api.put("/machine-config", json=body).status_code == 204


def test_instance_info_and_the_start_rules(sim: tuple[httpx.Client, Path]) -> None:
    api, tmp = sim
    info = api.get("/").json()
    assert info["id"] == "sim1"
    assert info["app_name"] == "Firecracker"
    assert info["state"] == "Not started"
    start = {"action_type": "InstanceStart"}
    assert "kernel configuration" in _fault(api.put("/actions", json=start))
    kernel = tmp / "vmlinux"
    kernel.write_bytes(b"k")
    assert api.put("/boot-source", json={"kernel_image_path": str(kernel)}).status_code == 204
    assert "machine configuration" in _fault(api.put("/actions", json=start))
    assert (
        api.put("/machine-config", json={"vcpu_count": 2, "mem_size_mib": 256}).status_code == 204
    )
    kernel.unlink()
    assert "Kernel image not found" in _fault(api.put("/actions", json=start))
    kernel.write_bytes(b"k")
    assert api.put("/actions", json=start).status_code == 204
    assert api.get("/").json()["state"] == "Running"


def test_pre_boot_only_and_post_boot_only(sim: tuple[httpx.Client, Path]) -> None:
    api, tmp = sim
    disk = tmp / "disk"
    disk.write_bytes(b"")
    drive = {"drive_id": "d0", "path_on_host": str(disk), "is_root_device": False}
    assert "before starting" in _fault(api.patch("/drives/d0", json={"drive_id": "d0"}))
    assert "before starting" in _fault(api.patch("/vm", json={"state": "Paused"}))
    assert api.put("/drives/d0", json=drive).status_code == 204
    _configure(api, tmp)
    assert api.put("/actions", json={"action_type": "InstanceStart"}).status_code == 204
    after = "not supported after starting"
    assert after in _fault(api.put("/drives/d1", json={**drive, "drive_id": "d1"}))
    assert after in _fault(api.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 256}))
    assert after in _fault(api.put("/vsock", json={"guest_cid": 3, "uds_path": str(tmp / "v")}))
    assert after in _fault(api.put("/actions", json={"action_type": "InstanceStart"}))
    patch = {"drive_id": "d0", "path_on_host": str(disk)}
    assert api.patch("/drives/d0", json=patch).status_code == 204
    assert "not found" in _fault(api.patch("/drives/d9", json={**patch, "drive_id": "d9"}))
    snap = {"snapshot_path": str(tmp / "s"), "mem_file_path": str(tmp / "m")}
    assert "not paused" in _fault(api.put("/snapshot/create", json=snap))
    assert api.patch("/vm", json={"state": "Paused"}).status_code == 204
    assert api.put("/snapshot/create", json=snap).status_code == 204
    assert (tmp / "m").stat().st_size == 256 << 20


def test_bodies_are_checked_like_firecracker_does(sim: tuple[httpx.Client, Path]) -> None:
    api, tmp = sim
    assert "unknown field `cpus`" in _fault(
        api.put("/machine-config", json={"cpus": 1, "mem_size_mib": 256})
    )
    assert "missing field `is_root_device`" in _fault(
        api.put("/drives/d0", json={"drive_id": "d0", "path_on_host": "/dev/null"})
    )
    assert "does not match" in _fault(
        api.put("/drives/d0", json={"drive_id": "d1", "is_root_device": False})
    )
    assert "No such file" in _fault(
        api.put(
            "/drives/d0",
            json={"drive_id": "d0", "path_on_host": str(tmp / "x"), "is_root_device": False},
        )
    )
    assert "invalid type" in _fault(
        api.put("/machine-config", json={"vcpu_count": "2", "mem_size_mib": 256})
    )
    assert "vCPU number is invalid" in _fault(
        api.put("/machine-config", json={"vcpu_count": 33, "mem_size_mib": 256})
    )
    assert "deserializing" in _fault(api.put("/machine-config", content=b"{oops"))
    assert _fault(api.get("/nope")) == "Invalid request method and/or path: GET /nope."
    assert "Invalid request method and/or path" in _fault(api.post("/vm", json={}))
    assert "Invalid rate limiter" in _fault(
        api.put(
            "/network-interfaces/eth0",
            json={"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"x": 1}},
        )
    )
    assert "Invalid guest CID" in _fault(api.put("/vsock", json={"guest_cid": 2, "uds_path": "/v"}))


def test_refuses_an_existing_api_socket(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    sock.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "virtcontainers.testing.fc_sim", "--api-sock", str(sock)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert "already used" in done.stderr


# -- Kata's configuration-fc.toml --------------------------------------------------------


async def test_kata_fc_configuration_is_accepted_and_boots(
    shared_dir: Path, tmp_path: Path
) -> None:
    text = (shared_dir / "kata-configs" / "configuration-fc.toml").read_text()
    dummies = sim_config(tmp_path / "assets")
    image = tmp_path / "kata-containers.img"
    image.write_bytes(b"\0" * 4096)
    for original, replacement in (
        ("/usr/bin/firecracker", dummies.boot.hypervisor_path),
        ("/usr/share/kata-containers/vmlinux.container", dummies.boot.kernel_path),
        ("/usr/share/kata-containers/kata-containers.img", str(image)),
    ):
        assert original in text
        text = text.replace(original, replacement)
    path = tmp_path / "configuration-fc.toml"
    path.write_text(text)
    loaded = load_kata_config(path)
    assert loaded.hypervisor_type is HypervisorType.FIRECRACKER
    cfg = loaded.config
    assert cfg.storage.block_device_driver == "virtio-mmio"
    assert cfg.resources.memory_size == 2048
    hv = FirecrackerHypervisor()
    await hv.create_sandbox("kata-fc", NetworkNamespace(), cfg)
    assert hv.state is VmState.CREATED
    await hv.start_sandbox(timeout=20)
    try:
        await hv.check()
        assert sorted(await hv.get_thread_ids()) == [0]
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
