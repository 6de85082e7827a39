"""Async host-side client of the guest agent.

One ``AgentClient`` owns one connection (a ``StreamReader``/``StreamWriter`` pair from
:mod:`virtcontainers.agent.transport`). A single reader task decodes frames and hands them to
waiting futures (replies) or exec processes (output, exit, flow-control credit). Requests are
pipelined: any number of coroutines may call the client concurrently.

Failures all surface as :class:`~virtcontainers.errors.AgentError` (``OSError``, EOF and
protocol violations are translated at the reader and writer boundary); an error reply from the
agent is an :class:`AgentRequestError` carrying the agent's error code and errno. Caller input
the wire cannot carry (an empty argv; NUL characters or text that is not UTF-8 in argv, env,
cwd or a path; integers out of range; a non-positive timeout) is the caller's mistake, not the
agent's, so it raises :class:`~virtcontainers.errors.ConfigError` naming the argument
(``field``) before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from types import TracebackType

from virtcontainers.agent.protocol import (
    CHUNK,
    INITIAL_WINDOW,
    PROTOCOL_MAJOR,
    SYNC_PREAMBLE,
    AgentRequestError,
    ExecSpec,
    ExitStatus,
    Fields,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    MountFlag,
    Tag,
    encode_frame,
    error_reply,
    exit_status,
    incompatible,
    path_item,
    read_file_chunk,
    read_file_request,
    text_item,
    tlv,
    tlv_encode,
    uint_item,
    write_file_requests,
)
from virtcontainers.agent.transport import (
    StreamPair,
    connect_hybrid_vsock,
    connect_unix,
    connect_vsock,
)
from virtcontainers.errors import AgentError, ConfigError

__all__ = [
    "AgentClient",
    "AgentRequestError",
    "ExecProcess",
    "ExecResult",
    "ExitStatus",
    "Stream",
    "VersionInfo",
]

log = logging.getLogger(__name__)

_PIPELINE = 8
"""File chunks in flight per read_file/write_file call."""


class Stream(IntEnum):
    STDOUT = 1
    STDERR = 2


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """What the agent answers to a ping: its protocol version and its own version."""

    protocol_major: int
    protocol_minor: int
    agent_version: str


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


@dataclass(slots=True)
class _Pending:
    id: int
    op: str
    future: asyncio.Future[Frame]
    on_ok: Callable[[Fields], None] | None = None


class ExecProcess:
    """A running exec: iterate it for ``(Stream, bytes)`` chunks, then ``await wait()``.

    Output flows only as fast as it is consumed (the agent holds at most 256 KiB per exec);
    ``wait()`` discards output that was not iterated.
    """

    def __init__(self, client: AgentClient, exec_id: int, pid: int, stdin_closed: bool) -> None:
        self.exec_id = exec_id
        self.pid = pid
        self._client = client
        self._chunks: deque[tuple[Stream, bytes]] = deque()
        self._wakeup = asyncio.Event()
        self._credit_changed = asyncio.Event()
        self._stdin_credit = INITIAL_WINDOW
        self._stdin_closed = stdin_closed
        self._consumed = 0
        self._status: ExitStatus | None = None
        self._error: AgentError | None = None

    @property
    def status(self) -> ExitStatus | None:
        """The exit status once the agent reported it, else ``None``."""
        return self._status

    # --- called by the client's reader -------------------------------------------------
    def _on_frame(self, frame: Frame) -> None:
        if frame.type == FrameType.STDOUT:
            self._chunks.append((Stream.STDOUT, frame.payload))
            self._wakeup.set()
        elif frame.type == FrameType.STDERR:
            self._chunks.append((Stream.STDERR, frame.payload))
            self._wakeup.set()
        elif frame.type == FrameType.WINDOW and len(frame.payload) == 4:
            self._stdin_credit += int.from_bytes(frame.payload, "big")
            self._credit_changed.set()
        elif frame.type == FrameType.EXIT:
            self._status = exit_status(frame.payload)
            self._wakeup.set()
            self._credit_changed.set()

    def _fail(self, error: AgentError) -> None:
        if self._status is None and self._error is None:
            self._error = error
        self._wakeup.set()
        self._credit_changed.set()

    # --- output ------------------------------------------------------------------------
    def __aiter__(self) -> ExecProcess:
        return self

    async def __anext__(self) -> tuple[Stream, bytes]:
        while True:
            if self._chunks:
                item = self._chunks.popleft()
                self._return_credit(len(item[1]))
                return item
            if self._status is not None:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            self._wakeup.clear()
            await self._wakeup.wait()

    def _return_credit(self, n: int) -> None:
        self._consumed += n
        if self._consumed >= INITIAL_WINDOW // 4 and self._status is None:
            self._client._send_nowait(
                encode_frame(FrameType.WINDOW, self.exec_id, self._consumed.to_bytes(4, "big"))
            )
            self._consumed = 0

    async def wait(self) -> ExitStatus:
        """Wait for the exit, discarding output not consumed yet. Raises ``AgentError``."""
        async for _ in self:
            pass
        if self._status is None:  # pragma: no cover - iteration ends only on exit or error
            raise AgentError(f"exec {self.exec_id} ended without a status")
        return self._status

    # --- input -------------------------------------------------------------------------
    async def write_stdin(self, data: bytes) -> None:
        """Send ``data`` to the process's stdin, waiting for flow-control credit.

        Returns early (dropping the rest) once the process has exited. Raises ``AgentError``
        when the connection fails or stdin was closed.
        """
        view = memoryview(data)
        off = 0
        while off < len(view):
            if self._error is not None:
                raise self._error
            if self._status is not None:
                return
            if self._stdin_closed:
                raise AgentError(f"exec {self.exec_id}: stdin is already closed")
            if self._stdin_credit <= 0:
                self._credit_changed.clear()
                await self._credit_changed.wait()
                continue
            n = min(CHUNK, self._stdin_credit, len(view) - off)
            self._stdin_credit -= n
            await self._client._send(
                encode_frame(FrameType.STDIN, self.exec_id, bytes(view[off : off + n]))
            )
            off += n

    async def close_stdin(self) -> None:
        """Signal end of input (for a tty: a VEOF, i.e. ^D). Idempotent."""
        if self._stdin_closed or self._status is not None or self._error is not None:
            return
        self._stdin_closed = True
        await self._client._send(encode_frame(FrameType.STDIN, self.exec_id, b"", Flag.EOF))

    async def signal(self, sig: int, *, group: bool = False) -> None:
        """Send ``sig`` to the process (or its whole process group)."""
        await self._client.signal(self.exec_id, sig, group=group)

    async def resize(self, rows: int, cols: int) -> None:
        """Set the window size of the process's pty."""
        await self._client.resize_tty(self.exec_id, rows, cols)


