"""The Cloud Hypervisor driver against the simulator: errors, timeouts, launch failures,
crash clean-up, console, hybrid vsock, snapshot, reattach, virtiofsd, the Kata config."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

from tests.behaviour.harness_clh import sim_config
from tests.unit.test_agent_client import Agent, agent_binary, start_agent  # noqa: F401
from virtcontainers.agent.client import AgentClient
from virtcontainers.agent.transport import connect_hybrid_vsock
from virtcontainers.config import HypervisorConfig
from virtcontainers.config.kata import load_kata_config
from virtcontainers.deadline import Deadline
from virtcontainers.devices import (
    BlockDrive,
    CpuDevice,
    FsShare,
    HybridVSock,
    MemoryDevice,
    NetDevice,
    VfioDevice,
)
from virtcontainers.drivers._rest import ApiUnreachable
from virtcontainers.drivers.clh import CloudHypervisor
from virtcontainers.drivers.clh.api import ClhApi
from virtcontainers.errors import (
    AgentError,
    ApiError,
    HypervisorError,
    HypervisorTimeout,
    LaunchError,
    StateError,
    UnsupportedError,
)
from virtcontainers.hypervisor import NetworkNamespace, VmState
from virtcontainers.testing.clh_sim import parse_args, write_wrapper


def sim(tmp: Path, *extra: str) -> HypervisorConfig:
    cfg = sim_config(tmp)
    cfg.boot.hypervisor_path = str(write_wrapper(tmp / "cloud-hypervisor", extra_args=extra))
    return cfg


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def leftovers(run_dir: Path) -> list[str]:
    """Sockets left in the run dir (logs are kept until cleanup)."""
    if not run_dir.exists():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.is_socket())


@pytest.fixture
async def vm(tmp_path: Path) -> AsyncIterator[CloudHypervisor]:
    hv = CloudHypervisor()
    await hv.create_sandbox("unit", NetworkNamespace(), sim(tmp_path))
    await hv.start_sandbox(timeout=30)
    try:
        yield hv
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


# -- errors and timeouts -------------------------------------------------------------------


async def test_error_reply_becomes_api_error_with_status_request_and_body(
    vm: CloudHypervisor,
) -> None:
    with pytest.raises(ApiError) as exc:
        await vm.api.resume_vm()
    assert exc.value.status == 405
    assert exc.value.request == "PUT /api/v1/vm.resume"
    assert "Running" in exc.value.reply
    assert exc.value.driver == "clh"
    with pytest.raises(ApiError) as exc:
        await vm.hotplug_remove_device(BlockDrive(file="/f", id="never"))
    assert exc.value.status == 404
    assert "disk-never" in exc.value.reply


async def test_connection_error_becomes_hypervisor_error(tmp_path: Path) -> None:
    api = ClhApi(tmp_path / "nothing.sock", sandbox_id="x")
    with pytest.raises(ApiUnreachable, match=r"GET /api/v1/vmm.ping: cannot connect") as exc:
        await api.ping()
    assert not isinstance(exc.value, ApiError | HypervisorTimeout)
    await api.aclose()


async def test_slow_reply_times_out_after_one_second(tmp_path: Path) -> None:
    hv = CloudHypervisor()
    await hv.create_sandbox("slow", NetworkNamespace(), sim(tmp_path, "--sim-delay", "vm.pause=3"))
    await hv.start_sandbox(timeout=30)
    try:
        started = time.monotonic()
        with pytest.raises(HypervisorTimeout) as exc:
            await hv.pause_sandbox()
        assert 0.9 < time.monotonic() - started < 2.5
        assert exc.value.operation == "PUT /api/v1/vm.pause"
        assert exc.value.seconds == 1.0
        assert hv.state is VmState.RUNNING
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


async def test_slow_vmm_start_is_not_cut_by_the_api_timeout(tmp_path: Path) -> None:
    """kata-containers#6240: the 1 s request timeout must not run before the VMM answered."""
    hv = CloudHypervisor()
    await hv.create_sandbox(
        "slowstart", NetworkNamespace(), sim(tmp_path, "--sim-startup-delay", "1.5")
    )
    assert hv.api.default_timeout() == 10.0
    await hv.start_sandbox(timeout=30)
    assert hv.api.default_timeout() == 1.0
    await hv.stop_sandbox()
    await hv.cleanup()


