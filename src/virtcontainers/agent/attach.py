"""Following an attached guest process from an event loop: its output copied out as it
comes, its stdin fed, host signals turned into requests, until it exits.

One loop for both front ends that attach a local terminal or stdio to an
:class:`~virtcontainers.agent.client.ExecProcess`: ``vc run`` / ``vc exec`` on the direct
path (``cli/streams.py``) and the OCI runtime's relay (``oci/relay.py``). What differs
between them (where output goes, which fd feeds stdin, which signals become which request)
is passed in; :func:`feed` is the stdin copier both use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping

from virtcontainers.agent.client import ExecProcess, Stream
from virtcontainers.errors import AgentError
from virtcontainers.fdwait import readable

__all__ = ["SignalRequest", "feed", "follow_process"]

#: A signal's request to the guest (a resize, a signal), or None when there is none to make.
SignalRequest = Callable[[], Awaitable[None] | None]

_background: set[asyncio.Task[None]] = set()
_READ_SIZE = 65536


async def follow_process(
    proc: ExecProcess,
    write: Callable[[Stream, bytes], None],
    *,
    signals: Mapping[int, SignalRequest],
    feed: Callable[[], Coroutine[object, object, None]] | None,
) -> int:
    """Give each chunk of ``proc``'s output to ``write`` until the process exits; feed its
    stdin with ``feed()`` (with ``None`` its stdin is closed at once); while it runs, each
    signal of ``signals`` received here sends that signal's request in the background.
    Returns the shell-style exit code (128 + the signal when killed).

    Raises:
        AgentError: the connection to the agent failed (a signal's request failing is
            dropped: the process may just have ended).
    """
    loop = asyncio.get_running_loop()
    feeder: asyncio.Task[None] | None = None
    handled: list[int] = []
    try:
        for sig, request in signals.items():
            loop.add_signal_handler(sig, _send_soon, request)
            handled.append(sig)
        if feed is not None:
            feeder = asyncio.create_task(feed())
        else:
            await proc.close_stdin()
        async for stream, data in proc:
            write(stream, data)
        status = await proc.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
    return status.shell_code


async def feed(proc: ExecProcess, fd: int) -> None:
    """Copy ``fd`` to ``proc``'s stdin until its end, then close that stdin.

    Waits for readability, then reads: no thread blocked in read() (it would keep this
    process alive after the guest process exited), and no O_NONBLOCK (it would also apply to
    a terminal that stdout shares). Regular files and /dev/null, which epoll refuses, are
    read straight: their reads do not block.

    Raises:
        AgentError: the connection to the agent failed.
    """
    pollable = True
    while True:
        if pollable:
            try:
                await readable(fd)
            except PermissionError:
                pollable = False
        try:
            chunk = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            continue
        except OSError:  # EIO: the other side of a pty closed
            chunk = b""
        if not chunk:
            break
        await proc.write_stdin(chunk)
    await proc.close_stdin()


def _send_soon(request: SignalRequest) -> None:
    work = request()
    if work is not None:
        task = asyncio.ensure_future(_quietly(work))
        _background.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(_background.discard)


async def _quietly(work: Awaitable[None]) -> None:
    with contextlib.suppress(AgentError):
        await work
