"""Out of space with a real guest: the run dir fills up while the guest writes its console,
and /dev/shm (here: the template's tmpfs) is too small for a template's memory. Real tmpfs
mounts of the test's own (root)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import pytest

from tests.reliability.leaks import Snapshot
from tests.reliability.test_vm_faults import config
from tests.reliability.tmpfs import fill, small_tmpfs
from virtcontainers import Sandbox
from virtcontainers.errors import ConfigError, VirtContainersError
from virtcontainers.factory import Template
from virtcontainers.guest.image import GuestImage
from virtcontainers.persist.store import StateStore
from virtcontainers.procfs import processes_mentioning

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
]
BOUND = 30.0
#: More than the console socket's buffers hold: a watcher that stopped reading stalls it.
FILL_BYTES = 1 << 20


async def test_disk_full_during_a_console_write(
    guest_image: GuestImage, caplog: pytest.LogCaptureFixture
) -> None:
    """The guest goes on (its console writes do not stall), the record stays as it was, the
    console watcher says once what it lost and why, and after space is freed stop + remove
    leave nothing."""
    with small_tmpfs("2m") as fs:
        store = StateStore(fs / "root")
        before = Snapshot.take(fs / "root")
        sb = await Sandbox.create(config(guest_image), store=store)
        try:
            await _console_fills_up(sb, store, fs, caplog)
        finally:
            with contextlib.suppress(VirtContainersError):
                await sb.remove()  # a failed assertion must not leave the VM running
        assert Snapshot.take(fs / "root").leaked_since(before) == {}


async def _console_fills_up(
    sb: Sandbox, store: StateStore, fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await sb.start()
    record = store.load(sb.id)
    filler = fill(fs)
    caplog.set_level(logging.WARNING, logger="virtcontainers.console")
    script = f"yes vc-fill | head -c {FILL_BYTES} > /dev/console; echo done"
    async with asyncio.timeout(BOUND):  # a stalled console would hang the guest's echo
        result = await sb.exec(["sh", "-c", script])
    assert result.stdout == b"done\n"
    async with asyncio.timeout(BOUND):
        assert (await sb.exec(["echo", "alive"])).stdout == b"alive\n"
    assert store.load(sb.id) == record  # the record is intact
    lost = [r for r in caplog.records if "No space left on device" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in caplog.records]
    # Only what fitted in the log's last page is there (1 MiB = 131072 lines were sent).
    assert sb.logs().count(b"vc-fill\r\n") < 1024
    filler.unlink()
    await sb.stop()
    # Written again once there is space: the log ends with the guest's power-down.
    assert "reboot: Power down" in sb.logs().decode(errors="replace").splitlines()[-1]


async def test_full_dev_shm_during_template_creation(
    guest_image: GuestImage, vc_root: Path
) -> None:
    """The template's memory file is the guest's RAM, on tmpfs: a 32 MiB tmpfs cannot hold
    a 256 MiB guest, and one already full cannot either. ConfigError naming the space, at
    once (before, QEMU hung on the first page it could not get, and the creation ended
    after its whole timeout with "the agent did not answer"); no QEMU, no file left."""
    with small_tmpfs("32m") as shm:
        where = shm / "template"
        for attempt in ("small", "full"):
            with pytest.raises(ConfigError, match="MiB free") as err:
                async with asyncio.timeout(BOUND):
                    await Template.create(config(guest_image), where, timeout=60)
            print(f"template creation on a {attempt} tmpfs: {err.value}")
            assert err.value.field == "template.memory_path"
            assert processes_mentioning(str(shm)) == []
            assert not where.exists()
            fill(shm)
    # A tmpfs with room: the same call makes a template (so the refusal was about space).
    with small_tmpfs("300m") as shm:
        template = await Template.create(config(guest_image), shm / "template", timeout=120)
        try:
            clone = await template.clone()
            assert (await clone.exec(["echo", "clone"])).stdout == b"clone\n"
            await clone.remove()
        finally:
            template.remove()
        assert processes_mentioning(str(shm)) == []