async def test_vmm_that_exits_at_once_is_a_launch_error(tmp_path: Path) -> None:
    binary = tmp_path / "broken-clh"
    binary.write_text("#!/bin/sh\necho 'Error: KVM is not available' >&2\nexit 3\n")
    binary.chmod(0o755)
    cfg = sim_config(tmp_path)
    cfg.boot.hypervisor_path = str(binary)
    hv = CloudHypervisor()
    await hv.create_sandbox("dies", NetworkNamespace(), cfg)
    with pytest.raises(LaunchError) as exc:
        await hv.start_sandbox(timeout=10)
    assert exc.value.exit_code == 3
    assert "KVM is not available" in exc.value.log_tail
    assert exc.value.argv[1:] == ("--api-socket", f"path={hv.paths.api}")
    assert hv.state is VmState.FAILED
    assert leftovers(hv.paths.run_dir) == []
    await hv.cleanup()


async def test_vmm_that_never_answers_times_out_and_is_killed(tmp_path: Path) -> None:
    binary = tmp_path / "mute-clh"
    binary.write_text('#!/bin/sh\necho $$ > "$(dirname "$0")/pid"\nexec sleep 60\n')
    binary.chmod(0o755)
    cfg = sim_config(tmp_path)
    cfg.boot.hypervisor_path = str(binary)
    hv = CloudHypervisor()
    await hv.create_sandbox("mute", NetworkNamespace(), cfg)
    with pytest.raises(HypervisorTimeout, match="starting cloud-hypervisor"):
        await hv.start_sandbox(timeout=1.0)
    pid = int((tmp_path / "pid").read_text())
    assert not alive(pid)
    assert hv.state is VmState.FAILED
    await hv.cleanup()


async def test_refused_vm_config_is_an_api_error_and_nothing_is_left(tmp_path: Path) -> None:
    cfg = sim(tmp_path)
    hv = CloudHypervisor()
    await hv.create_sandbox("refused", NetworkNamespace(), cfg)
    Path(cfg.boot.kernel_path).unlink()  # the VMM fails to load it at boot
    with pytest.raises(ApiError, match="kernel") as exc:
        await hv.start_sandbox(timeout=30)
    assert exc.value.request == "PUT /api/v1/vm.boot"
    assert hv.get_pids() == []
    assert leftovers(hv.paths.run_dir) == []
    await hv.cleanup()


# -- crash, stop, console ----------------------------------------------------------------


async def test_crash_mid_run_then_stop_leaves_nothing(tmp_path: Path) -> None:
    hv = CloudHypervisor()
    await hv.create_sandbox("crash", NetworkNamespace(), sim(tmp_path))
    await hv.start_sandbox(timeout=30)
    pid = hv.get_pids()[0]
    run_dir = hv.paths.run_dir
    assert {"clh-api.sock", "clh-vsock.sock", "console.sock"} <= set(leftovers(run_dir))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(HypervisorError, match=r"not running|exited"):
        await hv.check()
    assert hv.state is VmState.FAILED
    with pytest.raises(HypervisorError, match="has failed") as again:
        await hv.check()
    assert type(again.value) is HypervisorError
    await hv.stop_sandbox()
    assert hv.state is VmState.STOPPED
    assert not alive(pid)
    assert leftovers(run_dir) == []
    await hv.cleanup()
    assert not run_dir.exists()


