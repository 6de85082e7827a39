"""VM templating with real QEMU (TCG here): a template VM saved, clones restored from it."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.integration.qemu_helpers import guest_config, qemu_processes_for
from virtcontainers.config import HypervisorConfig
from virtcontainers.errors import ConfigError, HypervisorError
from virtcontainers.factory import Template
from virtcontainers.factory.template import _fs_type, sync_clone
from virtcontainers.guest.image import GuestImage
from virtcontainers.persist.store import StateStore
from virtcontainers.sandbox import Sandbox

pytestmark = pytest.mark.integration

MEMORY_MB = 256


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def store() -> Iterator[StateStore]:
    root = Path(tempfile.mkdtemp(prefix="vc-tpl-"))
    yield StateStore(root)
    for pid_file in root.glob("sandboxes/*/qemu.pid"):
        pid = int(pid_file.read_text().strip() or 0)
        if pid:
            os.kill(pid, 9)
    shutil.rmtree(root, ignore_errors=True)


def _config(guest_image: GuestImage, tmp_path: Path) -> HypervisorConfig:
    cfg = guest_config(guest_image, tmp_path, hold=False)
    cfg.resources.memory_size = MEMORY_MB
    return cfg


@pytest.fixture
async def template(guest_image: GuestImage, tmp_path: Path) -> AsyncIterator[Template]:
    tpl = await Template.create(_config(guest_image, tmp_path))
    yield tpl
    tpl.remove()


async def test_template_files_on_tmpfs(template: Template) -> None:
    assert str(template.path).startswith("/dev/shm/")
    assert template.memory_path.stat().st_size == MEMORY_MB << 20
    assert template.state_path.stat().st_size > 0
    # RAM is not in the device state (x-ignore-shared): a few hundred KiB at most.
    assert template.state_path.stat().st_size < 8 << 20
    template.remove()
    assert not template.path.exists()
    template.remove()  # idempotent


async def test_two_clones_are_independent_and_leave_the_template_intact(
    template: Template, store: StateStore
) -> None:
    before = (_digest(template.memory_path), template.memory_path.stat().st_mtime_ns)
    a = await template.clone("clone-a", store=store)
    b = await template.clone("clone-b", store=store)
    try:
        assert a.hypervisor.get_pids() != b.hypervisor.get_pids()
        ra, rb = await a.exec(["echo", "from-a"]), await b.exec(["echo", "from-b"])
        assert (ra.exit_code, ra.stdout) == (0, b"from-a\n")
        assert (rb.exit_code, rb.stdout) == (0, b"from-b\n")
        # The guest's root is in RAM: a file written in A lives in A's private pages only.
        await a.write_file("/tmp/only-in-a", b"secret")
        assert await a.read_file("/tmp/only-in-a") == b"secret"
        probe = await b.exec(["test", "-e", "/tmp/only-in-a"])
        assert probe.exit_code == 1
        # Same RNG state at the pause; after restore (+ reseed) they must not repeat.
        rand = ["head", "-c", "16", "/dev/urandom"]
        assert (await a.exec(rand)).stdout != (await b.exec(rand)).stdout
        # Both run on: each agent still answers after the other's work.
        assert (await b.exec(["cat", "/proc/uptime"])).exit_code == 0
        assert (await a.exec(["cat", "/proc/uptime"])).exit_code == 0
    finally:
        run_dirs = [a.run_dir, b.run_dir]
        await a.stop()
        await b.stop()
    for run_dir in run_dirs:
        assert qemu_processes_for(run_dir) == []
        assert not any(run_dir.glob("*.sock"))
    await a.remove()
    await b.remove()
    assert (_digest(template.memory_path), template.memory_path.stat().st_mtime_ns) == before


async def test_clone_clock_is_synced_after_resume(template: Template, store: StateStore) -> None:
    time.sleep(3)  # the template's clock stopped when it was paused
    sb = await template.clone(store=store, sync_guest=False)
    try:

        async def skew() -> float:
            out = await sb.exec(["date", "+%s"])
            return time.time() - int(out.stdout)

        assert await skew() >= 2.0
        await sync_clone(sb)
        assert abs(await skew()) < 2.0
    finally:
        await sb.remove()


async def test_clone_hot_adds_cpus_and_memory(template: Template, store: StateStore) -> None:
    sb = await template.clone(store=store, vcpus=2, memory_mb=MEMORY_MB + 256)
    try:
        assert (await sb.exec(["nproc"])).stdout.strip() == b"2"
        meminfo = (await sb.read_file("/proc/meminfo")).decode()
        total_kib = int(meminfo.split("MemTotal:")[1].split()[0])
        # A plain 256 MiB guest shows ~220 MiB; 256 MiB more were hot-added and onlined.
        assert total_kib > (MEMORY_MB + 128) << 10
    finally:
        await sb.remove()


async def test_clone_without_state_file_fails_clearly(
    template: Template, store: StateStore
) -> None:
    template.state_path.unlink()
    with pytest.raises(ConfigError, match="device state") as err:
        await template.clone("no-state", store=store)
    assert err.value.field == "template.devices_state_path"
    assert Sandbox.list(store) == []


async def test_clone_with_corrupt_state_fails_and_leaves_nothing(
    template: Template, store: StateStore
) -> None:
    template.state_path.write_bytes(b"not a migration stream")
    with pytest.raises(HypervisorError):
        await template.clone("bad-state", store=store, timeout=30)
    assert Sandbox.list(store) == []
    assert qemu_processes_for(store.root) == []


async def test_template_refuses_a_disk_directory(guest_image: GuestImage, tmp_path: Path) -> None:
    if _fs_type(Path.home()) in ("tmpfs", "hugetlbfs", "ramfs"):
        pytest.skip("the home directory is on tmpfs here")
    target = Path.home() / f".vc-tpl-test-{os.getpid()}"
    with pytest.raises(ConfigError, match="not tmpfs"):
        await Template.create(_config(guest_image, tmp_path), target)
    assert not target.exists()
