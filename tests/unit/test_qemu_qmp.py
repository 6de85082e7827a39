"""The QMP client wrapper against fake QMP servers (no QEMU needed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtcontainers.deadline import Deadline
from virtcontainers.drivers.qemu.qmp import Qmp
from virtcontainers.errors import HypervisorTimeout

_GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
        "capabilities": [],
    }
}


@pytest.fixture
async def silent_server(tmp_path: Path) -> AsyncIterator[Path]:
    """A QMP socket that accepts but never greets: what QEMU does while another client
    holds its (single-client) QMP monitor."""
    path = tmp_path / "qmp.sock"
    held: list[asyncio.StreamWriter] = []

    async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    server = await asyncio.start_unix_server(accept, str(path))
    yield path
    for w in held:
        w.close()
    server.close()
    await server.wait_closed()


async def test_connect_bounds_the_greeting_wait(silent_server: Path) -> None:
    qmp = Qmp(silent_server, sandbox_id="sb")
    # The outer bound only makes a regression fail instead of hanging the suite.
    async with asyncio.timeout(20):
        with pytest.raises(HypervisorTimeout) as info:
            await qmp.connect(Deadline.after(0.3))
    assert info.value.seconds == 0.3
    assert "greeting" in str(info.value)
    assert "within 0.3 s" in str(info.value)
    assert not qmp.connected


async def test_connect_timeout_without_a_socket_names_the_limit(tmp_path: Path) -> None:
    qmp = Qmp(tmp_path / "absent.sock", sandbox_id="sb")
    with pytest.raises(HypervisorTimeout) as info:
        await qmp.connect(Deadline.after(0.2))
    assert info.value.seconds == 0.2
    assert "within 0 s" not in str(info.value)


async def test_connect_negotiates_with_a_greeting_server(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(json.dumps(_GREETING).encode() + b"\r\n")
        await w.drain()
        # qemu.qmp sends bare JSON objects (no newline): decode them from the stream.
        buf, decoder = "", json.JSONDecoder()
        while chunk := await r.read(4096):
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                reply: dict[str, object] = {"return": {}}
                if "id" in msg:
                    reply["id"] = msg["id"]
                w.write(json.dumps(reply).encode() + b"\r\n")
                await w.drain()

    server = await asyncio.start_unix_server(serve, str(path))
    try:
        qmp = Qmp(path, sandbox_id="sb")
        await qmp.connect(Deadline.after(10))
        assert qmp.connected
        await qmp.disconnect()
    finally:
        server.close()
        await server.wait_closed()