async def test_crash_during_an_api_call_marks_the_vm_failed(vm: CloudHypervisor) -> None:
    os.kill(vm.get_pids()[0], signal.SIGKILL)
    await asyncio.sleep(0.1)
    with pytest.raises(HypervisorError, match="exited"):
        await vm.hotplug_add_device(BlockDrive(file="/dev/null", id="late"))
    assert vm.state is VmState.FAILED


async def test_stop_is_polite_and_console_is_drained_after_exit(tmp_path: Path) -> None:
    hv = CloudHypervisor()
    await hv.create_sandbox("console", NetworkNamespace(), sim(tmp_path))
    await hv.start_sandbox(timeout=30)
    assert (await hv.get_sandbox_console("console")).url == str(hv.paths.console)
    pid = hv.get_pids()[0]
    # The guest powers off (what the agent does on its own shutdown): then wait_only.
    await hv.api.request("PUT", "vm.shutdown")
    await hv.api.shutdown_vmm()
    started = time.monotonic()
    await hv.stop_sandbox(wait_only=True)
    assert time.monotonic() - started < 2.0
    assert not alive(pid)
    log = hv.paths.console_log.read_text()
    assert "Linux version" in log
    assert log.rstrip().endswith("reboot: Power down")
    assert "vmm.shutdown" in hv.paths.vmm_log.read_text()
    await hv.cleanup()


async def test_wait_only_forces_a_vmm_that_does_not_exit(tmp_path: Path) -> None:
    hv = CloudHypervisor()
    hv.stop_timeout = 0.3
    await hv.create_sandbox("force", NetworkNamespace(), sim(tmp_path))
    await hv.start_sandbox(timeout=30)
    pid = hv.get_pids()[0]
    await hv.stop_sandbox(wait_only=True)  # nobody shuts it down: SIGTERM after 0.3 s
    assert not alive(pid)
    assert "vmm.shutdown" not in hv.paths.vmm_log.read_text()
    assert leftovers(hv.paths.run_dir) == []
    await hv.cleanup()


# -- devices, resize, threads -----------------------------------------------------------


async def test_hotplug_devices_get_pci_paths(vm: CloudHypervisor, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 512)
    a = await vm.hotplug_add_device(BlockDrive(file=str(disk), id="a"))
    b = await vm.hotplug_add_device(BlockDrive(file=str(disk), id="b"))
    nic = await vm.hotplug_add_device(NetDevice(id="n", tap_name="tap9", mac="02:00:00:00:00:09"))
    gpu = await vm.hotplug_add_device(VfioDevice(bdf="0000:65:00.0", id="gpu"))
    paths = [a.pci_path, b.pci_path, nic.pci_path, gpu.pci_path]
    assert len(set(paths)) == 4
    assert all(len(p) == 2 for p in paths)
    assert (a.index, b.index) == (0, 1)
    assert vm.save().block_index_map == {0: 1, 1: 1}
    with pytest.raises(ApiError, match="cannot open"):
        await vm.hotplug_add_device(BlockDrive(file=str(tmp_path / "missing"), id="m"))
    await vm.hotplug_remove_device(a)
    assert vm.save().block_index_map == {1: 1}


async def test_cpu_and_memory_through_hotplug(vm: CloudHypervisor) -> None:
    cpus = await vm.hotplug_add_device(CpuDevice(2))
    assert (cpus.amount, cpus.ids) == (2, ["vcpu1", "vcpu2"])
    assert sorted(await vm.get_thread_ids()) == [0, 1, 2]
    assert (await vm.hotplug_add_device(CpuDevice(9))).amount == 1  # capped at max 4
    with pytest.raises(HypervisorError, match="only 3 were hot-added"):
        await vm.hotplug_remove_device(CpuDevice(4))
    removed = await vm.hotplug_remove_device(CpuDevice(3))
    assert removed.ids == ["vcpu1", "vcpu2", "vcpu3"]
    assert sorted(await vm.get_thread_ids()) == [0]
    mem = await vm.hotplug_add_device(MemoryDevice(size_mb=128))
    assert mem.size_mb == 128
    info = await vm.api.vm_info()
    assert info["memory_actual_size"] == (512 + 128) << 20
    with pytest.raises(UnsupportedError):
        await vm.resize_memory(1024, 128, probe=True)
    with pytest.raises(UnsupportedError):
        await vm.hotplug_remove_device(MemoryDevice(size_mb=128))


