"""A blocking client of a sandbox server, for the CLI's hot commands (`vc exec`, `vc attach`,
`vc top`, `vc kill`, `vc cp`, `vc pause`, `vc resume`, `vc resize`).

The same wire as :class:`~virtcontainers.server.client.ServerClient` (the agent framing of
:mod:`virtcontainers.agent.protocol`, the server's ops of :mod:`.wire`) over a plain unix
socket, in the calling thread: no asyncio, no reader task, so a `vc exec` costs the
interpreter, click and this module. Replies and stream frames share the connection:
:meth:`ServerConnection.request` waits for its own reply and keeps the stream frames that
arrive meanwhile for :meth:`ServerConnection.receive`.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections import deque
from collections.abc import Sequence

from virtcontainers.agent import protocol
from virtcontainers.errors import AgentError
from virtcontainers.server import wire
from virtcontainers.telemetry.context import current_traceparent

__all__ = ["RemoteProcess", "ServerConnection"]

SOCKET_NAME = "server.sock"  # server.client.SOCKET_NAME (that module imports asyncio)


class ServerConnection:
    """One blocking connection to a sandbox server. Every failure is an ``AgentError``."""

    def __init__(self, sock: socket.socket, *, timeout: float = 30.0) -> None:
        self._sock = sock
        self._timeout = timeout
        self._decoder = protocol.FrameDecoder()
        self._queued: deque[protocol.Frame] = deque()
        # random, as AgentClient's (without `secrets`: it loads OpenSSL for hmac)
        self._next_id = int.from_bytes(os.urandom(4), "big") % (1 << 30) + 1

    @classmethod
    def connect(cls, run_dir: str | os.PathLike[str], *, timeout: float = 30.0) -> ServerConnection:
        """Connect to the server of the sandbox whose run dir is ``run_dir``.

        Raises:
            AgentError: no server listens there (none was started, or it died).
        """
        where = os.path.join(run_dir, SOCKET_NAME)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(min(timeout, 5.0))
            sock.connect(where)
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            raise AgentError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
        return cls(sock, timeout=timeout)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        """Close the connection (use ``contextlib.closing``); idempotent."""
        self._sock.close()

    # -- requests ------------------------------------------------------------------------

    def call(self, op: str, **args: object) -> object:
        """Run server op ``op``; raises the server's error as its public class."""
        payload = wire.encode_request(op, args, current_traceparent())
        fields = self.request(protocol.FrameType.SERVER, payload, op)
        return wire.decode_reply(fields.raw(protocol.Tag.DATA))

    def start_exec(
        self, command: protocol.ExecSpec | Sequence[str], *, keep: bool = False,
        no_stdin: bool = False,
    ) -> RemoteProcess:  # fmt: skip
        """Start ``command`` in the guest (as ``ServerClient.exec_stream``; ``keep``: the
        process outlives this connection, for ``vc attach``).

        Raises:
            AgentRequestError: the program cannot be started (the agent's reply).
            ConfigError: input the wire cannot carry.
        """
        spec = protocol.ExecSpec.of(command)
        payload = spec.request(no_stdin=no_stdin, extra_items=[wire.KEEP] if keep else [])
        fields = self.request(protocol.FrameType.EXEC, payload, spec.what)
        return RemoteProcess(
            self, fields.uint(protocol.Tag.EXEC_ID), fields.uint(protocol.Tag.PID), no_stdin
        )

    def attach(self, pid: int) -> RemoteProcess:
        """Reconnect to process ``pid``: its kept output comes first, then it streams live.

        Raises:
            StateError: no such process, or another client is attached to it.
        """
        payload = wire.encode_request("attach", {"pid": pid}, current_traceparent())
        fields = self.request(protocol.FrameType.SERVER, payload, "attach")
        info = wire.decode_reply(fields.raw(protocol.Tag.DATA))
        if not isinstance(info, dict):
            raise AgentError(f"malformed attach reply {info!r}")
        return RemoteProcess(self, int(info["exec_id"]), int(info["pid"]), False)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the guest (atomically: renamed into place after the
        last chunk), one chunk at a time.

        Raises:
            ConfigError: a path or mode the wire cannot carry. AgentRequestError: the guest
                refused (e.g. no such directory). AgentError: no reply, or a lost connection.
        """
        for payload in protocol.write_file_requests(path, data, mode):
            self.request(protocol.FrameType.WRITE_FILE, payload, f"write_file {path}")

    def read_file(self, path: str) -> bytes:
        """The contents of ``path`` in the guest, one chunk at a time.

        Raises:
            ConfigError: a path the wire cannot carry. AgentRequestError: the guest refused
                (e.g. no such file). AgentError: no reply, or a lost connection.
        """
        parts: list[bytes] = []
        while True:
            offset = len(parts) * protocol.CHUNK
            fields = self.request(
                protocol.FrameType.READ_FILE,
                protocol.read_file_request(path, offset),
                f"read_file {path}",
            )
            data, last = protocol.read_file_chunk(fields)
            parts.append(data)
            if last:
                return b"".join(parts)

    def request(self, ftype: protocol.FrameType, payload: bytes, op: str) -> protocol.Fields:
        """Send a request and wait for its reply; frames for streams are kept meanwhile.

        Raises:
            AgentError: an error reply (``AgentRequestError`` from the agent), no reply
                within the timeout, or a lost connection.
        """
        fid = self.notify(ftype, payload)
        deadline = time.monotonic() + self._timeout
        while True:
            for index, frame in enumerate(self._queued):
                if frame.id == fid and frame.type in (
                    protocol.FrameType.OK,
                    protocol.FrameType.ERROR,
                ):
                    del self._queued[index]
                    if frame.type == protocol.FrameType.ERROR:
                        raise protocol.error_reply(op, frame)
                    return protocol.Fields(frame.payload)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                raise AgentError(f"{op} timed out after {self._timeout:g} s")
            self._queued.extend(self._read())

    def notify(self, ftype: protocol.FrameType, payload: bytes = b"") -> int:
        """Send a request without waiting (its reply is dropped by :meth:`receive`);
        returns its id."""
        fid = self._next_id
        self._next_id = fid + 1 if fid < 0xFFFFFFFF else 1
        try:
            data = protocol.encode_frame(ftype, fid, payload)
        except ValueError as exc:
            raise AgentError(f"{ftype.name.lower()}: {exc}") from None
        self.send(data)
        return fid

    def send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise AgentError(f"sandbox server connection failed: {exc.strerror or exc}") from exc

    # -- stream frames -------------------------------------------------------------------

    def receive(self) -> list[protocol.Frame]:
        """The stream frames kept by requests, else those of one read (blocks until data).
        Replies to :meth:`notify` requests are dropped.

        Raises:
            AgentError: the server closed the connection or broke the protocol.
        """
        frames = list(self._queued) if self._queued else self._read()
        self._queued.clear()
        return [
            f for f in frames if f.type not in (protocol.FrameType.OK, protocol.FrameType.ERROR)
        ]

    @property
    def has_queued(self) -> bool:
        """Frames are waiting that :meth:`receive` returns without reading."""
        return bool(self._queued)

    def _read(self) -> list[protocol.Frame]:
        try:
            data = self._sock.recv(1 << 18)
        except OSError as exc:
            raise AgentError(f"sandbox server connection failed: {exc.strerror or exc}") from exc
        if not data:
            raise AgentError("the sandbox server closed the connection")
        frames = self._decoder.feed(data)
        for frame in frames:
            if frame.version != protocol.PROTOCOL_MAJOR:
                raise protocol.incompatible(frame.version, None)
        return frames


class RemoteProcess:
    """A process started (or attached to) through a :class:`ServerConnection`: feed it the
    frames the connection receives (:meth:`on_frame`) until :attr:`status` is set."""

    def __init__(
        self, connection: ServerConnection, exec_id: int, pid: int, stdin_closed: bool
    ) -> None:
        self.connection = connection
        self.exec_id = exec_id
        self.pid = pid
        self.stdin_closed = stdin_closed
        #: stdin bytes the agent still accepts (its flow-control window)
        self.stdin_credit = protocol.INITIAL_WINDOW
        self.status: protocol.ExitStatus | None = None
        self._consumed = 0

    def on_frame(self, frame: protocol.Frame) -> tuple[protocol.FrameType, bytes] | None:
        """Account for a frame of this process: ``(STDOUT or STDERR, data)`` for output
        (credited back as consumed), else ``None``."""
        if frame.id != self.exec_id:
            return None
        if frame.type in (protocol.FrameType.STDOUT, protocol.FrameType.STDERR):
            self._consumed += len(frame.payload)
            if self._consumed >= protocol.INITIAL_WINDOW // 4:
                credit = self._consumed.to_bytes(4, "big")
                self.connection.send(
                    protocol.encode_frame(protocol.FrameType.WINDOW, self.exec_id, credit)
                )
                self._consumed = 0
            return protocol.FrameType(frame.type), frame.payload
        if frame.type == protocol.FrameType.WINDOW and len(frame.payload) == 4:
            self.stdin_credit += int.from_bytes(frame.payload, "big")
        elif frame.type == protocol.FrameType.EXIT:
            self.status = protocol.exit_status(frame.payload)
        return None

    def write_stdin(self, data: bytes) -> None:
        """Send stdin bytes; the caller keeps within :attr:`stdin_credit` (at most
        ``protocol.CHUNK`` bytes per frame are sent)."""
        for off in range(0, len(data), protocol.CHUNK):
            part = data[off : off + protocol.CHUNK]
            self.stdin_credit -= len(part)
            self.connection.send(
                protocol.encode_frame(protocol.FrameType.STDIN, self.exec_id, part)
            )

    def close_stdin(self) -> None:
        """End of input (for a tty: a VEOF). Idempotent."""
        if not self.stdin_closed and self.status is None:
            self.stdin_closed = True
            self.connection.send(
                protocol.encode_frame(
                    protocol.FrameType.STDIN, self.exec_id, b"", protocol.Flag.EOF
                )
            )

    def signal(self, sig: int, *, group: bool = False) -> None:
        """Send ``sig`` to the process (its process group with ``group``); not awaited."""
        items = [
            protocol.tlv(protocol.Tag.EXEC_ID, self.exec_id, 4),
            protocol.tlv(protocol.Tag.SIGNAL, sig, 4),
        ]
        if group:
            items.append(protocol.tlv(protocol.Tag.GROUP, 1, 1))
        self.connection.notify(protocol.FrameType.SIGNAL, protocol.tlv_encode(items))

    def resize(self, rows: int, cols: int) -> None:
        """Set the window size of the process's pty; not awaited."""
        items = [
            protocol.tlv(protocol.Tag.EXEC_ID, self.exec_id, 4),
            protocol.tlv(protocol.Tag.ROWS, rows, 4),
            protocol.tlv(protocol.Tag.COLS, cols, 4),
        ]
        self.connection.notify(protocol.FrameType.RESIZE, protocol.tlv_encode(items))
