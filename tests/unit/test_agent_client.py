"""vc-agent compiled with the host's gcc and run on the host (``--unix``), driven by AgentClient.

No VM is involved: the agent is an ordinary program here, its children are host processes and
its "guest" file system is the host's (under tmp_path). ``--sysfs-root`` points the CPU/memory
onlining at a fake sysfs tree and ``--no-poweroff`` turns shutdown into exit(0).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import tty
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtcontainers.agent import (
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    AgentClient,
    AgentRequestError,
    ExecSpec,
    Stream,
    connect_unix,
)
from virtcontainers.agent.protocol import (
    MAX_PAYLOAD,
    SYNC_PREAMBLE,
    ErrorCode,
    Fields,
    Frame,
    FrameDecoder,
    FrameType,
    MountFlag,
    Tag,
    encode_frame,
    tlv,
    tlv_encode,
)
from virtcontainers.errors import AgentError, ConfigError

SOURCE = Path(__file__).resolve().parents[2] / "src/virtcontainers/guest/agent/vc-agent.c"


def _compile(out: Path, *extra: str) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot build vc-agent")
    cmd = [gcc, *extra, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SOURCE)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0 and "-static" in extra:  # no static libc: a dynamic build will do
        res = subprocess.run(
            [c for c in cmd if c != "-static"], capture_output=True, text=True, check=False
        )
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="session")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vc-agent") / "vc-agent"
    _compile(out, "-static")  # as the image builder does, plus -Wextra -Werror
    return out


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    sock: str
    sysfs: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _accepts(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def start_agent(binary: Path | list[str], tmp_path: Path, *extra: str) -> Iterator[Agent]:
    rundir = tempfile.mkdtemp(prefix="vca-", dir="/tmp")  # short: sun_path has 108 bytes
    sock = os.path.join(rundir, "agent.sock")
    sysfs = tmp_path / "sys"
    sysfs.mkdir(exist_ok=True)
    log = tmp_path / "agent.log"
    argv = [str(binary)] if isinstance(binary, Path) else binary
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            [*argv, "--unix", sock, "--sysfs-root", str(sysfs), "--no-poweroff", *extra],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 20
    while not _accepts(sock):  # the file appears at bind(), connections work after listen()
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "agent socket never accepted a connection"
        time.sleep(0.005)
    agent = Agent(proc, sock, sysfs, log)
    try:
        yield agent
    finally:
        for kid in _children(proc.pid):  # leave no stray test process behind
            with contextlib.suppress(OSError):
                os.killpg(kid, signal.SIGKILL)
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(rundir, ignore_errors=True)


@pytest.fixture
def agent(agent_binary: Path, tmp_path: Path) -> Iterator[Agent]:
    yield from start_agent(agent_binary, tmp_path)


@pytest.fixture
async def client(agent: Agent) -> AsyncIterator[AgentClient]:
    c = await AgentClient.connect_unix(agent.sock, timeout=20)
    try:
        yield c
    finally:
        await c.close()


# --- basics -----------------------------------------------------------------------------


async def test_ping_reports_versions(client: AgentClient) -> None:
    info = await client.ping()
    assert info.protocol_major == PROTOCOL_MAJOR
    assert info.protocol_minor >= 0
    assert info.agent_version == "0.1.0"


async def test_exec_echo(client: AgentClient) -> None:
    res = await client.exec(["echo", "hello", "world"])
    assert (res.exit_code, res.signal, res.stdout, res.stderr) == (0, None, b"hello world\n", b"")


async def test_exit_code_and_stderr(client: AgentClient) -> None:
    res = await client.exec(["sh", "-c", "echo oops >&2; exit 7"])
    assert res.exit_code == 7
    assert res.signal is None
    assert res.stderr == b"oops\n"


async def test_killed_by_signal(client: AgentClient) -> None:
    res = await client.exec(["sh", "-c", "kill -TERM $$"])
    assert res.exit_code is None
    assert res.signal == signal.SIGTERM
    assert not res.timed_out


async def test_env_replaces_environment_and_cwd(client: AgentClient, tmp_path: Path) -> None:
    res = await client.exec(ExecSpec(["env"], env={"FOO": "bar baz", "X": ""}))
    assert sorted(res.stdout.decode().splitlines()) == ["FOO=bar baz", "X="]
    res = await client.exec(
        ExecSpec(["sh", "-c", 'echo "$FOO"; pwd'], env={"FOO": "v"}, cwd=str(tmp_path))
    )
    assert res.stdout.decode().splitlines() == ["v", str(tmp_path)]


async def test_exec_failures_are_request_errors(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentRequestError) as info:
        await client.exec(["/nonexistent/program"])
    assert info.value.code == ErrorCode.EXEC
    assert info.value.errno == errno.ENOENT
    with pytest.raises(AgentRequestError, match="chdir") as info:
        await client.exec(ExecSpec(["true"], cwd=str(tmp_path / "missing")))
    assert info.value.errno == errno.ENOENT
    with pytest.raises(ConfigError, match="empty"):
        await client.exec([])
    assert (await client.exec(["true"])).exit_code == 0  # the agent carries on


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c, d: c.exec([]), "argv"),
        (lambda c, d: c.exec_stream([]), "argv"),
        (lambda c, d: c.exec(["echo", "a\0b"]), "argv"),
        (lambda c, d: c.exec(ExecSpec(["true"], env={"K\0": "v"})), "env"),
        (lambda c, d: c.exec(ExecSpec(["true"], env={"K": "v\0"})), "env"),
        (lambda c, d: c.exec(ExecSpec(["true"], env={"A=B": "v"})), "env"),
        (lambda c, d: c.exec(ExecSpec(["true"], env={"": "v"})), "env"),
        (lambda c, d: c.exec(ExecSpec(["true"], cwd=f"{d}\0x")), "cwd"),
        (lambda c, d: c.exec(["echo", "\udcff"]), "argv"),
        (lambda c, d: c.exec(ExecSpec(["true"], uid=-1)), "uid"),
        (lambda c, d: c.exec(ExecSpec(["true"], gid=2**32)), "gid"),
        (lambda c, d: c.exec(ExecSpec(["true"], timeout=-1)), "timeout"),
        (lambda c, d: c.write_file(f"{d}/a\0b", b"x"), "path"),
        (lambda c, d: c.write_file(f"{d}/a", b"x", mode=-1), "mode"),
        (lambda c, d: c.read_file(f"{d}/a\0b"), "path"),
        (lambda c, d: c.read_file(""), "path"),
        (lambda c, d: c.signal(1, -1), "signal"),
    ],
)
async def test_bad_request_input_is_a_config_error(
    client: AgentClient,
    tmp_path: Path,
    call: Callable[[AgentClient, Path], Awaitable[object]],
    field: str,
) -> None:
    """Caller input the wire cannot carry (empty argv, NUL bytes, unencodable text, numbers
    out of range) is refused before anything is sent, as ConfigError naming the field."""
    with pytest.raises(ConfigError) as info:
        await call(client, tmp_path)
    assert info.value.field == field
    assert not (tmp_path / "a").exists()  # a NUL never truncated a path into another one
    assert (await client.exec(["true"])).exit_code == 0  # the connection is still fine


@pytest.mark.skipif(os.geteuid() != 0, reason="setuid needs root")
async def test_uid_gid(client: AgentClient) -> None:
    res = await client.exec(ExecSpec(["sh", "-c", "id -u; id -g; id -G"], uid=65534, gid=65534))
    assert res.stdout.decode().split() == ["65534", "65534", "65534"]


@pytest.mark.skipif(os.geteuid() != 0, reason="setgroups/setuid need root")
async def test_groups_rlimits_and_umask_since_1_3(client: AgentClient) -> None:
    proc = await client.exec_stream(
        ExecSpec(
            ["sh", "-c", "id -G; ulimit -Sn; ulimit -Hn; umask"],
            uid=65534,
            gid=65534,
            groups=[1234, 5],
            rlimits=[(7, 100, 200)],
            umask=0o027,
        ),
        no_stdin=True,
    )
    out = b"".join([data async for _stream, data in proc])
    assert (await proc.wait()).exit_code == 0
    groups, limits = out.decode().splitlines()[0].split(), out.decode().split()[3:]
    assert groups[0] == "65534"
    assert sorted(groups[1:]) == ["1234", "5"]
    assert limits == ["100", "200", "0027"]
    with pytest.raises(AgentRequestError, match="setrlimit") as info:
        await client.exec_stream(
            ExecSpec(["true"], rlimits=[(7, 10, 5)])
        )  # soft above hard: EINVAL
    assert info.value.code == ErrorCode.EXEC
    with pytest.raises(ConfigError, match="supplementary groups need a gid"):
        await client.exec_stream(ExecSpec(["true"], groups=[1]))


async def test_write_file_parents_since_1_3(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.txt"
    with pytest.raises(AgentRequestError, match="No such file or directory"):
        await client.write_file(str(target), b"x")
    await client.write_file(str(target), b"made", parents=True)
    assert target.read_bytes() == b"made"


@pytest.mark.skipif(os.geteuid() != 0, reason="mount needs root")
async def test_mount_since_1_3(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "made" / "here"
    await client.mount(str(target), source="tmpfs", fstype="tmpfs",
                       flags=MountFlag.NOSUID | MountFlag.RDONLY, data="size=1m")  # fmt: skip
    try:
        line = next(m for m in Path("/proc/self/mounts").read_text().splitlines()
                    if m.split()[1] == str(target))  # fmt: skip
        assert line.split()[2] == "tmpfs"
        assert {"ro", "nosuid"} <= set(line.split()[3].split(","))
    finally:
        subprocess.run(["umount", str(target)], check=True)
    afile = tmp_path / "f" / "bound"
    await client.mount(str(afile), source=str(SOURCE), flags=MountFlag.BIND | MountFlag.FILE)
    try:
        assert afile.read_bytes() == SOURCE.read_bytes()
    finally:
        subprocess.run(["umount", str(afile)], check=True)
    with pytest.raises(AgentRequestError, match="no disk labelled vc-none"):
        await client.mount(str(tmp_path / "x"), source="LABEL=vc-none", fstype="ext4")
    with pytest.raises(AgentRequestError, match="No such device"):
        await client.mount(str(tmp_path / "y"), source="none", fstype="no-such-fs")
    with pytest.raises(ConfigError, match="must be absolute"):
        await client.mount("relative", source="tmpfs", fstype="tmpfs")


# --- streams and flow control -------------------------------------------------------------


async def test_stdin_round_trip_10mib(client: AgentClient) -> None:
    data = random.Random(1).randbytes(10 << 20)
    res = await client.exec(ExecSpec(["cat"], timeout=60), stdin=data)
    assert res.exit_code == 0
    assert len(res.stdout) == len(data)
    assert zlib.crc32(res.stdout) == zlib.crc32(data)
    assert res.stdout == data


async def test_large_output_and_stdin_to_a_process_that_does_not_read(
    client: AgentClient,
) -> None:
    res = await client.exec(["head", "-c", str(8 << 20), "/dev/zero"])
    assert res.stdout == bytes(8 << 20)
    # `true` never reads stdin: the agent must credit the dropped bytes back, not stall
    res = await client.exec(ExecSpec(["true"], timeout=30), stdin=bytes(3 << 20))
    assert res.exit_code == 0


async def test_slow_consumer_does_not_block_other_requests(client: AgentClient) -> None:
    proc = await client.exec_stream(["head", "-c", str(4 << 20), "/dev/zero"], no_stdin=True)
    await asyncio.sleep(0.3)  # the agent is now out of credit for this exec
    assert (await client.exec(["echo", "still here"])).stdout == b"still here\n"
    total = 0
    async for stream, chunk in proc:
        assert stream is Stream.STDOUT
        total += len(chunk)
    assert total == 4 << 20
    assert (await proc.wait()).exit_code == 0


async def test_interactive_stream(client: AgentClient) -> None:
    proc = await client.exec_stream(["cat"])
    got = b""
    for line in (b"one\n", b"two\n"):
        await proc.write_stdin(line)
        while not got.endswith(line):
            stream, chunk = await anext(proc)
            assert stream is Stream.STDOUT
            got += chunk
    await proc.close_stdin()
    status = await proc.wait()
    assert (status.exit_code, status.signal) == (0, None)
    assert got == b"one\ntwo\n"


async def test_twenty_concurrent_execs_do_not_mix(client: AgentClient) -> None:
    script = 'i=0; while [ $i -lt 300 ]; do echo "$1-$i"; echo "err-$1-$i" >&2; i=$((i+1)); done'

    async def one(n: int) -> None:
        res = await client.exec(["sh", "-c", script, "sh", f"job{n}"])
        assert res.exit_code == 0
        assert res.stdout.decode().splitlines() == [f"job{n}-{i}" for i in range(300)]
        assert res.stderr.decode().splitlines() == [f"err-job{n}-{i}" for i in range(300)]

    await asyncio.gather(*(one(n) for n in range(20)))


async def test_timeout_kills_the_process_group(client: AgentClient) -> None:
    start = time.monotonic()
    proc = await client.exec_stream(
        ExecSpec(["sh", "-c", "sleep 30 & echo $!; wait"], timeout=0.5), no_stdin=True
    )
    first = b""
    async for _stream, chunk in proc:
        first += chunk
    status = await proc.wait()
    assert status.timed_out
    assert status.signal == signal.SIGKILL
    assert time.monotonic() - start < 10
    background = int(first.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # gone, or a zombie waiting for its new parent
        try:
            state = Path(f"/proc/{background}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z":
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the background child survived the exec timeout")


async def test_signal(client: AgentClient) -> None:
    proc = await client.exec_stream(["sleep", "30"], no_stdin=True)
    await proc.signal(signal.SIGTERM)
    status = await proc.wait()
    assert (status.exit_code, status.signal, status.timed_out) == (None, signal.SIGTERM, False)
    with pytest.raises(AgentRequestError) as info:
        await client.signal(proc.exec_id, signal.SIGTERM)  # gone after its EXIT
    assert info.value.code == ErrorCode.NOT_FOUND


async def test_tty(client: AgentClient) -> None:
    res = await client.exec(ExecSpec(["tty"], tty=True))
    assert res.exit_code == 0
    assert res.stdout.startswith(b"/dev/pts/")
    res = await client.exec(
        ExecSpec(["sh", "-c", "stty size; read x; echo got:$x"], tty=True), stdin=b"hi\n"
    )
    assert b"got:hi" in res.stdout
    proc = await client.exec_stream(ExecSpec(["stty", "size"], tty=True, tty_size=(33, 111)))
    assert b"".join([c async for _s, c in proc]).strip() == b"33 111"


# --- files ------------------------------------------------------------------------------


async def test_write_and_read_file(client: AgentClient, tmp_path: Path) -> None:
    tmp_path = tmp_path / "files"
    tmp_path.mkdir()
    small = tmp_path / "small.txt"
    await client.write_file(str(small), b"hello\n", 0o600)
    assert small.read_bytes() == b"hello\n"
    assert stat.S_IMODE(small.stat().st_mode) == 0o600
    assert await client.read_file(str(small)) == b"hello\n"
    await client.write_file(str(small), b"#!/bin/sh\necho replaced\n", 0o755)
    assert stat.S_IMODE(small.stat().st_mode) == 0o755
    assert (await client.exec([str(small)])).stdout == b"replaced\n"

    big = random.Random(2).randbytes(5 << 20)
    await client.write_file(str(tmp_path / "big"), big, 0o640)
    assert (tmp_path / "big").read_bytes() == big
    assert stat.S_IMODE((tmp_path / "big").stat().st_mode) == 0o640
    assert await client.read_file(str(tmp_path / "big")) == big
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "small.txt"]  # no .vc-part

    await client.write_file(str(tmp_path / "empty"), b"")
    assert await client.read_file(str(tmp_path / "empty")) == b""
    exact = bytes(range(256)) * 128  # exactly one chunk
    await client.write_file(str(tmp_path / "exact"), exact)
    assert await client.read_file(str(tmp_path / "exact")) == exact


async def test_file_errors(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentRequestError) as info:
        await client.read_file(str(tmp_path / "missing"))
    assert info.value.errno == errno.ENOENT
    with pytest.raises(AgentRequestError) as info:
        await client.read_file(str(tmp_path))
    assert info.value.errno == errno.EISDIR
    with pytest.raises(AgentRequestError) as info:
        await client.write_file(str(tmp_path / "no" / "dir"), b"x" * 100_000)
    assert info.value.errno == errno.ENOENT
    assert await client.read_file("/proc/self/status")  # st_size 0: read until EOF


async def test_direct_write(client: AgentClient, tmp_path: Path) -> None:
    target = tmp_path / "attr"
    target.write_text("0\n")
    inode = target.stat().st_ino
    await client.write_file(str(target), b"1", atomic=False)
    assert target.stat().st_ino == inode
    assert target.read_text() == "1"  # replaced in place (same inode), no .vc-part file
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("attr")) == ["attr"]


# --- sysfs, shutdown ----------------------------------------------------------------------


async def test_online_cpus_and_memory(client: AgentClient, agent: Agent) -> None:
    cpu = agent.sysfs / "devices/system/cpu"
    (cpu / "cpu0").mkdir(parents=True)  # the boot CPU has no "online" file
    for n, state in ((1, "0"), (2, "1"), (3, "0"), (12, "0")):
        (cpu / f"cpu{n}").mkdir()
        (cpu / f"cpu{n}" / "online").write_text(state + "\n")
    (cpu / "cpufreq").mkdir()
    mem = agent.sysfs / "devices/system/memory"
    for n, state in ((0, "online"), (1, "offline"), (2, "offline")):
        (mem / f"memory{n}").mkdir(parents=True)
        (mem / f"memory{n}" / "state").write_text(state + "\n")
    (mem / "block_size_bytes").write_text("8000000\n")

    assert await client.online_cpus() == 3
    assert [(cpu / f"cpu{n}" / "online").read_text()[0] for n in (1, 2, 3, 12)] == ["1"] * 4
    assert await client.online_cpus() == 0
    assert await client.online_memory() == 2
    assert all((mem / f"memory{n}" / "state").read_text().startswith("online") for n in (0, 1, 2))
    assert await client.online_memory() == 0


async def test_online_without_sysfs_is_an_error(client: AgentClient) -> None:
    with pytest.raises(AgentRequestError) as info:
        await client.online_cpus()
    assert info.value.errno == errno.ENOENT


async def test_shutdown_replies_then_exits(client: AgentClient, agent: Agent) -> None:
    await client.shutdown()
    assert await asyncio.to_thread(agent.proc.wait, 10) == 0
    assert "shutdown requested" in agent.log_text()
    with pytest.raises(AgentError):
        await client.ping()


# --- connection handling ------------------------------------------------------------------


async def test_close_leaves_no_tasks(agent: Agent) -> None:
    before = asyncio.all_tasks()
    c = await AgentClient.connect_unix(agent.sock)
    await c.exec(["echo", "x"], stdin=b"ignored")
    proc = await c.exec_stream(["cat"])
    await c.close()
    await c.close()  # idempotent
    assert asyncio.all_tasks() == before
    with pytest.raises(AgentError, match="closed"):
        await c.ping()
    with pytest.raises(AgentError, match="closed"):
        await proc.wait()


async def test_calls_time_out(agent: Agent) -> None:
    # A peer that accepts and never answers.
    server = await asyncio.start_unix_server(lambda r, w: None, path=agent.sock + ".mute")
    async with server:
        c = await AgentClient.connect_unix(agent.sock + ".mute", timeout=0.2)
        with pytest.raises(AgentError, match=r"ping timed out after 0.2 s"):
            await c.ping()
        await c.close()


async def test_reconnect_orphans_the_old_sessions_execs(agent: Agent) -> None:
    first = await AgentClient.connect_unix(agent.sock)
    proc = await first.exec_stream(["cat"])
    pid = proc.pid
    await first.close()
    second = await AgentClient.connect_unix(agent.sock)
    try:
        await second.ping()
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists():  # stdin closed: cat ends and the agent reaps it
            assert time.monotonic() < deadline, "orphaned cat still running"
            await asyncio.sleep(0.02)
        assert (await second.exec(["echo", "ok"])).stdout == b"ok\n"
    finally:
        await second.close()


async def test_agent_death_fails_waiters(client: AgentClient, agent: Agent) -> None:
    proc = await client.exec_stream(["sleep", "30"], no_stdin=True)
    agent.proc.kill()
    with pytest.raises(AgentError, match="closed the connection"):
        await proc.wait()
    with pytest.raises(AgentError):
        await client.ping()


def test_sigterm_removes_the_socket(agent: Agent) -> None:
    agent.proc.terminate()
    assert agent.proc.wait(timeout=10) == 0
    assert not os.path.exists(agent.sock)


async def test_hybrid_vsock_handshake(agent: Agent) -> None:
    """A stand-in for Firecracker's hybrid vsock socket in front of the agent."""
    uds = agent.sock + ".hv"
    seen: list[bytes] = []

    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except OSError:
            pass
        finally:
            w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        line = await r.readline()
        seen.append(line)
        if line != b"CONNECT 1024\n":
            w.close()  # what Firecracker does when nothing listens on the port
            return
        ar, aw = await asyncio.open_unix_connection(agent.sock)
        w.write(b"OK 1073741824\n")
        await asyncio.gather(pump(r, aw), pump(ar, w))

    server = await asyncio.start_unix_server(handle, path=uds)
    async with server:
        c = await AgentClient.connect_hybrid_vsock(uds, 1024)
        try:
            assert (await c.ping()).protocol_major == PROTOCOL_MAJOR
            assert (await c.exec(["echo", "via hvsock"])).stdout == b"via hvsock\n"
        finally:
            await c.close()
        with pytest.raises(AgentError, match=r"CONNECT 99 .* refused"):
            await AgentClient.connect_hybrid_vsock(uds, 99)
    assert seen == [b"CONNECT 1024\n", b"CONNECT 99\n"]


