"""Running a command in a sandbox with the terminal's streams attached."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from virtcontainers.agent.client import ExecProcess, Stream
from virtcontainers.sandbox import Sandbox


async def stream_exec(sandbox: Sandbox, argv: list[str], *, tty: bool = False) -> int:
    """Run ``argv``, copy its output to ours as it comes, feed it our stdin when that is
    not a terminal. Returns a shell-style exit code (128 + signal when killed)."""
    proc = await sandbox.exec_stream(argv, tty=tty)
    feeder: asyncio.Task[None] | None = None
    if sys.stdin.isatty():
        await proc.close_stdin()
    else:
        feeder = asyncio.create_task(_feed_stdin(proc))
    try:
        async for stream, data in proc:
            out = sys.stdout.buffer if stream is Stream.STDOUT else sys.stderr.buffer
            out.write(data)
            out.flush()
        status = await proc.wait()
    finally:
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
    if status.signal is not None:
        return 128 + status.signal
    return status.exit_code if status.exit_code is not None else 1


async def _feed_stdin(proc: ExecProcess) -> None:
    fd = sys.stdin.fileno()
    while chunk := await asyncio.to_thread(os.read, fd, 65536):
        await proc.write_stdin(chunk)
    await proc.close_stdin()