#: How long close() lets buffered bytes drain before dropping the connection.
_CLOSE_FLUSH_TIMEOUT = 2.0


class AgentClient:
    """Client of one agent connection.

    Use ``async with AgentClient(reader, writer) as agent:`` or one of the ``connect_*``
    class methods, and ``await close()`` when done. Each call takes ``timeout`` (seconds,
    default: the client's ``timeout``) and raises ``AgentError`` when it passes.

    ``resync`` sends :data:`SYNC_PREAMBLE` and an ATTACH frame before the first request, so
    that an agent on a virtio-serial port, which cannot reliably see host reconnects, drops
    whatever a previous host left half-written and ends that host's sessions.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout: float = 30.0,
        resync: bool = True,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._resync = resync
        self._decoder = FrameDecoder()
        self._pending: dict[int, _Pending] = {}
        self._procs: dict[int, ExecProcess] = {}
        self._task: asyncio.Task[None] | None = None
        self._broken: AgentError | None = None
        self._closed = False
        self._next_id = secrets.randbelow(1 << 30) + 1

    # --- construction ------------------------------------------------------------------
    @classmethod
    async def connect_unix(
        cls, path: str | os.PathLike[str], *, timeout: float = 30.0, resync: bool = True
    ) -> AgentClient:
        """Client over a unix socket (virtio-serial chardev, or ``vc-agent --unix``)."""
        return cls._started(await connect_unix(path, timeout=timeout), timeout, resync)

    @classmethod
    async def connect_hybrid_vsock(
        cls, uds_path: str | os.PathLike[str], port: int = 1024, *, timeout: float = 30.0
    ) -> AgentClient:
        """Client over Firecracker / Cloud Hypervisor hybrid vsock."""
        pair = await connect_hybrid_vsock(uds_path, port, timeout=timeout)
        return cls._started(pair, timeout, False)

    @classmethod
    async def connect_vsock(
        cls, cid: int, port: int = 1024, *, timeout: float = 30.0
    ) -> AgentClient:
        """Client over AF_VSOCK."""
        return cls._started(await connect_vsock(cid, port, timeout=timeout), timeout, False)

    @classmethod
    def _started(cls, pair: StreamPair, timeout: float, resync: bool) -> AgentClient:
        client = cls(pair[0], pair[1], timeout=timeout, resync=resync)
        client._start()
        return client

    async def __aenter__(self) -> AgentClient:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- public requests ---------------------------------------------------------------
    async def ping(self, *, timeout: float | None = None) -> VersionInfo:
        """Check the agent is alive and speaks our protocol major version."""
        fields = await self._call(FrameType.PING, b"", "ping", timeout)
        info = VersionInfo(
            protocol_major=fields.uint(Tag.PROTO_MAJOR),
            protocol_minor=fields.uint(Tag.PROTO_MINOR),
            agent_version=fields.text(Tag.AGENT_VERSION),
        )
        if info.protocol_major != PROTOCOL_MAJOR:
            raise incompatible(info.protocol_major, info.protocol_minor)
        return info

    async def exec(
        self, command: ExecSpec | Sequence[str], *, stdin: bytes | None = None
    ) -> ExecResult:
        """Run ``command`` (an :class:`ExecSpec`, or a bare argv) to completion and collect
        its output; ``stdin`` is written to it, then closed (``None``: no stdin at all).

        With ``tty`` stdout and stderr arrive merged as stdout; with ``timeout`` the agent
        SIGKILLs the process group after that many seconds (then ``timed_out`` is set).
        Raises ``AgentRequestError`` when the program cannot be started, ``AgentError`` when
        the connection fails or the exit is not reported in time, ``ConfigError`` for input
        that cannot be sent (see the module docstring).
        """
        spec = ExecSpec.of(command)
        proc = await self.exec_stream(spec, no_stdin=stdin is None)
        out: dict[Stream, bytearray] = {Stream.STDOUT: bytearray(), Stream.STDERR: bytearray()}
        feeder: asyncio.Task[None] | None = None
        if stdin is not None:
            feeder = asyncio.create_task(_feed(proc, stdin), name=f"agent-stdin-{proc.exec_id}")
        limit = None if spec.timeout is None else spec.timeout + self._timeout
        try:
            async with asyncio.timeout(limit):
                async for stream, chunk in proc:
                    out[stream] += chunk
                status = await proc.wait()
                if feeder is not None:
                    await feeder
        except TimeoutError:
            raise AgentError(f"{spec.what}: no exit after {limit:g} s") from None
        finally:
            if feeder is not None and not feeder.done():
                feeder.cancel()
                await asyncio.wait([feeder])
            if feeder is not None and not feeder.cancelled():
                feeder.exception()  # retrieved: the output side already raised
        return ExecResult(
            status.exit_code,
            status.signal,
            bytes(out[Stream.STDOUT]),
            bytes(out[Stream.STDERR]),
            status.timed_out,
        )

    async def exec_stream(
        self,
        command: ExecSpec | Sequence[str],
        *,
        no_stdin: bool = False,
        request_timeout: float | None = None,
        extra_items: Sequence[tuple[int, bytes]] = (),
    ) -> ExecProcess:
        """Start ``command`` (an :class:`ExecSpec`, or a bare argv) and return at once with an
        :class:`ExecProcess`.

        ``no_stdin`` starts it with stdin already closed. ``extra_items``: more TLV items for
        the request (e.g. the sandbox server's KEEP).

        Raises:
            ConfigError: input the wire cannot carry (names the field).
            AgentRequestError: the agent refused (EXEC: the failing step and errno).
        """
        spec = ExecSpec.of(command)
        payload = spec.request(no_stdin=no_stdin, extra_items=extra_items)
        started: list[ExecProcess] = []

        def register(fields: Fields) -> None:
            # Runs inside the reader before the next frame, so no output frame can race it.
            proc = ExecProcess(self, fields.uint(Tag.EXEC_ID), fields.uint(Tag.PID), no_stdin)
            self._procs[proc.exec_id] = proc
            started.append(proc)

        await self._call(FrameType.EXEC, payload, spec.what, request_timeout, register)
        return started[0]

    async def signal(
        self, exec_id: int, sig: int, *, group: bool = False, timeout: float | None = None
    ) -> None:
        """Send signal ``sig`` to exec ``exec_id`` (its process group with ``group=True``)."""
        items = [
            uint_item(Tag.EXEC_ID, "exec_id", exec_id, 4),
            uint_item(Tag.SIGNAL, "signal", sig, 4),
        ]
        if group:
            items.append(tlv(Tag.GROUP, 1, 1))
        await self._call(FrameType.SIGNAL, tlv_encode(items), "signal", timeout)

    async def resize_tty(
        self, exec_id: int, rows: int, cols: int, *, timeout: float | None = None
    ) -> None:
        """Set the window size of exec ``exec_id``'s pty (protocol 1.2; the guest process
        gets SIGWINCH)."""
        items = [tlv(Tag.EXEC_ID, exec_id, 4), tlv(Tag.ROWS, rows, 4), tlv(Tag.COLS, cols, 4)]
        await self._call(FrameType.RESIZE, tlv_encode(items), "resize", timeout)

    async def mount(
        self,
        target: str,
        *,
        source: str = "",
        fstype: str = "",
        flags: MountFlag = MountFlag.NONE,
        data: str = "",
        timeout: float | None = None,
    ) -> None:
        """Mount in the container root (protocol 1.3): ``source`` is a guest path, a pseudo
        source (``tmpfs``) or ``LABEL=NAME`` (the virtio disk with that ext4 label). The
        target is created first (a file with ``MountFlag.FILE``).

        Raises:
            ConfigError: a relative target or text the wire cannot carry.
            AgentRequestError: the mount failed in the guest (errno and step in the message).
        """
        if not target.startswith("/"):
            raise ConfigError(f"mount target {target!r} must be absolute", field="target")
        items = [path_item(target), uint_item(Tag.MOUNT_FLAGS, "flags", int(flags), 4)]
        for tag, name, value in ((Tag.SOURCE, "source", source), (Tag.FSTYPE, "fstype", fstype),
                                 (Tag.MOUNT_DATA, "data", data)):  # fmt: skip
            if value:
                items.append(text_item(tag, name, value))
        await self._call(FrameType.MOUNT, tlv_encode(items), f"mount {target}", timeout)

    async def write_file(
        self,
        path: str,
        data: bytes,
        mode: int = 0o644,
        *,
        atomic: bool = True,
        timeout: float | None = None,
        parents: bool = False,
    ) -> None:
        """Write ``data`` to ``path`` in the guest with permission bits ``mode``.

        ``atomic`` writes ``<path>.vc-part`` and renames it over ``path`` after the last
        chunk; ``atomic=False`` writes in place (sysfs, procfs, devices, a bind-mounted
        file). ``parents`` (protocol 1.3) creates missing parent directories. ``timeout``
        applies per chunk.
        """
        op = f"write_file {path}"
        requests = write_file_requests(path, data, mode, atomic=atomic, parents=parents)
        window: deque[_Pending] = deque()
        try:
            for index, payload in enumerate(requests):
                if index == len(requests) - 1:
                    # the rename must not happen unless every earlier chunk landed
                    while window:
                        await self._result(window.popleft(), timeout)
                while len(window) >= _PIPELINE:
                    await self._result(window.popleft(), timeout)
                window.append(self._submit(FrameType.WRITE_FILE, payload, op))
            while window:
                await self._result(window.popleft(), timeout)
        finally:
            for pending in window:
                self._discard(pending)

    async def read_file(self, path: str, *, timeout: float | None = None) -> bytes:
        """Return the contents of ``path`` in the guest. ``timeout`` applies per chunk."""
        op = f"read_file {path}"
        parts: list[bytes] = []
        window: deque[_Pending] = deque()
        offset = 0
        try:
            while True:
                while len(window) < _PIPELINE:
                    window.append(
                        self._submit(FrameType.READ_FILE, read_file_request(path, offset), op)
                    )
                    offset += CHUNK
                data, last = read_file_chunk(await self._result(window.popleft(), timeout))
                parts.append(data)
                if last:
                    return b"".join(parts)
        finally:
            for pending in window:
                self._discard(pending)

    async def online_cpus(self, *, timeout: float | None = None) -> int:
        """Online every offline vCPU in the guest; returns how many were onlined."""
        return await self._online(FrameType.ONLINE_CPUS, "online_cpus", timeout)

    async def online_memory(self, *, timeout: float | None = None) -> int:
        """Online every offline memory block in the guest; returns how many were onlined."""
        return await self._online(FrameType.ONLINE_MEMORY, "online_memory", timeout)

    async def shutdown(self, *, timeout: float | None = None) -> None:
        """Ask the agent to sync and power the guest off. The connection ends after it."""
        await self._call(FrameType.SHUTDOWN, b"", "shutdown", timeout)

    async def close(self) -> None:
        """Close the connection and stop the reader task. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        self._fail_all(AgentError("agent client is closed"))
        self._writer.close()
        # A peer that stopped reading (a wedged agent, a full pty or virtio-serial buffer)
        # would keep buffered bytes unflushed and wait_closed() pending forever.
        try:
            async with asyncio.timeout(_CLOSE_FLUSH_TIMEOUT):
                await self._writer.wait_closed()
        except TimeoutError:
            self._writer.transport.abort()
        except OSError:
            pass

    # --- plumbing ----------------------------------------------------------------------
    def _start(self) -> None:
        if self._task is not None or self._closed:
            return
        if self._resync:
            # ATTACH tells the agent that the previous host's sessions are over, which a
            # virtio-serial port does not reliably do (docs/agent-protocol.md, "Resync").
            self._writer.write(SYNC_PREAMBLE + encode_frame(FrameType.ATTACH, 0, b""))
        self._task = asyncio.create_task(self._read_loop(), name="agent-reader")

    @property
    def usable(self) -> bool:
        """False once the connection was closed or broke (a new one is needed)."""
        return not self._closed and self._broken is None

    def _check_usable(self) -> None:
        if self._closed:
            raise AgentError("agent client is closed")
        if self._broken is not None:
            raise self._broken
        self._start()

    async def _online(self, ftype: FrameType, op: str, timeout: float | None) -> int:
        fields = await self._call(ftype, b"", op, timeout)
        failed = fields.uint(Tag.FAILED, 0)
        if failed:
            log.warning("%s: %d entries could not be onlined (see the guest console)", op, failed)
        return fields.uint(Tag.COUNT)

    async def _call(
        self,
        ftype: FrameType,
        payload: bytes,
        op: str,
        timeout: float | None,
        on_ok: Callable[[Fields], None] | None = None,
    ) -> Fields:
        return await self._result(self._submit(ftype, payload, op, on_ok), timeout)

    def _submit(
        self,
        ftype: FrameType,
        payload: bytes,
        op: str,
        on_ok: Callable[[Fields], None] | None = None,
    ) -> _Pending:
        """Queue a request frame (no drain: :meth:`_result` applies back-pressure)."""
        self._check_usable()
        try:
            frame_id = self._new_id()
            data = encode_frame(ftype, frame_id, payload)
        except ValueError as exc:
            raise AgentError(f"{op}: {exc}") from None
        pending = _Pending(frame_id, op, asyncio.get_running_loop().create_future(), on_ok)
        self._pending[frame_id] = pending
        self._send_nowait(data)
        return pending

    async def _result(self, pending: _Pending, timeout: float | None) -> Fields:
        seconds = self._timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(seconds):
                await self._drain()
                frame = await pending.future
        except TimeoutError:
            raise AgentError(f"{pending.op} timed out after {seconds:g} s") from None
        finally:
            self._discard(pending)
        if frame.type == FrameType.ERROR:
            raise error_reply(pending.op, frame)
        return Fields(frame.payload)

    def _discard(self, pending: _Pending) -> None:
        self._pending.pop(pending.id, None)
        if pending.future.done() and not pending.future.cancelled():
            pending.future.exception()  # mark retrieved
        else:
            pending.future.cancel()

    def _new_id(self) -> int:
        frame_id = self._next_id
        self._next_id = frame_id + 1 if frame_id < 0xFFFFFFFF else 1
        return frame_id

    def _send_nowait(self, data: bytes) -> None:
        if self._closed or self._broken is not None:
            return
        try:
            self._writer.write(data)
        except (OSError, RuntimeError) as exc:
            self._fail_all(AgentError(f"agent connection failed: {exc}"))

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except OSError as exc:
            error = AgentError(f"agent connection failed: {exc.strerror or exc}")
            self._fail_all(error)
            raise error from exc

    async def _send(self, data: bytes) -> None:
        self._check_usable()
        self._send_nowait(data)
        await self._drain()

    async def _read_loop(self) -> None:
        error: AgentError
        try:
            while True:
                data = await self._reader.read(1 << 18)
                if not data:
                    error = AgentError("agent closed the connection")
                    break
                for frame in self._decoder.feed(data):
                    self._dispatch(frame)
                if self._broken is not None:
                    return
        except OSError as exc:
            error = AgentError(f"agent connection failed: {exc.strerror or exc}")
        except AgentError as exc:
            error = exc
        except Exception as exc:  # a bug must not leave every waiter hanging
            log.exception("agent reader failed")
            error = AgentError(f"agent reader failed: {exc!r}")
        self._fail_all(error)

    def _dispatch(self, frame: Frame) -> None:
        if frame.version != PROTOCOL_MAJOR:
            self._fail_all(incompatible(frame.version, None))
            return
        if frame.type in (FrameType.OK, FrameType.ERROR):
            pending = self._pending.get(frame.id)
            if pending is None or pending.future.done():
                log.debug("reply to unknown request %d ignored", frame.id)
                return
            if frame.type == FrameType.OK and pending.on_ok is not None:
                try:
                    pending.on_ok(Fields(frame.payload))
                except AgentError as exc:
                    pending.future.set_exception(exc)
                    return
            pending.future.set_result(frame)
        elif frame.type in (
            FrameType.STDOUT,
            FrameType.STDERR,
            FrameType.EXIT,
            FrameType.WINDOW,
        ):
            proc = self._procs.get(frame.id)
            if proc is None:
                log.debug("frame type %#x for unknown exec %d ignored", frame.type, frame.id)
                return
            proc._on_frame(frame)
            if frame.type == FrameType.EXIT:
                del self._procs[frame.id]
        else:
            log.debug("unexpected frame type %#x ignored", frame.type)

    def _fail_all(self, error: AgentError) -> None:
        if self._broken is None:
            self._broken = error
        for pending in list(self._pending.values()):
            if not pending.future.done():
                pending.future.set_exception(error)
        self._pending.clear()
        for proc in self._procs.values():
            proc._fail(error)
        self._procs.clear()


async def _feed(proc: ExecProcess, data: bytes) -> None:
    await proc.write_stdin(data)
    await proc.close_stdin()
