"""Faults during a start and inside the guest: QEMU SIGKILLed while it launches and while the
guest boots, the agent killed inside the guest, the guest kernel panicking. Each ends in a
typed error within a bound (a hang fails the test), and removing the sandbox leaves nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.reliability.leaks import Snapshot
from tests.reliability.test_vm_faults import config
from virtcontainers import Sandbox, VmState
from virtcontainers.errors import AgentError, HypervisorError, StateError
from virtcontainers.guest.image import GuestImage
from virtcontainers.persist.store import StateStore
from virtcontainers.procfs import processes_mentioning

pytestmark = pytest.mark.integration

#: No fault here may take longer than this to surface; the agent wait of a start is 60 s,
#: so a start that does not notice its VMM died fails the test.
BOUND = 30.0


async def _qemu_pid(run_dir: Path) -> int:
    async with asyncio.timeout(BOUND):
        while not (pids := processes_mentioning(str(run_dir))):
            await asyncio.sleep(0.005)
    return pids[0]


async def _recorded_running(sandbox_id: str) -> None:
    store = StateStore()
    async with asyncio.timeout(BOUND):
        while store.load(sandbox_id).state != VmState.RUNNING.value:
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("when", ["launch", "boot"])
async def test_qemu_killed_during_start(guest_image: GuestImage, vc_root: Path, when: str) -> None:
    """``launch``: as soon as the QEMU process exists (the driver is still connecting its
    console and QMP). ``boot``: once the VM is recorded running and the start waits for the
    guest's agent (the guest is still booting)."""
    before = Snapshot.take(vc_root)
    sb = await Sandbox.create(config(guest_image))
    start = asyncio.create_task(sb.start())
    pid = await _qemu_pid(sb.run_dir)
    if when == "boot":
        await _recorded_running(sb.id)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(HypervisorError, match=r"exited|not running") as err:
        async with asyncio.timeout(BOUND):
            await start
    print(f"start ({when}) failed {time.monotonic() - killed:.2f} s after the kill: {err.value}")
    assert sb.info().state == VmState.FAILED.value
    await sb.remove()
    assert not sb.run_dir.exists()
    assert Snapshot.take(vc_root).leaked_since(before) == {}


async def test_agent_killed_inside_the_guest(guest_image: GuestImage, vc_root: Path) -> None:
    before = Snapshot.take(vc_root)
    sb = await Sandbox.create(config(guest_image))
    await sb.start()
    assert (await sb.exec(["true"])).exit_code == 0
    with pytest.raises(AgentError):
        async with asyncio.timeout(BOUND):
            await sb.exec(["sh", "-c", "kill -KILL $(pidof vc-agent)"])
    with pytest.raises(AgentError):
        async with asyncio.timeout(BOUND):
            await sb.exec(["true"])
    # With its agent gone the guest's init powers the VM off: the VMM exits by itself.
    async with asyncio.timeout(BOUND):
        while sb.info().state != "exited":
            await asyncio.sleep(0.05)
    await sb.stop()
    assert "vc-init: agent exited with 137" in sb.logs().decode(errors="replace")
    await sb.remove()
    assert not sb.run_dir.exists()
    assert Snapshot.take(vc_root).leaked_since(before) == {}


async def test_guest_kernel_panic_is_recorded_as_a_vm_exit(
    guest_image: GuestImage, vc_root: Path
) -> None:
    """A panic reboots the guest (``panic=1``) and ``-no-reboot`` ends QEMU with exit code 0,
    as a power-off would: the record must still say that the kernel panicked."""
    before = Snapshot.take(vc_root)
    sb = await Sandbox.create(config(guest_image))
    await sb.start(server=True)
    with pytest.raises(AgentError):
        async with asyncio.timeout(BOUND):
            await sb.exec(["sh", "-c", "echo c > /proc/sysrq-trigger"])
    async with asyncio.timeout(BOUND):
        # The record's own exit (written by the server), not `vc ps`'s "the VMM is gone"
        # that shows as soon as QEMU has exited.
        while StateStore().load(sb.id).exit is None:
            await asyncio.sleep(0.05)
        sb.reload()
    info = sb.info()
    assert info.state is VmState.EXITED  # it ended by itself: not a stop someone asked for
    assert info.exit is not None
    assert "kernel panic" in info.exit.reason, info.exit
    assert "sysrq triggered crash" in info.exit.reason, info.exit
    assert "Kernel panic - not syncing" in sb.logs().decode(errors="replace")
    with pytest.raises(StateError, match="cannot talk to the guest agent while exited"):
        await sb.exec(["true"])
    await sb.remove()
    assert not sb.run_dir.exists()
    assert Snapshot.take(vc_root).leaked_since(before) == {}
