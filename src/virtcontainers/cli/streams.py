"""Running a command in a sandbox with the terminal's streams attached.

With a tty on both sides (``vc exec -it``) the local terminal goes into raw mode, so every
key, Ctrl-C included, reaches the guest's pty (whose line discipline turns ^C into SIGINT for
the guest's foreground process group), and SIGWINCH forwards the window size. Without a local
terminal, SIGINT/SIGTERM received by ``vc`` are forwarded to the guest process group.

Two loops do this: :func:`follow_blocking` over the blocking server connection (`vc exec`,
`vc attach`: no asyncio to import), and :func:`follow` over an async ``ExecProcess`` (`vc run`,
which holds its sandbox through the async layer, and `vc exec` on a sandbox without a server).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import select
import signal
import socket
import sys
import termios
import tty as tty_mod
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from virtcontainers.agent.protocol import CHUNK, FrameType

if TYPE_CHECKING:  # the async client only for `vc run` and the direct path
    from virtcontainers.agent.client import ExecProcess
    from virtcontainers.agent.protocol import AgentRequestError
    from virtcontainers.server.sync_client import RemoteProcess


def claim_stdin() -> None:
    """Open /dev/null as fd 0 when we were started with it closed (`vc exec ... <&-`), before
    a socket of ours can get fd 0 and be read as our stdin."""
    try:
        os.fstat(0)
    except OSError:
        os.open(os.devnull, os.O_RDONLY)  # the lowest free fd: 0


def terminal_size() -> tuple[int, int] | None:
    """(rows, cols) of our terminal, if stdout or stdin is one."""
    for fd in (1, 0):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
    return None


async def stream_exec(
    starting: Awaitable[ExecProcess], *, tty: bool = False, interactive: bool = False
) -> int:
    """Follow the process ``starting`` starts: copy its output to ours as it comes, feed it
    our stdin when that is not a terminal (or with ``interactive``). Returns a shell-style
    exit code; a program that cannot be started gives docker's codes: 127 when it is not
    found, else 126, with the agent's message (naming the program) on stderr."""
    from virtcontainers.agent.protocol import AgentRequestError

    try:
        proc = await starting
    except AgentRequestError as exc:
        return exec_failed(exc)
    return await follow(proc, tty=tty, interactive=interactive)


def exec_failed(exc: AgentRequestError) -> int:
    """docker's exit code for a program that could not be started (127: not found, else
    126), with the agent's message (naming the program) on stderr; re-raises other errors."""
    from virtcontainers.agent.protocol import ErrorCode

    if exc.code != ErrorCode.EXEC:
        raise exc
    from virtcontainers.cli.report import print_error

    print_error(exc.message)
    return 127 if exc.errno == errno.ENOENT and exc.message.startswith("execve") else 126


@dataclass(frozen=True)
class _Mode:
    #: our stdin goes to the process
    forward: bool
    #: our terminal is in raw mode (keys, Ctrl-C included, go to the guest's pty)
    raw: bool


@contextlib.contextmanager
def _terminal(*, tty: bool, interactive: bool) -> Iterator[_Mode]:
    """How to connect our terminal to the process; raw mode while it runs, when ``tty``
    and our stdin is a terminal that is forwarded."""
    stdin_is_tty = os.isatty(0)  # not sys.stdin: None when started with fd 0 closed
    forward = interactive or not stdin_is_tty
    mode = _Mode(forward, tty and stdin_is_tty and forward)
    saved = termios.tcgetattr(0) if mode.raw else None
    try:
        if saved is not None:
            tty_mod.setraw(0)
        yield mode
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _handled_signals(mode: _Mode) -> tuple[signal.Signals, ...]:
    """SIGWINCH (forwarded as a resize) in raw mode, else SIGINT/SIGTERM (forwarded to the
    guest process group)."""
    return (signal.SIGWINCH,) if mode.raw else (signal.SIGINT, signal.SIGTERM)


