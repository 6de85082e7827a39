"""The Firecracker driver against the simulator (its real launch path: spawn, REST, signals).

Every test starts the simulator through ``boot.hypervisor_path``; nothing is mocked inside
the driver. What the simulator cannot show (a real guest) is in
tests/integration/test_firecracker_real.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.behaviour.harness_firecracker import sim_config
from virtcontainers.agent.transport import connect_hybrid_vsock
from virtcontainers.config import HypervisorConfig, Param
from virtcontainers.devices import (
    BlockDrive,
    CpuDevice,
    FsShare,
    HybridVSock,
    MemoryDevice,
    NetDevice,
    VSock,
)
from virtcontainers.drivers._rest import ApiUnreachable
from virtcontainers.drivers.firecracker import FirecrackerHypervisor
from virtcontainers.drivers.firecracker import driver as fc_driver
from virtcontainers.drivers.firecracker.driver import (
    DISK_POOL_SIZE,
    guest_disk_name,
    kernel_params,
    rate_limiter,
    revert_bytes,
)
from virtcontainers.errors import (
    AgentError,
    ApiError,
    ConfigError,
    HypervisorError,
    HypervisorTimeout,
    LaunchError,
    StateError,
    UnsupportedError,
)
from virtcontainers.hypervisor import (
    Capability,
    HypervisorType,
    NetworkNamespace,
    VmState,
    new_hypervisor,
)

Request = tuple[str, str, object]


class Recorder:
    """Records (method, path, body) of every request the driver sends."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    async def __call__(self, request: httpx.Request) -> None:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body))

    def find(self, method: str, path: str) -> list[object]:
        return [b for m, p, b in self.requests if (m, p) == (method, path)]

    def sequence(self) -> list[str]:
        out: list[str] = []
        for m, p, _ in self.requests:
            key = f"{m} {p}"
            if m != "GET" and (not out or out[-1] != key):
                out.append(key)
        return out


@pytest.fixture
def cfg(tmp_path: Path) -> HypervisorConfig:
    return sim_config(tmp_path / "assets")


async def _started(
    cfg: HypervisorConfig, recorder: Recorder | None = None, name: str = "fc-unit"
) -> FirecrackerHypervisor:
    hv = FirecrackerHypervisor(request_hooks=[recorder] if recorder else ())
    await hv.create_sandbox(name, NetworkNamespace(), cfg)
    await hv.start_sandbox(timeout=20)
    return hv


@pytest.fixture
async def running(cfg: HypervisorConfig) -> AsyncIterator[FirecrackerHypervisor]:
    hv = await _started(cfg)
    try:
        yield hv
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _api(hv: FirecrackerHypervisor) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(hv.paths.api_socket)), base_url="http://localhost"
    )


# -- pure helpers ------------------------------------------------------------------------


def test_registered_as_the_firecracker_driver() -> None:
    assert isinstance(new_hypervisor(HypervisorType.FIRECRACKER), FirecrackerHypervisor)
    assert new_hypervisor("firecracker").is_rate_limiter_builtin()


def test_kernel_params_follow_the_reference(cfg: HypervisorConfig) -> None:
    quiet = kernel_params(cfg).split()
    assert "8250.nr_uarts=0" in quiet
    assert not any(p.startswith("console=") for p in quiet)
    assert {"pci=off", "reboot=k", "panic=1", "vc.agent=vsock"} <= set(quiet)
    assert not any(p.startswith("root=") for p in quiet)  # initrd boot
    cfg.debugging.debug = True
    cfg.boot.image_path, cfg.boot.initrd_path = "/img", ""
    cfg.boot.kernel_params.append(Param("vc.agent", "vsock:2000"))
    loud = kernel_params(cfg).split()
    assert "console=ttyS0" in loud
    assert "8250.nr_uarts=0" not in loud
    assert "root=/dev/vda1" in loud
    assert loud[-1] == "vc.agent=vsock:2000"  # the user's parameters come last and win


def test_rate_limiter_converts_kata_bits_to_firecracker_bytes() -> None:
    assert revert_bytes(999) == 999
    assert revert_bytes(1000) == 1024
    assert revert_bytes(1_000_000) == 1024 * 1024
    assert revert_bytes(1_500_000) == 1024 * 1024 + 500 * 1024
    assert rate_limiter(0) is None
    assert rate_limiter(8_000_000) == {"bandwidth": {"size": 1024 * 1024, "refill_time": 1000}}


