"""The server process: owns one sandbox's VM for its whole life and serves its clients.

``python -m virtcontainers.server ID --root ROOT --ready-fd N [--lifeline-fd M] [--timeout S]``
(started by :func:`virtcontainers.server.spawn.start_server`; not meant to be run by hand).

It boots the VM in this process (driver, QMP/REST control, console watcher), takes the one
agent connection into a :class:`~virtcontainers.server.relay.Relay`, listens on
``<run dir>/server.sock`` (0600; peers are checked with ``SO_PEERCRED``: the owner uid or
root only), and records every state change and the VM's end in the store. Control operations
run one at a time under one lock, in this process, which is the only writer of the record
while it lives: a resize and a hotplug from two clients can no longer overwrite each other.

It ends when the VM ends (a stop or remove op, the guest powering off, the VMM dying) or, for
an ephemeral sandbox, when the starter's lifeline closes: then it stops the VM at once and
removes the sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path

import msgspec

from virtcontainers.agent.client import AgentClient
from virtcontainers.agent.transport import connect_channel
from virtcontainers.errors import AgentError, ConfigError, StoreError, VirtContainersError
from virtcontainers.hypervisor import VmState
from virtcontainers.images.sandbox_image import exec_defaults
from virtcontainers.persist.document import SandboxDocument
from virtcontainers.persist.records import ExitRecord
from virtcontainers.persist.store import StateStore
from virtcontainers.process import VmmProcess
from virtcontainers.sandbox import (
    AGENT_READY_TIMEOUT,
    Sandbox,
    _device_to_dict,
    _hotplug_from_dict,
)
from virtcontainers.server import wire
from virtcontainers.server.client import socket_path
from virtcontainers.server.peercred import peer_of
from virtcontainers.server.relay import Relay
from virtcontainers.telemetry import export, logs
from virtcontainers.telemetry.context import ENV as TRACEPARENT_ENV
from virtcontainers.telemetry.metrics import METRICS_SOCKET, SandboxMetrics, serve_http
from virtcontainers.telemetry.tracing import attached, operation

__all__ = ["SandboxServer", "main", "serve"]

log = logging.getLogger("virtcontainers.server")

#: How long teardown waits for a control op in progress before stopping the VM anyway.
_LOCK_GRACE = 3.0


class SandboxServer:
    """One sandbox, served. See the module docstring."""

    def __init__(
        self,
        sandbox: Sandbox,
        store: StateStore,
        *,
        ephemeral: bool,
        traceparent: str | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.store = store
        self.ephemeral = ephemeral
        self.traceparent = traceparent  # the starter's span: the parent of the boot's
        sandbox.use_server = False  # this process *is* the server
        sandbox.agent_source = self._agent
        self.metrics = SandboxMetrics(
            sandbox.id, sandbox.info().hypervisor, self._snapshot, self._guest_meminfo
        )
        self._probe: AgentClient | None = None
        self.relay = Relay(self._handle, self.metrics)
        self._lock = asyncio.Lock()
        self._done = asyncio.Event()
        self._ending: str | None = None  # why the VM ends, once we end it ourselves
        self._removed = False
        self._boot: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the agent connection ------------------------------------------------------------

    async def _agent(self) -> AgentClient:
        if not self.relay.connected:
            channel = self.sandbox.agent_channel
            if channel is None:
                raise AgentError(f"sandbox {self.sandbox.id} has no agent channel recorded")
            pair, resync = await connect_channel(channel, timeout=5.0)
            self.relay.attach_upstream(pair, resync=resync)
        return await self.relay.internal_client()

    # -- metrics -----------------------------------------------------------------------------

    def _snapshot(self) -> tuple[str, int, int, int]:
        info = self.sandbox.info()
        return info.state, info.vcpus, info.memory_mb, info.pid

    async def _guest_meminfo(self) -> bytes:
        if self._probe is None:
            self._probe = await self._agent()
        try:
            return await self._probe.read_file("/proc/meminfo", timeout=2.0)
        except BaseException:
            probe, self._probe = self._probe, None
            await probe.close()
            raise

    # -- lifetime --------------------------------------------------------------------------

    async def run(
        self,
        *,
        timeout: float,
        ready_fd: int | None,
        lifeline_fd: int | None,
        adopt: bool = False,
    ) -> int:
        path = socket_path(self.sandbox.run_dir)
        path.unlink(missing_ok=True)
        listener = await asyncio.start_unix_server(self._accept, path=str(path))
        os.chmod(path, 0o600)
        metrics_path = self.sandbox.run_dir / METRICS_SOCKET
        metrics = await serve_http(
            metrics_path, self.metrics.render, allowed=lambda sock: peer_of(sock).allowed
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._spawn, self._terminate(sig.name))
        self.sandbox.set_owner(os.getpid())
        if lifeline_fd is not None:
            self._watch_lifeline(lifeline_fd)
        try:
            code = await self._boot_and_serve(timeout, ready_fd, adopt)
        finally:
            listener.close()
            metrics.close()
            if self._ending is not None:  # the VM ran and ended: vc metrics serve keeps that
                self.metrics.report_end(self.store.root, self._ending)
            self.metrics.close()
            metrics_path.unlink(missing_ok=True)
            await self.relay.close()
            for task in list(self._tasks):
                if task is not asyncio.current_task():
                    task.cancel()
            if not self._removed:
                path.unlink(missing_ok=True)
        return code

    async def _boot_and_serve(self, timeout: float, ready_fd: int | None, adopt: bool) -> int:
        boot = self.sandbox.adopt(min(timeout, 30.0)) if adopt else self.sandbox.start(timeout)
        ids = {"vc.sandbox.id": self.sandbox.id, "vc.driver": self.sandbox.info().hypervisor}
        with (
            attached(self.traceparent),
            operation("server.adopt" if adopt else "server.boot", ids),
        ):
            # The task copies the context: the boot's spans are children of this one.
            self._boot = asyncio.create_task(boot, name="boot")
            await asyncio.wait([self._boot])
        if self._boot.cancelled():  # the ephemeral starter died during boot
            await self._done.wait()
            return 1
        error = self._boot.exception()
        if error is not None:
            log.error("boot failed: %s", error)
            if not isinstance(error, VirtContainersError):
                error = AgentError(f"the sandbox server failed: {error!r}")
            _report(ready_fd, wire.encode_error(error))
            if self.ephemeral and not adopt:
                self._remove_record()
            return 1
        log.info("sandbox %s running (vmm pid %d)", self.sandbox.id, self.sandbox.info().pid)
        _report(ready_fd, wire.encode_result(self.sandbox.info().to_dict()))
        self._spawn(self._watch_vm())
        await self._done.wait()
        return 0

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finish(self) -> None:
        # After the reply in progress has been written (the relay writes it synchronously
        # once the handler returns).
        asyncio.get_running_loop().call_soon(self._done.set)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer.get_extra_info("socket"))
        if not peer.allowed:
            log.warning("refused pid %d: uid %d is neither the owner nor root", peer.pid, peer.uid)
            writer.close()
            return
        self.relay.serve(reader, writer, f"pid{peer.pid}")

    def _watch_lifeline(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)

        def readable() -> None:
            try:
                data = os.read(fd, 64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                return  # the starter never writes; ignore
            loop.remove_reader(fd)
            os.close(fd)
            self._spawn(self._starter_gone())

        loop.add_reader(fd, readable)

    async def _starter_gone(self) -> None:
        """The ephemeral sandbox's starter exited (or was killed): stop at once, remove."""
        if self._ending is not None:  # a stop or remove op is running: let it finish first
            async with self._lock:
                pass
        if self._removed or self._done.is_set():
            return
        log.info("the starter of ephemeral sandbox %s is gone: removing it", self.sandbox.id)
        self._ending = "its client exited"
        if self._boot is not None and not self._boot.done():
            self._boot.cancel()
            await asyncio.wait([self._boot])
        else:
            await self._stop_now(wait_only=False)
        self._remove_record()
        self._done.set()

    async def _terminate(self, signame: str) -> None:
        log.info("%s: stopping sandbox %s", signame, self.sandbox.id)
        self._ending = f"the sandbox server got {signame}"
        if self._boot is not None and not self._boot.done():
            self._boot.cancel()
            await asyncio.wait([self._boot])
        else:
            await self._stop_now(wait_only=True)
        if self.ephemeral:
            self._remove_record()
        self._done.set()

    async def _stop_now(self, *, wait_only: bool) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_LOCK_GRACE):
                await self._lock.acquire()
        try:
            await self.sandbox.stop(wait_only=wait_only)
        except Exception:
            log.exception("stopping sandbox %s", self.sandbox.id)
        finally:
            if self._lock.locked():
                self._lock.release()
        self._record_exit(VmState.STOPPED, self._ending or "stopped", 0)

    async def _watch_vm(self) -> None:
        """Record the VM's end when nobody asked for it (the guest powered off, the VMM
        crashed or was killed), after the console was drained to its end."""
        hv = self.sandbox.hypervisor
        vmm = getattr(hv, "_process", None)  # the driver's own child: knows its exit code
        own = not isinstance(vmm, VmmProcess)
        proc = VmmProcess.adopt(self.sandbox.info().pid) if own else vmm
        assert isinstance(proc, VmmProcess)
        try:
            await proc.wait(None)
            code = proc.returncode
        finally:
            if own:
                proc.close()
        if self._ending is not None:
            return  # a stop we are doing records itself
        self._ending = _reason(code)
        log.info("sandbox %s: the VM ended (%s)", self.sandbox.id, self._ending)
        async with self._lock:
            try:
                await hv.stop_sandbox()  # drains the console to EOF, removes sockets
            except Exception:
                log.exception("cleaning up after the VM of %s", self.sandbox.id)
            # The console is complete now: a panic ends QEMU like a power-off (code 0 after
            # panic=1 and -no-reboot), only the kernel's last words tell them apart.
            self._ending = _panic(self.sandbox.logs()) or self._ending
            self._record_exit(VmState.EXITED, self._ending, code)
        if not self.ephemeral:
            self._done.set()

    def _record_exit(self, state: VmState, reason: str, code: int | None) -> None:
        """Record the VM's end: STOPPED when asked to stop, EXITED when it ended by itself."""
        ended = ExitRecord(reason=reason, time=time.time(), exit_code=code)

        def change(doc: SandboxDocument) -> SandboxDocument:
            return msgspec.structs.replace(
                doc,
                state=state,
                hypervisor=msgspec.structs.replace(doc.hypervisor, pid=0),
                exit=ended,
            )

        with contextlib.suppress(StoreError):
            self.store.update(self.sandbox.id, change)
        self.sandbox.reload()

    def _remove_record(self) -> None:
        try:
            self.store.delete(self.sandbox.id)
        except StoreError as exc:
            log.error("removing sandbox %s: %s", self.sandbox.id, exc)
        self._removed = True

    # -- control ops ---------------------------------------------------------------------

    async def _handle(self, op: str, args: wire.JsonObject) -> object:
        ids = {"vc.sandbox.id": self.sandbox.id, "vc.driver": self.sandbox.info().hypervisor}
        with operation(f"server.{op}", ids):
            return await self._serve_op(op, args)

    async def _serve_op(self, op: str, args: wire.JsonObject) -> object:
        sb = self.sandbox
        if op == "info":
            return {**sb.info().to_dict(), "server_pid": os.getpid()}
        if op == "logs":
            return sb.logs().decode(errors="replace")
        if op == "exec_defaults":
            return _exec_defaults(sb, args)
        if self._ending is not None and op != "remove":
            raise AgentError(f"sandbox {sb.id} is ending ({self._ending})")
        async with self._lock:
            if op == "pause":
                await sb.pause()
                return None
            if op == "resume":
                await sb.resume()
                return None
            if op == "hotplug":
                device = args.get("device")
                if not isinstance(device, dict):
                    raise AgentError("hotplug needs a 'device' object")
                plugged = await sb.hotplug(_hotplug_from_dict(device))
                return _device_to_dict(plugged)
            if op == "resize_vcpus":
                return list(await sb.resize_vcpus(int(str(args.get("vcpus")))))
            if op == "resize_memory":
                return await sb.resize_memory(int(str(args.get("mem_mb"))))
            if op == "save":
                await sb.hypervisor.save_sandbox()
                return None
            if op == "stop":
                self._ending = "stopped on request"
                await sb.stop(wait_only=bool(args.get("wait_only", True)))
                self._record_exit(VmState.STOPPED, self._ending, 0)
                if not self.ephemeral:
                    self._finish()
                return None
            if op == "remove":
                self._ending = self._ending or "removed on request"
                await sb.remove()
                self._removed = True
                self._finish()
                return None
        raise AgentError(f"unknown server op {op!r}")


