"""Cold start to guest init: virtcontainers' QEMU driver vs the same QEMU started bare.

Each pair boots the same kernel and initrd with the same QEMU command line twice: once bare
(the console chardev on stdio, timed until ``vc-init: ready`` appears on its stdout) and once
through ``QemuHypervisor`` (create + start, timed until the console watcher logs the same
line), in a balanced random order (``bench.stats``). The ratio is the driver's own overhead.
Reported: the median of the per-pair ratios and the CPU time of *this* process per
create+start+stop (QEMU itself is excluded).

Usage: .venv/bin/python -m bench.qemu_boot [--pairs 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from bench.stats import Figure, from_pairs, run_pairs
from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.drivers.qemu.argv import QemuPaths, build_argv
from virtcontainers.guest.image import GuestImage, build_image
from virtcontainers.hypervisor import NetworkNamespace

READY = "vc-init: ready"


def make_config(image: GuestImage, memory: int = 512) -> HypervisorConfig:
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = str(image.kernel)
    cfg.boot.initrd_path = str(image.initrd)
    cfg.resources.memory_size = memory
    cfg.valid()
    return cfg


def bare_argv(cfg: HypervisorConfig, qemu: str, name: str, run_dir: Path) -> list[str]:
    """The driver's own QEMU command line with the console on stdio instead of our watcher's
    socket; nothing else changes (its QMP and agent sockets stay in ``run_dir``)."""
    argv = build_argv(
        cfg,
        binary=qemu,
        sandbox_id=name,
        uuid=str(uuid.uuid4()),
        paths=QemuPaths(run_dir),
        accel=host.accelerator(),
        host_memory_mb=host.host_memory_kib() // 1024,
    )
    i = argv.index(f"socket,id=console,path={run_dir / 'console.sock'},server=on,wait=on")
    argv[i] = "stdio,id=console"
    return argv


class BareQemu:
    """A QEMU started bare from :func:`bare_argv`, its console read from stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, run_dir: Path) -> None:
        self.proc = proc
        self.run_dir = run_dir
        self.console = bytearray()

    @property
    def qmp_path(self) -> Path:
        return self.run_dir / "qmp.sock"

    async def wait_for(self, text: str, timeout: float = 120.0) -> None:
        """Read the console until ``text`` appears. Raises RuntimeError if QEMU exits first."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while text.encode() not in self.console:
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"bare QEMU exited before {text!r}: {self.console[-500:]!r}")
                self.console += line


@contextlib.asynccontextmanager
async def bare_qemu(
    cfg: HypervisorConfig, qemu: str, name: str, extra: Sequence[str] = ()
) -> AsyncIterator[BareQemu]:
    """Launch the bare QEMU (plus ``extra`` arguments); kill it and remove its run dir after."""
    run_dir = Path(tempfile.mkdtemp(prefix="vc-bench-bare-"))
    argv = [*bare_argv(cfg, qemu, name, run_dir), *extra]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
    )
    try:
        yield BareQemu(proc, run_dir)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        shutil.rmtree(run_dir, ignore_errors=True)


async def bare_boot(cfg: HypervisorConfig, qemu: str, n: int) -> float:
    """Seconds from launching the bare QEMU to the guest's ``vc-init: ready``."""
    start = time.perf_counter()
    async with bare_qemu(cfg, qemu, f"bare{n}") as vm:
        await vm.wait_for(READY)
        return time.perf_counter() - start


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


async def measure(cfg: HypervisorConfig, qemu: str, pairs: int, rng: random.Random) -> Figure:
    """The driver's cold start to guest init against the same QEMU command bare."""
    await driver_boot(cfg, -1)  # warm caches (page cache, imports)
    count = iter(range(10**6))

    async def ours() -> float:
        return (await driver_boot(cfg, next(count)))[0] * 1000

    async def bare() -> float:
        return await bare_boot(cfg, qemu, next(count)) * 1000

    got, base, orders = await run_pairs(pairs, rng, ours, bare)
    return from_pairs(
        "driver_start_to_init",
        "driver create+start to guest init",
        "ms",
        got,
        base,
        orders,
        "same QEMU command bare, to init",
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    cfg = make_config(build_image("cloud"))
    qemu = str(host.find_binary(["qemu-system-x86_64"]))
    host.accelerator()  # probe once, outside the measurements
    figure = await measure(cfg, qemu, args.pairs, random.Random(args.seed))
    print(figure.line())
    print(json.dumps(figure.to_dict(), indent=2))


if __name__ == "__main__":
    asyncio.run(main())
