"""Throughput: sandboxes created, exec'd and destroyed per minute with 1, 2 and 4 workers.

Each worker loops ``Sandbox.create`` + ``start`` + ``exec(["true"])`` + ``remove`` until the
window closes (a cycle begun before it finishes and counts); the rate is cycles over the time
until the last worker finished. Baseline, with as many workers and the same window: the same
QEMU command launched bare to guest init and killed (``bench.qemu_boot.bare_boot``). Per
worker count the two run back to back in a random order.

Usage: .venv/bin/python -m bench.throughput [--window 20]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.qemu_boot import bare_boot, make_config
from bench.sandbox import boot_to_exec
from bench.stats import Figure, balanced_orders, single
from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.guest.image import build_image
from virtcontainers.persist.store import StateStore

WORKERS = (1, 2, 4)


async def per_minute(cycle: Callable[[], Awaitable[None]], workers: int, window_s: float) -> float:
    start = time.perf_counter()
    close = start + window_s
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < close:
            await cycle()
            done += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return done / (time.perf_counter() - start) * 60


async def measure(
    cfg: HypervisorConfig, qemu: str, store: StateStore, window_s: float, rng: random.Random
) -> list[Figure]:
    count = itertools.count()

    async def ours() -> None:
        _, sandbox = await boot_to_exec(store, cfg)
        await sandbox.remove()

    async def bare() -> None:
        await bare_boot(cfg, qemu, next(count))

    figures = []
    for workers, order in zip(WORKERS, balanced_orders(len(WORKERS), rng), strict=True):
        runs = [("ours", ours), ("bare", bare)]
        got = {
            name: await per_minute(fn, workers, window_s)
            for name, fn in (runs if order == "ours-first" else runs[::-1])
        }
        figures.append(
            single(
                f"throughput_{workers}w",
                f"create+exec+destroy per minute, {workers} worker{'s' * (workers > 1)}",
                "per min",
                got["ours"],
                got["bare"],
                "bare QEMU launched to guest init and killed",
                lower_is_better=False,
                note=f"{window_s:.0f} s window; {order}",
            )
        )
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--window", type=float, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    cfg = make_config(build_image("cloud"))
    qemu = str(host.find_binary(["qemu-system-x86_64"]))
    host.accelerator()
    root = Path(tempfile.mkdtemp(prefix="vc-bench-"))
    try:
        store = StateStore(root)
        for figure in await measure(cfg, qemu, store, args.window, random.Random(args.seed)):
            print(figure.line())
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