def _exec_defaults(sb: Sandbox, args: wire.JsonObject) -> dict[str, object]:
    """The image's exec defaults (``images.sandbox_image.exec_defaults``) for a client that
    does not load the sandbox's record (`vc exec`): ``env``/``cwd``/``user`` in, the resolved
    ``env``/``cwd``/``uid``/``gid`` out.

    Raises:
        ConfigError: an argument of the wrong type, or what ``exec_defaults`` refuses.
    """
    raw_env, env = args.get("env"), None
    if raw_env is not None:
        if not isinstance(raw_env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw_env.items()
        ):
            raise ConfigError("exec_defaults: 'env' must map names to strings", field="env")
        env = raw_env
    cwd, user = _optional_str(args, "cwd"), _optional_str(args, "user")
    full, cwd, uid, gid = exec_defaults(sb.image, env, cwd, None, None, user)
    return {"env": full, "cwd": cwd, "uid": uid, "gid": gid, "image": sb.image is not None}


def _optional_str(args: wire.JsonObject, name: str) -> str | None:
    value = args.get(name)
    if value is None or isinstance(value, str):
        return value
    raise ConfigError(f"exec_defaults: {name!r} must be a string", field=name)


def _reason(code: int | None) -> str:
    if code == 0:
        return "the guest powered off"
    if code is None:
        return "the VMM exited"
    if code < 0:
        return f"the VMM was killed by signal {-code}"
    return f"the VMM exited with code {code}"


