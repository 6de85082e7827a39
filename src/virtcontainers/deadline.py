"""Readiness by deadline: one monotonic :class:`Deadline` and one :func:`poll_until` loop.

Every "wait until the socket answers / the file appears / the migration completes" in the
drivers is the same loop: try, stop early when an ``abort`` future (e.g. "the VMM exited")
has finished, give up at the deadline, sleep a little, try again. The deadline carries the
limit it was made from so a timeout error can name it (a remaining-time figure would read
"did not finish within 0 s").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from virtcontainers.errors import HypervisorTimeout

__all__ = ["Deadline", "poll_until"]

T = TypeVar("T")


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock, and the limit (seconds) it was set from."""

    at: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        """The deadline ``seconds`` from now."""
        return cls(time.monotonic() + seconds, seconds)

    def remaining(self, floor: float = 0.0) -> float:
        """Seconds left, at least ``floor`` (a late request still gets a moment for its reply)."""
        return max(floor, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def missed(
        self, operation: str, *, driver: str = "", sandbox_id: str = ""
    ) -> HypervisorTimeout:
        """The error for ``operation`` not done by this deadline (names the limit)."""
        return HypervisorTimeout(operation, self.seconds, driver=driver, sandbox_id=sandbox_id)


async def poll_until(
    deadline: Deadline,
    probe: Callable[[], Awaitable[T | None]],
    *,
    on_timeout: Callable[[], BaseException],
    abort: asyncio.Future[None] | None = None,
    interval: float = 0.01,
) -> T:
    """Await ``probe()`` until it returns something other than ``None``, and return that.

    ``probe`` raising ends the wait with its exception (catch what means "not yet" inside
    it). Between attempts: when ``abort`` is done, its exception is raised; when
    ``deadline`` has passed, ``on_timeout()`` is raised; otherwise sleep ``interval`` seconds.

    Raises:
        whatever ``probe`` or ``abort`` raise, and ``on_timeout()`` at the deadline.
    """
    while True:
        got = await probe()
        if got is not None:
            return got
        if abort is not None and abort.done():
            abort.result()
        if deadline.expired:
            raise on_timeout()
        await asyncio.sleep(min(interval, deadline.remaining()))
