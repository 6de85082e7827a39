"""Who is on the other end of a unix socket (``SO_PEERCRED``), and may they use the server."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

__all__ = ["Peer", "peer_of"]

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    @property
    def allowed(self) -> bool:
        """Only the server's own uid and root may drive a sandbox: a client can run anything
        in the guest and stop the VM."""
        return self.uid in (os.geteuid(), 0)


def peer_of(sock: socket.socket) -> Peer:
    """The credentials the kernel recorded when the peer connected (not forgeable)."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Peer(pid, uid, gid)
