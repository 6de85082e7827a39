"""Starting a sandbox server process and waiting until its VM is up.

The server is ``python -m virtcontainers.server ID --root ROOT --ready-fd N
[--lifeline-fd M]`` in its own session (a Ctrl-C for the starter never reaches it). Two pipes
connect it to the starter:

- *ready*: the server writes one JSON reply (:mod:`virtcontainers.server.wire`) when the
  guest agent answered, or the boot error, then closes it. EOF without a reply means the server
  died; its log (``server.log`` in the run dir) goes into the ``LaunchError``.
- *lifeline* (ephemeral sandboxes only): the starter keeps the write end open and never writes.
  The kernel closes it when the starter exits for any reason, SIGKILL included, and the server
  sees EOF and removes the sandbox. A pipe, unlike a watched pid, cannot be confused by pid
  reuse, and it is closed even before the starter could connect to the server's socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass

from virtcontainers.errors import HypervisorTimeout, LaunchError
from virtcontainers.persist.store import StateStore
from virtcontainers.process import VmmProcess
from virtcontainers.server import wire
from virtcontainers.telemetry.context import ENV as TRACEPARENT_ENV
from virtcontainers.telemetry.context import current_traceparent

__all__ = ["ServerProcess", "start_server"]

LOG_NAME = "server.log"


@dataclass
class ServerProcess:
    """A server this process started. ``lifeline`` is the pipe end that keeps an ephemeral
    sandbox alive; closing it (or exiting) removes the sandbox."""

    pid: int
    popen: subprocess.Popen[bytes]
    lifeline: int | None

    async def wait(self, timeout: float) -> bool:
        """Wait for the server to exit (after a stop/remove); True if it did."""
        proc = VmmProcess.adopt(self.pid)
        try:
            done = await proc.wait(timeout)
        finally:
            proc.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(0.5)  # reap our child
        self.release()
        return done

    def release(self) -> None:
        """Close the lifeline: an ephemeral sandbox's server now removes it."""
        fd, self.lifeline = self.lifeline, None
        if fd is not None:
            os.close(fd)


async def start_server(
    sandbox_id: str, store: StateStore, *, timeout: float, ephemeral: bool, adopt: bool = False
) -> ServerProcess:
    """Start the server of a created sandbox; returns once its guest agent answered.
    ``adopt``: the sandbox's VM runs on after its server died; the new server takes it over.

    Raises:
        LaunchError: the server died before reporting (its log tail is attached), or the
            boot error it reported (LaunchError, HypervisorTimeout, AgentError, ...).
    """
    run_dir = store.sandbox_dir(sandbox_id)
    log_path = run_dir / LOG_NAME
    ready_r, ready_w = os.pipe()
    life_r, life_w = os.pipe() if ephemeral else (-1, -1)
    argv = [
        sys.executable, "-m", "virtcontainers.server", sandbox_id,
        "--root", str(store.root), "--ready-fd", str(ready_w), "--timeout", str(timeout),
    ]  # fmt: skip
    pass_fds = [ready_w]
    if adopt:
        argv.append("--adopt")
    if ephemeral:
        argv += ["--lifeline-fd", str(life_r)]
        pass_fds.append(life_r)
    # The starter's current span (sandbox.start) becomes the parent of the server's boot.
    parent = current_traceparent()
    env = {**os.environ, TRACEPARENT_ENV: parent} if parent else None
    try:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            # Not asyncio's subprocess: its transport kills a child still running when the
            # loop closes, and a detached server must outlive the starter's loop.
            popen = subprocess.Popen(  # noqa: ASYNC220
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=pass_fds,
                start_new_session=True,
                env=env,
            )
        finally:
            os.close(log_fd)
    except BaseException:
        for fd in (ready_r, life_w):
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        os.close(ready_w)
        if life_r >= 0:
            os.close(life_r)
    server = ServerProcess(popen.pid, popen, life_w if ephemeral else None)
    try:
        data = await _read_all(ready_r, timeout + 30.0)
    except TimeoutError:
        server.release()
        popen.terminate()
        raise HypervisorTimeout(f"starting sandbox {sandbox_id} in its server", timeout) from None
    except BaseException:
        server.release()  # an ephemeral server removes what it booted
        raise
    if not data:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(5.0)
        server.release()
        tail = log_path.read_text(errors="replace").splitlines()[-20:] if log_path.exists() else []
        raise LaunchError(
            f"the server of sandbox {sandbox_id} exited before its VM was up",
            exit_code=popen.returncode,
            argv=argv,
            log_tail="\n".join(tail),
            sandbox_id=sandbox_id,
        )
    try:
        wire.decode_reply(data)
    except BaseException:
        server.release()
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(10.0)
        raise
    return server


async def _read_all(fd: int, timeout: float) -> bytes:
    """Everything from pipe ``fd`` until EOF (closes it); raises TimeoutError after
    ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if not done.done():
                done.set_exception(exc)
            return
        if data:
            chunks.append(data)
        elif not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        async with asyncio.timeout(timeout):
            await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return b"".join(chunks)