async def test_connect_errors_are_agent_errors(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="cannot connect"):
        await connect_unix(tmp_path / "nothing.sock")


# --- robustness against a bad peer -----------------------------------------------------


class RawPeer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, frame_id: int) -> Frame:
        async with asyncio.timeout(10):
            while True:
                for f in self.frames:
                    if f.id == frame_id:
                        self.frames.remove(f)
                        return f
                data = await self.reader.read(65536)
                assert data, "agent closed the connection"
                self.frames += self.decoder.feed(data)


def _error(frame: Frame) -> tuple[int, int]:
    assert frame.type == FrameType.ERROR, frame
    return frame.id, Fields(frame.payload).uint(Tag.ERR_CODE)


def _forged(ftype: int, frame_id: int, length: int) -> bytes:
    """A header with a valid header CRC whose length field lies."""
    head = bytearray(encode_frame(ftype, frame_id, b""))
    head[12:16] = length.to_bytes(4, "big")
    head[20:24] = zlib.crc32(bytes(head[:20])).to_bytes(4, "big")
    return bytes(head)


async def test_garbage_then_valid_ping_on_the_same_connection(agent: Agent) -> None:
    peer = RawPeer(*await connect_unix(agent.sock))
    rng = random.Random(3)
    await peer.send(rng.randbytes(5000))  # junk
    await peer.send(b"VCAG" * 10 + b"VC")  # magic without a valid header
    await peer.send(encode_frame(FrameType.PING, 70, b"x" * 100)[:40])  # truncated frame
    await peer.send(SYNC_PREAMBLE)  # what a reattaching host sends
    await peer.send(_forged(FrameType.PING, 71, MAX_PAYLOAD + 1))  # oversized length
    await peer.send(rng.randbytes(1000))
    await peer.send(encode_frame(0x3F, 72))  # unknown type
    await peer.send(encode_frame(FrameType.EXEC, 73, b"\x00\x01\xff\xff\xff\xff"))  # bad TLV
    await peer.send(encode_frame(FrameType.EXEC, 74, tlv_encode([tlv(Tag.UID, b"\x01")])))
    await peer.send(encode_frame(FrameType.EXEC, 75, tlv_encode([tlv(Tag.ARG, b"a\x00b")])))
    await peer.send(encode_frame(FrameType.EXEC, 76, tlv_encode([tlv(0x8123, b"")])))
    await peer.send(encode_frame(FrameType.PING, 77, version=2))  # future major version
    corrupt = bytearray(encode_frame(FrameType.PING, 78, b"payload"))
    corrupt[-1] ^= 1
    await peer.send(bytes(corrupt))  # payload CRC mismatch: dropped without a reply
    await peer.send(encode_frame(FrameType.STDIN, 999, b"to nobody"))  # unknown exec
    await peer.send(encode_frame(FrameType.PING, 79))

    assert _error(await peer.reply(71)) == (71, ErrorCode.TOO_LARGE)
    assert _error(await peer.reply(72)) == (72, ErrorCode.BAD_TYPE)
    for bad in (73, 74, 75, 76):
        assert _error(await peer.reply(bad)) == (bad, ErrorCode.BAD_PAYLOAD)
    version_error = await peer.reply(77)
    assert _error(version_error) == (77, ErrorCode.BAD_VERSION)
    assert Fields(version_error.payload).uint(Tag.PROTO_MAJOR) == PROTOCOL_MAJOR
    pong = await peer.reply(79)
    assert pong.type == FrameType.OK
    assert Fields(pong.payload).uint(Tag.PROTO_MAJOR) == PROTOCOL_MAJOR
    assert not [f for f in peer.frames if f.id in (70, 78)]

    # the same connection still serves a full client
    c = AgentClient(peer.reader, peer.writer, resync=False)
    try:
        assert (await c.ping()).protocol_major == PROTOCOL_MAJOR
        assert (await c.exec(["echo", "alive"])).stdout == b"alive\n"
    finally:
        await c.close()
    assert agent.proc.poll() is None