def test_guest_disk_names() -> None:
    assert [guest_disk_name(i) for i in (0, 1, 25, 26, 27)] == [
        "vda",
        "vdb",
        "vdz",
        "vdaa",
        "vdab",
    ]


def test_capabilities() -> None:
    caps = FirecrackerHypervisor().capabilities()
    for cap in (
        Capability.BLOCK_DEVICE,
        Capability.BLOCK_DEVICE_HOTPLUG,
        Capability.HYBRID_VSOCK,
        Capability.PAUSE,
        Capability.SAVE,
    ):
        assert cap in caps
    for cap in (
        Capability.CPU_HOTPLUG,
        Capability.MEMORY_HOTPLUG,
        Capability.FS_SHARING,
        Capability.NET_HOTPLUG,
        Capability.MULTI_QUEUE,
    ):
        assert cap not in caps


# -- create: validation before any process ------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: setattr(c.boot, "image_path", c.boot.initrd_path), "boot.initrd_path"),
        (lambda c: setattr(c.resources, "num_vcpus", 33), "resources.num_vcpus"),
        (lambda c: setattr(c.boot, "kernel_path", "/nonexistent/vmlinux"), "boot.kernel_path"),
        (lambda c: setattr(c.boot, "initrd_path", ""), "boot.image_path"),
        (lambda c: setattr(c.resources, "memory_size", 255), "resources.memory_size"),
        (lambda c: setattr(c.boot, "jailer_path", "/nonexistent/jailer"), "boot.jailer_path"),
    ],
)
async def test_create_refuses_bad_configs(
    cfg: HypervisorConfig, change: object, field: str, tmp_path: Path
) -> None:
    cfg.resources.default_max_vcpus = 64
    change(cfg)  # type: ignore[operator]
    hv = FirecrackerHypervisor()
    with pytest.raises(ConfigError) as exc:
        await hv.create_sandbox("bad", NetworkNamespace(), cfg)
    assert exc.value.field == field
    assert hv.state is VmState.NEW
    assert hv.get_pids() == []


async def test_create_without_a_binary(
    cfg: HypervisorConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fc_driver, "_find", lambda name: "")
    cfg.boot.hypervisor_path = ""
    with pytest.raises(ConfigError, match="no firecracker binary"):
        await FirecrackerHypervisor().create_sandbox("bad", NetworkNamespace(), cfg)


async def test_machine_type_is_ignored(cfg: HypervisorConfig) -> None:
    cfg.boot.hypervisor_machine_type = "q35"
    hv = FirecrackerHypervisor()
    await hv.create_sandbox("mt", NetworkNamespace(), cfg)
    assert hv.state is VmState.CREATED
    await hv.cleanup()


# -- start: the configuration sequence -------------------------------------------------


