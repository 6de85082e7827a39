"""Cold start to guest init: virtcontainers' QEMU driver vs the same QEMU started bare.

Each pair boots the same kernel and initrd with the same QEMU command line twice, in
alternating order: once bare (the console chardev on stdio, timed until ``vc-init: ready``
appears on its stdout) and once through ``QemuHypervisor`` (create + start, timed until the
console watcher logs the same line). The ratio is the driver's own overhead.
Reported: the median of the per-pair ratios (target <= 1.05) and the CPU time of *this*
process per create+start+stop (target <= 50 ms; QEMU itself is excluded).

Usage: .venv/bin/python bench/qemu_boot.py [--pairs 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.drivers.qemu.argv import QemuPaths, build_argv
from virtcontainers.guest.image import GuestImage, build_image
from virtcontainers.hypervisor import NetworkNamespace

READY = "vc-init: ready"


def make_config(image: GuestImage) -> HypervisorConfig:
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = str(image.kernel)
    cfg.boot.initrd_path = str(image.initrd)
    cfg.resources.memory_size = 512
    cfg.valid()
    return cfg


async def bare_boot(cfg: HypervisorConfig, qemu: str, n: int) -> float:
    """The driver's own QEMU command line, started bare: the console goes to stdio instead
    of our watcher's socket, nothing else changes (QMP and agent sockets stay, unused)."""
    run_dir = Path(tempfile.mkdtemp(prefix="vc-bench-bare-"))
    argv = build_argv(
        cfg,
        binary=qemu,
        sandbox_id=f"bare{n}",
        uuid=str(uuid.uuid4()),
        paths=QemuPaths(run_dir),
        accel=host.accelerator(),
        host_memory_mb=host.host_memory_kib() // 1024,
    )
    i = argv.index(f"socket,id=console,path={run_dir / 'console.sock'},server=on,wait=on")
    argv[i] = "stdio,id=console"
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        while line := await proc.stdout.readline():
            if READY.encode() in line:
                return time.perf_counter() - start
        raise RuntimeError("bare QEMU exited before the guest reached init")
    finally:
        proc.kill()
        await proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)


class _ReadyHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if READY in record.getMessage():
            self.seen.set()


async def driver_boot(cfg: HypervisorConfig, n: int) -> tuple[float, float]:
    """Returns (seconds to guest init, CPU seconds of this process for create+start+stop)."""
    handler = _ReadyHandler()
    console_log = logging.getLogger(f"virtcontainers.console.bench{n}")
    console_log.setLevel(logging.DEBUG)
    console_log.addHandler(handler)
    hv = QemuHypervisor()
    cpu0 = time.process_time()
    start = time.perf_counter()
    await hv.create_sandbox(f"bench{n}", NetworkNamespace(), cfg)
    try:
        await hv.start_sandbox(timeout=60)
        cpu_start = time.process_time() - cpu0
        await asyncio.wait_for(handler.seen.wait(), 60)
        elapsed = time.perf_counter() - start
        cpu1 = time.process_time()
    finally:
        await hv.stop_sandbox()
    cpu_stop = time.process_time() - cpu1
    await hv.cleanup()
    console_log.removeHandler(handler)
    return elapsed, cpu_start + cpu_stop


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    image = build_image("cloud")
    cfg = make_config(image)
    qemu = str(host.find_binary(["qemu-system-x86_64"]))
    host.accelerator()  # probe once, outside the measurements
    await driver_boot(cfg, -1)  # warm caches (page cache, imports)

    bare, ours, cpu, ratios = [], [], [], []
    for i in range(args.pairs):
        if i % 2:
            b = await bare_boot(cfg, qemu, i)
            o, c = await driver_boot(cfg, i)
        else:
            o, c = await driver_boot(cfg, i)
            b = await bare_boot(cfg, qemu, i)
        bare.append(b)
        ours.append(o)
        cpu.append(c)
        ratios.append(o / b)
        if not args.json:
            print(f"pair {i + 1:2d}: bare {b * 1000:7.1f} ms  driver {o * 1000:7.1f} ms  "
                  f"ratio {o / b:5.3f}  our CPU {c * 1000:5.1f} ms")  # fmt: skip
    summary = {
        "pairs": args.pairs,
        "accelerator": host.accelerator(),
        "bare_median_ms": round(statistics.median(bare) * 1000, 1),
        "driver_median_ms": round(statistics.median(ours) * 1000, 1),
        "median_ratio": round(statistics.median(ratios), 3),
        "cpu_ms_per_create_start_stop_median": round(statistics.median(cpu) * 1000, 1),
        "targets": {"median_ratio": 1.05, "cpu_ms": 50},
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