async def test_incompatible_agent_version(agent: Agent) -> None:
    async def fake_agent(version: int, ping_major: int) -> str:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            dec = FrameDecoder()
            while data := await r.read(65536):
                for f in dec.feed(data):
                    body = tlv_encode(
                        [
                            tlv(Tag.PROTO_MAJOR, ping_major, 4),
                            tlv(Tag.PROTO_MINOR, 3, 4),
                            tlv(Tag.AGENT_VERSION, "9.9"),
                        ]
                    )
                    w.write(encode_frame(FrameType.OK, f.id, body, version=version))
            w.close()

        path = f"{agent.sock}.v{version}{ping_major}"
        servers.append(await asyncio.start_unix_server(handle, path=path))
        return path

    servers: list[asyncio.Server] = []
    try:
        for version, major in ((2, 2), (1, 2)):
            c = await AgentClient.connect_unix(await fake_agent(version, major))
            with pytest.raises(AgentError, match="incompatible agent protocol") as info:
                await c.ping()
            assert "version 2" in str(info.value)
            assert f"client speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}" in str(info.value)
            await c.close()
    finally:
        for s in servers:
            s.close()
            await s.wait_closed()

    # and the real agent refuses a frame of another major version with both versions named
    peer = RawPeer(*await connect_unix(agent.sock))
    await peer.send(encode_frame(FrameType.PING, 5, version=PROTOCOL_MAJOR + 1))
    reply = await peer.reply(5)
    assert _error(reply) == (5, ErrorCode.BAD_VERSION)
    assert b"agent speaks protocol 1, frame has version 2" in Fields(reply.payload).raw(Tag.MESSAGE)
    peer.writer.close()


