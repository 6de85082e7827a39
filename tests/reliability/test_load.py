"""N sandboxes in parallel x M create/exec/stop cycles; afterwards nothing of them is left,
counted: our file descriptors, child processes, processes using the store, run-dir files,
mounts, unix sockets, and (worker 0 runs its sandboxes with a tap network, as root) netns,
host veths and nft tables. Bounded: 2 x 3; long (VC_RELIABILITY_LONG=1): 8 x 20."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import LONG
from tests.reliability.leaks import Snapshot
from tests.reliability.test_vm_faults import config
from virtcontainers import Sandbox
from virtcontainers.guest.image import GuestImage
from virtcontainers.network import NetworkSpec

pytestmark = pytest.mark.integration
PARALLEL, CYCLES = (8, 20) if LONG else (2, 3)
TAP = os.geteuid() == 0 and shutil.which("nft") is not None


async def _worker(image: GuestImage, root: Path, worker: int, done: list[str]) -> None:
    tap = TAP and worker == 0
    network = NetworkSpec.build("tap") if tap else NetworkSpec()
    for cycle in range(CYCLES):
        tag = f"w{worker}-c{cycle}"
        async with await Sandbox.create(config(image), network=network) as sb:
            done.append(sb.id)
            if tap:  # the counter sees a live tap network (so it can see a leaked one)
                live = Snapshot.take(root, [sb.id])
                assert len(live.netns) == len(live.links) == len(live.nft_tables) == 1, live
            result = await sb.exec(["sh", "-c", 'echo "$0"; cat /proc/sys/kernel/random/uuid', tag])
            assert result.exit_code == 0, result.stderr
            assert result.stdout.splitlines()[0] == tag.encode()
            uuid = result.stdout.splitlines()[1]
            assert len(uuid) == 36  # the guest answered with its own output
        assert not sb.run_dir.exists()


@pytest.mark.timeout(3600 if LONG else 600)
async def test_parallel_cycles_leave_nothing(guest_image: GuestImage, vc_root: Path) -> None:
    before = Snapshot.take(vc_root)
    done: list[str] = []
    started = time.monotonic()
    await asyncio.gather(*(_worker(guest_image, vc_root, w, done) for w in range(PARALLEL)))
    took = time.monotonic() - started
    assert len(done) == PARALLEL * CYCLES
    after = Snapshot.take(vc_root, done)
    print(
        f"{PARALLEL} x {CYCLES} cycles in {took:.1f} s; fds {before.fds} -> {after.fds}, "
        f"leaked: {after.leaked_since(before) or 'nothing'}"
    )
    assert after.leaked_since(before) == {}
    assert after.files == ()
    assert after.processes == ()
    assert after.sockets == ()
