"""VMM process supervision: spawn, wait by deadline, escalate signals, reap.

A VMM is either our child (we spawned it: asyncio reaps it and we know its exit code) or
adopted (another process spawned it and died; we found its pid in the state store). Both
are watched through a pidfd, so waiting never polls and a recycled pid can't be signalled
by mistake once the pidfd is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import select
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from virtcontainers.errors import HypervisorTimeout
from virtcontainers.fdwait import readable

__all__ = ["VmmProcess", "process_matches", "vcpu_threads"]

log = logging.getLogger(__name__)

#: The reference's default grace period before SIGKILL (15 s for QEMU, Firecracker, ACRN).
DEFAULT_STOP_TIMEOUT = 15.0


class VmmProcess:
    """One VMM process. Create with :meth:`spawn` or :meth:`adopt`."""

    def __init__(
        self,
        pid: int,
        *,
        child: asyncio.subprocess.Process | None,
        log_path: Path | None,
        argv: Sequence[str] = (),
    ) -> None:
        self.pid = pid
        #: What was executed (empty for an adopted process).
        self.argv: tuple[str, ...] = tuple(argv)
        self._child = child
        self.log_path = log_path
        self._pidfd: int | None = None
        with contextlib.suppress(ProcessLookupError):
            self._pidfd = os.pidfd_open(pid)

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        log_path: Path,
        pass_fds: Sequence[int] = (),
        cwd: Path | None = None,
        netns: str = "",
    ) -> VmmProcess:
        """Start ``argv`` (never through a shell) with stdin from /dev/null and stdout and
        stderr appended to ``log_path`` (created 0600). The VMM gets its own session so a
        Ctrl-C meant for us never reaches it. Raises OSError when it cannot be executed.

        ``netns``: a network namespace path (``/run/netns/NAME``) to run the VMM in, so it
        opens its tap by name there. ``nsenter --net`` joins it and execs the VMM (same pid,
        no shell, no other namespace changed)."""
        if netns:
            argv = ["nsenter", f"--net={netns}", "--", *argv]
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                pass_fds=tuple(pass_fds),
                start_new_session=True,
                cwd=cwd,
                # Sockets and files the VMM creates are the owner's alone (0600).
                umask=0o077,
            )
        finally:
            os.close(fd)
        log.debug("spawned pid %d: %s", proc.pid, " ".join(argv))
        return cls(proc.pid, child=proc, log_path=log_path, argv=argv)

    @classmethod
    def adopt(cls, pid: int, *, log_path: Path | None = None) -> VmmProcess:
        """Watch a VMM someone else started (reattach). Check identity first with
        :func:`process_matches`."""
        return cls(pid, child=None, log_path=log_path)

    # -- state --------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        """The exit code when known (our own child only), else None."""
        return self._child.returncode if self._child is not None else None

    def alive(self) -> bool:
        """False as soon as the process has exited, even before it is reaped."""
        if self._child is not None and self._child.returncode is not None:
            return False
        if self._pidfd is None:
            return False
        # A pidfd polls readable once the process has exited (zombie or reaped).
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return not poller.poll(0)

    async def wait(self, timeout: float | None) -> bool:
        """Wait until the process has exited; True if it did within ``timeout`` seconds."""
        if not self.alive():
            await self._reap()
            return True
        try:
            async with asyncio.timeout(timeout):
                if self._child is not None:
                    await self._child.wait()
                else:
                    await self._wait_pidfd()
        except TimeoutError:
            return False
        return True

    async def _wait_pidfd(self) -> None:
        assert self._pidfd is not None
        # A pidfd turns readable when the process exits; zombies of a dead parent are
        # reaped by init soon after, which is all we need to know.
        await readable(self._pidfd)

    async def _reap(self) -> None:
        if self._child is not None:
            await self._child.wait()

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal the process through its pidfd (never a recycled pid); ignores a dead one."""
        if self._pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    async def stop(
        self,
        *,
        polite: Callable[[], Awaitable[None]] | None = None,
        polite_timeout: float = 3.0,
        term_timeout: float = 3.0,
        kill_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> str:
        """Stop in steps, each with its own deadline: ``polite()`` (e.g. QMP quit), SIGTERM,
        SIGKILL. Returns the step that ended it ("exited", "polite", "sigterm", "sigkill").
        Idempotent: a process that is already gone returns "exited"."""
        if not self.alive():
            await self._reap()
            return "exited"
        if polite is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(polite_timeout):
                    await polite()
            if await self.wait(polite_timeout):
                return "polite"
        self.send_signal(signal.SIGTERM)
        if await self.wait(term_timeout):
            return "sigterm"
        log.warning("pid %d ignored SIGTERM for %.1f s; sending SIGKILL", self.pid, term_timeout)
        self.send_signal(signal.SIGKILL)
        if not await self.wait(kill_timeout):
            raise HypervisorTimeout(f"pid {self.pid} exiting after SIGKILL", kill_timeout)
        return "sigkill"

    def close(self) -> None:
        """Release the pidfd."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the VMM wrote to stdout/stderr."""
        if self.log_path is None:
            return ""
        try:
            data = self.log_path.read_bytes()[-16384:]
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def vcpu_threads(pid: int, comm: re.Pattern[str]) -> dict[int, int]:
    """vCPU index -> thread id of ``pid``'s threads whose name (``/proc/<pid>/task/*/comm``)
    fully matches ``comm``, whose group 1 is the index (``vcpu0``, ``fc_vcpu 1``...)."""
    out: dict[int, int] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread exited meanwhile
        match = comm.fullmatch(name)
        if match:
            out[int(match.group(1))] = int(task.name)
    return dict(sorted(out.items()))


def process_matches(pid: int, needle: str) -> bool:
    """True when ``pid`` is alive and ``needle`` is one of its argv words or inside one
    (guards against signalling a recycled pid when reattaching)."""
    # The implementation lives in procfs, which `vc ps` can import without asyncio.
    from virtcontainers import procfs

    return procfs.process_matches(pid, needle)