# --- valgrind ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_agent_under_valgrind(tmp_path: Path) -> None:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.skip("valgrind is not installed")
    binary = tmp_path / "vc-agent-dyn"  # static binaries hide malloc from valgrind
    _compile(binary, "-g")
    vlog = tmp_path / "valgrind.log"
    argv = [valgrind, "--error-exitcode=99", "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect", "--track-fds=no",
            f"--log-file={vlog}", str(binary)]  # fmt: skip
    gen = start_agent(argv, tmp_path)
    agent = next(gen)
    try:
        await test_garbage_then_valid_ping_on_the_same_connection(agent)
        c = await AgentClient.connect_unix(agent.sock, timeout=60)
        try:
            res = await c.exec(["cat"], stdin=random.Random(4).randbytes(1 << 20))
            assert len(res.stdout) == 1 << 20
            assert (await c.exec(ExecSpec(["tty"], tty=True))).stdout.startswith(b"/dev/pts/")
            await c.write_file(str(tmp_path / "f"), b"y" * 100_000, 0o600)
            assert len(await c.read_file(str(tmp_path / "f"))) == 100_000
            await c.exec(ExecSpec(["sleep", "5"], timeout=0.2))
            with pytest.raises(AgentRequestError):
                await c.exec(["/nonexistent"])
            await c.shutdown()
        finally:
            await c.close()
        code = await asyncio.to_thread(agent.proc.wait, 60)
        assert code == 0, vlog.read_text()
    finally:
        gen.close()


