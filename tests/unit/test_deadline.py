"""poll_until: returns the probe's answer, ends early on abort, names the limit on timeout."""

from __future__ import annotations

import asyncio

import pytest

from virtcontainers.deadline import Deadline, poll_until
from virtcontainers.errors import HypervisorTimeout, LaunchError


async def test_returns_the_first_answer() -> None:
    calls: list[int] = []

    async def probe() -> str | None:
        calls.append(1)
        return "ready" if len(calls) == 3 else None

    got = await poll_until(
        Deadline.after(10), probe, on_timeout=lambda: HypervisorTimeout("x", 10), interval=0
    )
    assert got == "ready"
    assert len(calls) == 3


async def test_timeout_names_the_limit_not_what_is_left() -> None:
    async def never() -> None:
        return None

    with pytest.raises(HypervisorTimeout) as info:
        await poll_until(
            Deadline.after(0.05),
            never,
            on_timeout=lambda: HypervisorTimeout("waiting", 0.05),
        )
    assert info.value.seconds == 0.05
    assert "within 0.05 s" in str(info.value)


async def test_abort_ends_the_wait_with_its_exception() -> None:
    loop = asyncio.get_running_loop()
    abort: asyncio.Future[None] = loop.create_future()
    abort.set_exception(LaunchError("vmm exited", exit_code=1, argv=["vmm"], log_tail=""))

    async def never() -> None:
        return None

    with pytest.raises(LaunchError, match="vmm exited"):
        await poll_until(
            Deadline.after(30), never, abort=abort, on_timeout=lambda: HypervisorTimeout("x", 30)
        )


async def test_probe_errors_propagate() -> None:
    async def broken() -> None:
        raise LaunchError("gone", exit_code=2, argv=[], log_tail="")

    with pytest.raises(LaunchError, match="gone"):
        await poll_until(Deadline.after(30), broken, on_timeout=lambda: HypervisorTimeout("x", 1))


def test_deadline_remaining_has_a_floor() -> None:
    past = Deadline(0.0, 5.0)
    assert past.expired
    assert past.remaining() == 0.0
    assert past.remaining(0.1) == 0.1
