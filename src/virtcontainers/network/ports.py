"""Published host ports: is each one free before anything is created?"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable

from virtcontainers.errors import ConfigError
from virtcontainers.network.spec import PortMapping, Protocol

__all__ = ["check_free"]


def check_free(ports: Iterable[PortMapping]) -> None:
    """Bind each host address and port once, as the VMM or forwarder will.

    SO_REUSEADDR as they use it: a port held only by old TIME_WAIT connections is free.

    Raises:
        ConfigError: a port is in use, or the address is not one of this host's.
    """
    for p in ports:
        kind = socket.SOCK_STREAM if p.protocol is Protocol.TCP else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((p.host_ip, p.host_port))
                if kind == socket.SOCK_STREAM:
                    s.listen(1)
            except OSError as exc:
                reason = (
                    "is already in use"
                    if exc.errno == errno.EADDRINUSE
                    else f"cannot be bound ({exc.strerror})"
                )
                raise ConfigError(
                    f"--publish {p}: host port {p.host_ip}:{p.host_port}/{p.protocol.value} "
                    f"{reason}",
                    field="--publish",
                ) from None
