"""Faults of a real QEMU guest driven in-process: QEMU SIGKILLed during an exec and during a
hot-plug, QEMU frozen (SIGSTOP) so its QMP socket stops answering. Each ends in a typed error
within a bounded time, and stop + remove leave nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from tests.reliability.leaks import Snapshot
from virtcontainers import Sandbox, VmState
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import BlockDrive
from virtcontainers.errors import AgentError, HypervisorError, HypervisorTimeout
from virtcontainers.guest.image import GuestImage

pytestmark = pytest.mark.integration


def config(image: GuestImage, memory: int = 256) -> HypervisorConfig:
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = str(image.kernel)
    cfg.boot.initrd_path = str(image.initrd)
    cfg.resources.num_vcpus = 1
    cfg.resources.memory_size = memory
    cfg.storage.block_device_driver = "virtio-blk"
    return cfg


def check_private(run_dir: Path) -> dict[str, str]:
    """Modes that are not private: the run dir must be 0700, every file 0600, every socket
    without group or other bits (QEMU binds its sockets 0700 under its umask: the x bit means
    nothing on a socket, connecting needs w)."""
    wrong = {}
    mode = stat.S_IMODE(run_dir.stat().st_mode)
    if mode != 0o700:
        wrong[str(run_dir)] = oct(mode)
    for entry in run_dir.iterdir():
        st = entry.lstat()
        if stat.S_ISDIR(st.st_mode):
            wrong.update(check_private(entry))
        elif stat.S_ISSOCK(st.st_mode):
            if st.st_mode & 0o077:
                wrong[entry.name] = oct(stat.S_IMODE(st.st_mode))
        elif stat.S_IMODE(st.st_mode) != 0o600:
            wrong[entry.name] = oct(stat.S_IMODE(st.st_mode))
    return wrong


async def test_qemu_killed_during_an_exec(guest_image: GuestImage, vc_root: Path) -> None:
    before = Snapshot.take(vc_root)
    sb = await Sandbox.create(config(guest_image))
    await sb.start()
    run_dir, pid = sb.run_dir, sb.info().pid
    # Security of a running sandbox, while it runs: private files, QEMU's own seccomp filter.
    assert check_private(run_dir) == {}
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    sandbox_opts = argv[argv.index(b"-sandbox") + 1].split(b",")
    assert sandbox_opts[0] == b"on"
    assert b"spawn=deny" in sandbox_opts

    proc = await sb.exec_stream(["sh", "-c", "echo running; exec sleep 600"])
    seen = b""
    async with asyncio.timeout(60):
        async for _stream, data in proc:
            seen += data
            if b"running" in seen:
                break
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(AgentError):
        async with asyncio.timeout(30):  # a hang here is the failure this test exists for
            await proc.wait()
    print(f"exec ended {time.monotonic() - killed:.2f} s after QEMU's SIGKILL")
    with pytest.raises(AgentError):
        await sb.exec(["true"])
    with pytest.raises(HypervisorError, match="not running"):
        await sb.hypervisor.check()
    assert sb.hypervisor.state is VmState.FAILED
    assert sb.info().state == "exited"
    await sb.stop()
    assert sb.info().state == "stopped"
    await sb.remove()
    assert not run_dir.exists()
    assert Snapshot.take(vc_root).leaked_since(before) == {}


async def test_frozen_qemu_then_killed_during_a_hotplug(
    guest_image: GuestImage, vc_root: Path
) -> None:
    before = Snapshot.take(vc_root)
    disk = vc_root / "disk.img"
    with disk.open("wb") as f:
        f.truncate(16 << 20)
    async with await Sandbox.create(config(guest_image)) as sb:
        pid, hv = sb.info().pid, sb.hypervisor
        os.kill(pid, signal.SIGSTOP)  # QMP's socket stays open, nothing answers
        try:
            started = time.monotonic()
            with pytest.raises(HypervisorTimeout) as timeout:
                async with asyncio.timeout(60):
                    await hv.check()
            waited = time.monotonic() - started
            assert timeout.value.operation == "QMP query-status"
            assert waited >= timeout.value.seconds  # it waited its whole bound, then gave up
            print(f"frozen QMP: HypervisorTimeout after {waited:.2f} s")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert (await sb.exec(["echo", "thawed"])).stdout == b"thawed\n"
        await hv.check()  # the same connection answers again

        # SIGKILL during a hot-plug: freeze QEMU so the request is surely in flight, then kill.
        os.kill(pid, signal.SIGSTOP)
        plug = asyncio.create_task(sb.hotplug(BlockDrive(file=str(disk), id="d0")))
        await asyncio.sleep(0.5)
        assert not plug.done()
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(HypervisorError, match="during hot-plug") as err:
            async with asyncio.timeout(30):
                await plug
        assert not isinstance(err.value, HypervisorTimeout)  # QEMU's death, not a timeout
        print(f"hot-plug ended {time.monotonic() - killed:.2f} s after QEMU's SIGKILL")
        assert hv.state is VmState.FAILED
        assert sb.info().devices == ()
    assert not sb.run_dir.exists()
    disk.unlink()
    assert Snapshot.take(vc_root).leaked_since(before) == {}


async def test_qemu_killed_during_a_save(guest_image: GuestImage, vc_root: Path) -> None:
    before = Snapshot.take(vc_root)
    cfg = config(guest_image)
    cfg.template.devices_state_path = str(vc_root / "saved.state")
    async with await Sandbox.create(cfg) as sb:
        pid, hv = sb.info().pid, sb.hypervisor
        await sb.pause()
        os.kill(pid, signal.SIGSTOP)  # the save's first request is surely in flight
        save = asyncio.create_task(hv.save_sandbox())
        await asyncio.sleep(0.5)
        assert not save.done()
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(HypervisorError) as err:
            async with asyncio.timeout(30):
                await save
        assert not isinstance(err.value, HypervisorTimeout)
        print(f"save ended {time.monotonic() - killed:.2f} s after QEMU's SIGKILL: {err.value}")
        with pytest.raises(HypervisorError, match="not running"):
            await hv.check()
    assert not sb.run_dir.exists()
    Path(cfg.template.devices_state_path).unlink(missing_ok=True)
    assert Snapshot.take(vc_root).leaked_since(before) == {}
