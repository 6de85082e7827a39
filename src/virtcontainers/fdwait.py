"""Waiting on the running event loop until a file descriptor turns readable.

One helper for what would otherwise be a future, a reader callback and its removal written
out at each place: a pidfd (readable when its process has exited), a terminal or a pipe.
"""

from __future__ import annotations

import asyncio

__all__ = ["readable"]


async def readable(fd: int) -> None:
    """Return once ``fd`` is readable (or at its end, or in error: a read will not block).

    Raises:
        PermissionError: epoll refuses ``fd`` (a regular file, /dev/null): its reads never
            block, so the caller may just read.
    """
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
