"""What every process-backed driver (QEMU, Firecracker, Cloud Hypervisor, ACRN) does the same.

A driver subclasses :class:`VmmDriver` and keeps only what is its own: the argv or API
payloads, its ready probe (:meth:`VmmDriver._until_ready`), its liveness probe
(:meth:`VmmDriver._probe`), its device mapping and its extra files. The base owns:

* the run directory (the sandbox's, or a private temp dir it then removes), with the
  driver's :class:`~virtcontainers.drivers._runpaths.RunPaths`;
* launch: argv list, stdin from /dev/null, stdout/stderr to the VMM log, whose tail goes
  into :class:`~virtcontainers.errors.LaunchError`;
* the start template: spawn → the driver's ready probe raced against "the VMM exited early"
  → on any failure stop the VMM, tear down and record FAILED; a missed deadline becomes
  ``HypervisorTimeout("starting <vmm>", timeout)``;
* :meth:`VmmDriver._guarded`, the one place where a call is watched against the VMM dying
  (the VM becomes FAILED and the error says the VMM exited, ``raise … from exc``);
* stop in steps (the driver's polite request, SIGTERM, SIGKILL, each with its deadline;
  ``wait_only`` waits for the guest-driven exit first); ``check()``, ``cleanup()``,
  ``get_pids()``, ``save()``/``load()``, ``reattach()`` and ``to_grpc``/``from_grpc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from virtcontainers.config import HypervisorConfig
from virtcontainers.console import ConsoleWatcher
from virtcontainers.deadline import Deadline
from virtcontainers.drivers._grpc import decode_vm, encode_vm
from virtcontainers.drivers._runpaths import RunPaths
from virtcontainers.errors import (
    ApiError,
    ConfigError,
    HypervisorError,
    HypervisorTimeout,
    LaunchError,
    StateError,
    UnsupportedError,
)
from virtcontainers.hypervisor import (
    Capabilities,
    Capability,
    ConsoleUrl,
    Hypervisor,
    NetworkNamespace,
    VmState,
)
from virtcontainers.persist.hypervisor_state import HypervisorState
from virtcontainers.process import (
    DEFAULT_STOP_TIMEOUT,
    VmmProcess,
    process_matches,
    vcpu_threads,
)

__all__ = ["VmmDriver", "check_boot_files"]

log = logging.getLogger(__name__)
T = TypeVar("T")
P = TypeVar("P", bound="RunPaths")

#: How long to drain the console after the VMM exited (it closes the socket on exit).
CONSOLE_DRAIN_TIMEOUT = 5.0
#: How long a start that failed gets to stop the VMM: SIGTERM, then SIGKILL.
_ABORT_TERM_TIMEOUT = 2.0
_ABORT_KILL_TIMEOUT = 5.0
#: After a call failed: how long to wait for the VMM's exit to tell "it died" from "it erred".
_DIED_GRACE = 1.0


def check_boot_files(cfg: HypervisorConfig) -> None:
    """Raise ConfigError naming the field when a configured kernel, initrd or image file
    does not exist."""
    for label, path in (
        ("kernel", cfg.kernel_asset_path()),
        ("initrd", cfg.initrd_asset_path()),
        ("image", cfg.image_asset_path()),
    ):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{label} {path} does not exist", field=f"boot.{label}_path")


class VmmDriver(Hypervisor, Generic[P]):
    """Base of the drivers that run one VMM process per VM. See the module docstring.

    ``P`` is the driver's :class:`RunPaths` subclass.
    """

    #: The VMM's name in messages ("QEMU", "cloud-hypervisor", ...).
    vmm_name: ClassVar[str] = "the VMM"
    #: What a ``wait_only`` stop does when the guest did not power off in time: go through
    #: the stop steps ("stop"), or SIGKILL at once ("kill", the reference's choice for
    #: Firecracker and ACRN).
    wait_only_fallback: ClassVar[str] = "stop"
    #: The VMM's vCPU thread names (group 1: the index), for :meth:`get_thread_ids`;
    #: None: no host thread per vCPU (ACRN), or the driver asks its VMM (QEMU).
    vcpu_thread_names: ClassVar[re.Pattern[str] | None] = None
    #: What the driver can do (``capabilities()``; a driver whose set depends on its
    #: config overrides :meth:`_capability_flags`).
    capability_flags: ClassVar[Capability] = Capability.NONE

    def __init__(self, paths: P) -> None:
        super().__init__()
        self._paths: P = paths
        self._config = HypervisorConfig()
        self._netns = NetworkNamespace()
        self._uuid = ""
        self._owns_run_dir = False
        self._argv: list[str] = []
        self._process: VmmProcess | None = None
        self._console: ConsoleWatcher | None = None
        self.stop_timeout = DEFAULT_STOP_TIMEOUT

    # -- hooks a driver provides ----------------------------------------------------------

    def _make_paths(self, run_dir: Path) -> P:
        """The driver's paths for ``run_dir``."""
        raise NotImplementedError

    def _set_run_dir(self, run_dir: Path) -> None:
        """Use ``run_dir`` (drivers extend this to rebind what hangs on the paths, e.g. an
        API client)."""
        self._paths = self._make_paths(run_dir)

    async def _until_ready(self, deadline: Deadline, exited: asyncio.Future[None]) -> None:
        """After spawn: wait until the VM runs. ``exited`` fails with LaunchError when the
        VMM exits; pass it as ``abort`` to waits, or race calls with :meth:`_race`."""
        raise NotImplementedError

    async def _probe(self) -> str | None:
        """Ask the VMM how the VM is (``check``): a problem to report, or None. Raise
        HypervisorError when the VMM does not answer."""
        return None

    async def _adopt(self, timeout: float) -> VmState:
        """After :meth:`load` in a new process: connect to the running VMM and say whether
        the VM runs or is paused."""
        raise NotImplementedError

    def _identity(self) -> str:
        """A word that stands in the VMM's argv, so a recycled pid is never adopted."""
        return str(self._paths.run_dir)

    def _polite(self, wait_only: bool) -> Callable[[], Awaitable[None]] | None:
        """How to ask the VMM to exit (QMP quit, ``vmm.shutdown``, SIGINT) before SIGTERM;
        ``wait_only`` says the guest was already asked and did not power off. Default:
        none, stop starts with SIGTERM."""
        return None

    def _stop_steps(self) -> dict[str, float]:
        """The deadlines of :meth:`VmmProcess.stop` for a normal stop."""
        return {"kill_timeout": self.stop_timeout}

    async def _close_control(self) -> None:
        """Drop the control connection (QMP, REST client); the VM keeps running."""

    async def _teardown_extra(self) -> None:
        """After the VMM is gone: stop helper processes, remove driver-specific files."""

    def _extra_pids(self) -> list[int]:
        """Helper processes (virtiofsd) after the VMM in :meth:`get_pids`."""
        return []

    def _save_fields(self) -> dict[str, Any]:
        """The driver's own HypervisorState fields."""
        return {}

    def _load_fields(self, state: HypervisorState) -> None:
        """Restore the driver's own fields from ``state`` (paths are already set)."""

    def _failure(self, message: str) -> HypervisorError:
        """The error ``check`` raises (ACRN adds why the host cannot run it)."""
        return self._error(message)

    # -- helpers --------------------------------------------------------------------------

    @property
    def paths(self) -> P:
        return self._paths

    @property
    def argv(self) -> list[str]:
        return list(self._argv)

    def _error(self, message: str) -> HypervisorError:
        return HypervisorError(message, driver=self.driver.value, sandbox_id=self.sandbox_id)

    def _unsupported(self, operation: str) -> UnsupportedError:
        return UnsupportedError(operation, driver=self.driver.value, sandbox_id=self.sandbox_id)

    def hypervisor_config(self) -> HypervisorConfig:
        return self._config.copy()

    def capabilities(self) -> Capabilities:
        return Capabilities(self._capability_flags())

    def _capability_flags(self) -> Capability:
        return self.capability_flags

    async def get_sandbox_console(self, sandbox_id: str) -> ConsoleUrl:
        """The console's unix socket (the driver's watcher is connected to it; VMMs serve
        one client at a time)."""
        return ConsoleUrl("unix", str(self._paths.console))

    def _valid_config(self, config: HypervisorConfig) -> HypervisorConfig:
        cfg = config.copy()
        cfg.valid()
        return cfg

    def _make_run_dir(self, sandbox_id: str) -> Path:
        """The sandbox's run dir (created 0700), or a private temp dir removed by cleanup."""
        if self._sandbox is not None:
            run_dir = self._sandbox.run_dir
            run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._owns_run_dir = False
        else:
            prefix = f"vc-{self.driver.value}-{sandbox_id[:16]}-"
            run_dir = Path(tempfile.mkdtemp(prefix=prefix))
            self._owns_run_dir = True
        return run_dir

    def _new_console(self) -> ConsoleWatcher:
        return ConsoleWatcher(
            self._paths.console,
            self._paths.console_log,
            logging.getLogger(f"virtcontainers.console.{self.sandbox_id}"),
        )

    def _launch_error(self, message: str) -> LaunchError:
        proc = self._process
        return LaunchError(
            message,
            exit_code=proc.returncode if proc else None,
            argv=self._argv,
            log_tail=proc.log_tail() if proc else "",
            driver=self.driver.value,
            sandbox_id=self.sandbox_id,
        )

    async def _spawn(self, **kwargs: Any) -> VmmProcess:
        """Start ``self._argv`` with the VMM log. Raises LaunchError when it cannot run."""
        try:
            self._process = await VmmProcess.spawn(
                self._argv, log_path=self._paths.vmm_log, **kwargs
            )
        except OSError as exc:
            raise LaunchError(
                f"cannot execute {self.vmm_name}: {exc}",
                exit_code=None,
                argv=self._argv,
                log_tail="",
                driver=self.driver.value,
                sandbox_id=self.sandbox_id,
            ) from exc
        return self._process

    # -- start ----------------------------------------------------------------------------

    async def _start(
        self, timeout: float, spawn: Callable[[], Awaitable[object]] | None = None
    ) -> None:
        """The start template: ``spawn`` (default :meth:`_spawn`), then
        :meth:`_until_ready` raced against the VMM's exit, all within ``timeout``.

        Raises:
            LaunchError: the VMM could not run or exited before it was ready.
            HypervisorTimeout: not ready within ``timeout`` seconds.
        """
        deadline = Deadline.after(timeout)
        try:
            await (spawn or self._spawn)()
        except BaseException:
            await self._abort_start()
            raise
        exited = asyncio.ensure_future(self._exited_early())
        try:
            async with asyncio.timeout(timeout):
                await self._until_ready(deadline, exited)
        except BaseException as exc:
            await self._abort_start()
            if isinstance(exc, TimeoutError | HypervisorTimeout):
                what = f" ({exc.operation})" if isinstance(exc, HypervisorTimeout) else ""
                raise HypervisorTimeout(
                    f"starting {self.vmm_name}{what}",
                    timeout,
                    driver=self.driver.value,
                    sandbox_id=self.sandbox_id,
                ) from exc
            raise
        finally:
            exited.cancel()
            with contextlib.suppress(asyncio.CancelledError, LaunchError):
                await exited
        self._set_state(VmState.RUNNING)

    async def _exited_early(self) -> None:
        """Fails with LaunchError as soon as the VMM exits during start-up."""
        assert self._process is not None
        await self._process.wait(None)
        raise self._launch_error(f"{self.vmm_name} exited during start-up")

    async def _race(self, exited: asyncio.Future[None], work: Awaitable[T]) -> T:
        """Await ``work`` during start unless the VMM exits first (then its LaunchError).

        A refused or reset connection while the VMM is exiting is reported as the exit.
        """
        task = asyncio.ensure_future(work)
        waiters: set[asyncio.Future[Any]] = {task, exited}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                try:
                    return task.result()
                except (ApiError, HypervisorTimeout):
                    raise
                except HypervisorError:
                    proc = self._process
                    if proc is not None and await proc.wait(_DIED_GRACE):
                        raise self._launch_error(
                            f"{self.vmm_name} exited during start-up"
                        ) from None
                    raise
            exited.result()  # raises the LaunchError
            raise AssertionError("unreachable: exited without an error")  # pragma: no cover
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, HypervisorError):
                    await task

    async def _abort_start(self) -> None:
        if self._process is not None:
            with contextlib.suppress(HypervisorError):
                await self._process.stop(
                    term_timeout=_ABORT_TERM_TIMEOUT, kill_timeout=_ABORT_KILL_TIMEOUT
                )
        await self._teardown()
        self._set_state(VmState.FAILED)

    # -- the guarded call -----------------------------------------------------------------

    async def _guarded(self, operation: str, work: Awaitable[T]) -> T:
        """Await ``work`` (a control call), failing fast when the VMM dies meanwhile.

        The VMM's death, first or as the cause of a failed call (a refused connection),
        marks the VM FAILED and raises HypervisorError naming ``operation`` and the exit
        code, from the call's own error. API refusals and timeouts pass unchanged.
        """
        proc = self._process
        task = asyncio.ensure_future(work)
        if proc is None:
            return await task
        died = asyncio.ensure_future(proc.wait(None))
        try:
            await asyncio.wait({task, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, HypervisorError):
                    await task
        cause: BaseException | None = None
        if not task.cancelled():
            try:
                return task.result()
            except (ApiError, HypervisorTimeout):
                raise
            except HypervisorError as exc:
                if not await proc.wait(_DIED_GRACE / 2):
                    raise
                cause = exc
        self._set_state(VmState.FAILED)
        raise self._error(
            f"{self.vmm_name} exited (code {proc.returncode}) during {operation}"
        ) from cause

    # -- stop -----------------------------------------------------------------------------

    async def stop_sandbox(self, wait_only: bool = False) -> None:
        """Stop the VMM and remove its sockets; logs stay until :meth:`cleanup`. Idempotent.

        Normal stop: the driver's polite request, SIGTERM, SIGKILL, each with its deadline.
        ``wait_only``: the guest is powering off by itself; wait up to ``stop_timeout`` for
        the VMM to exit, then force it. The console is drained to end-of-file only after
        the VMM has exited.

        Raises:
            HypervisorTimeout: the VMM survived SIGKILL (the VM becomes FAILED).
        """
        if self.state in (VmState.STOPPED, VmState.NEW):
            self._set_state(VmState.STOPPED)
            return
        proc = self._process
        if proc is not None:
            try:
                await self._end_process(proc, wait_only)
            except BaseException:
                self._set_state(VmState.FAILED)
                raise
        await self._teardown()
        self._set_state(VmState.STOPPED)

    async def _end_process(self, proc: VmmProcess, wait_only: bool) -> None:
        if wait_only:
            if await proc.wait(self.stop_timeout):
                log.debug("%s %s: exited by itself", self.driver, self.sandbox_id)
                return
            log.warning(
                "%s %s: the guest did not power off within %.0f s; stopping %s",
                self.driver,
                self.sandbox_id,
                self.stop_timeout,
                self.vmm_name,
            )
            if self.wait_only_fallback == "kill":
                proc.send_signal(signal.SIGKILL)
                if not await proc.wait(_ABORT_KILL_TIMEOUT):
                    raise HypervisorTimeout(
                        f"{self.vmm_name} (pid {proc.pid}) exiting after SIGKILL",
                        _ABORT_KILL_TIMEOUT,
                        driver=self.driver.value,
                        sandbox_id=self.sandbox_id,
                    )
                return
        try:
            how = await proc.stop(polite=self._polite(wait_only), **self._stop_steps())
        except HypervisorTimeout as exc:
            raise HypervisorTimeout(
                f"{self.vmm_name} (pid {proc.pid}) exiting after SIGKILL",
                exc.seconds,
                driver=self.driver.value,
                sandbox_id=self.sandbox_id,
            ) from exc
        log.debug("%s %s: %s ended (%s)", self.driver, self.sandbox_id, self.vmm_name, how)

    async def _teardown(self) -> None:
        """After the VMM is gone: drain the console to EOF, drop the control connection,
        release the pidfd, remove the sockets and the driver's extra files."""
        if self._console is not None:
            await self._console.wait_closed(CONSOLE_DRAIN_TIMEOUT)
            self._console = None
        await self._close_control()
        if self._process is not None:
            self._process.close()
            self._process = None
        if self._paths.unset:
            return
        for path in self._paths.sockets():
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        await self._teardown_extra()

    # -- check, disconnect, cleanup -------------------------------------------------------

    async def check(self) -> None:
        """Raise HypervisorError unless the VMM is alive and its probe reports no problem;
        a VMM found dead makes the VM FAILED."""
        if self.state is VmState.FAILED:
            raise self._failure("the VM has failed")
        self._require("check", VmState.RUNNING, VmState.PAUSED)
        proc = self._process
        if proc is None or not proc.alive():
            code = proc.returncode if proc is not None else None
            self._set_state(VmState.FAILED)
            raise self._failure(f"{self.vmm_name} is not running (exit code {code})")
        try:
            problem = await self._probe()
        except HypervisorError:
            # A dying VMM drops its connections a moment before it becomes a zombie.
            if not await proc.wait(_DIED_GRACE):
                raise
            self._set_state(VmState.FAILED)
            raise self._failure(
                f"{self.vmm_name} is not running (it exited during the check)"
            ) from None
        if problem:
            raise self._failure(problem)

    async def disconnect(self) -> None:
        """Drop the control connection; the VM keeps running and the next call reconnects."""
        await self._close_control()

    async def cleanup(self) -> None:
        """Remove the run dir (when the driver made it) or the logs, after stop. Idempotent.

        Raises:
            StateError: the VM is running or paused.
        """
        if self.state not in (VmState.STOPPED, VmState.FAILED, VmState.NEW, VmState.CREATED):
            raise StateError(
                "clean up", self.state.value, ["stopped", "failed"], driver=self.driver.value
            )
        paths = self._paths
        if paths.unset:
            return
        if self._owns_run_dir:
            shutil.rmtree(paths.run_dir, ignore_errors=True)
            return
        for path in (*paths.sockets(), *paths.logs()):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    async def get_thread_ids(self) -> dict[int, int]:
        """vCPU index -> host thread id, from the VMM's thread names (``vcpu_thread_names``)."""
        self._require("get thread ids", VmState.RUNNING, VmState.PAUSED)
        if self._process is None or self.vcpu_thread_names is None:
            return {}
        return await asyncio.to_thread(vcpu_threads, self._process.pid, self.vcpu_thread_names)

    def get_pids(self) -> list[int]:
        """The VMM's pid first, then helpers; empty when it is not running."""
        if self._process is None or not self._process.alive():
            return []
        return [self._process.pid, *self._extra_pids()]

    # -- persisted state, reattach --------------------------------------------------------

    def save(self) -> HypervisorState:
        return HypervisorState(
            pid=self._process.pid if self._process else 0,
            type=self.driver.value,
            uuid=self._uuid,
            run_dir=str(self._paths.run_dir),
            sandbox_id=self.sandbox_id,
            **self._save_fields(),
        )

    def load(self, state: HypervisorState) -> None:
        """Restore bookkeeping from a persisted state (then :meth:`reattach`).

        Raises:
            StateError: the state belongs to another driver.
        """
        if state.type and state.type != self.driver.value:
            raise StateError(
                "load a state", state.type, [self.driver.value], driver=self.driver.value
            )
        self.sandbox_id = state.sandbox_id
        self._uuid = state.uuid
        self._set_run_dir(Path(state.run_dir))
        self._load_fields(state)
        if state.pid:
            self._process = VmmProcess.adopt(state.pid, log_path=self._paths.vmm_log)

    async def reattach(
        self, state: HypervisorState, config: HypervisorConfig, *, timeout: float = 10.0
    ) -> None:
        """Take over a VM another process started on this host: :meth:`load` ``state``,
        check that its pid is still this VM's VMM, connect, and adopt its run state.

        Raises:
            StateError: this driver instance already has a VM, or ``state`` is another
                driver's.
            HypervisorError: the VMM process is gone (or the pid is someone else's).
        """
        self._require("adopt a VM", VmState.NEW)
        self._config = self._valid_config(config)
        self.load(state)
        proc = self._process
        if proc is None or not process_matches(proc.pid, self._identity()):
            raise self._error(f"the VM's {self.vmm_name} process is gone")
        self._set_state(await self._adopt(timeout))

    async def to_grpc(self) -> bytes:
        """This running VM, serialized for a process on this host (the VM cache)."""
        self._require("serialize", VmState.RUNNING, VmState.PAUSED)
        return encode_vm(self.save(), self.state, self._argv)

    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        """Adopt a VM serialized by :meth:`to_grpc`.

        Raises:
            HypervisorError: ``data`` is malformed or describes a VM that is not running.
        """
        self._require("adopt a VM", VmState.NEW)
        vm = decode_vm(data, driver=self.driver.value)
        if vm.vm_state not in (VmState.RUNNING, VmState.PAUSED):
            raise self._error(f"cannot adopt a VM that is {vm.vm_state}")
        await self.reattach(vm.state, config)
        self._argv = list(vm.argv)
