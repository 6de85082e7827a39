"""The host side of a container's (or an exec's) stdio: fds or a pty, relayed to a guest process.

Without a terminal the process's stdin, stdout and stderr are the host process's fds 0-2
(conmon's pipes). With one (``process.terminal`` and ``--console-socket``), the host process
opens a pty, sends its master to the console socket with ``SCM_RIGHTS`` as runc does (the
message's data is the pty's name), and relays between the slave and the guest's own pty.
The slave is raw: the guest's line discipline does echo and ^C. It is also the host
process's controlling terminal, so conmon's resize of the master raises SIGWINCH here,
which becomes a RESIZE of the guest pty.

Signals the host process receives (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) are
forwarded to the guest process.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
import socket
import struct
import termios
import tty as tty_mod
from collections.abc import Awaitable
from dataclasses import dataclass

from virtcontainers.agent.attach import SignalRequest, feed, follow_process
from virtcontainers.agent.client import ExecProcess, Stream
from virtcontainers.errors import ContainerError

__all__ = ["FORWARDED_SIGNALS", "Stdio", "open_console", "relay"]

FORWARDED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
)  # fmt: skip


@dataclass
class Stdio:
    """Where the guest process's streams go: ``tty_fd`` (a pty slave) or fds 0-2."""

    tty_fd: int = -1

    @property
    def tty(self) -> bool:
        return self.tty_fd >= 0

    def size(self) -> tuple[int, int] | None:
        if not self.tty:
            return None
        rows, cols, _, _ = struct.unpack(
            "HHHH", fcntl.ioctl(self.tty_fd, termios.TIOCGWINSZ, bytes(8))
        )
        return (rows, cols) if rows and cols else None


def open_console(console_socket: str, size: tuple[int, int] | None) -> Stdio:
    """Open a pty, send its master to ``console_socket`` (runc's protocol), keep the slave
    as this process's raw controlling terminal. Call after ``setsid``.

    Raises:
        ContainerError: the console socket cannot be reached.
    """
    master, slave = os.openpty()
    try:
        if size is not None:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
        tty_mod.setraw(slave)
        with contextlib.suppress(OSError):  # not a session leader: no SIGWINCH, still works
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(console_socket)
                socket.send_fds(sock, [os.ttyname(slave).encode()], [master])
            except OSError as exc:
                raise ContainerError(
                    f"console socket {console_socket}: {exc.strerror or exc}"
                ) from None
    except BaseException:
        os.close(slave)
        raise
    finally:
        os.close(master)
    return Stdio(tty_fd=slave)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            import select

            select.select([], [fd], [])
        except BrokenPipeError:
            return  # nobody reads any more (conmon gone): drop, as a closed terminal would


async def relay(proc: ExecProcess, stdio: Stdio, *, stdin: bool = True) -> int:
    """Relay until the guest process exits; returns its shell-style exit code (128 + the
    signal when killed: what conmon reports for a runc container)."""
    in_fd = stdio.tty_fd if stdio.tty else 0
    out_fd = stdio.tty_fd if stdio.tty else 1

    def write(stream: Stream, data: bytes) -> None:
        _write_all(out_fd if stream is Stream.STDOUT else 2, data)

    def resized() -> Awaitable[None] | None:
        size = stdio.size()
        return None if size is None else proc.resize(*size)

    signals: dict[int, SignalRequest] = {
        int(sig): functools.partial(proc.signal, int(sig)) for sig in FORWARDED_SIGNALS
    }
    if stdio.tty:
        signals[signal.SIGWINCH] = resized
    feed_stdin = functools.partial(feed, proc, in_fd) if stdin else None
    return await follow_process(proc, write, signals=signals, feed=feed_stdin)
