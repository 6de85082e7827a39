"""fdwait.readable: the one 'wait until this fd can be read' of the event-loop code."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from virtcontainers.fdwait import readable


async def test_a_pipe_is_readable_once_written_and_at_its_end() -> None:
    r, w = os.pipe()
    try:
        waiting = asyncio.ensure_future(readable(r))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # nothing to read yet
        os.write(w, b"x")
        await asyncio.wait_for(waiting, 10)
        assert os.read(r, 1) == b"x"
        os.close(w)
        w = -1
        await asyncio.wait_for(readable(r), 10)  # the end is readable too
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    loop = asyncio.get_running_loop()
    assert not loop.remove_reader(r)  # no reader left behind


async def test_a_regular_file_is_refused_by_epoll(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(PermissionError):
            await readable(fd)
    finally:
        os.close(fd)


async def test_a_pidfd_is_readable_when_its_process_exits() -> None:
    proc = await asyncio.create_subprocess_exec("sleep", "0.2")
    pidfd = os.pidfd_open(proc.pid)
    try:
        await asyncio.wait_for(readable(pidfd), 10)
        assert await proc.wait() == 0
    finally:
        os.close(pidfd)
