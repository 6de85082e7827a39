"""Sandbox on the mock driver, without QEMU: its guest is the real vc-agent run on the host,
so these tests run real processes and check the error paths of the whole lifecycle (double
start, exec on a stopped sandbox, a VMM that died between two commands, a corrupt record)
with the precise error class and message, and that nothing is left behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from virtcontainers.config import HypervisorConfig
from virtcontainers.errors import AgentError, LaunchError, StateError, StoreError
from virtcontainers.images import ImageStore
from virtcontainers.lifecycle import VmState
from virtcontainers.listing import GONE, list_sandboxes
from virtcontainers.persist import StateStore
from virtcontainers.procfs import process_matches, processes_mentioning
from virtcontainers.sandbox import Sandbox
from virtcontainers.sync import SyncSandbox

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the agent")


@pytest.fixture
def root() -> Iterator[Path]:
    # Short: the agent's socket path must fit in sun_path (108 bytes).
    path = Path(tempfile.mkdtemp(prefix="vcm-", dir="/tmp"))
    try:
        yield path
    finally:
        left = processes_mentioning(str(path))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)
        assert left == [], "a process of a mock sandbox outlived the test"


@pytest.fixture
def store(root: Path) -> StateStore:
    return StateStore(root / "vc")


@pytest.fixture
def config(root: Path) -> HypervisorConfig:
    cfg = HypervisorConfig()
    for name in ("vmlinuz", "initrd"):
        (root / name).write_bytes(b"not booted by the mock")
    cfg.boot.kernel_path = str(root / "vmlinuz")
    cfg.boot.initrd_path = str(root / "initrd")
    return cfg


@pytest.fixture
async def running(config: HypervisorConfig, store: StateStore) -> AsyncIterator[Sandbox]:
    sb = await Sandbox.create(config, id="m1", hypervisor="mock", store=store)
    await sb.start(timeout=60)
    try:
        yield sb
    finally:
        await sb.remove()


async def test_exec_runs_a_real_process_in_the_guest_agent(running: Sandbox) -> None:
    result = await running.exec(
        ["sh", "-c", 'echo "$PPID $GREETING $(pwd)"; cat; echo oops >&2; exit 3'],
        env={"GREETING": "hi", "PATH": "/usr/bin:/bin"},
        cwd="/tmp",
        stdin=b"from stdin\n",
    )
    # The agent forked it: its parent is the VM's process, the sandbox's recorded pid.
    assert result.stdout == f"{running.info().pid} hi /tmp\nfrom stdin\n".encode()
    assert (result.stderr, result.exit_code, result.signal) == (b"oops\n", 3, None)
    assert process_matches(running.info().pid, "mock-agent.sock")


async def test_files_and_timeouts_go_through_the_agent(running: Sandbox, root: Path) -> None:
    target = root / "written-by-the-agent"
    await running.write_file(str(target), b"payload", mode=0o600)
    assert target.read_bytes() == b"payload"
    assert await running.read_file(str(target)) == b"payload"
    slow = await running.exec(["sleep", "30"], timeout=0.3)
    assert slow.timed_out
    assert slow.signal == signal.SIGKILL


async def test_double_start_is_a_state_error(running: Sandbox) -> None:
    pid = running.info().pid
    with pytest.raises(StateError, match="cannot start while running; requires created") as err:
        await running.start()
    assert (err.value.state, err.value.required) == (VmState.RUNNING, (VmState.CREATED,))
    assert running.info().state is VmState.RUNNING
    assert running.info().pid == pid, "the running VM is untouched"


async def test_exec_on_a_stopped_sandbox_is_a_state_error(running: Sandbox) -> None:
    pid = running.info().pid
    await running.stop()
    assert running.info().state is VmState.STOPPED
    assert not process_matches(pid, str(running.run_dir)), "the guest is gone"
    with pytest.raises(StateError, match="cannot talk to the guest agent while stopped"):
        await running.exec(["true"])
    await running.stop()  # idempotent
    assert running.info().state is VmState.STOPPED


async def test_exec_before_start_is_a_state_error(
    config: HypervisorConfig, store: StateStore
) -> None:
    sb = await Sandbox.create(config, id="m2", hypervisor="mock", store=store)
    with pytest.raises(StateError, match="while created; requires running"):
        await sb.exec(["true"])
    await sb.remove()
    assert store.list() == []


async def test_a_vmm_that_died_between_commands(running: Sandbox, store: StateStore) -> None:
    pid = running.info().pid
    await running.close()  # as when the command that started it has exited
    os.kill(pid, signal.SIGKILL)
    await _gone(pid, str(running.run_dir))
    later = await Sandbox.attach("m1", store=store)  # the next command
    info = later.info()
    assert (info.state, info.pid, info.exit) == (VmState.EXITED, 0, GONE)
    with pytest.raises(StateError, match=r"while exited \(its VMM is gone\); requires running"):
        await later.exec(["true"])
    await later.stop()
    assert later.info().state is VmState.STOPPED
    assert not (later.run_dir / "mock-agent.sock").exists()


async def test_stop_leaves_no_process_of_the_guest(running: Sandbox) -> None:
    # A unique argv word (the duration), so the guest's process is found on the host by what
    # it runs; its output is never read (the stream stays open, as an attached client keeps it).
    marker = f"300.{os.getpid()}"
    proc = await running.exec_stream(["sleep", marker])
    async with asyncio.timeout(20):
        while not (found := processes_mentioning(marker)):
            await asyncio.sleep(0.02)
    [child] = found
    assert process_matches(child, "sleep")
    await running.stop(wait_only=False)
    await _gone(child, "sleep")
    assert processes_mentioning(marker) == [], "nothing of the guest outlives it"
    with pytest.raises(AgentError, match="agent client is closed"):
        await proc.wait()  # its stream ended with the sandbox, without a status


async def test_another_process_attaches_execs_and_stops(
    running: Sandbox, store: StateStore
) -> None:
    await running.close()  # one host at a time on the agent channel, as on virtio-serial
    script = (
        "import asyncio, sys\n"
        "from virtcontainers.persist import StateStore\n"
        "from virtcontainers.sandbox import Sandbox\n"
        "async def main():\n"
        "    sb = await Sandbox.attach('m1', store=StateStore(sys.argv[1]))\n"
        "    r = await sb.exec(['echo', 'from another process'])\n"
        "    sys.stdout.write(r.stdout.decode())\n"
        "    await sb.stop()\n"
        "asyncio.run(main())\n"
    )
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script, str(store.root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "from another process\n"
    running.reload()
    assert running.info().state is VmState.STOPPED
    assert b"shutdown requested" in running.logs()


async def test_the_sandbox_server_records_how_the_guest_died(
    config: HypervisorConfig, store: StateStore
) -> None:
    sb = await Sandbox.create(config, id="srv", hypervisor="mock", store=store)
    await sb.start(timeout=60, server=True)
    try:
        assert (await sb.exec(["echo", "served"])).stdout == b"served\n"
        assert sb.info().server == "running"
        os.kill(sb.info().pid, signal.SIGKILL)
        async with asyncio.timeout(30):
            while store.load("srv").state is not VmState.EXITED:
                await asyncio.sleep(0.05)
        ended = store.load("srv").exit
        assert ended is not None
        assert (ended.reason, ended.exit_code) == ("the VMM was killed by signal 9", -9)
        assert ended.time is not None
    finally:
        await sb.remove()
    assert store.list() == []


def test_sync_facade_takes_every_create_argument_and_serves(
    config: HypervisorConfig, store: StateStore, root: Path
) -> None:
    # The hand-written twin lacked image_store and tls_verify (a TypeError here); it is now
    # Sandbox.create itself, made blocking.
    sb = SyncSandbox.create(
        config, id="sync", hypervisor="mock", store=store,
        image_store=ImageStore(root / "images"), tls_verify=False,
    )  # fmt: skip
    sb.start(server=True, ephemeral=True, timeout=60)
    with sb:
        assert sb.info().server == "running"
        other = SyncSandbox.attach("sync", store=store)  # a second client of its server
        try:
            assert other.exec(["echo", "from", "the", "other"]).stdout == b"from the other\n"
        finally:
            other.close()
        assert sb.exec(["cat"], stdin=b"mine").stdout == b"mine"
    assert store.list() == []


async def test_resizes_are_onlined_in_the_guests_sysfs(
    config: HypervisorConfig, store: StateStore
) -> None:
    config.resources.mem_slots = 2
    sb = await Sandbox.create(config, id="m2", hypervisor="mock", store=store)
    await sb.start(timeout=60)
    try:
        assert (sb.info().vcpus, sb.info().memory_mb) == (1, 2048)  # the defaults it boots with
        sysfs = sb.run_dir / "mock-sysfs" / "devices" / "system"
        assert sorted(p.name for p in (sysfs / "cpu").iterdir()) == ["cpu0"]
        assert await sb.resize_vcpus(2) == (1, 2)
        assert (sysfs / "cpu" / "cpu1" / "online").read_text() == "1"  # written as sysfs is
        grown = 2048 + 256
        assert await sb.resize_memory(grown) == grown
        states = {p.name: (p / "state").read_text() for p in (sysfs / "memory").iterdir()}
        assert states == {"memory0": "online", "memory1": "online"}  # 2 blocks of 128 MiB
        assert await sb.resize_vcpus(1) == (2, 1)
        assert not (sysfs / "cpu" / "cpu1").exists()
    finally:
        await sb.remove()
    assert not sb.run_dir.exists()


async def test_a_corrupt_record_is_a_store_error_naming_its_path(
    running: Sandbox, store: StateStore
) -> None:
    await running.close()
    path = store.state_path("m1")
    good = path.read_bytes()
    path.write_bytes(good.replace(b'"state": "running"', b'"state": "sleeping"'))
    with pytest.raises(StoreError, match=r"Invalid enum value 'sleeping' - at `\$.state`") as err:
        await Sandbox.attach("m1", store=store)
    assert err.value.path == str(path)
    unreadable: list[tuple[str, StoreError]] = []
    assert list_sandboxes(store, on_unreadable=lambda i, e: unreadable.append((i, e))) == []
    assert [(i, e.path) for i, e in unreadable] == [("m1", str(path))]  # not shown as valid
    path.write_bytes(good)  # so that the fixture can stop and remove it


async def test_a_boot_failure_is_recorded_failed_with_its_reason(
    config: HypervisorConfig, root: Path
) -> None:
    # A run dir so deep that the agent's socket path cannot fit in sun_path: the guest exits.
    store = StateStore(root / ("d" * 100) / "vc")
    sb = await Sandbox.create(config, id="m3", hypervisor="mock", store=store)
    with pytest.raises(LaunchError, match="the mock guest exited before it listened") as err:
        await sb.start(timeout=60)
    assert err.value.exit_code == 2
    assert "socket path too long" in err.value.log_tail
    doc = store.load("m3")
    assert doc.state is VmState.FAILED
    assert doc.exit is not None
    assert doc.exit.reason == (
        "the boot failed: [mock:m3] the mock guest exited before it listened (exit code 2)"
    )
    assert (doc.exit.exit_code, doc.exit.time is not None) == (2, True)
    with pytest.raises(StateError, match="cannot start while failed; requires created"):
        await sb.start(timeout=60)
    await sb.remove()
    assert store.list() == []


async def test_attach_of_an_unknown_id_is_a_store_error(store: StateStore) -> None:
    with pytest.raises(StoreError, match="no sandbox 'nosuch'"):
        await Sandbox.attach("nosuch", store=store)


async def _gone(pid: int, needle: str) -> None:
    async with asyncio.timeout(20):
        while process_matches(pid, needle):
            await asyncio.sleep(0.02)
