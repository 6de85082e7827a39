"""The mock driver's guest: the real ``vc-agent``, built for the host, run as the VM's process.

It listens on ``<run dir>/mock-agent.sock`` (``--unix``; the host talks to it as to a
virtio-serial port), writes CPU/memory onlining into a private ``--sysfs-root``, logs to
``<run dir>/console.log`` (the mock's console) and, with ``--no-poweroff``, exits when the
host asks the guest to shut down, as a VMM exits when its guest powers off. The run dir is
in its argv, so ``process_matches(pid, run_dir)`` tells it apart from a recycled pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path

from virtcontainers.deadline import Deadline, poll_until
from virtcontainers.devices import SerialPort
from virtcontainers.errors import LaunchError, VirtContainersError
from virtcontainers.persist.layout import CONSOLE_LOG
from virtcontainers.process import VmmProcess
from virtcontainers.procfs import children_of

__all__ = ["MockGuest", "agent_socket"]

AGENT_SOCKET = "mock-agent.sock"
_SYSFS = "mock-sysfs"
_MEMORY_BLOCK_MB = 128


def agent_socket(run_dir: Path) -> SerialPort:
    """Where the guest agent of the sandbox in ``run_dir`` listens."""
    return SerialPort(id="agent0", name="vc.agent", host_path=str(run_dir / AGENT_SOCKET))


class MockGuest:
    """One running guest agent. Create with :meth:`boot` or :meth:`adopt`."""

    def __init__(self, run_dir: Path, process: VmmProcess) -> None:
        self.run_dir = run_dir
        self.process = process

    @property
    def socket(self) -> Path:
        return self.run_dir / AGENT_SOCKET

    @classmethod
    async def boot(cls, run_dir: Path, deadline: Deadline, *, sandbox_id: str) -> MockGuest:
        """Start the agent and wait until it listens.

        Raises:
            LaunchError: it cannot be built or started, or it exited before it listened.
            HypervisorTimeout: it did not listen by ``deadline``.
        """
        from virtcontainers.guest.host_agent import host_agent

        sysfs = run_dir / _SYSFS
        argv = ["vc-agent", "--unix", str(run_dir / AGENT_SOCKET), "--sysfs-root", str(sysfs),
                "--no-poweroff"]  # fmt: skip
        try:
            argv[0] = str(await asyncio.to_thread(host_agent))
            sysfs.mkdir(mode=0o700, exist_ok=True)
            process = await VmmProcess.spawn(argv, log_path=run_dir / CONSOLE_LOG)
        except (OSError, VirtContainersError) as exc:
            why = f"cannot start the mock guest: {exc}"
            raise LaunchError(why, exit_code=None, argv=argv, log_tail="", driver="mock",
                              sandbox_id=sandbox_id) from exc  # fmt: skip
        guest = cls(run_dir, process)

        async def listening() -> bool | None:
            # The agent binds under a temporary name and renames: the path means "listening".
            if guest.socket.exists():
                return True
            if not process.alive():
                await process.wait(1.0)
                guest.forget()
                raise LaunchError("the mock guest exited before it listened",
                                  exit_code=process.returncode, argv=argv,
                                  log_tail=process.log_tail(), driver="mock",
                                  sandbox_id=sandbox_id)  # fmt: skip
            return None

        def late() -> BaseException:
            return deadline.missed("start the mock guest", driver="mock", sandbox_id=sandbox_id)

        try:
            await poll_until(deadline, listening, on_timeout=late, interval=0.005)
        except BaseException:
            await guest.stop(wait=0.0)
            raise
        return guest

    @classmethod
    def adopt(cls, run_dir: Path, pid: int) -> MockGuest:
        """The guest another process started (check it with ``process_matches`` first)."""
        return cls(run_dir, VmmProcess.adopt(pid, log_path=run_dir / CONSOLE_LOG))

    def alive(self) -> bool:
        return self.process.alive()

    def show_cpus(self, count: int, *, online: bool) -> None:
        """Make the guest's sysfs list ``count`` CPUs: ``cpu0`` (which has no ``online``
        file: it cannot go offline) to ``cpu<count-1>``. CPUs it did not list yet appear
        ``online`` (boot) or offline (hot-added: the agent's ``online_cpus`` onlines them);
        CPUs past ``count`` (hot-removed) disappear.

        Raises:
            OSError: the sysfs cannot be written.
        """
        cpus = self.run_dir / _SYSFS / "devices" / "system" / "cpu"
        cpus.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            cpu = cpus / f"cpu{index}"
            if not cpu.exists():
                cpu.mkdir()
                if index:
                    (cpu / "online").write_text("1\n" if online else "0\n")
        for cpu in cpus.glob("cpu*"):
            if cpu.name[3:].isdigit() and int(cpu.name[3:]) >= count:
                shutil.rmtree(cpu)

    def add_memory(self, size_mb: int) -> None:
        """Make the guest's sysfs list the memory blocks of a hot-added DIMM (128 MiB each,
        as on x86), offline until the agent's ``online_memory`` onlines them.

        Raises:
            OSError: the sysfs cannot be written.
        """
        blocks = self.run_dir / _SYSFS / "devices" / "system" / "memory"
        blocks.mkdir(parents=True, exist_ok=True)
        first = len(list(blocks.glob("memory*")))
        for index in range(first, first + max(1, size_mb // _MEMORY_BLOCK_MB)):
            block = blocks / f"memory{index}"
            block.mkdir()
            (block / "state").write_text("offline\n")

    def kill(self) -> None:
        """SIGKILL the agent: the VMM dies under a running guest."""
        self.process.send_signal(signal.SIGKILL)

    async def stop(self, *, wait: float) -> None:
        """Stop the agent (after ``wait`` s for it to exit by itself, as after a guest
        shutdown) and every process it started: nothing of the VM outlives it."""
        process = self.process
        if wait:
            await process.wait(wait)
        execs = children_of(process.pid) if process.alive() else []
        for pgid in execs:  # each exec leads its own process group (the agent's setsid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        await process.stop(term_timeout=5.0)
        self.forget()

    def forget(self) -> None:
        """Release the process handle and remove the socket and the fake sysfs."""
        self.process.close()
        self.socket.unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / _SYSFS, ignore_errors=True)
