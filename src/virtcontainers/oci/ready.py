"""The one-shot report a forked container (or exec) process sends its parent on a pipe:
``ok`` once the process runs, ``error: MESSAGE`` if it could not start, nothing if it died."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

__all__ = ["child_main", "report", "wait_report"]


def child_main(body: Callable[[], int]) -> NoReturn:
    """Run a forked child's ``body`` and leave with its code, never returning into the
    parent's code; an unexpected error is printed (conmon shows it) and exits 1."""
    code = 1
    try:
        code = body()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


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
