"""The multiplexer: many client connections, one connection to the guest agent.

Every client (``vc`` processes, ``Sandbox`` objects in other processes, and the server's own
``Sandbox``, over an internal socket pair) speaks the agent protocol to the relay. The relay
forwards agent requests upstream under its own request ids and routes each reply back to the
client that asked, under the id that client used. Exec ids are the agent's own (unique per
agent session), so stream frames need no renaming: STDOUT/STDERR/EXIT/WINDOW go to the exec's
*owner*, the client that started it (or attached to it later).

An exec outlives its client. When the owner goes away (an exit, a SIGKILL) the relay credits
back what the owner had not acknowledged, keeps the latest output in a bounded backlog, and
returns the agent's output credit itself, so the process never blocks on a full pipe. An exec
started without KEEP then gets what a hung-up terminal gives it: stdin closed, and SIGHUP to its
process group when it has a tty (as the agent does for a host that disconnects). An exec with
KEEP (``vc exec -d``) keeps its stdin open for ``vc attach``, which replays the backlog first.

SERVER frames (:mod:`virtcontainers.server.wire`) are not forwarded: the relay answers
``processes``, ``attach``, ``kill`` and ``resize_tty`` itself and hands every other op to the
server's handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from virtcontainers.agent.client import AgentClient
from virtcontainers.agent.protocol import (
    SYNC_PREAMBLE,
    ErrorCode,
    Fields,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    Tag,
    encode_frame,
    tlv,
    tlv_decode,
    tlv_encode,
)
from virtcontainers.agent.transport import StreamPair
from virtcontainers.errors import AgentError, StateError, VirtContainersError
from virtcontainers.server import wire
from virtcontainers.telemetry.tracing import attached

__all__ = ["Handler", "Relay"]

log = logging.getLogger(__name__)

#: Output kept per exec while no client is attached (the newest bytes win).
BACKLOG_BYTES = 256 * 1024
#: Exited execs remembered for ``vc attach``/``vc top`` after their client left.
FINISHED_KEPT = 64

#: The server's handler for SERVER ops the relay does not answer itself.
Handler = Callable[[str, "wire.JsonObject"], Awaitable[object]]

C = TypeVar("C", bound=AgentClient)


class RelayObserver(Protocol):
    """Told of every agent round trip and exec (the server's metrics)."""

    def request_done(self, request: str, seconds: float, ok: bool) -> None: ...

    def exec_started(self) -> None: ...

    def exec_exited(self, exit_code: int | None, signal: int | None) -> None: ...


@dataclass(eq=False)
class _Client:
    name: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    closed: bool = False
    owned: set[int] = field(default_factory=set)

    def send(self, data: bytes) -> None:
        if self.closed or self.writer.is_closing():
            return
        try:
            self.writer.write(data)
        except (OSError, RuntimeError):  # the peer went away: its reader notices
            self.closed = True


@dataclass(eq=False)
class _Exec:
    exec_id: int
    pid: int
    argv: list[str]
    tty: bool
    keep: bool
    started_at: float
    owner: _Client | None
    #: bytes forwarded to the owner that it has not credited back yet
    unacked: int = 0
    #: replayed bytes the owner will credit although the relay already did
    owed: int = 0
    backlog: deque[Frame] = field(default_factory=deque)
    backlog_bytes: int = 0
    exit: Frame | None = None

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {
            "pid": self.pid,
            "exec_id": self.exec_id,
            "argv": self.argv,
            "tty": self.tty,
            "detached": self.keep,
            "attached": self.owner is not None and not self.owner.closed,
            "started_at": self.started_at,
            "running": self.exit is None,
        }
        if self.exit is not None:
            fields = Fields(self.exit.payload)
            out["exit_code"] = fields.opt_uint(Tag.EXIT_CODE)
            out["signal"] = fields.opt_uint(Tag.SIGNAL)
        return out


@dataclass(eq=False)
class _Route:
    """Where an upstream reply goes: a client's request, or the relay's own (``future``)."""

    client: _Client | None
    client_id: int
    exec_request: tuple[list[str], bool, bool] | None = None  # argv, tty, keep
    future: asyncio.Future[Frame] | None = None
    request: int = 0  # the FrameType sent, and when (for the observer)
    sent: float = 0.0


class Relay:
    """One agent connection shared by any number of clients (see the module docstring)."""

    def __init__(self, handler: Handler, observer: RelayObserver | None = None) -> None:
        self._handler = handler
        self._observer = observer
        self._up: StreamPair | None = None
        self._up_task: asyncio.Task[None] | None = None
        self._broken: str | None = None
        self._routes: dict[int, _Route] = {}
        self._execs: dict[int, _Exec] = {}
        self._finished: deque[_Exec] = deque(maxlen=FINISHED_KEPT)
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = secrets.randbelow(1 << 30) + 1

    # -- upstream ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._up is not None and self._broken is None

    def attach_upstream(self, pair: StreamPair, *, resync: bool) -> None:
        """Take the agent connection. ``resync``: send the preamble and ATTACH first (a
        virtio-serial port that a previous host may have left mid-frame)."""
        self._up = pair
        self._broken = None
        if resync:
            pair[1].write(SYNC_PREAMBLE + encode_frame(FrameType.ATTACH, 0, b""))
        self._up_task = asyncio.create_task(self._upstream_loop(pair[0]), name="relay-upstream")

    def _upstream_send(self, data: bytes) -> bool:
        if self._up is None or self._broken is not None:
            return False
        try:
            self._up[1].write(data)
        except (OSError, RuntimeError) as exc:
            self._lose_upstream(f"agent connection failed: {exc}")
            return False
        return True

    async def _upstream_loop(self, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder()
        why = "agent closed the connection"
        try:
            while data := await reader.read(1 << 18):
                for frame in decoder.feed(data):
                    self._from_agent(frame)
        except OSError as exc:
            why = f"agent connection failed: {exc.strerror or exc}"
        except Exception:  # a relay bug must not leave every client hanging
            log.exception("relay upstream loop failed")
            why = "relay failed"
        self._lose_upstream(why)

    def _lose_upstream(self, why: str) -> None:
        if self._broken is not None:
            return
        self._broken = why
        log.info("agent connection lost: %s", why)
        for route in self._routes.values():
            if route.future is not None and not route.future.done():
                route.future.set_exception(AgentError(why))
            elif route.client is not None:
                self._client_error(route.client, route.client_id, why)
        self._routes.clear()
        # A client streaming an exec would wait for its EXIT forever: end its connection
        # (its ExecProcess raises AgentError). Other clients keep the server's own ops.
        for ex in self._execs.values():
            if ex.owner is not None and not ex.owner.closed:
                ex.owner.writer.close()
                ex.owner.closed = True
        self._execs.clear()

    def _from_agent(self, frame: Frame) -> None:
        if frame.type in (FrameType.OK, FrameType.ERROR):
            route = self._routes.pop(frame.id, None)
            if route is not None and route.request:
                seconds, ok = time.monotonic() - route.sent, frame.type == FrameType.OK
                self._tell(lambda o: o.request_done(_request_name(route.request), seconds, ok))
            if route is None:
                log.debug("reply to unknown request %d dropped", frame.id)
            elif route.future is not None:
                if not route.future.done():
                    route.future.set_result(frame)
            else:
                self._reply_to_client(route, frame)
            return
        ex = self._execs.get(frame.id)
        if ex is None:
            log.debug("frame %#x for unknown exec %d dropped", frame.type, frame.id)
            return
        owner = ex.owner if ex.owner is not None and not ex.owner.closed else None
        if frame.type in (FrameType.STDOUT, FrameType.STDERR):
            if owner is not None:
                ex.unacked += len(frame.payload)
                owner.send(encode_frame(frame.type, frame.id, frame.payload, frame.flags))
            else:
                self._keep_output(ex, frame)
        elif frame.type == FrameType.WINDOW:
            if owner is not None:
                owner.send(encode_frame(frame.type, frame.id, frame.payload))
        elif frame.type == FrameType.EXIT:
            ex.exit = frame
            self._tell(lambda o: o.exec_exited(*_exit_status(frame)))
            del self._execs[frame.id]
            if owner is not None:
                owner.owned.discard(frame.id)
                owner.send(encode_frame(frame.type, frame.id, frame.payload))
            else:
                self._finished.append(ex)

    def _tell(self, event: Callable[[RelayObserver], None]) -> None:
        """Tell the observer; whatever it (or a malformed frame it parses) raises must not
        end the relay's loop."""
        if self._observer is None:
            return
        try:
            event(self._observer)
        except Exception:
            log.exception("relay observer failed")

    def _keep_output(self, ex: _Exec, frame: Frame) -> None:
        ex.backlog.append(frame)
        ex.backlog_bytes += len(frame.payload)
        while ex.backlog_bytes > BACKLOG_BYTES and len(ex.backlog) > 1:
            ex.backlog_bytes -= len(ex.backlog.popleft().payload)
        # Nobody reads: credit the agent ourselves so the process never blocks on output.
        self._upstream_send(
            encode_frame(FrameType.WINDOW, ex.exec_id, len(frame.payload).to_bytes(4, "big"))
        )

    def _reply_to_client(self, route: _Route, frame: Frame) -> None:
        client = route.client
        alive = client is not None and not client.closed
        if route.exec_request is not None and frame.type == FrameType.OK:
            fields = Fields(frame.payload)
            argv, tty, keep = route.exec_request
            ex = _Exec(
                exec_id=fields.uint(Tag.EXEC_ID),
                pid=fields.uint(Tag.PID),
                argv=argv,
                tty=tty,
                keep=keep,
                started_at=time.time(),
                owner=client if alive else None,
            )
            self._execs[ex.exec_id] = ex
            self._tell(lambda o: o.exec_started())
            if alive and client is not None:
                client.owned.add(ex.exec_id)
            else:
                self._owner_gone(ex)
        if alive and client is not None:
            client.send(encode_frame(frame.type, route.client_id, frame.payload))

    def _new_id(self) -> int:
        fid = self._next_id
        self._next_id = fid + 1 if fid < 0xFFFFFFFF else 1
        return fid

    async def request(self, ftype: FrameType, payload: bytes, timeout: float = 10.0) -> Fields:
        """A request of the relay's own. Raises ``AgentError`` (incl. an ERROR reply)."""
        if self._broken is not None:
            raise AgentError(self._broken)
        fid = self._new_id()
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._routes[fid] = _Route(None, 0, future=future, request=ftype, sent=time.monotonic())
        if not self._upstream_send(encode_frame(ftype, fid, payload)):
            self._routes.pop(fid, None)
            raise AgentError(self._broken or "no agent connection")
        try:
            async with asyncio.timeout(timeout):
                frame = await future
        except TimeoutError:
            raise AgentError(f"agent request {ftype.name} timed out after {timeout:g} s") from None
        finally:
            self._routes.pop(fid, None)
        fields = Fields(frame.payload)
        if frame.type == FrameType.ERROR:
            raise AgentError(f"{ftype.name.lower()}: {fields.text(Tag.MESSAGE)}")
        return fields

    # -- clients -------------------------------------------------------------------------

    def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
        """Serve one client connection until it closes."""
        client = _Client(name, reader, writer)
        self._clients.add(client)
        self._spawn(self._client_loop(client), f"relay-client-{name}")

    async def internal_client(self, cls: type[C] = AgentClient) -> C:  # type: ignore[assignment]
        """A client (``cls``: an :class:`AgentClient` class) of this relay inside this
        process, over a socket pair."""
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        self.serve(reader, writer, "internal")
        c_reader, c_writer = await asyncio.open_unix_connection(sock=theirs)
        client = cls(c_reader, c_writer, resync=False)
        await client.__aenter__()
        return client

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _client_loop(self, client: _Client) -> None:
        decoder = FrameDecoder()
        try:
            while data := await client.reader.read(1 << 18):
                for frame in decoder.feed(data):
                    self._from_client(client, frame)
                if self._up is not None and self._broken is None:
                    # Back-pressure per client: a fast writer waits for the agent channel.
                    with contextlib.suppress(OSError, RuntimeError):
                        await self._up[1].drain()
        except OSError:
            pass
        except Exception:
            log.exception("relay client loop failed (%s)", client.name)
        finally:
            self._client_gone(client)

    def _client_gone(self, client: _Client) -> None:
        client.closed = True
        self._clients.discard(client)
        client.writer.close()
        for exec_id in list(client.owned):
            ex = self._execs.get(exec_id)
            if ex is not None and ex.owner is client:
                ex.owner = None
                self._owner_gone(ex)
        client.owned.clear()

    def _owner_gone(self, ex: _Exec) -> None:
        if ex.unacked:
            self._upstream_send(
                encode_frame(FrameType.WINDOW, ex.exec_id, ex.unacked.to_bytes(4, "big"))
            )
        ex.unacked = ex.owed = 0
        if ex.keep:
            return
        self._upstream_send(encode_frame(FrameType.STDIN, ex.exec_id, b"", Flag.EOF))
        if ex.tty:
            items = [
                tlv(Tag.EXEC_ID, ex.exec_id, 4),
                tlv(Tag.SIGNAL, int(signal.SIGHUP), 4),
                tlv(Tag.GROUP, 1, 1),
            ]
            fid = self._new_id()
            self._routes[fid] = _Route(None, 0)  # reply dropped
            self._upstream_send(encode_frame(FrameType.SIGNAL, fid, tlv_encode(items)))

    def _from_client(self, client: _Client, frame: Frame) -> None:
        ftype = frame.type
        if ftype == FrameType.SERVER:
            self._spawn(self._server_request(client, frame), f"relay-op-{client.name}")
        elif ftype == FrameType.ATTACH:
            pass  # the agent session is the relay's: one client must not end the others'
        elif ftype < FrameType.OK:
            self._forward_request(client, frame)
        elif ftype in (FrameType.STDIN, FrameType.WINDOW):
            ex = self._execs.get(frame.id)
            if ex is None or ex.owner is not client:
                return
            if ftype == FrameType.WINDOW and len(frame.payload) == 4:
                credit = int.from_bytes(frame.payload, "big")
                swallowed = min(credit, ex.owed)
                ex.owed -= swallowed
                credit -= swallowed
                ex.unacked = max(0, ex.unacked - credit)
                if credit:
                    self._upstream_send(
                        encode_frame(FrameType.WINDOW, frame.id, credit.to_bytes(4, "big"))
                    )
                return
            self._upstream_send(encode_frame(ftype, frame.id, frame.payload, frame.flags))

    def _forward_request(self, client: _Client, frame: Frame) -> None:
        payload = frame.payload
        route = _Route(client, frame.id)
        if frame.type == FrameType.EXEC:
            try:
                items = tlv_decode(payload)
            except AgentError:
                items = []  # malformed: the agent answers BAD_PAYLOAD
            tags = {tag for tag, _ in items}
            keep = Tag.KEEP in tags
            argv = [v.decode(errors="replace") for tag, v in items if tag == Tag.ARG]
            route.exec_request = (argv, Tag.TTY in tags, keep)
            if keep:
                payload = tlv_encode([(t, v) for t, v in items if t != Tag.KEEP])
        if self._broken is not None or self._up is None:
            self._client_error(client, frame.id, self._broken or "the guest agent is not up")
            return
        fid = self._new_id()
        route.request, route.sent = frame.type, time.monotonic()
        self._routes[fid] = route
        try:
            data = encode_frame(frame.type, fid, payload)
        except ValueError as exc:
            self._routes.pop(fid, None)
            self._client_error(client, frame.id, str(exc))
            return
        self._upstream_send(data)

    def _client_error(self, client: _Client, fid: int, message: str) -> None:
        items = [tlv(Tag.ERR_CODE, int(ErrorCode.OS), 4), tlv(Tag.MESSAGE, message)]
        client.send(encode_frame(FrameType.ERROR, fid, tlv_encode(items)))

    # -- SERVER ops ----------------------------------------------------------------------

    async def _server_request(self, client: _Client, frame: Frame) -> None:
        after: Callable[[], None] | None = None
        try:
            op, args, parent = wire.decode_request(frame.payload)
            if op == "attach":
                result, after = self._attach(client, args)
            elif op == "processes":
                result = [ex.describe() for ex in [*self._execs.values(), *self._finished]]
            elif op == "kill":
                result = await self._kill(args)
            elif op == "resize_tty":
                result = await self._resize_tty(args)
            else:
                with attached(parent):  # the client's span is the parent of the server's
                    result = await self._handler(op, args)
            body = wire.encode_result(result)
        except VirtContainersError as exc:
            body = wire.encode_error(exc)
        except Exception as exc:
            log.exception("server op failed")
            body = wire.encode_error(AgentError(f"server op failed: {exc!r}"))
        client.send(encode_frame(FrameType.OK, frame.id, tlv_encode([tlv(Tag.DATA, body)])))
        if after is not None:
            after()

    def _find(self, args: wire.JsonObject) -> _Exec:
        pid = args.get("pid")
        for ex in [*self._execs.values(), *self._finished]:
            if ex.pid == pid:
                return ex
        raise StateError("find the process", f"no process {pid} started through the agent",
                         ["a pid listed by `vc top`"])  # fmt: skip

    def _attach(self, client: _Client, args: wire.JsonObject) -> tuple[object, Callable[[], None]]:
        ex = self._find(args)
        if ex.owner is not None and not ex.owner.closed and ex.owner is not client:
            raise StateError("attach", f"process {ex.pid} is attached to another client",
                             ["detached"])  # fmt: skip
        info = ex.describe()

        def replay() -> None:
            # Runs right after the OK went out, so the client has registered the exec.
            backlog, ex.backlog, ex.backlog_bytes = ex.backlog, deque(), 0
            if ex.exit is None:
                ex.owner = client
                client.owned.add(ex.exec_id)
                ex.owed += sum(len(f.payload) for f in backlog)
            for f in backlog:
                client.send(encode_frame(f.type, f.id, f.payload, f.flags))
            if ex.exit is not None:
                client.send(encode_frame(FrameType.EXIT, ex.exec_id, ex.exit.payload))
                with contextlib.suppress(ValueError):
                    self._finished.remove(ex)

        return info, replay

    async def _kill(self, args: wire.JsonObject) -> object:
        ex = self._find(args)
        if ex.exit is not None:
            return False
        sig = args.get("signal", int(signal.SIGTERM))
        items = [tlv(Tag.EXEC_ID, ex.exec_id, 4), tlv(Tag.SIGNAL, int(str(sig)), 4)]
        if args.get("group"):
            items.append(tlv(Tag.GROUP, 1, 1))
        await self.request(FrameType.SIGNAL, tlv_encode(items))
        return True

    async def _resize_tty(self, args: wire.JsonObject) -> object:
        ex = self._find(args)
        items = [
            tlv(Tag.EXEC_ID, ex.exec_id, 4),
            tlv(Tag.ROWS, int(str(args.get("rows", 24))), 4),
            tlv(Tag.COLS, int(str(args.get("cols", 80))), 4),
        ]
        await self.request(FrameType.RESIZE, tlv_encode(items))
        return True

    async def close(self) -> None:
        """Close every connection (clients and agent)."""
        for client in list(self._clients):
            client.writer.close()
        if self._up is not None:
            self._up[1].close()
        for task in [t for t in (self._up_task, *self._tasks) if t is not None]:
            task.cancel()
        await asyncio.gather(
            *[t for t in (self._up_task, *self._tasks) if t is not None], return_exceptions=True
        )


def _exit_status(frame: Frame) -> tuple[int | None, int | None]:
    """(exit code, signal) of an EXIT frame. Raises ``AgentError`` when it is malformed."""
    status = Fields(frame.payload)
    return status.opt_uint(Tag.EXIT_CODE), status.opt_uint(Tag.SIGNAL)


def _request_name(ftype: int) -> str:
    """A metrics label for a request type; a client may send types this host does not know
    (the agent answers BAD_TYPE), which must not break the relay."""
    try:
        return FrameType(ftype).name.lower()
    except ValueError:
        return f"type_{ftype:#04x}"
