"""The container process: the host process conmon watches for one container.

``create`` forks it (so it stays in conmon's process tree: conmon is a child subreaper and
reaps the pid written to ``--pid-file``). It

1. boots the sandbox VM in a sandbox server of its own, tied to it (``ephemeral``: when this
   process ends, even by SIGKILL, the server stops the VM and removes its run dir);
2. makes the bundle's mounts in the guest, records ``created`` with its pid, and tells
   ``create`` it is ready (or why it failed);
3. waits on ``<state dir>/shim.sock`` for ``start`` (and ``kill``), then starts the process
   in the guest and relays its stdio (:mod:`virtcontainers.oci.relay`);
4. records ``stopped`` with the exit code and exits with that code (128 + N when the guest
   process was killed by signal N), which conmon reports to podman.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
from dataclasses import dataclass

from virtcontainers.agent.client import AgentRequestError, ExecProcess
from virtcontainers.agent.protocol import ErrorCode, ExecSpec
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import BlockDrive
from virtcontainers.errors import ContainerError, VirtContainersError
from virtcontainers.oci.ready import report
from virtcontainers.oci.relay import FORWARDED_SIGNALS, Stdio, open_console, relay
from virtcontainers.oci.spec import Bundle, Process
from virtcontainers.oci.state import StateDir, Status
from virtcontainers.oci.vm import MountPlan, apply_in_guest, configure_guest
from virtcontainers.server.client import ServerClient

__all__ = ["SHIM_SOCKET", "ContainerJob", "run_container", "start_process"]

SHIM_SOCKET = "shim.sock"
#: How long the guest may take to boot (TCG: a few seconds; a loaded CI machine: more).
BOOT_TIMEOUT = 120.0


@dataclass
class ContainerJob:
    """Everything ``create`` prepared for the container process."""

    container_id: str
    states: StateDir
    bundle: Bundle
    hypervisor: str
    config: HypervisorConfig
    disks: list[BlockDrive]
    plan: MountPlan
    console_socket: str | None


def run_container(job: ContainerJob, ready_fd: int) -> int:
    """The body of the forked container process; returns its exit code."""
    os.setsid()
    stdio = Stdio()
    try:
        if job.bundle.process.terminal and job.console_socket:
            stdio = open_console(job.console_socket, job.bundle.process.tty_size())
    except VirtContainersError as exc:
        report(ready_fd, f"error: {exc}")
        return 1
    return asyncio.run(_main(job, ready_fd, stdio))


async def _main(job: ContainerJob, ready_fd: int, stdio: Stdio) -> int:
    from virtcontainers.persist.store import StateStore
    from virtcontainers.sandbox import Sandbox

    states, cid = job.states, job.container_id
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[int] = loop.create_future()
    # Until the process runs, a signal ends the container (as for runc's init before start).
    for sig in FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, _end, ended, 128 + int(sig))
    hostname = job.bundle.spec.hostname
    try:
        sandbox = await Sandbox.create(
            configure_guest(job.config, hostname),
            id=states.sandbox_id(cid),
            hypervisor=job.hypervisor,
            devices=job.disks,
            store=StateStore(states.vm_root),
        )
        await sandbox.start(BOOT_TIMEOUT, server=True, ephemeral=True)
        agent = await sandbox.server_client()
        await apply_in_guest(agent, job.plan)
        control = _Control(job, agent, stdio, ended)
        server = await asyncio.start_unix_server(
            control.serve, path=str(states.path(cid) / SHIM_SOCKET)
        )
        os.chmod(states.path(cid) / SHIM_SOCKET, 0o600)
        states.update(cid, status=Status.CREATED, pid=os.getpid())
    except (VirtContainersError, OSError) as exc:
        report(ready_fd, f"error: {exc}")
        return 1
    report(ready_fd, "ok")
    code = await ended
    for sig in FORWARDED_SIGNALS:
        loop.remove_signal_handler(sig)
    server.close()
    with contextlib.suppress(OSError):
        states.update(cid, status=Status.STOPPED, exit_code=code)
    # Leaving closes the server's lifeline: it stops the VM and removes its run dir.
    return code


def _end(ended: asyncio.Future[int], code: int) -> None:
    if not ended.done():
        ended.set_result(code)


class _Control:
    """``shim.sock``: one line per request (``start``, ``kill SIG [all]``), one line back
    (``ok [guest pid]`` or ``error: ...``)."""

    def __init__(
        self, job: ContainerJob, agent: ServerClient, stdio: Stdio, ended: asyncio.Future[int]
    ) -> None:
        self.job = job
        self.agent = agent
        self.stdio = stdio
        self.ended = ended
        self.proc: ExecProcess | None = None
        self.relay: asyncio.Task[None] | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline()).decode(errors="replace").split()
            try:
                reply = await self.handle(line)
            except VirtContainersError as exc:
                reply = f"error: {exc}"
            writer.write(reply.encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    async def handle(self, words: list[str]) -> str:
        match words:
            case ["start"]:
                if self.proc is not None:
                    return "error: the container was already started"
                proc = await start_process(self.agent, self.job.bundle.process, self.stdio)
                self.proc = proc
                self.job.states.update(
                    self.job.container_id, status=Status.RUNNING, guest_pid=proc.pid
                )
                self.relay = asyncio.create_task(self._relay(proc))
                return f"ok {proc.pid}"
            case ["kill", sig, *rest]:
                if self.proc is not None:
                    await self.proc.signal(int(sig), group=rest == ["all"])
                else:
                    _end(self.ended, 128 + int(sig))
                return "ok"
        return f"error: unknown request {' '.join(words)!r}"

    async def _relay(self, proc: ExecProcess) -> None:
        # relay() installs its own handlers (forwarding); ours (ending) must yield to them.
        loop = asyncio.get_running_loop()
        for sig in FORWARDED_SIGNALS:
            loop.remove_signal_handler(sig)
        try:
            code = await relay(proc, self.stdio)
        except VirtContainersError:
            code = 255  # the VM or its server went away under the process
        _end(self.ended, code)


async def start_process(agent: ServerClient, process: Process, stdio: Stdio) -> ExecProcess:
    """Start ``process`` in the guest as the spec says (env exactly, cwd, uid/gid and
    supplementary groups, umask, rlimits, terminal).

    Raises:
        ContainerError: the program is not there or not executable (runc's words).
        AgentRequestError: the agent refused otherwise (the failing step and errno).
    """
    try:
        return await _exec_stream(agent, process, stdio)
    except AgentRequestError as exc:
        raise exec_error(exc, process.args[0]) from None


def program_not_found(program: str, container_id: str = "") -> ContainerError:
    return ContainerError(
        f"executable file `{program}` not found in $PATH: No such file or directory",
        id=container_id,
    )


def exec_error(exc: AgentRequestError, program: str) -> VirtContainersError:
    """An agent's failure to start a program, in the words of runc/crun: podman maps
    "executable file not found" / "no such file" to exit 127, "permission denied" to 126."""
    if exc.code == ErrorCode.EXEC and exc.message.startswith("execve"):
        if exc.errno == errno.ENOENT:
            return program_not_found(program)
        if exc.errno == errno.EACCES:
            return ContainerError(f"exec `{program}`: permission denied")
    return exc


async def _exec_stream(agent: ServerClient, process: Process, stdio: Stdio) -> ExecProcess:
    user = process.user
    spec = ExecSpec(
        process.args,
        env=process.environment(),
        cwd=process.cwd,
        uid=user.uid,
        gid=user.gid,
        groups=[g for g in user.additional_gids if g != user.gid],
        rlimits=process.rlimit_triples(),
        umask=user.umask,
        tty=stdio.tty,
        tty_size=stdio.size(),
    )
    return await agent.exec_stream(spec)


def stop_signal(sig: str) -> int:
    """A signal given by name (``TERM``, ``SIGTERM``) or number.

    Raises:
        ValueError: an unknown signal.
    """
    if sig.isdigit():
        return int(sig)
    name = sig.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    return int(signal.Signals[name])