async def test_start_configures_the_vm_in_the_reference_order(
    cfg: HypervisorConfig, tmp_path: Path
) -> None:
    image = tmp_path / "rootfs.img"
    image.write_bytes(b"\0" * 4096)
    disk = tmp_path / "cold.img"
    disk.write_bytes(b"\0" * 4096)
    cfg.boot.initrd_path, cfg.boot.image_path = "", str(image)
    cfg.resources.num_vcpus = 2
    cfg.network.rx_rate_limiter_max_rate = 8_000_000
    rec = Recorder()
    hv = FirecrackerHypervisor(request_hooks=[rec])
    await hv.create_sandbox("order", NetworkNamespace(), cfg)
    cold = BlockDrive(file=str(disk), id="cold0", read_only=True)
    await hv.add_device(cold)
    await hv.add_device(
        NetDevice(id="eth0", tap_name="tap0", mac="02:00:00:00:00:01", tx_rate_limiter_max_rate=800)
    )
    await hv.add_device(HybridVSock(uds_path="/elsewhere.sock", port=1024, context_id=7))
    await hv.start_sandbox(timeout=20)
    try:
        placeholders = [f"PUT /drives/drive_{i}" for i in range(DISK_POOL_SIZE)]
        assert rec.sequence() == [
            "PUT /logger",
            "PUT /metrics",
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/rootfs",
            *placeholders,
            "PUT /drives/cold0",
            "PUT /network-interfaces/eth0",
            "PUT /vsock",
            "PUT /actions",
        ]
        assert rec.find("PUT", "/machine-config") == [
            {"vcpu_count": 2, "mem_size_mib": 512, "smt": False}
        ]
        (boot,) = rec.find("PUT", "/boot-source")
        assert isinstance(boot, dict)
        assert "initrd_path" not in boot
        assert "root=/dev/vda1" in boot["boot_args"]
        assert "vc.agent=vsock" in boot["boot_args"]
        assert rec.find("PUT", "/drives/rootfs")[0] == {
            "drive_id": "rootfs",
            "path_on_host": str(image),
            "is_root_device": False,
            "is_read_only": True,
        }
        (net,) = rec.find("PUT", "/network-interfaces/eth0")
        assert net == {
            "iface_id": "eth0",
            "host_dev_name": "tap0",
            "guest_mac": "02:00:00:00:00:01",
            "rx_rate_limiter": {"bandwidth": {"size": 1024 * 1024, "refill_time": 1000}},
            "tx_rate_limiter": {"bandwidth": {"size": 100, "refill_time": 1000}},
        }
        assert rec.find("PUT", "/vsock") == [{"guest_cid": 7, "uds_path": str(hv.paths.vsock)}]
        assert rec.find("PUT", "/actions") == [{"action_type": "InstanceStart"}]
        # rootfs is vda, the placeholders vdb..vdi, the cold drive after them.
        assert cold.virt_path == "/dev/vdj"
        sock = await hv.generate_socket("order")
        assert sock == HybridVSock(uds_path=str(hv.paths.vsock), port=1024, context_id=7)
        assert sorted(await hv.get_thread_ids()) == [0, 1]
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


async def test_thread_ids_are_the_fc_vcpu_tasks(cfg: HypervisorConfig) -> None:
    cfg.resources.num_vcpus = 3
    hv = await _started(cfg)
    try:
        threads = await hv.get_thread_ids()
        assert sorted(threads) == [0, 1, 2]
        pid = hv.get_pids()[0]
        for index, tid in threads.items():
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            assert comm == f"fc_vcpu {index}"
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


async def test_stale_sockets_are_removed_before_launch(cfg: HypervisorConfig) -> None:
    hv = FirecrackerHypervisor()
    await hv.create_sandbox("stale", NetworkNamespace(), cfg)
    # Left by a crashed Firecracker: a real one (and the simulator) refuses to start.
    hv.paths.api_socket.write_text("")
    hv.paths.vsock.write_text("")
    await hv.start_sandbox(timeout=20)
    await hv.stop_sandbox()
    await hv.cleanup()


