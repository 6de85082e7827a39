"""fsutil: atomic 0600 writes, 0700 directories, flock with a timeout."""

from __future__ import annotations

import multiprocessing
import os
import stat
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from virtcontainers.fsutil import atomic_write, flock, locked, mkdir_private, open_private


def test_atomic_write_replaces_whole_file_0600(tmp_path: Path) -> None:
    target = tmp_path / "doc.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    old_umask = os.umask(0)
    try:
        atomic_write(target, b"new contents", tmp_prefix=".doc.")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new contents"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json"]  # no temp file left


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "dir-not-file"
    target.mkdir()  # rename of a file over a directory fails
    with pytest.raises(IsADirectoryError):
        atomic_write(target, b"x")
    assert target.is_dir()
    assert list(tmp_path.iterdir()) == [target]


def test_mkdir_private_creates_0700_chain(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b"
    old_umask = os.umask(0)
    try:
        mkdir_private(deep)
    finally:
        os.umask(old_umask)
    for d in (tmp_path / "a", deep):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_open_private_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError, match="Too many levels"):
        open_private(tmp_path / "link")


def _hold(path: str, ready: Event, done: Event) -> None:
    with locked(Path(path)):
        ready.set()
        done.wait(30)


def test_flock_times_out_while_another_process_holds_it(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(lock), ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        fd = open_private(lock)
        try:
            with pytest.raises(TimeoutError, match=r"within 0\.05 s"):
                flock(fd, timeout=0.05)
        finally:
            os.close(fd)
    finally:
        done.set()
        holder.join(30)
    with locked(lock, timeout=5):  # released when the holder's descriptor closed
        pass
