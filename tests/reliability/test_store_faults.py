"""A full disk and a read-only run dir during a state write: the old document is intact, the
error is StoreError, and no temp file is left. A real tmpfs, mounted by the test (root)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from tests.reliability.tmpfs import fill, mount, small_tmpfs
from virtcontainers import Sandbox
from virtcontainers.config import HypervisorConfig
from virtcontainers.errors import StoreError
from virtcontainers.lifecycle import VmState
from virtcontainers.persist.store import StateStore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 1 MiB tmpfs of our own."""
    with small_tmpfs("1m") as where:
        yield where


def _files(store: StateStore, sandbox_id: str) -> list[str]:
    return sorted(p.name for p in store.sandbox_dir(sandbox_id).iterdir())


async def _sandbox(store: StateStore, tmp_path: Path, id: str = "full") -> Sandbox:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"i")
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = str(kernel)
    cfg.boot.initrd_path = str(initrd)
    return await Sandbox.create(cfg, id=id, hypervisor="mock", store=store)


async def test_disk_full_during_a_state_write(small_fs: Path, tmp_path: Path) -> None:
    store = StateStore(small_fs / "root")
    sb = await _sandbox(store, tmp_path)
    before, files = store.load("full"), _files(store, "full")
    annotations = {"note": "x" * 200_000}  # a bigger document than the space left
    fill(small_fs)
    with pytest.raises(StoreError) as err:
        store.update("full", lambda d: msgspec.structs.replace(d, annotations=annotations))
    assert "No space left on device" in str(err.value)
    assert store.load("full") == before
    assert _files(store, "full") == files  # no temp file left
    assert sb.info().state == "created"


async def test_read_only_run_dir_during_a_state_write(small_fs: Path, tmp_path: Path) -> None:
    store = StateStore(small_fs / "root")
    await _sandbox(store, tmp_path)
    before, files = store.load("full"), _files(store, "full")
    mount("-o", "remount,ro", str(small_fs))
    try:
        with pytest.raises(StoreError) as err:
            store.update("full", lambda d: msgspec.structs.replace(d, state=VmState.RUNNING))
        assert "Read-only file system" in str(err.value)
        assert store.load("full") == before  # reading still works, and shows the old state
        with pytest.raises(StoreError):
            await _sandbox(store, tmp_path, "second")
    finally:
        mount("-o", "remount,rw", str(small_fs))
    assert store.list() == ["full"]
    assert _files(store, "full") == files  # no temp file left
