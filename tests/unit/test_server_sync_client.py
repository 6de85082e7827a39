"""The blocking server client (what `vc exec/attach/top/kill` use) against the real relay and
the real agent run on the host (no VM): streams, flow control both ways, exit codes, errors
with their class, attach with replay, and the terminal loop of `vc exec` in a subprocess
(stdin, output, exit code, SIGINT forwarded, SIGPIPE on a closed reader)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tests.unit.test_agent_client import Agent, agent_binary, start_agent  # noqa: F401
from tests.unit.test_server_relay import _handler
from virtcontainers.agent import connect_unix
from virtcontainers.agent.protocol import CHUNK, AgentRequestError, FrameType
from virtcontainers.errors import AgentError, ConfigError, StateError
from virtcontainers.server.relay import Relay
from virtcontainers.server.sync_client import RemoteProcess, ServerConnection


@pytest.fixture
def agent(agent_binary: Path, tmp_path: Path) -> Iterator[Agent]:  # noqa: F811
    yield from start_agent(agent_binary, tmp_path)


@pytest.fixture
async def run_dir(agent: Agent) -> AsyncIterator[str]:
    """A directory whose ``server.sock`` is served by a relay on the agent."""
    relay = Relay(_handler)
    relay.attach_upstream(await connect_unix(agent.sock), resync=True)
    where = tempfile.mkdtemp(prefix="vcs-", dir="/tmp")  # short: sun_path has 108 bytes
    server = await asyncio.start_unix_server(
        lambda r, w: relay.serve(r, w, "test"), os.path.join(where, "server.sock")
    )
    try:
        yield where
    finally:
        server.close()
        await relay.close()
        os.unlink(os.path.join(where, "server.sock"))
        os.rmdir(where)


def _collect(proc: RemoteProcess, stdin: bytes = b"") -> tuple[bytes, bytes]:
    """Run the frames of ``proc`` to its exit, feeding ``stdin`` within its credit."""
    out = {FrameType.STDOUT: bytearray(), FrameType.STDERR: bytearray()}
    sent = 0
    while proc.status is None:
        if sent < len(stdin) and proc.stdin_credit > 0:
            part = stdin[sent : sent + proc.stdin_credit]
            proc.write_stdin(part)
            sent += len(part)
            if sent == len(stdin):
                proc.close_stdin()
            continue
        for frame in proc.connection.receive():
            got = proc.on_frame(frame)
            if got is not None:
                out[got[0]] += got[1]
    return bytes(out[FrameType.STDOUT]), bytes(out[FrameType.STDERR])


def _blocking(run_dir: str) -> None:
    with closing(ServerConnection.connect(run_dir)) as conn:
        proc = conn.start_exec(["sh", "-c", "echo out; echo err >&2; exit 3"], no_stdin=True)
        assert _collect(proc) == (b"out\n", b"err\n")
        assert proc.status is not None
        assert proc.status.exit_code == 3

        # more than the 256 KiB windows both ways: credit flows back on both sides
        data = os.urandom(1_500_000)
        proc = conn.start_exec(["sha256sum"])
        out, _ = _collect(proc, data)
        assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
        proc = conn.start_exec(["head", "-c", "2000000", "/dev/zero"], no_stdin=True)
        assert _collect(proc)[0] == bytes(2_000_000)

        with pytest.raises(AgentRequestError) as missing:
            conn.start_exec(["/nonexistent/program"])
        assert "/nonexistent/program" in missing.value.message

        with pytest.raises(StateError) as failed:
            conn.call("fail")
        assert failed.value.sandbox_id == "sb1"
        assert conn.call("echo", a=1) == {"a": 1}

        # detached: output made after its client left is kept and replayed to an attacher
        mark = os.path.join(run_dir, "go")
        script = f"while [ ! -e {mark} ]; do sleep 0.02; done; echo kept; read x; echo got-$x"
        proc = conn.start_exec(["sh", "-c", script], keep=True)
    with closing(ServerConnection.connect(run_dir)) as conn:
        while any(p["attached"] for p in conn.call("processes")):  # type: ignore[union-attr]
            time.sleep(0.02)
        Path(mark).touch()
        time.sleep(0.5)  # mostly printed while nobody listens: replayed (else live: the same)
        again = conn.attach(proc.pid)
        again.write_stdin(b"it\n")
        assert _collect(again) == (b"kept\ngot-it\n", b"")
        os.unlink(mark)
        with pytest.raises(StateError):
            conn.attach(999999)


async def test_blocking_client_through_the_relay(run_dir: str) -> None:
    await asyncio.to_thread(_blocking, run_dir)


def _files(run_dir: str) -> None:
    target = os.path.join(run_dir, "copied")
    data = os.urandom(3 * CHUNK + 123)  # several chunks, the last one short
    with closing(ServerConnection.connect(run_dir)) as conn:
        conn.write_file(target, data, 0o640)
        assert Path(target).read_bytes() == data
        assert Path(target).stat().st_mode & 0o777 == 0o640
        assert not Path(target + ".vc-part").exists()  # renamed into place after the last
        assert conn.read_file(target) == data
        conn.write_file(target, b"", 0o600)  # one empty, final chunk
        assert conn.read_file(target) == b""
        exact = os.urandom(2 * CHUNK)  # ends on a chunk boundary: EOF on an empty chunk
        conn.write_file(target, exact)
        assert conn.read_file(target) == exact
        status = conn.read_file("/proc/self/status")  # st_size 0: ends with a short read
        assert status.startswith(b"Name:")
        nosuch = os.path.join(run_dir, "nosuch")
        with pytest.raises(AgentRequestError) as missing:
            conn.read_file(nosuch)
        # the agent's message names the request: said once, not twice
        assert str(missing.value) == f"read_file {nosuch}: No such file or directory (OS [ENOENT])"
        with pytest.raises(AgentRequestError):
            conn.write_file(os.path.join(run_dir, "nodir", "f"), b"x")
        with pytest.raises(ConfigError):
            conn.write_file("", b"x")
    os.unlink(target)


async def test_blocking_client_copies_files_through_the_relay(run_dir: str) -> None:
    await asyncio.to_thread(_files, run_dir)


async def test_connect_without_a_server_is_an_agent_error(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="cannot connect"):
        ServerConnection.connect(tmp_path)


# -- `vc exec`'s terminal loop (cli/streams.follow_blocking), in its own process ---------

_FOLLOW = textwrap.dedent(
    """
    import sys
    from virtcontainers.cli.streams import claim_stdin, follow_blocking
    from virtcontainers.server.sync_client import ServerConnection

    claim_stdin()  # as vc exec does first
    conn = ServerConnection.connect(sys.argv[1])
    proc = conn.start_exec(sys.argv[2:])
    print("started", file=sys.stderr, flush=True)
    sys.exit(follow_blocking(proc, tty=False, interactive=False))
    """
)


def _follow(run_dir: str, *argv: str, **popen: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _FOLLOW, run_dir, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,  # type: ignore[call-overload]
    )


async def test_follow_streams_stdin_and_exit_code(run_dir: str, tmp_path: Path) -> None:
    data = os.urandom(700_000)
    (tmp_path / "in").write_bytes(data)
    with (tmp_path / "in").open("rb") as stdin:  # a regular file: poll() says readable
        proc = _follow(run_dir, "sh", "-c", "sha256sum; echo warn >&2; exit 7", stdin=stdin)
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 7
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert err == b"started\nwarn\n"


async def test_follow_with_our_stdin_closed_gives_the_process_eof(run_dir: str) -> None:
    """Started with fd 0 closed, our own sockets could get fd 0 and be read as stdin (it hung
    doing so): /dev/null takes fd 0 first."""
    closed = subprocess.Popen(
        ["sh", "-c", 'exec "$@" <&-', "sh", sys.executable, "-c", _FOLLOW, run_dir,
         "sh", "-c", "cat; echo eof-seen"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.to_thread(closed.communicate, timeout=30)
    assert (out, closed.returncode) == (b"eof-seen\n", 0), err


async def test_follow_forwards_sigint_to_the_guest_process(run_dir: str) -> None:
    script = "trap 'echo got-int; exit 9' INT; echo ready; while :; do sleep 0.05; done"
    proc = _follow(run_dir, "sh", "-c", script, stdin=subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    assert line == b"ready\n"
    proc.send_signal(signal.SIGINT)  # not KeyboardInterrupt here: the guest gets it
    out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    assert out == b"got-int\n"
    assert proc.returncode == 9


async def test_follow_sends_sigpipe_when_our_reader_goes(run_dir: str) -> None:
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", _FOLLOW, run_dir, "yes"],
        stdout=write_end,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        first = await asyncio.to_thread(reader.read, 4)  # the relay runs on this loop
    _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert first == b"y\ny\n", err
    assert proc.returncode == 128 + signal.SIGPIPE, err
