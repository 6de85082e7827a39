"""The server's relay against the real agent run on the host (no VM): many clients, one
agent connection; exec ownership, detached execs, attach with replay, server ops and errors."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.unit.test_agent_client import Agent, agent_binary, start_agent  # noqa: F401
from virtcontainers.agent import AgentRequestError, ExecSpec, Stream, connect_unix
from virtcontainers.errors import AgentError, ConfigError, StateError
from virtcontainers.server import wire
from virtcontainers.server.client import KEEP, ServerClient
from virtcontainers.server.peercred import peer_of
from virtcontainers.server.relay import Relay


@pytest.fixture
def agent(agent_binary: Path, tmp_path: Path) -> Iterator[Agent]:  # noqa: F811
    yield from start_agent(agent_binary, tmp_path)


async def _handler(op: str, args: wire.JsonObject) -> object:
    if op == "echo":
        return args
    if op == "fail":
        raise StateError("pause", "stopped", ["running", "paused"], sandbox_id="sb1")
    raise AgentError(f"unknown op {op}")


@pytest.fixture
async def relay(agent: Agent) -> AsyncIterator[Relay]:
    r = Relay(_handler)
    r.attach_upstream(await connect_unix(agent.sock), resync=True)
    try:
        yield r
    finally:
        await r.close()


async def test_clients_share_one_agent_and_keep_their_output(relay: Relay) -> None:
    clients = [await relay.internal_client() for _ in range(5)]
    try:
        results = await asyncio.gather(
            *(
                c.exec(["sh", "-c", f"for i in 1 2 3; do echo c{n}-e{k}-$i; done"])
                for n, c in enumerate(clients)
                for k in range(4)
            )
        )
        want = [
            "".join(f"c{n}-e{k}-{i}\n" for i in (1, 2, 3)).encode()
            for n in range(5)
            for k in range(4)
        ]
        assert [r.stdout for r in results] == want
        assert all(r.exit_code == 0 for r in results)
        assert (await clients[0].ping()).protocol_major == 1
    finally:
        for c in clients:
            await c.close()


async def test_an_attach_frame_from_one_client_does_not_end_anothers_exec(relay: Relay) -> None:
    a = await relay.internal_client()
    b = await relay.internal_client()
    try:
        proc = await a.exec_stream(["cat"])
        # b speaks like a reattaching host: preamble + ATTACH. The relay keeps it to itself.
        b._writer.write(bytes(70000))
        await b.ping()
        from virtcontainers.agent.protocol import FrameType, encode_frame

        b._writer.write(encode_frame(FrameType.ATTACH, 0, b""))
        await b.ping()
        await proc.write_stdin(b"still mine\n")
        await proc.close_stdin()
        chunks = [data async for _, data in proc]
        assert b"".join(chunks) == b"still mine\n"
        assert (await proc.wait()).exit_code == 0
    finally:
        await a.close()
        await b.close()


async def test_a_plain_exec_gets_stdin_closed_when_its_client_goes(relay: Relay) -> None:
    a = await relay.internal_client(ServerClient)
    proc = await a.exec_stream(["sh", "-c", "cat; echo cat-saw-eof"])
    pid = proc.pid
    await a.close()
    watcher = await relay.internal_client(ServerClient)
    try:
        for _ in range(200):
            listed = await watcher.call("processes")
            mine = next(p for p in listed if p["pid"] == pid)  # type: ignore[union-attr]
            if not mine["running"]:
                break
            await asyncio.sleep(0.02)
        assert mine["exit_code"] == 0
        proc2 = await watcher.attach(pid)
        out = b"".join([d async for _, d in proc2])
        assert out == b"cat-saw-eof\n"  # kept while nobody was attached
        assert (await proc2.wait()).exit_code == 0
    finally:
        await watcher.close()


async def test_detached_exec_keeps_running_and_can_be_reattached(relay: Relay) -> None:
    a = await relay.internal_client(ServerClient)
    proc = await a.exec_stream(
        ["sh", "-c", "echo first; read line; echo got-$line"], extra_items=[KEEP]
    )
    pid = proc.pid
    first = await anext(aiter(proc))
    assert first == (Stream.STDOUT, b"first\n")
    await a.close()  # the client goes; the process waits for input

    b = await relay.internal_client(ServerClient)
    c = await relay.internal_client(ServerClient)
    try:
        listed = await b.call("processes")
        entry = next(p for p in listed if p["pid"] == pid)  # type: ignore[union-attr]
        assert entry["running"]
        assert entry["detached"]
        assert not entry["attached"]
        assert entry["argv"][0] == "sh"
        again = await b.attach(pid)
        with pytest.raises(StateError, match="another client"):
            await c.attach(pid)
        await again.write_stdin(b"hello\n")
        out = b"".join([d async for _, d in again])
        assert out == b"got-hello\n"
        assert (await again.wait()).exit_code == 0
    finally:
        await b.close()
        await c.close()


async def test_kill_by_pid_and_unknown_pids(relay: Relay) -> None:
    a = await relay.internal_client(ServerClient)
    try:
        proc = await a.exec_stream(["sleep", "30"], extra_items=[KEEP])
        assert await a.call("kill", pid=proc.pid, signal=int(signal.SIGKILL)) is True
        status = await proc.wait()
        assert status.signal == signal.SIGKILL
        with pytest.raises(StateError, match="no process 999999"):
            await a.call("kill", pid=999999)
        with pytest.raises(StateError):
            await a.attach(999999)
    finally:
        await a.close()


async def test_server_ops_and_their_errors_keep_the_public_class(relay: Relay) -> None:
    a = await relay.internal_client(ServerClient)
    try:
        assert await a.call("echo", x=[1, "two"]) == {"x": [1, "two"]}
        with pytest.raises(StateError) as info:
            await a.call("fail")
        assert info.value.state == "stopped"
        assert info.value.required == ("running", "paused")
        assert info.value.sandbox_id == "sb1"
        assert "cannot pause while stopped" in str(info.value)
        with pytest.raises(AgentError, match="unknown op nope"):
            await a.call("nope")
        assert (await a.exec(["echo", "after errors"])).stdout == b"after errors\n"
    finally:
        await a.close()


async def test_lost_agent_ends_streaming_clients_but_not_server_ops(
    relay: Relay, agent: Agent
) -> None:
    a = await relay.internal_client(ServerClient)
    b = await relay.internal_client(ServerClient)
    try:
        proc = await a.exec_stream(["sleep", "30"])
        agent.proc.send_signal(signal.SIGTERM)  # the agent exits: like a VM powering off
        with pytest.raises(AgentError):
            await proc.wait()
        assert await b.call("echo", still="here") == {"still": "here"}
        with pytest.raises(AgentError):
            await b.exec(["true"])
    finally:
        await a.close()
        await b.close()


def test_wire_rebuilds_errors_with_their_data() -> None:
    err = ConfigError("bad cpus", field="--cpus", allowed=["1", "2"])
    with pytest.raises(ConfigError) as info:
        wire.decode_reply(wire.encode_error(err))
    assert info.value.field == "--cpus"
    assert info.value.allowed == ("1", "2")
    assert str(info.value) == str(err)
    with pytest.raises(AgentError, match="not JSON"):
        wire.decode_reply(b"{")
    with pytest.raises(AgentError, match="'op'"):
        wire.decode_request(b'{"args": {}}')


CONNECT_AS_NOBODY = """
import os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.recv(1)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_peer_credentials_name_the_connecting_uid() -> None:
    where = Path(tempfile.mkdtemp(prefix="vc-peer-"))
    os.chmod(where, 0o755)  # nobody must reach the socket to connect at all
    path = str(where / "s.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.settimeout(30)
    listener.bind(path)
    os.chmod(path, 0o666)
    listener.listen()
    child = subprocess.Popen([sys.executable, "-c", CONNECT_AS_NOBODY, path])
    try:
        conn, _ = listener.accept()
        peer = peer_of(conn)
        assert (peer.pid, peer.uid, peer.gid) == (child.pid, 65534, 65534)
        assert not peer.allowed
        conn.close()
        mine = socket.socket(socket.AF_UNIX)
        mine.connect(path)
        conn, _ = listener.accept()
        assert peer_of(conn).allowed
        assert peer_of(conn).pid == os.getpid()
        conn.close()
        mine.close()
    finally:
        child.wait(10)
        listener.close()
        shutil.rmtree(where)


async def test_resize_sets_the_window_size_of_a_tty_exec(relay: Relay) -> None:
    a = await relay.internal_client(ServerClient)
    try:
        proc = await a.exec_stream(
            ExecSpec(["sh", "-c", "stty size; read x; stty size"], tty=True, tty_size=(24, 80))
        )
        seen = b""
        async for _, data in proc:
            seen += data
            if b"24 80" in seen:
                break
        await proc.resize(50, 132)  # the agent's RESIZE (protocol 1.2), relayed
        await a.call("resize_tty", pid=proc.pid, rows=51, cols=133)  # the server's op
        await proc.write_stdin(b"\n")
        rest = b"".join([d async for _, d in proc])
        assert b"51 133" in rest
        assert (await proc.wait()).exit_code == 0
        plain = await a.exec_stream(["sleep", "5"])
        with pytest.raises(AgentRequestError, match="has no tty"):
            await plain.resize(10, 10)
        await plain.signal(signal.SIGKILL)
        await plain.wait()
    finally:
        await a.close()
