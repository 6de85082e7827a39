"""Connectors that turn an agent address into an asyncio stream pair.

- ``connect_unix``: a unix socket; QEMU's virtio-serial chardev socket, or ``vc-agent --unix``.
- ``connect_hybrid_vsock``: Firecracker / Cloud Hypervisor hybrid vsock: connect to the VMM's
  unix socket, send ``CONNECT <port>\\n``, expect ``OK <host port>\\n``.
- ``connect_vsock``: AF_VSOCK to ``(cid, port)`` (QEMU with vhost-vsock).

Every failure is raised as ``AgentError``; the caller never sees ``OSError``.
"""

from __future__ import annotations

import asyncio
import os
import socket

from virtcontainers.errors import AgentError
from virtcontainers.persist.records import (
    AgentChannel,
    HybridVsockChannel,
    SerialChannel,
    VsockChannel,
)

__all__ = [
    "StreamPair",
    "connect_channel",
    "connect_hybrid_vsock",
    "connect_unix",
    "connect_vsock",
]

StreamPair = tuple[asyncio.StreamReader, asyncio.StreamWriter]

_LIMIT = 1 << 20


async def connect_unix(path: str | os.PathLike[str], *, timeout: float = 10.0) -> StreamPair:
    """Connect to a unix socket. Raises ``AgentError`` on failure or after ``timeout`` s."""
    where = os.fspath(path)
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.open_unix_connection(where, limit=_LIMIT)
    except TimeoutError:
        raise AgentError(f"connecting to {where} timed out after {timeout:g} s") from None
    except OSError as exc:
        raise AgentError(f"cannot connect to {where}: {exc.strerror or exc}") from exc


async def connect_hybrid_vsock(
    uds_path: str | os.PathLike[str], port: int, *, timeout: float = 10.0
) -> StreamPair:
    """Connect through a hybrid vsock unix socket to guest ``port``.

    The VMM answers ``OK <host port>`` when the guest accepted, and closes the socket when
    nothing listens on ``port`` (the agent may not be up yet: callers retry on ``AgentError``).
    """
    reader, writer = await connect_unix(uds_path, timeout=timeout)
    where = os.fspath(uds_path)
    try:
        async with asyncio.timeout(timeout):
            writer.write(f"CONNECT {port}\n".encode())
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        writer.close()
        raise AgentError(
            f"hybrid vsock handshake on {where} port {port} timed out after {timeout:g} s"
        ) from None
    except OSError as exc:
        writer.close()
        raise AgentError(f"hybrid vsock handshake on {where} port {port}: {exc}") from exc
    if not line.startswith(b"OK "):
        writer.close()
        reply = line.decode(errors="replace").strip() or "connection closed"
        raise AgentError(f"hybrid vsock CONNECT {port} on {where} refused: {reply}")
    return reader, writer


async def connect_vsock(cid: int, port: int, *, timeout: float = 10.0) -> StreamPair:
    """Connect over AF_VSOCK to ``cid:port``."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise AgentError("AF_VSOCK is not supported by this Python/kernel")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (cid, port))
            return await asyncio.open_connection(sock=sock, limit=_LIMIT)
    except TimeoutError:
        sock.close()
        raise AgentError(f"vsock connect to {cid}:{port} timed out after {timeout:g} s") from None
    except OSError as exc:
        sock.close()
        raise AgentError(f"vsock connect to {cid}:{port}: {exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise


async def connect_channel(
    channel: AgentChannel, *, timeout: float = 10.0
) -> tuple[StreamPair, bool]:
    """Connect to the agent channel a sandbox record describes.

    Returns the stream pair and whether the host must resync first (virtio-serial: a port
    that outlives host connections, see docs/agent-protocol.md "Resync").

    Raises:
        AgentError: it cannot be connected.
    """
    match channel:
        case SerialChannel():
            return await connect_unix(channel.path, timeout=timeout), True
        case HybridVsockChannel():
            return await connect_hybrid_vsock(channel.path, channel.port, timeout=timeout), False
        case VsockChannel():
            return await connect_vsock(channel.cid, channel.port, timeout=timeout), False
