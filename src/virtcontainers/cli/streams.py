"""Running a command in a sandbox with the terminal's streams attached.

With a tty on both sides (``vc exec -it``) the local terminal goes into raw mode, so every
key, Ctrl-C included, reaches the guest's pty (whose line discipline turns ^C into SIGINT for
the guest's foreground process group), and SIGWINCH forwards the window size. Without a local
terminal, SIGINT/SIGTERM received by ``vc`` are forwarded to the guest process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import stat
import sys
import termios
import tty as tty_mod
from collections.abc import Awaitable, Coroutine, Mapping
from typing import TYPE_CHECKING

from virtcontainers.agent.client import ExecProcess, ExitStatus, Stream

if TYPE_CHECKING:
    from virtcontainers.agent.client import AgentRequestError
    from virtcontainers.sandbox import Sandbox


def exit_code(status: ExitStatus) -> int:
    """A shell-style exit code: 128 + signal when killed."""
    if status.signal is not None:
        return 128 + status.signal
    return status.exit_code if status.exit_code is not None else 1


def terminal_size() -> tuple[int, int] | None:
    """(rows, cols) of our terminal, if stdout or stdin is one."""
    for fd in (1, 0):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
    return None


async def stream_exec(
    sandbox: Sandbox,
    argv: list[str],
    *,
    tty: bool = False,
    interactive: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    uid: int | None = None,
    gid: int | None = None,
    user: str | None = None,
) -> int:
    """Run ``argv``, copy its output to ours as it comes, feed it our stdin when that is not
    a terminal (or with ``interactive``). Returns a shell-style exit code; a program that
    cannot be started gives docker's codes: 127 when it is not found, else 126, with the
    agent's message (naming the program) on stderr."""
    from virtcontainers.agent.client import AgentRequestError

    size = terminal_size() if tty else None
    try:
        proc = await sandbox.exec_stream(
            argv, tty=tty, tty_size=size, env=env, cwd=cwd, uid=uid, gid=gid, user=user
        )
    except AgentRequestError as exc:
        return exec_failed(exc)
    return await follow(proc, tty=tty, interactive=interactive)


def exec_failed(exc: AgentRequestError) -> int:
    """docker's exit code for a program that could not be started (127: not found, else
    126), with the agent's message (naming the program) on stderr; re-raises other errors."""
    from virtcontainers.agent.protocol import ErrorCode

    if exc.code != ErrorCode.EXEC:
        raise exc
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(
        f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True
    )
    return 127 if exc.errno == errno.ENOENT and exc.message.startswith("execve") else 126


async def follow(proc: ExecProcess, *, tty: bool, interactive: bool) -> int:
    """Stream a started (or attached) process to our terminal until it exits."""
    stdin_is_tty = sys.stdin.isatty()
    forward = interactive or not stdin_is_tty
    raw = tty and stdin_is_tty and forward
    loop = asyncio.get_running_loop()
    saved = termios.tcgetattr(0) if raw else None
    feeder: asyncio.Task[None] | None = None
    handled: list[signal.Signals] = []
    try:
        if saved is not None:
            tty_mod.setraw(0)
            loop.add_signal_handler(signal.SIGWINCH, _resize_soon, proc)
            handled.append(signal.SIGWINCH)
        else:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, _signal_soon, proc, sig)
                handled.append(sig)
        if forward:
            feeder = asyncio.create_task(_feed_stdin(proc))
        else:
            await proc.close_stdin()
        async for stream, data in proc:
            out = sys.stdout.buffer if stream is Stream.STDOUT else sys.stderr.buffer
            out.write(data)
            out.flush()
        status = await proc.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
    return exit_code(status)


_background: set[asyncio.Task[None]] = set()


def _later(coro: Coroutine[object, object, None]) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


def _resize_soon(proc: ExecProcess) -> None:
    size = terminal_size()
    if size is not None:
        _later(_quietly(proc.resize(*size)))


def _signal_soon(proc: ExecProcess, sig: signal.Signals) -> None:
    _later(_quietly(proc.signal(int(sig), group=True)))


async def _quietly(work: Awaitable[None]) -> None:
    from virtcontainers.errors import AgentError

    with contextlib.suppress(AgentError):
        await work


async def _feed_stdin(proc: ExecProcess) -> None:
    fd = sys.stdin.fileno()
    if stat.S_ISREG(os.fstat(fd).st_mode):  # epoll refuses files, and their reads never block
        while chunk := await asyncio.to_thread(os.read, fd, 65536):
            await proc.write_stdin(chunk)
        await proc.close_stdin()
        return
    # Wait for readability, then read: not a thread blocked in read(), which would keep the
    # process alive after the command exited, and no O_NONBLOCK on a terminal that stdout
    # may share.
    while True:
        await _readable(fd)
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        await proc.write_stdin(chunk)
    await proc.close_stdin()


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def callback() -> None:
        loop.remove_reader(fd)  # level-triggered: one wake-up per wait
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, callback)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
