"""Density: how many 256 MiB sandboxes run at once here and all answer an exec within 1 s.

Sandboxes are added one at a time (cold boots, then, separately, template clones); after
each addition every running sandbox gets an ``exec(["true"])`` at the same moment, and the
step passes when all answer within 1 s of that moment. The figure is the largest count that
passed. The search is bounded (``--max`` sandboxes and ``--budget`` seconds per kind) so the
whole benchmark stays within its time limit: a count reached at the bound is a lower bound,
and the report says which one stopped it.

Usage: .venv/bin/python -m bench.density [--max 24] [--budget 120]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench.qemu_boot import make_config
from bench.sandbox import boot_to_exec
from bench.stats import Figure, single
from bench.template import clone
from virtcontainers import Sandbox, host
from virtcontainers.config import HypervisorConfig
from virtcontainers.factory import Template
from virtcontainers.guest.image import build_image
from virtcontainers.persist.store import StateStore

MEMORY_MIB = 256
ANSWER_WITHIN_S = 1.0


@dataclass
class Density:
    count: int
    stopped_by: str  # "exec over 1 s", "max", "budget"
    slowest_exec_ms: float


async def all_answer(sandboxes: list[Sandbox]) -> float:
    """Seconds until the last of the sandboxes answered an exec issued to all at once
    (infinity when one failed or none answered within twice the bound)."""
    start = time.perf_counter()

    async def one(sb: Sandbox) -> float:
        result = await sb.exec(["true"])
        if result.exit_code != 0:
            raise RuntimeError(f"exec true in {sb.id}: {result}")
        return time.perf_counter() - start

    try:
        async with asyncio.timeout(ANSWER_WITHIN_S * 2):
            return max(await asyncio.gather(*(one(sb) for sb in sandboxes)))
    except TimeoutError:
        return float("inf")


async def grow(
    make: Callable[[], Awaitable[tuple[float, Sandbox]]], most: int, budget_s: float
) -> Density:
    running: list[Sandbox] = []
    deadline = time.monotonic() + budget_s
    slowest = 0.0
    try:
        while True:
            if len(running) >= most:
                return Density(len(running), "max", slowest * 1000)
            if time.monotonic() > deadline:
                return Density(len(running), "budget", slowest * 1000)
            running.append((await make())[1])
            took = await all_answer(running)
            if took > ANSWER_WITHIN_S:
                return Density(len(running) - 1, "exec over 1 s", slowest * 1000)
            slowest = took
    finally:
        await asyncio.gather(*(sb.remove() for sb in running), return_exceptions=True)


async def measure(cfg: HypervisorConfig, store: StateStore, most: int, budget_s: float) -> Figure:
    cfg = cfg.copy()
    cfg.resources.memory_size = MEMORY_MIB
    cold = await grow(lambda: boot_to_exec(store, cfg), most, budget_s)
    template = await Template.create(cfg)
    try:
        cloned = await grow(lambda: clone(store, template), most, budget_s)
    finally:
        template.remove()
    return single(
        "density",
        f"{MEMORY_MIB} MiB sandboxes at once, all exec within 1 s (clones)",
        "sandboxes",
        cloned.count,
        cold.count,
        "cold-booted sandboxes, same test",
        lower_is_better=False,
        note=(
            f"clones stopped by: {cloned.stopped_by} (slowest passing exec "
            f"{cloned.slowest_exec_ms:.0f} ms); cold stopped by: {cold.stopped_by} "
            f"({cold.slowest_exec_ms:.0f} ms); bound {most} sandboxes, {budget_s:.0f} s per kind"
        ),
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--max", type=int, default=24)
    parser.add_argument("--budget", type=float, default=120)
    args = parser.parse_args()
    cfg = make_config(build_image("cloud"))
    host.accelerator()
    root = Path(tempfile.mkdtemp(prefix="vc-bench-"))
    try:
        print((await measure(cfg, StateStore(root), args.max, args.budget)).line())
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
