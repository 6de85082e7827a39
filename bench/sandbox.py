"""Sandbox latency: boot to first exec, exec round trip, stop with complete logs.

Measured in one run on the same kernel and initrd:

* **start to first exec** — ``Sandbox.create`` + ``start`` + ``exec(["true"])``, against the
  baseline of the same QEMU command started bare until the guest prints ``vc-init: ready``
  (``qemu_boot.bare_boot``); pairs in alternating order, median ratio (target <= 1.10).
* **agent start** — host arrival of the agent's "ready" console line after init's (the
  agent must be ready within ~150 ms of init under TCG).
* **exec round trip** of ``true`` through the agent, median of N (target <= 30 ms under TCG).
* **stop** — ``Sandbox.stop()``: agent shutdown, guest power-off, VMM exit, console drained;
  checked to end with the kernel's power-down line (target <= 150 ms).

Usage: .venv/bin/python bench/sandbox.py [--pairs 10] [--execs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from qemu_boot import bare_boot, make_config  # type: ignore[import-not-found]
from virtcontainers import Sandbox, host
from virtcontainers.guest.image import build_image
from virtcontainers.persist.store import StateStore


class _Marks(logging.Handler):
    """Host arrival time of the guest's init-ready and agent-ready console lines."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        for mark in ("vc-init: ready", "vc-agent: ready"):
            if mark in record.getMessage():
                self.seen.setdefault(mark, time.perf_counter())


MARKS = _Marks()
_console_log = logging.getLogger("virtcontainers.console")
_console_log.setLevel(logging.DEBUG)
_console_log.addHandler(MARKS)
_console_log.propagate = False


async def boot_to_exec(store: StateStore, cfg: object) -> tuple[float, Sandbox]:
    MARKS.seen.clear()
    start = time.perf_counter()
    sandbox = await Sandbox.create(cfg, store=store)  # type: ignore[arg-type]
    try:
        await sandbox.start()
        result = await sandbox.exec(["true"])
        elapsed = time.perf_counter() - start
        assert result.exit_code == 0
    except BaseException:
        await sandbox.remove()  # never leave a VM running behind a failed measurement
        raise
    return elapsed, sandbox


async def timed_stop(sandbox: Sandbox) -> float:
    start = time.perf_counter()
    await sandbox.stop()
    elapsed = time.perf_counter() - start
    log = sandbox.logs().decode(errors="replace").rstrip().splitlines()
    assert "reboot: Power down" in log[-1], log[-3:]
    await sandbox.remove()
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--execs", type=int, default=200)
    args = parser.parse_args()

    image = build_image("cloud")
    cfg = make_config(image)
    qemu = str(host.find_binary(["qemu-system-x86_64"]))
    host.accelerator()
    root = Path(tempfile.mkdtemp(prefix="vc-bench-"))
    try:
        await measure(args, cfg, qemu, StateStore(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def measure(args: argparse.Namespace, cfg: object, qemu: str, store: StateStore) -> None:

    _, warm = await boot_to_exec(store, cfg)
    await timed_stop(warm)

    ratios, ours, bare, stops, agent_after_init = [], [], [], [], []
    for i in range(args.pairs):
        if i % 2:
            b = await bare_boot(cfg, qemu, i)
            o, sandbox = await boot_to_exec(store, cfg)
        else:
            o, sandbox = await boot_to_exec(store, cfg)
            b = await bare_boot(cfg, qemu, i)
        agent_after_init.append(MARKS.seen["vc-agent: ready"] - MARKS.seen["vc-init: ready"])
        stops.append(await timed_stop(sandbox))
        ours.append(o)
        bare.append(b)
        ratios.append(o / b)
        print(f"pair {i + 1:2d}: bare boot {b * 1000:7.1f} ms  start->exec {o * 1000:7.1f} ms  "
              f"ratio {o / b:5.3f}  stop {stops[-1] * 1000:6.1f} ms")  # fmt: skip

    _, sandbox = await boot_to_exec(store, cfg)
    rtts = []
    for _ in range(args.execs):
        t = time.perf_counter()
        await sandbox.exec(["true"])
        rtts.append(time.perf_counter() - t)
    await timed_stop(sandbox)

    summary = {
        "accelerator": host.accelerator(),
        "pairs": args.pairs,
        "bare_boot_to_init_median_ms": round(statistics.median(bare) * 1000, 1),
        "start_to_first_exec_median_ms": round(statistics.median(ours) * 1000, 1),
        "start_to_first_exec_ratio_median": round(statistics.median(ratios), 3),
        "agent_ready_after_init_median_ms": round(statistics.median(agent_after_init) * 1000, 1),
        "exec_true_rtt_median_ms": round(statistics.median(rtts) * 1000, 2),
        "exec_true_rtt_p90_ms": round(statistics.quantiles(rtts, n=10)[-1] * 1000, 2),
        "stop_median_ms": round(statistics.median(stops) * 1000, 1),
        "targets": {"ratio": 1.10, "exec_rtt_ms": 30, "stop_ms": 150},
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