async def test_launch_error_carries_exit_code_and_log_tail(
    cfg: HypervisorConfig, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-firecracker"
    broken.write_text("#!/bin/sh\necho 'bad KVM' >&2\nexit 3\n")
    broken.chmod(0o755)
    cfg.boot.hypervisor_path = str(broken)
    hv = FirecrackerHypervisor()
    await hv.create_sandbox("launch", NetworkNamespace(), cfg)
    with pytest.raises(LaunchError) as exc:
        await hv.start_sandbox(timeout=20)
    assert exc.value.exit_code == 3
    assert "bad KVM" in exc.value.log_tail
    assert exc.value.argv[:2] == (str(broken), "--api-sock")
    assert hv.state is VmState.FAILED
    left = {p.name for p in hv.paths.run_dir.iterdir()}
    assert left <= {"firecracker.log", "fc-logger.log", "fc-metrics.log"}
    await hv.cleanup()
    assert not hv.paths.run_dir.exists()


async def test_start_timeout_kills_the_vmm(cfg: HypervisorConfig, tmp_path: Path) -> None:
    hung = tmp_path / "hung-firecracker"
    hung.write_text("#!/bin/sh\nexec sleep 60\n")
    hung.chmod(0o755)
    cfg.boot.hypervisor_path = str(hung)
    hv = FirecrackerHypervisor()
    await hv.create_sandbox("hung", NetworkNamespace(), cfg)
    started = time.monotonic()
    with pytest.raises(HypervisorTimeout) as exc:
        await hv.start_sandbox(timeout=0.5)
    assert time.monotonic() - started < 10
    assert exc.value.seconds == 0.5
    assert hv.state is VmState.FAILED
    assert hv.get_pids() == []
    await hv.cleanup()


async def test_cannot_execute(cfg: HypervisorConfig, tmp_path: Path) -> None:
    plain = tmp_path / "not-executable"
    plain.write_text("")
    cfg.boot.hypervisor_path = str(plain)
    hv = FirecrackerHypervisor()
    await hv.create_sandbox("noexec", NetworkNamespace(), cfg)
    with pytest.raises(LaunchError, match="cannot execute"):
        await hv.start_sandbox(timeout=5)
    assert hv.state is VmState.FAILED
    await hv.cleanup()


# -- errors from the API -----------------------------------------------------------------


async def test_error_replies_become_api_error_with_the_fault_message(
    running: FirecrackerHypervisor, tmp_path: Path
) -> None:
    missing = BlockDrive(file=str(tmp_path / "missing.img"), id="m")
    with pytest.raises(ApiError) as exc:
        await running.hotplug_add_device(missing)
    err = exc.value
    assert err.status == 400
    assert err.request == "PATCH /drives/drive_0"
    assert "No such file or directory" in str(err)
    assert json.loads(err.reply)["fault_message"] in str(err)
    assert missing.index == -1
    # The slot was given back: the next drive gets drive_0.
    disk = tmp_path / "ok.img"
    disk.write_bytes(b"\0" * 512)
    plugged = await running.hotplug_add_device(BlockDrive(file=str(disk), id="ok"))
    assert plugged.index == 0


async def test_api_connection_errors_are_hypervisor_errors(
    running: FirecrackerHypervisor,
) -> None:
    running.paths.api_socket.unlink()  # nobody can reach the API any more
    await running.disconnect()
    with pytest.raises(ApiUnreachable, match="cannot connect"):
        await running.pause_sandbox()
    assert running.state is VmState.RUNNING


# -- hot-plug ----------------------------------------------------------------------------


async def test_block_hotplug_uses_the_placeholder_pool(
    running: FirecrackerHypervisor, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 512)
    drives = [
        await running.hotplug_add_device(BlockDrive(file=str(disk), id=f"d{i}"))
        for i in range(DISK_POOL_SIZE)
    ]
    assert [d.index for d in drives] == list(range(DISK_POOL_SIZE))
    assert [d.virt_path for d in drives] == [f"/dev/vd{c}" for c in "abcdefgh"]
    assert running.save().block_index_map == {i: 1 for i in range(DISK_POOL_SIZE)}
    with pytest.raises(HypervisorError, match="in use"):
        await running.hotplug_add_device(BlockDrive(file=str(disk), id="one-too-many"))
    await running.hotplug_remove_device(drives[3])
    again = await running.hotplug_add_device(BlockDrive(file=str(disk), id="again"))
    assert again.index == 3
    assert 3 in running.save().block_index_map


async def test_unsupported_operations_raise(running: FirecrackerHypervisor) -> None:
    for device in (CpuDevice(1), MemoryDevice(128), NetDevice(id="n", tap_name="t", mac="")):
        with pytest.raises(UnsupportedError) as exc:
            await running.hotplug_add_device(device)
        assert exc.value.driver == "firecracker"
        with pytest.raises(UnsupportedError):
            await running.hotplug_remove_device(device)
    # The reference's no-op resizes: the current size is fine, anything else is refused.
    assert await running.resize_vcpus(1) == (1, 1)
    assert await running.resize_memory(512, 128, probe=False) == (512, MemoryDevice(0))
    assert await running.resize_memory(256, 128, probe=False) == (512, MemoryDevice(0))
    with pytest.raises(UnsupportedError):
        await running.resize_vcpus(2)
    with pytest.raises(UnsupportedError):
        await running.resize_memory(1024, 128, probe=False)
    with pytest.raises(UnsupportedError):
        await running.get_sandbox_console("fc-unit")


async def test_cold_plug_rules(cfg: HypervisorConfig) -> None:
    hv = FirecrackerHypervisor()
    await hv.create_sandbox("cold", NetworkNamespace(), cfg)
    for device in (FsShare(host_path="/tmp", mount_tag="t"), VSock(context_id=3, port=1024)):
        with pytest.raises(UnsupportedError):
            await hv.add_device(device)
    await hv.add_device(BlockDrive(file="/dev/null", id="x"))
    for taken in ("x", "drive_0", "rootfs"):
        with pytest.raises(ConfigError):
            await hv.add_device(BlockDrive(file="/dev/null", id=taken))
    await hv.cleanup()


async def test_debug_console_is_the_vmm_log(cfg: HypervisorConfig) -> None:
    cfg.debugging.debug = True
    hv = await _started(cfg)
    try:
        url = await hv.get_sandbox_console("fc-unit")
        assert (url.protocol, url.url) == ("file", str(hv.paths.vmm_log))
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


# -- pause, snapshot ---------------------------------------------------------------------


async def test_pause_resume_and_snapshot(running: FirecrackerHypervisor, tmp_path: Path) -> None:
    with pytest.raises(StateError):
        await running.save_sandbox()
    await running.pause_sandbox()
    with _api(running) as api:
        assert api.get("/").json()["state"] == "Paused"
    with pytest.raises(ConfigError):
        await running.save_sandbox()  # no template paths configured
    running._config.template.devices_state_path = str(tmp_path / "state")
    running._config.template.memory_path = str(tmp_path / "mem")
    await running.save_sandbox()
    assert json.loads((tmp_path / "state").read_text())["machine-config"]["mem_size_mib"] == 512
    assert (tmp_path / "mem").stat().st_size == 512 << 20
    await running.resume_sandbox()
    with _api(running) as api:
        assert api.get("/").json()["state"] == "Running"


# -- logger and metrics FIFOs ------------------------------------------------------------


async def test_logger_and_metrics_fifos_are_read_into_logs(cfg: HypervisorConfig) -> None:
    cfg.debugging.debug = True
    hv = await _started(cfg)
    paths = hv.paths
    assert paths.log_fifo.is_fifo()
    assert paths.metrics_fifo.is_fifo()
    await hv.pause_sandbox()
    await hv.resume_sandbox()
    await hv.stop_sandbox()
    # Drained after Firecracker exited, then removed.
    assert not paths.log_fifo.exists()
    assert not paths.metrics_fifo.exists()
    log = paths.logger_log.read_text()
    assert 'received a Put request on "/actions"' in log
    assert "The microVM has been resumed" in log
    metrics = [json.loads(line) for line in paths.metrics_log.read_text().splitlines()]
    assert metrics
    assert metrics[0]["vcpu"]["count"] == 1
    await hv.cleanup()


# -- stop --------------------------------------------------------------------------------


async def test_stop_sends_sigterm_and_leaves_only_logs(running: FirecrackerHypervisor) -> None:
    pid = running.get_pids()[0]
    run_dir = running.paths.run_dir
    await running.stop_sandbox()
    assert not _pid_alive(pid)
    assert {p.name for p in run_dir.iterdir()} <= {
        "firecracker.log",
        "fc-logger.log",
        "fc-metrics.log",
    }
    assert "Firecracker exiting" in running.paths.vmm_log.read_text()  # it ended cleanly


async def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    cfg = sim_config(tmp_path / "assets", "--sim-ignore-sigterm")
    hv = await _started(cfg)
    hv.stop_timeout = 0.5
    pid = hv.get_pids()[0]
    started = time.monotonic()
    await hv.stop_sandbox()
    assert 0.5 <= time.monotonic() - started < 10
    assert not _pid_alive(pid)
    assert "Firecracker exiting" not in hv.paths.vmm_log.read_text()
    await hv.cleanup()


async def test_wait_only_lets_the_guest_power_off(cfg: HypervisorConfig) -> None:
    hv = await _started(cfg)
    pid = hv.get_pids()[0]
    with _api(hv) as api:
        assert api.put("/actions", json={"action_type": "SendCtrlAltDel"}).status_code == 204
    started = time.monotonic()
    await hv.stop_sandbox(wait_only=True)
    assert time.monotonic() - started < 5
    assert not _pid_alive(pid)
    # It exited by itself (the simulator's own exit path), not by a signal.
    assert "Firecracker exiting" in hv.paths.vmm_log.read_text()
    await hv.cleanup()


async def test_wait_only_kills_a_guest_that_never_powers_off(tmp_path: Path) -> None:
    # SIGTERM ignored too: only the SIGKILL at the deadline can end it.
    cfg = sim_config(tmp_path / "assets", "--sim-ignore-sigterm")
    hv = await _started(cfg)
    hv.stop_timeout = 0.5
    pid = hv.get_pids()[0]
    started = time.monotonic()
    await hv.stop_sandbox(wait_only=True)
    assert time.monotonic() - started >= 0.5
    assert not _pid_alive(pid)
    await hv.cleanup()


async def test_crash_is_detected_and_nothing_leaks(cfg: HypervisorConfig) -> None:
    hv = await _started(cfg)
    pid = hv.get_pids()[0]
    run_dir = hv.paths.run_dir
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(HypervisorError, match="not running"):
        await hv.check()
    assert hv.state is VmState.FAILED
    await hv.stop_sandbox()
    assert hv.state is VmState.STOPPED
    assert hv.get_pids() == []
    assert not Path(f"/proc/{pid}").exists()  # reaped, not a zombie
    assert {p.name for p in run_dir.iterdir()} <= {
        "firecracker.log",
        "fc-logger.log",
        "fc-metrics.log",
    }
    await hv.cleanup()
    assert not run_dir.exists()


async def test_stop_is_idempotent_and_cleanup_refuses_a_running_vm(
    running: FirecrackerHypervisor,
) -> None:
    with pytest.raises(StateError):
        await running.cleanup()
    await running.stop_sandbox()
    await running.stop_sandbox()
    assert running.state is VmState.STOPPED


# -- state, reattach ---------------------------------------------------------------------


async def test_grpc_round_trip_adopts_the_running_vm(
    running: FirecrackerHypervisor, cfg: HypervisorConfig, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 512)
    drive = await running.hotplug_add_device(BlockDrive(file=str(disk), id="d"))
    await running.pause_sandbox()
    data = await running.to_grpc()
    await running.disconnect()
    adopted = FirecrackerHypervisor()
    await adopted.from_grpc(cfg, data)
    assert adopted.state is VmState.PAUSED
    assert adopted.get_pids() == running.get_pids()
    assert adopted.save() == running.save()
    await adopted.resume_sandbox()
    await adopted.check()
    await adopted.hotplug_remove_device(drive)  # found by its slot after the reload
    assert adopted.save().block_index_map == {}
    pid = adopted.get_pids()[0]
    await adopted.stop_sandbox()
    assert not _pid_alive(pid)


async def test_from_grpc_refuses_garbage_and_a_dead_vm(cfg: HypervisorConfig) -> None:
    with pytest.raises(HypervisorError, match="invalid serialized VM"):
        await FirecrackerHypervisor().from_grpc(cfg, b"{")
    hv = await _started(cfg)
    data = await hv.to_grpc()
    await hv.stop_sandbox()
    with pytest.raises(HypervisorError, match="gone"):
        await FirecrackerHypervisor().from_grpc(cfg, data)
    await hv.cleanup()


# -- hybrid vsock ------------------------------------------------------------------------


@pytest.fixture
def echo_agent(tmp_path: Path) -> Iterator[Path]:
    """A unix socket server echoing what it gets: stands in for ``vc-agent --unix``."""
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    server.close()


async def test_hybrid_vsock_reaches_the_agent(tmp_path: Path, echo_agent: Path) -> None:
    cfg = sim_config(tmp_path / "assets", "--agent-unix", str(echo_agent))
    hv = await _started(cfg)
    try:
        sock = await hv.generate_socket("fc-unit")
        assert isinstance(sock, HybridVSock)
        reader, writer = await connect_hybrid_vsock(sock.uds_path, sock.port, timeout=5)
        writer.write(b"ping\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
        writer.close()
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
    assert not Path(sock.uds_path).exists()


async def test_hybrid_vsock_without_a_guest_listener(running: FirecrackerHypervisor) -> None:
    sock = await running.generate_socket("fc-unit")
    assert isinstance(sock, HybridVSock)
    with pytest.raises(AgentError, match="refused"):
        await connect_hybrid_vsock(sock.uds_path, 1024, timeout=5)