# --- serial transport ---------------------------------------------------------------------


async def _pty_streams(master: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a pty master: the host end of a stand-in serial port."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    rproto = asyncio.StreamReaderProtocol(reader)
    rtransport, _ = await loop.connect_read_pipe(
        lambda: rproto, os.fdopen(os.dup(master), "rb", buffering=0)
    )

    class ClosesReadSide(asyncio.StreamReaderProtocol):
        # A socket closes both directions at once; the pty's two pipe transports do not. A
        # client's read side left open would go on stealing bytes meant for the next client.
        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            rtransport.close()

    wproto = ClosesReadSide(asyncio.StreamReader())
    wtransport, _ = await loop.connect_write_pipe(
        lambda: wproto, os.fdopen(os.dup(master), "wb", buffering=0)
    )
    return reader, asyncio.StreamWriter(wtransport, wproto, reader, loop)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or before the read
        return False


async def test_serial_transport_and_host_reattach(agent_binary: Path, tmp_path: Path) -> None:
    """Like virtio-serial, a pty does not tell the agent that the host went away."""
    master, slave = os.openpty()
    tty.setraw(slave)  # before the agent starts, so not even the first bytes are echoed
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"console=ttyS0 vc.agent=serial:{os.ttyname(slave)} quiet\n")
    log = tmp_path / "agent.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            [str(agent_binary), "--cmdline", str(cmdline), "--no-poweroff"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "ready" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"agent not ready: {log.read_text()!r}"
            await asyncio.sleep(0.01)
        first = AgentClient(*await _pty_streams(master), timeout=10)
        assert (await first.ping()).protocol_major == PROTOCOL_MAJOR
        assert (await first.exec(["echo", "over serial"])).stdout == b"over serial\n"
        binary = random.Random(5).randbytes(300_000)
        assert (await first.exec(["cat"], stdin=binary)).stdout == binary
        # The first host leaves a `cat` waiting for stdin that only that host could close.
        waiting = await first.exec_stream(["cat"])
        # the host dies half-way through a frame
        first._writer.write(encode_frame(FrameType.EXEC, 1, bytes(200))[:60])
        await first.close()

        # A new host that does not resync has its first frames swallowed by the stale one...
        naive = AgentClient(*await _pty_streams(master), timeout=0.5, resync=False)
        with pytest.raises(AgentError, match="timed out"):
            await naive.ping()
        await naive.close()
        # ...one that sends the sync preamble (the default) gets through.
        second = AgentClient(*await _pty_streams(master), timeout=10)
        assert (await second.ping()).protocol_major == PROTOCOL_MAJOR
        # The pty never reports the first host gone, but the second host's ATTACH ends the
        # first host's session: the agent closes that `cat`'s stdin and the process exits.
        deadline = time.monotonic() + 10
        while _alive(waiting.pid):
            assert time.monotonic() < deadline, "the first host's exec outlived its session"
            await asyncio.sleep(0.02)
        assert (await second.exec(["echo", "again"])).stdout == b"again\n"
        await second.shutdown()
        await second.close()
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
