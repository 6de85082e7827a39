"""Firecracker's logger and metrics outputs: named pipes we read into log files.

Firecracker writes its log and metrics to a path given by ``PUT /logger`` and
``PUT /metrics``. As in the reference these are FIFOs in the VM's directory, so nothing
grows on disk unless we choose to keep it: a reader copies every line to a log file and to
the Python logger. The reader opens the FIFO read-write, so it never sees end-of-file while
Firecracker restarts its writes, and it is drained once more after Firecracker has exited
so the last lines are kept (the console watcher's rule, applied to these streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from virtcontainers.console import LineLog

__all__ = ["FifoReader"]

_CHUNK = 65536


class FifoReader:
    """Creates ``fifo`` (0600) and copies what is written into it to ``log_path``."""

    def __init__(self, fifo: Path, log_path: Path, logger: logging.Logger) -> None:
        self.fifo = fifo
        self.log_path = log_path
        self._log = LineLog(logger)
        self._fd: int | None = None
        self._out: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.bytes_read = 0

    def open(self) -> None:
        """Create the FIFO and start reading it on the running event loop."""
        self.fifo.unlink(missing_ok=True)
        os.mkfifo(self.fifo, 0o600)
        self._fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._out = os.open(
            self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._drain)

    def _drain(self) -> None:
        if self._fd is None or self._out is None:
            return
        while True:
            try:
                chunk = os.read(self._fd, _CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:
                self._log.logger.debug("reading %s failed: %s", self.fifo, exc)
                return
            if not chunk:
                return
            self.bytes_read += len(chunk)
            os.write(self._out, chunk)
            self._log.feed(chunk)

    def close(self) -> None:
        """Read what is left, stop, and remove the FIFO. Idempotent."""
        if self._fd is not None:
            self._drain()
            self._log.flush()
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._out is not None:
            os.close(self._out)
            self._out = None
        with contextlib.suppress(OSError):
            self.fifo.unlink(missing_ok=True)