async def follow(proc: ExecProcess, *, tty: bool, interactive: bool) -> int:
    """Stream a started (or attached) process to our terminal until it exits."""
    from virtcontainers.agent.attach import feed, follow_process
    from virtcontainers.agent.client import Stream

    def write(stream: Stream, data: bytes) -> None:
        out = sys.stdout.buffer if stream is Stream.STDOUT else sys.stderr.buffer
        out.write(data)
        out.flush()

    with _terminal(tty=tty, interactive=interactive) as mode:
        return await follow_process(
            proc,
            write,
            signals={sig: functools.partial(_request, proc, sig) for sig in _handled_signals(mode)},
            feed=functools.partial(feed, proc, 0) if mode.forward else None,
        )


def _request(proc: ExecProcess, sig: signal.Signals) -> Awaitable[None] | None:
    """What a signal received here asks of the guest process (see :func:`_handled_signals`)."""
    if sig != signal.SIGWINCH:
        return proc.signal(int(sig), group=True)
    size = terminal_size()
    return None if size is None else proc.resize(*size)


# -- the same over a blocking server connection (vc exec, vc attach) ------------------------


def follow_blocking(proc: RemoteProcess, *, tty: bool, interactive: bool) -> int:
    """:func:`follow` without asyncio: one ``poll`` over the server connection, our stdin
    and a signal wake-up socket, in this thread."""
    connection = proc.connection
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    with _terminal(tty=tty, interactive=interactive) as mode, wake_r, wake_w:
        handled = _handled_signals(mode)
        previous = {sig: signal.signal(sig, _note_signal) for sig in handled}
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        try:
            stdin_open = mode.forward
            if not stdin_open:
                proc.close_stdin()
            poller = select.poll()
            poller.register(connection.fileno(), select.POLLIN)
            poller.register(wake_r.fileno(), select.POLLIN)
            polling_stdin = False
            output_open = True
            while proc.status is None:
                want_stdin = stdin_open and proc.stdin_credit > 0
                if want_stdin and not polling_stdin:
                    poller.register(0, select.POLLIN)
                elif polling_stdin and not want_stdin:
                    poller.unregister(0)
                polling_stdin = want_stdin
                ready = [] if connection.has_queued else poller.poll()
                if connection.has_queued or any(fd == connection.fileno() for fd, _ in ready):
                    for frame in connection.receive():
                        out = proc.on_frame(frame)
                        if out is not None and output_open:
                            output_open = _write(out[0], out[1], proc)
                for fd, events in ready:
                    if fd == wake_r.fileno():
                        for number in wake_r.recv(64):
                            _forward_signal(proc, number)
                    elif fd == 0:
                        stdin_open = _copy_stdin(proc, events)
                        if not stdin_open:
                            poller.unregister(0)
                            polling_stdin = False
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    assert proc.status is not None
    return proc.status.shell_code


def _note_signal(signum: int, frame: object) -> None:
    """The handler: the signal number reaches the loop through the wake-up socket."""


def _forward_signal(proc: RemoteProcess, number: int) -> None:
    if number == signal.SIGWINCH:
        size = terminal_size()
        if size is not None:
            proc.resize(*size)
    elif number in (signal.SIGINT, signal.SIGTERM):
        proc.signal(number, group=True)


def _copy_stdin(proc: RemoteProcess, events: int) -> bool:
    """One read of our stdin into the process (within its credit); False at its end."""
    if not events & select.POLLNVAL:
        try:
            chunk = os.read(0, min(CHUNK, proc.stdin_credit))
        except BlockingIOError:
            return True
        if chunk:
            proc.write_stdin(chunk)
            return True
    proc.close_stdin()
    return False


def _write(stream: FrameType, data: bytes, proc: RemoteProcess) -> bool:
    """Copy output to ours; when our reader went away (``vc exec ... | head``), the guest
    process gets SIGPIPE, as it would in a local pipeline. False once that happened."""
    fd = 1 if stream == FrameType.STDOUT else 2
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        proc.signal(signal.SIGPIPE, group=True)
        return False
    return True
