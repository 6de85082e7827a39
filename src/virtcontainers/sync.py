"""A blocking facade over :class:`~virtcontainers.sandbox.Sandbox` for scripts and REPLs.

Each facade runs the async core on its own private event-loop thread, so blocking calls
never nest ``asyncio.run`` and one sandbox's connections stay on one loop::

    with SyncSandbox.create(config) as sb:
        print(sb.exec(["uname", "-r"]).stdout)

Its methods are :class:`Sandbox`'s, made blocking, with the same signatures (by
construction: a new argument of :meth:`Sandbox.create` is one of ``SyncSandbox.create``).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Concatenate, ParamSpec, TypeVar

from virtcontainers.lifecycle import VmState
from virtcontainers.sandbox import Sandbox, SandboxInfo

__all__ = ["SyncSandbox"]

T = TypeVar("T")
P = ParamSpec("P")


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


def _blocking(
    method: Callable[Concatenate[Sandbox, P], Coroutine[object, object, T]],
) -> Callable[Concatenate[SyncSandbox, P], T]:
    """``method`` of :class:`Sandbox`, run to completion on the facade's loop thread."""

    @functools.wraps(method)
    def blocking(self: SyncSandbox, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._loop.run(method(self._sandbox, *args, **kwargs))

    return blocking


def _blocking_opener(
    opener: Callable[P, Coroutine[object, object, Sandbox]],
) -> Callable[P, SyncSandbox]:
    """``opener`` (:meth:`Sandbox.create`, :meth:`Sandbox.attach`), its sandbox handed to a
    facade with a loop thread of its own."""

    @functools.wraps(opener)
    def open_blocking(*args: P.args, **kwargs: P.kwargs) -> SyncSandbox:
        return SyncSandbox._on_new_loop(opener(*args, **kwargs))

    return open_blocking


class SyncSandbox:
    """Blocking twin of :class:`Sandbox`: same methods, same errors."""

    def __init__(self, loop: _LoopThread, sandbox: Sandbox) -> None:
        self._loop = loop
        self._sandbox = sandbox

    @classmethod
    def _on_new_loop(cls, opening: Coroutine[object, object, Sandbox]) -> SyncSandbox:
        loop = _LoopThread()
        try:
            sandbox = loop.run(opening)
        except BaseException:
            loop.close()
            raise
        return cls(loop, sandbox)

    @property
    def id(self) -> str:
        return self._sandbox.id

    def info(self) -> SandboxInfo:
        return self._sandbox.info()

    def logs(self) -> bytes:
        return self._sandbox.logs()

    # The blocking twins: same arguments, same documentation, same errors.
    create = staticmethod(_blocking_opener(Sandbox.create))
    attach = staticmethod(_blocking_opener(Sandbox.attach))
    start = _blocking(Sandbox.start)
    exec = _blocking(Sandbox.exec)
    write_file = _blocking(Sandbox.write_file)
    read_file = _blocking(Sandbox.read_file)
    pause = _blocking(Sandbox.pause)
    resume = _blocking(Sandbox.resume)
    hotplug = _blocking(Sandbox.hotplug)
    resize_vcpus = _blocking(Sandbox.resize_vcpus)
    resize_memory = _blocking(Sandbox.resize_memory)
    stop = _blocking(Sandbox.stop)
    remove = _blocking(Sandbox.remove)

    def close(self) -> None:
        """Release connections and the loop thread; the sandbox keeps running."""
        try:
            self._loop.run(self._sandbox.close())
        finally:
            self._loop.close()

    def __enter__(self) -> SyncSandbox:
        """Starts the sandbox in this process if it is still created (to run it in a sandbox
        server instead, call ``start(server=True, ephemeral=True)`` first); ``__exit__``
        removes it."""
        if self.info().state is VmState.CREATED:
            self.start()
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