async def test_thread_ids_are_the_vmm_vcpu_threads(vm: CloudHypervisor) -> None:
    threads = await vm.get_thread_ids()
    pid = vm.get_pids()[0]
    for index, tid in threads.items():
        assert Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == f"vcpu{index}"


# -- pause, snapshot, agent socket ------------------------------------------------------


async def test_snapshot_needs_pause_and_writes_the_state(tmp_path: Path) -> None:
    cfg = sim(tmp_path)
    cfg.template.devices_state_path = str(tmp_path / "snap")
    hv = CloudHypervisor()
    await hv.create_sandbox("snap", NetworkNamespace(), cfg)
    await hv.start_sandbox(timeout=30)
    try:
        with pytest.raises(StateError):
            await hv.save_sandbox()
        await hv.pause_sandbox()
        await hv.check()
        await hv.save_sandbox()
        assert {p.name for p in (tmp_path / "snap").iterdir()} >= {"config.json", "state.json"}
        await hv.resume_sandbox()
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


async def test_hybrid_vsock_loopback(vm: CloudHypervisor) -> None:
    sock = await vm.generate_socket("unit")
    reader, writer = await connect_hybrid_vsock(sock.uds_path, sock.port, timeout=5)  # type: ignore[union-attr]
    writer.write(b"ping\n")
    assert await reader.readline() == b"ping\n"
    writer.close()


