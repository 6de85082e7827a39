"""The client side: an :class:`AgentClient` connected to a sandbox server, plus its own ops.

Everything an agent client does (exec, streams, files, signals) works unchanged through the
server; :meth:`ServerClient.call` adds the server's control ops and :meth:`attach` reconnects
to a running process by its guest pid. An exec that outlives its client (``vc exec -d``)
carries :data:`KEEP`: ``exec_stream(..., extra_items=[KEEP])``.
"""

from __future__ import annotations

import os
from pathlib import Path

from virtcontainers.agent.client import AgentClient, ExecProcess
from virtcontainers.agent.protocol import Fields, FrameType, Tag
from virtcontainers.agent.transport import connect_unix
from virtcontainers.errors import AgentError, VirtContainersError
from virtcontainers.server import wire
from virtcontainers.server.wire import KEEP
from virtcontainers.telemetry.context import current_traceparent

__all__ = ["KEEP", "SOCKET_NAME", "ServerClient", "socket_path"]

SOCKET_NAME = "server.sock"


def socket_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / SOCKET_NAME


class ServerClient(AgentClient):
    """A connection to one sandbox server."""

    @classmethod
    async def connect(
        cls, run_dir: str | os.PathLike[str], *, timeout: float = 30.0
    ) -> ServerClient:
        """Connect to the server of the sandbox whose run dir is ``run_dir``.

        Raises:
            AgentError: no server listens there (none was started, or it died).
        """
        reader, writer = await connect_unix(socket_path(run_dir), timeout=min(timeout, 5.0))
        client = cls(reader, writer, timeout=timeout, resync=False)
        client._start()
        return client

    async def call(self, op: str, timeout: float | None = None, **args: object) -> object:
        """Run server op ``op``; raises the server's error as its public class."""
        payload = wire.encode_request(op, args, current_traceparent())
        fields = await self._call(FrameType.SERVER, payload, op, timeout)
        return wire.decode_reply(fields.raw(Tag.DATA))

    async def attach(self, pid: int, *, timeout: float | None = None) -> ExecProcess:
        """Reconnect to the running (or exited, not yet collected) process ``pid``: its kept
        output is replayed, then it streams live; stdin works when it was started detached.

        Raises:
            StateError: no such process, or another client is attached to it.
        """
        procs: list[ExecProcess] = []
        failure: list[VirtContainersError] = []

        def register(fields: Fields) -> None:
            # Runs in the reader before the replayed output, so no frame can miss the exec.
            try:
                info = wire.decode_reply(fields.raw(Tag.DATA))
            except VirtContainersError as exc:
                failure.append(exc)
                return
            if not isinstance(info, dict):
                failure.append(AgentError(f"malformed attach reply {info!r}"))
                return
            proc = ExecProcess(self, int(info["exec_id"]), int(info["pid"]), False)
            self._procs[proc.exec_id] = proc
            procs.append(proc)

        payload = wire.encode_request("attach", {"pid": pid})
        await self._call(FrameType.SERVER, payload, "attach", timeout, register)
        if failure:
            raise failure[0]
        return procs[0]
