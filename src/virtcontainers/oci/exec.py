"""``vc-runtime exec``: another process in a running container (``podman exec``).

conmon runs ``exec --detach --pid-file F --process P.json ID`` and then waits for the pid in
F, as for the container: with ``--detach`` a forked relay process starts the process in the
guest (through the sandbox server), reports, and relays its stdio until it exits with its
code. Without ``--detach`` this process does that itself.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from virtcontainers.errors import BundleError, ContainerError, VirtContainersError
from virtcontainers.fsutil import atomic_write
from virtcontainers.oci.ready import child_main, report, wait_report
from virtcontainers.oci.relay import Stdio, open_console, relay
from virtcontainers.oci.spec import Process, User, check_process
from virtcontainers.oci.state import ContainerState, StateDir

__all__ = ["exec_process", "process_from_args"]


def process_from_args(
    args: Sequence[str], *, cwd: str | None, env: Sequence[str], user: str | None, tty: bool
) -> Process:
    """``exec ID ARGS`` with ``--cwd``, ``-e``, ``-u UID[:GID]``, ``-t``.

    Raises:
        BundleError: no ARGS, a relative --cwd, a malformed -e or -u.
    """
    uid = gid = 0
    if user:
        first, _, second = user.partition(":")
        if not first.isdigit() or (second and not second.isdigit()):
            raise BundleError(f"--user {user!r}: expected UID[:GID] (numbers)", field="--user")
        uid, gid = int(first), int(second or 0)
    base = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    process = Process(args=list(args), env=[*base, *env], cwd=cwd or "/", terminal=tty,
                      user=User(uid=uid, gid=gid))  # fmt: skip
    check_process(process, "exec")
    return process


def exec_process(
    states: StateDir,
    state: ContainerState,
    process: Process,
    *,
    console_socket: str | None,
    pid_file: Path | None,
    detach: bool,
) -> int:
    """Run ``process`` in the container; returns its exit code (0 with ``detach`` once it
    started).

    Raises:
        ContainerError: it could not be started: runc's words for a missing program
            ("executable file `X` not found", which podman turns into 127), else the
            agent's reason. AgentError: the sandbox server does not answer.
    """
    if process.terminal and not console_socket:
        raise ContainerError("a terminal needs --console-socket", id=state.id)
    run_dir = states.vm_run_dir(state.sandbox_id)
    size = process.tty_size()
    if not detach:
        stdio = open_console(console_socket, size) if process.terminal and console_socket \
            else Stdio()  # fmt: skip
        if pid_file is not None:
            atomic_write(pid_file.absolute(), str(os.getpid()).encode())
        return asyncio.run(_run(run_dir, process, stdio, -1))
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(ready_r)
        child_main(lambda: _detached(run_dir, process, console_socket, size, ready_w))
    os.close(ready_w)
    reply = wait_report(ready_r, 60.0)
    if reply != "ok":
        why = reply.removeprefix("error: ") or "the exec process died while starting"
        raise ContainerError(f"exec in container {state.id}: {why}", id=state.id)
    if pid_file is not None:
        atomic_write(pid_file.absolute(), str(child).encode())
    return 0


def _detached(
    run_dir: Path,
    process: Process,
    console_socket: str | None,
    size: tuple[int, int] | None,
    ready_fd: int,
) -> int:
    """The forked exec relay: a session of its own (the pty becomes its terminal)."""
    os.setsid()
    stdio = Stdio()
    try:
        if process.terminal and console_socket:
            stdio = open_console(console_socket, size)
    except VirtContainersError as exc:
        report(ready_fd, f"error: {exc}")
        return 1
    return asyncio.run(_run(run_dir, process, stdio, ready_fd))


async def _run(run_dir: Path, process: Process, stdio: Stdio, ready_fd: int) -> int:
    from virtcontainers.oci.shim import start_process
    from virtcontainers.server.client import ServerClient

    try:
        agent = await ServerClient.connect(run_dir)
        proc = await start_process(agent, process, stdio)
    except VirtContainersError as exc:
        if ready_fd < 0:
            raise
        report(ready_fd, f"error: {exc}")
        return 1
    report(ready_fd, "ok")
    try:
        return await relay(proc, stdio)
    finally:
        await agent.close()