def _panic(console: bytes) -> str:
    """``the guest kernel panicked (...)`` when the console's tail has the kernel's panic
    line, else ""."""
    for line in reversed(console[-16384:].decode(errors="replace").splitlines()):
        if (at := line.find("Kernel panic - not syncing")) >= 0:
            return f"the guest kernel panicked ({line[at:].strip()})"
    return ""


def _report(fd: int | None, body: bytes) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):  # the starter may be gone (ephemeral: we clean up)
        os.write(fd, body)
    with contextlib.suppress(OSError):
        os.close(fd)


async def serve(
    sandbox_id: str,
    store: StateStore,
    *,
    timeout: float = AGENT_READY_TIMEOUT,
    ready_fd: int | None = None,
    lifeline_fd: int | None = None,
    adopt: bool = False,
    traceparent: str | None = None,
) -> int:
    """Boot and serve sandbox ``sandbox_id`` (recorded, in the created state) until it ends;
    ``adopt``: take over its running VM instead (its previous server died); ``traceparent``:
    the starter's span, the parent of the boot's."""
    try:
        sandbox = await Sandbox.attach(sandbox_id, store=store)
    except VirtContainersError as exc:
        _report(ready_fd, wire.encode_error(exc))
        return 1
    server = SandboxServer(
        sandbox, store, ephemeral=lifeline_fd is not None, traceparent=traceparent
    )
    return await server.run(
        timeout=timeout, ready_fd=ready_fd, lifeline_fd=lifeline_fd, adopt=adopt
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m virtcontainers.server")
    parser.add_argument("sandbox_id")
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("--lifeline-fd", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=AGENT_READY_TIMEOUT)
    parser.add_argument("--adopt", action="store_true", help="take over a running VM")
    args = parser.parse_args(argv)
    for fd in (args.ready_fd, args.lifeline_fd):
        if fd is not None:
            os.set_inheritable(fd, False)  # never into the VMM
    # The starter's choices, inherited: log format, trace file / OTEL exporter, parent span.
    text = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    try:
        logs.configure(level=logging.INFO, text_format=text)
    except VirtContainersError:  # a bad VC_LOG_FORMAT must not keep the VM from booting
        logs.configure("text", level=logging.INFO, text_format=text)
    traceparent = os.environ.pop(TRACEPARENT_ENV, None)  # not into the VMM
    try:
        export.configure(service_name="vc-server")
    except VirtContainersError as exc:
        log.error("tracing stays off: %s", exc)
    sys.exit(
        asyncio.run(
            serve(
                args.sandbox_id,
                StateStore(args.root),
                timeout=args.timeout,
                ready_fd=args.ready_fd,
                lifeline_fd=args.lifeline_fd,
                adopt=args.adopt,
                traceparent=traceparent,
            )
        )
    )
