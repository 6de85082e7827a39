"""The host side of hybrid vsock, as Firecracker and Cloud Hypervisor serve it, for their
simulators: a unix socket where a client sends ``CONNECT <port>\\n``, gets ``OK <n>\\n`` and
is then spliced to the guest's listener (here: a unix socket a host-run agent serves)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

__all__ = ["accept_loop", "read_connect", "splice"]


def accept_loop(
    listener: Callable[[], socket.socket | None], serve: Callable[[socket.socket], None]
) -> None:
    """Accept on ``listener()`` until it is None or closed; each connection in a thread."""
    while (sock := listener()) is not None:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def read_connect(conn: socket.socket) -> int | None:
    """The port of a ``CONNECT <port>\\n`` handshake; None for anything else (the VMMs then
    close the connection)."""
    line = b""
    while not line.endswith(b"\n") and len(line) < 64:
        chunk = conn.recv(1)
        if not chunk:
            return None
        line += chunk
    words = line.decode(errors="replace").split()
    if len(words) != 2 or words[0] != "CONNECT" or not words[1].isdigit():
        return None
    return int(words[1])


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def splice(conn: socket.socket, upstream: socket.socket) -> None:
    """Copy both ways until each side has closed its half."""
    with upstream:
        pump = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
        pump.start()
        _pump(conn, upstream)
        pump.join(5)
