"""agent/attach.py against the real agent (run on the host): the follow loop both front
ends use (`vc run`/`vc exec` direct, the OCI relay) and its stdin copier."""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import random
import signal
import threading
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest

from tests.unit.test_agent_client import agent_binary, start_agent  # noqa: F401
from virtcontainers.agent.attach import feed, follow_process
from virtcontainers.agent.client import AgentClient, Stream
from virtcontainers.errors import AgentError


@pytest.fixture
async def client(agent_binary: Path, tmp_path: Path) -> AsyncIterator[AgentClient]:  # noqa: F811
    for agent in start_agent(agent_binary, tmp_path):
        c = await AgentClient.connect_unix(agent.sock, timeout=20)
        try:
            yield c
        finally:
            await c.close()


def _collector() -> tuple[dict[Stream, bytearray], functools.partial[None]]:
    out: dict[Stream, bytearray] = {Stream.STDOUT: bytearray(), Stream.STDERR: bytearray()}

    def write(into: dict[Stream, bytearray], stream: Stream, data: bytes) -> None:
        into[stream] += data

    return out, functools.partial(write, out)


async def test_feed_copies_a_regular_file_to_stdin_and_closes_it(
    client: AgentClient, tmp_path: Path
) -> None:
    data = random.Random(3).randbytes(200_000)
    source = tmp_path / "stdin"
    source.write_bytes(data)
    out, write = _collector()
    fd = os.open(source, os.O_RDONLY)
    try:
        proc = await client.exec_stream(["cat"])
        async with asyncio.timeout(60):  # a stdin never closed would hang `cat`
            code = await follow_process(
                proc, write, signals={}, feed=functools.partial(feed, proc, fd)
            )
    finally:
        os.close(fd)
    assert code == 0
    assert bytes(out[Stream.STDOUT]) == data  # all of it, and cat saw the end (it exited)


async def test_feed_copies_a_pipe_until_its_writer_closes(client: AgentClient) -> None:
    chunks = [b"first\n", b"second\n", b"x" * 100_000]
    r, w = os.pipe()

    def writer() -> None:
        with os.fdopen(w, "wb", buffering=0) as pipe:
            for chunk in chunks:
                pipe.write(chunk)

    out, write = _collector()
    proc = await client.exec_stream(["cat"])
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        async with asyncio.timeout(60):  # a stdin never closed would hang `cat`
            code = await follow_process(
                proc, write, signals={}, feed=functools.partial(feed, proc, r)
            )
    finally:
        thread.join()
        os.close(r)
    assert code == 0
    assert bytes(out[Stream.STDOUT]) == b"".join(chunks)


async def test_without_a_feed_stdin_is_closed_at_once(client: AgentClient) -> None:
    out, write = _collector()
    proc = await client.exec_stream(["sh", "-c", "cat; echo after >&2"])
    assert await follow_process(proc, write, signals={}, feed=None) == 0
    assert (bytes(out[Stream.STDOUT]), bytes(out[Stream.STDERR])) == (b"", b"after\n")


async def test_signals_become_requests_a_failing_one_is_dropped_and_handlers_go(
    client: AgentClient,
) -> None:
    proc = await client.exec_stream(["sleep", "30"])

    async def refused() -> None:
        raise AgentError("the agent refused (as when the process just ended)")

    def failing() -> Awaitable[None]:
        return refused()

    def terminate() -> Awaitable[None]:
        return proc.signal(signal.SIGTERM)

    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    # The failing request first: it is dropped (not reported as a task exception that was
    # never retrieved), and the loop goes on to deliver the second.
    timers = [
        loop.call_later(0.2, os.kill, os.getpid(), signal.SIGUSR2),
        loop.call_later(0.4, os.kill, os.getpid(), signal.SIGUSR1),
    ]
    _, write = _collector()
    try:
        code = await follow_process(
            proc,
            write,
            signals={signal.SIGUSR2: failing, signal.SIGUSR1: terminate},
            feed=None,
        )
        gc.collect()  # an unretrieved task exception is reported when its task is collected
    finally:
        for timer in timers:  # never a signal without its handler: it would end pytest
            timer.cancel()
        loop.set_exception_handler(None)
    assert code == 128 + signal.SIGTERM
    assert reported == []
    # Both handlers were removed on the way out (nothing left to remove).
    assert not loop.remove_signal_handler(signal.SIGUSR1)
    assert not loop.remove_signal_handler(signal.SIGUSR2)
