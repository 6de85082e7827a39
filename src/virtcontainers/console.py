"""The console watcher: every byte the guest prints, into ``console.log`` and the logger.

Two rules make the log complete (the reference's fix for truncated logs, kata #1696):

* Connect before the guest can speak. A chardev socket with no client drops output, so the
  VMM's console socket is created with ``wait=on``: the VMM does not run the guest until the
  watcher is connected.
* Stop only after the VMM has exited. The watcher then reads to end-of-file, so the guest's
  last shutdown lines are kept. :meth:`ConsoleWatcher.close_now` exists for the abrupt case
  (and to show, in a test, what the wrong order loses).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from virtcontainers.deadline import Deadline, poll_until
from virtcontainers.telemetry.tracing import operation

__all__ = ["ConsoleWatcher", "LineLog"]

log = logging.getLogger(__name__)

_CHUNK = 65536


class LineLog:
    """A byte stream's lines, one debug record each, to ``logger``; a line cut across two
    reads waits for its end (or for :meth:`flush`). ``lines`` counts the records."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.lines = 0
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            self._emit(line)

    def flush(self) -> None:
        """Log the unfinished last line, if any (the stream has ended)."""
        if self._partial:
            self._emit(self._partial)
            self._partial = b""

    def _emit(self, line: bytes) -> None:
        self.lines += 1
        self.logger.debug("%s", line.rstrip(b"\r").decode(errors="replace"))


class ConsoleWatcher:
    """Reads a console unix socket into ``log_path`` (append, 0600) and ``logger``."""

    def __init__(self, socket_path: Path, log_path: Path, logger: logging.Logger) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self._log = LineLog(logger)
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        #: Bytes of console output lost since the log last could be written (a full disk).
        self.dropped = 0

    async def connect(
        self, deadline: Deadline, *, abort: asyncio.Future[None] | None = None
    ) -> None:
        """Connect, retrying every 10 ms until ``deadline``.

        ``abort`` (e.g. "the VMM exited") ends the wait early with the future's exception.

        Raises:
            HypervisorTimeout: the socket did not accept a connection in time.
        """

        async def attempt() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
            try:
                return await asyncio.open_unix_connection(str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError):
                return None

        reader, writer = await poll_until(
            deadline,
            attempt,
            abort=abort,
            on_timeout=lambda: deadline.missed(f"connecting the console at {self.socket_path}"),
        )
        self._writer = writer
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._task = asyncio.create_task(self._pump(reader, fd), name=f"console:{self.log_path}")

    async def _pump(self, reader: asyncio.StreamReader, fd: int) -> None:
        try:
            while chunk := await reader.read(_CHUNK):
                self._append(fd, chunk)
                self._log.feed(chunk)
        except (ConnectionError, OSError) as exc:
            self._log.logger.debug("console read ended: %s", exc)
        finally:
            self._log.flush()
            os.close(fd)

    def _append(self, fd: int, chunk: bytes) -> None:
        """Append ``chunk`` to the log. A failed write (ENOSPC, EIO) loses that output, never
        the console: reading on keeps the guest from stalling on a host problem. Warned
        once when the losses start and once when writing works again."""
        done = 0
        try:
            while done < len(chunk):
                done += os.write(fd, chunk[done:])
        except OSError as exc:
            if not self.dropped:
                log.warning("console log %s: %s: the guest's console output is dropped "
                            "until it can be written", self.log_path, exc.strerror)  # fmt: skip
            self.dropped += len(chunk) - done
            return
        if self.dropped:
            log.warning("console log %s is written again; %d bytes were lost",
                        self.log_path, self.dropped)  # fmt: skip
            self.dropped = 0

    @property
    def lines(self) -> int:
        """The console lines read so far."""
        return self._log.lines

    @property
    def connected(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait_closed(self, timeout: float) -> bool:
        """Wait for end-of-file (the VMM closed the console on exit), up to ``timeout``.

        Returns True when everything was read; on timeout the watcher is closed and False
        returned.
        """
        if self._task is None:
            return True
        with operation("ConsoleFlush", {"vc.console.log": str(self.log_path)}) as op:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._task)
            except TimeoutError:
                await self.close_now()
                op.set("vc.console.complete", False)
                return False
            finally:
                self._close_writer()
                op.set("vc.console.lines", self.lines)
            op.set("vc.console.complete", True)
            return True

    async def close_now(self) -> None:
        """Stop reading at once. What the guest prints afterwards is lost."""
        self._close_writer()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
