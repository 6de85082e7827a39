"""The one-shot report a forked container (or exec) process sends its parent on a pipe:
``ok`` once the process runs, ``error: MESSAGE`` if it could not start, nothing if it died."""

from __future__ import annotations

import contextlib
import os
import select
import time

__all__ = ["report", "wait_report"]


def report(fd: int, message: str) -> None:
    """Send ``message`` and close ``fd`` (a no-op for -1: nobody waits)."""
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, message.encode(errors="replace")[:65536])
    with contextlib.suppress(OSError):
        os.close(fd)


def wait_report(fd: int, timeout: float) -> str:
    """What the child reported ("" if it died first); closes ``fd``."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return f"error: no report within {timeout:g} s"
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks).decode(errors="replace")
            chunks.append(chunk)
    finally:
        os.close(fd)
