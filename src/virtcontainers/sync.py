"""A blocking facade over :class:`~virtcontainers.sandbox.Sandbox` for scripts and REPLs.

Each facade runs the async core on its own private event-loop thread, so blocking calls
never nest ``asyncio.run`` and one sandbox's connections stay on one loop::

    with SyncSandbox.create(config) as sb:
        print(sb.exec(["uname", "-r"]).stdout)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

from virtcontainers.agent.client import ExecResult
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import ColdPlugDevice, HotplugDevice
from virtcontainers.hypervisor import HypervisorType
from virtcontainers.images.store import StoredImage
from virtcontainers.network import NetworkSpec
from virtcontainers.persist.store import StateStore
from virtcontainers.sandbox import Sandbox, SandboxInfo

__all__ = ["SyncSandbox"]

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vc-sync", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[object, object, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class SyncSandbox:
    """Blocking twin of :class:`Sandbox`: same methods, same errors."""

    def __init__(self, loop: _LoopThread, sandbox: Sandbox, *, server: bool = False) -> None:
        self._loop = loop
        self._sandbox = sandbox
        self._server = server

    @classmethod
    def create(
        cls,
        config: HypervisorConfig,
        *,
        id: str | None = None,
        hypervisor: HypervisorType | str = HypervisorType.QEMU,
        devices: Sequence[ColdPlugDevice] = (),
        store: StateStore | None = None,
        server: bool = False,
        network: NetworkSpec | None = None,
        image: str | StoredImage | None = None,
        disk_size_mb: int = 0,
    ) -> SyncSandbox:
        """Record a new sandbox; ``server``: ``with`` starts it in an ephemeral sandbox
        server (removed when this process ends, however it ends) instead of in-process.
        ``image``: an OCI image to run in (see :meth:`Sandbox.create`)."""
        loop = _LoopThread()
        try:
            sandbox = loop.run(
                Sandbox.create(
                    config,
                    id=id,
                    hypervisor=hypervisor,
                    devices=devices,
                    store=store,
                    network=network,
                    image=image,
                    disk_size_mb=disk_size_mb,
                )
            )
        except BaseException:
            loop.close()
            raise
        return cls(loop, sandbox, server=server)

    @classmethod
    def attach(cls, id: str, *, store: StateStore | None = None) -> SyncSandbox:
        loop = _LoopThread()
        try:
            sandbox = loop.run(Sandbox.attach(id, store=store))
        except BaseException:
            loop.close()
            raise
        return cls(loop, sandbox)

    @property
    def id(self) -> str:
        return self._sandbox.id

    def info(self) -> SandboxInfo:
        return self._sandbox.info()

    def start(
        self, timeout: float = 60.0, *, server: bool = False, ephemeral: bool = False
    ) -> None:
        """See :meth:`Sandbox.start`."""
        self._loop.run(self._sandbox.start(timeout, server=server, ephemeral=ephemeral))

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        user: str | None = None,
    ) -> ExecResult:
        return self._loop.run(
            self._sandbox.exec(
                argv,
                env=env,
                cwd=cwd,
                uid=uid,
                gid=gid,
                stdin=stdin,
                timeout=timeout,
                user=user,
            )
        )

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._loop.run(self._sandbox.write_file(path, data, mode))

    def read_file(self, path: str) -> bytes:
        return self._loop.run(self._sandbox.read_file(path))

    def pause(self) -> None:
        self._loop.run(self._sandbox.pause())

    def resume(self) -> None:
        self._loop.run(self._sandbox.resume())

    def hotplug(self, device: HotplugDevice) -> HotplugDevice:
        return self._loop.run(self._sandbox.hotplug(device))

    def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        return self._loop.run(self._sandbox.resize_vcpus(vcpus))

    def resize_memory(self, mem_mb: int) -> int:
        return self._loop.run(self._sandbox.resize_memory(mem_mb))

    def logs(self) -> bytes:
        return self._sandbox.logs()

    def stop(self, wait_only: bool = True) -> None:
        self._loop.run(self._sandbox.stop(wait_only))

    def remove(self) -> None:
        self._loop.run(self._sandbox.remove())

    def close(self) -> None:
        """Release connections and the loop thread; the sandbox keeps running."""
        try:
            self._loop.run(self._sandbox.close())
        finally:
            self._loop.close()

    def __enter__(self) -> SyncSandbox:
        if self.info().state == "created":
            self.start(server=self._server, ephemeral=self._server)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.remove()
        finally:
            self._loop.close()