@pytest.fixture
def echo_agent(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn:
                data = conn.recv(100)
                conn.sendall(b"agent:" + data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    server.close()


async def test_hybrid_vsock_proxies_to_the_agent(tmp_path: Path, echo_agent: Path) -> None:
    hv = CloudHypervisor()
    await hv.create_sandbox(
        "agent", NetworkNamespace(), sim(tmp_path, "--agent-unix", str(echo_agent))
    )
    await hv.start_sandbox(timeout=30)
    try:
        sock = await hv.generate_socket("agent")
        reader, writer = await connect_hybrid_vsock(sock.uds_path, 1024, timeout=5)  # type: ignore[union-attr]
        writer.write(b"hello")
        assert await reader.read(100) == b"agent:hello"
        writer.close()
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


async def test_hybrid_vsock_refused_when_the_agent_is_not_listening(tmp_path: Path) -> None:
    hv = CloudHypervisor()
    await hv.create_sandbox(
        "noagent", NetworkNamespace(), sim(tmp_path, "--agent-unix", str(tmp_path / "none"))
    )
    await hv.start_sandbox(timeout=30)
    try:
        with pytest.raises(AgentError, match="refused"):
            await connect_hybrid_vsock(hv.paths.vsock, 1024, timeout=5)
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


@pytest.fixture
def vc_agent(agent_binary: Path, tmp_path: Path) -> Iterator[Agent]:  # noqa: F811
    """The real guest agent, compiled and run on the host on a unix socket."""
    yield from start_agent(agent_binary, tmp_path)


async def test_guest_agent_through_the_simulated_vsock(tmp_path: Path, vc_agent: Agent) -> None:
    """AgentClient -> hybrid vsock of the VMM -> vc-agent (host-run, ``--unix``)."""
    hv = CloudHypervisor()
    await hv.create_sandbox(
        "vcagent", NetworkNamespace(), sim(tmp_path, "--agent-unix", vc_agent.sock)
    )
    await hv.start_sandbox(timeout=30)
    try:
        sock = await hv.generate_socket("vcagent")
        assert isinstance(sock, HybridVSock)
        client = await AgentClient.connect_hybrid_vsock(sock.uds_path, sock.port, timeout=10)
        try:
            assert (await client.ping()).protocol_major >= 0
            result = await client.exec(["echo", "through", "vsock"])
            assert (result.exit_code, result.stdout) == (0, b"through vsock\n")
        finally:
            await client.close()
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


# -- reattach ---------------------------------------------------------------------------


async def test_to_grpc_and_from_grpc_adopt_the_running_vm(vm: CloudHypervisor) -> None:
    await vm.resize_vcpus(2)
    await vm.pause_sandbox()
    data = await vm.to_grpc()
    other = CloudHypervisor()
    await other.from_grpc(vm.hypervisor_config(), data)
    assert other.state is VmState.PAUSED
    assert other.get_pids() == vm.get_pids()
    assert other.save().hotplugged_vcpus == ("vcpu1",)
    await other.check()
    await other.resume_sandbox()
    assert sorted(await other.get_thread_ids()) == [0, 1]
    with pytest.raises(HypervisorError, match="invalid serialized VM"):
        await CloudHypervisor().from_grpc(vm.hypervisor_config(), b"{}")
    await other.disconnect()


async def test_load_rejects_another_driver_state(vm: CloudHypervisor) -> None:
    with pytest.raises(StateError):
        CloudHypervisor().load(msgspec.structs.replace(vm.save(), type="qemu"))


# -- virtio-fs ----------------------------------------------------------------------------


async def test_virtiofsd_per_share_started_and_stopped(tmp_path: Path) -> None:
    from tests.contract.test_clh_contract import fake_virtiofsd

    cfg = sim(tmp_path)
    cfg.shared_fs.shared_fs = "virtio-fs"
    cfg.shared_fs.virtio_fs_daemon = str(fake_virtiofsd(tmp_path))
    (tmp_path / "share").mkdir()
    hv = CloudHypervisor()
    await hv.create_sandbox("fs", NetworkNamespace(), cfg)
    await hv.add_device(FsShare(host_path=str(tmp_path / "share"), mount_tag="kataShared"))
    await hv.start_sandbox(timeout=30)
    pids = hv.get_pids()
    assert len(pids) == 2
    assert hv.save().virtiofsd_pid == pids[1]
    info = await hv.api.vm_info()
    assert info["config"]["fs"][0]["socket"] == str(hv.paths.virtiofsd_socket(0))
    await hv.stop_sandbox()
    assert not any(alive(p) for p in pids)
    assert leftovers(hv.paths.run_dir) == []
    await hv.cleanup()


# -- simulator ----------------------------------------------------------------------------


def test_simulator_accepts_cloud_hypervisor_flags() -> None:
    opts = parse_args(
        ["--api-socket", "path=/x/api.sock", "-v", "--log-file", "/l", "--sim-delay", "vm.boot=2"]
    )
    assert opts.api_socket == "/x/api.sock"
    assert opts.delays == {"vm.boot": 2.0}
    assert parse_args(["--api-socket=/y.sock"]).api_socket == "/y.sock"
    with pytest.raises(SystemExit):
        parse_args(["-v"])


async def test_simulator_state_machine(tmp_path: Path) -> None:
    """The spec's status codes, straight through the client (no driver guards)."""
    proc = await asyncio.create_subprocess_exec(
        str(write_wrapper(tmp_path / "sim")), "--api-socket", f"path={tmp_path / 'api.sock'}"
    )
    api = ClhApi(tmp_path / "api.sock")
    try:
        await api.wait_ready(Deadline.after(10))
        replies: list[str] = []

        async def status(method: str, endpoint: str, body: dict[str, object] | None = None) -> int:
            try:
                return (await api.request(method, endpoint, body)).status_code
            except ApiError as exc:
                replies.append(exc.reply)
                return exc.status or 0

        assert await status("GET", "vm.info") == 404
        assert await status("PUT", "vm.boot") == 404
        assert await status("PUT", "vm.pause") == 404
        kernel = tmp_path / "k"
        kernel.write_bytes(b"k")
        config = {"payload": {"kernel": str(kernel)}, "cpus": {"boot_vcpus": 1, "max_vcpus": 2}}
        assert await status("PUT", "vm.create", {"payload": {}}) == 400
        assert await status("PUT", "vm.create", config) == 204
        assert await status("PUT", "vm.create", config) == 500
        assert await status("PUT", "vm.pause") == 405  # created, not booted
        assert await status("PUT", "vm.add-disk", {"path": str(kernel), "id": "x"}) == 204
        assert await status("PUT", "vm.boot") == 204
        assert await status("PUT", "vm.resume") == 405
        assert await status("PUT", "vm.snapshot", {"destination_url": "file:///"}) == 405
        assert await status("PUT", "vm.add-disk", {"path": str(kernel), "id": "x"}) == 409
        assert await status("PUT", "vm.add-disk", {"readonly": True}) == 400
        assert await status("PUT", "vm.resize", {"desired_vcpus": 3}) == 500
        assert await status("PUT", "vm.resize", {"desired_vcpus": 2}) == 204
        assert await status("PUT", "vm.remove-device", {"id": "nope"}) == 404
        assert await status("PUT", "vm.remove-device", {"id": "x"}) == 204
        assert await status("GET", "vm.nothing") == 404
        assert await status("GET", "vm.boot") == 405
        assert await status("PUT", "vm.pause") == 204
        assert await status("PUT", "vm.pause") == 405
        assert (await api.vm_info())["state"] == "Paused"
        assert all(replies), "every error reply has a text body"
        await api.shutdown_vmm()
        assert await asyncio.wait_for(proc.wait(), 5) == 0
        assert not (tmp_path / "api.sock").exists()
    finally:
        await api.aclose()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_simulator_exits_on_sigterm(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(write_wrapper(tmp_path / "sim")), "--api-socket", f"path={tmp_path / 'api.sock'}"
    )
    api = ClhApi(tmp_path / "api.sock")
    await api.wait_ready(Deadline.after(10))
    await api.aclose()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 5) == 0
    assert not (tmp_path / "api.sock").exists()


# -- the Kata configuration file ------------------------------------------------------------


async def test_kata_clh_configuration_is_accepted(shared_dir: Path, tmp_path: Path) -> None:
    source = shared_dir / "kata-configs" / "configuration-clh.toml"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    wrapper = write_wrapper(tmp_path / "cloud-hypervisor")
    kernel, image = tmp_path / "vmlinux.container", tmp_path / "kata-containers.img"
    kernel.write_bytes(b"k")
    image.write_bytes(b"\0" * 4096)
    daemon = tmp_path / "virtiofsd"
    shutil.copy("/bin/true", daemon)
    text = (
        source.read_text()
        .replace("/usr/bin/cloud-hypervisor", str(wrapper))
        .replace("/usr/share/kata-containers/vmlinux.container", str(kernel))
        .replace("/usr/share/kata-containers/kata-containers.img", str(image))
        .replace("/usr/libexec/kata-qemu/virtiofsd", str(daemon))
    )
    path = tmp_path / "configuration-clh.toml"
    path.write_text(text)
    kata = load_kata_config(path)
    assert kata.hypervisor_type.value == "clh"
    cfg = kata.config
    assert cfg.shared_fs.shared_fs == "virtio-fs"
    cfg.resources.memory_size = 512  # the file's 2048 MiB is fine too, but keep tests small
    hv = CloudHypervisor()
    await hv.create_sandbox("kata", NetworkNamespace(), cfg)
    body = hv.build_vm_config()
    assert body["disks"][0] == {"path": str(image), "readonly": True, "id": "rootfs"}
    assert "root=/dev/vda1" in body["payload"]["cmdline"].split()
    assert "initramfs" not in body["payload"]
    await hv.start_sandbox(timeout=30)
    try:
        await hv.check()
        assert (await hv.api.vm_info())["state"] == "Running"
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
