"""The floor: the same QEMU command driven directly with ``qemu.qmp``, nothing of ours between.

What any Python tool driving QEMU must pay at least: launch, guest init on the console,
QMP ``stop``/``cont``, the device state to a file descriptor (``getfd`` + ``migrate fd:``),
a restore into a ``-incoming defer`` QEMU, and ``quit``. The runner uses it both as a peer
and as the baseline of the stop, pause/resume and CPU figures.

Usage: .venv/bin/python -m bench.floor
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from qemu.qmp import QMPClient

from bench.qemu_boot import READY, BareQemu, bare_qemu, make_config
from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.deadline import Deadline, poll_until
from virtcontainers.drivers.qemu.qmp import as_dict
from virtcontainers.guest.image import build_image


@contextlib.asynccontextmanager
async def qmp_of(vm: BareQemu) -> AsyncIterator[QMPClient]:
    async def bound() -> bool | None:  # QEMU binds it before the guest runs
        return True if vm.qmp_path.exists() else None

    await poll_until(
        Deadline.after(30), bound, on_timeout=lambda: RuntimeError("no QMP socket in 30 s")
    )
    client = QMPClient("bench-floor")
    await client.connect(str(vm.qmp_path))
    try:
        yield client
    finally:
        with contextlib.suppress(EOFError, ConnectionError):  # after quit: QEMU hung up first
            await client.disconnect()


async def quit_and_wait(vm: BareQemu, qmp: QMPClient) -> float:
    """Seconds from QMP ``quit`` to QEMU's exit."""
    start = time.perf_counter()
    with contextlib.suppress(Exception):  # QEMU may drop the socket before it answers
        await qmp.execute("quit")
    await asyncio.wait_for(vm.proc.wait(), 30)
    return time.perf_counter() - start


async def lifecycle(cfg: HypervisorConfig, qemu: str, n: int) -> dict[str, float]:
    """Launch to guest init, then ``quit``: wall ms of each, and this process's CPU ms for the
    whole (the floor of our CPU per lifecycle)."""
    cpu0 = time.process_time()
    start = time.perf_counter()
    async with bare_qemu(cfg, qemu, f"floor{n}") as vm:
        await vm.wait_for(READY)
        boot = time.perf_counter() - start
        async with qmp_of(vm) as qmp:
            stop = await quit_and_wait(vm, qmp)
    return {
        "boot_ms": boot * 1000,
        "stop_ms": stop * 1000,
        "cpu_ms": (time.process_time() - cpu0) * 1000,
    }


async def _migration_done(qmp: QMPClient) -> None:
    async def completed() -> bool | None:
        status = as_dict(await qmp.execute("query-migrate")).get("status")
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"migration {status}")
        return True if status == "completed" else None

    await poll_until(
        Deadline.after(120),
        completed,
        on_timeout=lambda: RuntimeError("migration not done in 120 s"),
        interval=0.005,
    )


async def _give_fd(qmp: QMPClient, fd: int, name: str) -> None:
    try:
        qmp.send_fd_scm(fd)
        await qmp.execute("getfd", {"fdname": name})
    finally:
        os.close(fd)


async def save_to(qmp: QMPClient, path: Path) -> float:
    """Seconds to migrate a paused VM's device state and RAM into ``path`` (a descriptor we
    open and pass with ``getfd``, as our driver does)."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    await _give_fd(qmp, fd, "migfile")
    await qmp.execute("migrate", {"uri": "fd:migfile"})
    await _migration_done(qmp)
    return time.perf_counter() - start


async def operations(cfg: HypervisorConfig, qemu: str) -> dict[str, float]:
    """One round of the peer operations, wall ms each: boot to init, pause, resume, save
    (from paused: device state + RAM to a file), restore (into a new ``-incoming defer`` QEMU, to
    running), stop (``quit`` to exit)."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vc-bench-floor-") as tmp:
        state = Path(tmp) / "vm.state"
        start = time.perf_counter()
        async with bare_qemu(cfg, qemu, "floor-ops") as vm:
            await vm.wait_for(READY)
            out["start_ms"] = (time.perf_counter() - start) * 1000
            async with qmp_of(vm) as qmp:
                t = time.perf_counter()
                await qmp.execute("stop")
                out["pause_ms"] = (time.perf_counter() - t) * 1000
                t = time.perf_counter()
                await qmp.execute("cont")
                out["resume_ms"] = (time.perf_counter() - t) * 1000
                await qmp.execute("stop")
                out["save_ms"] = await save_to(qmp, state) * 1000
                await quit_and_wait(vm, qmp)
        t = time.perf_counter()
        restoring = bare_qemu(cfg, qemu, "floor-restore", ["-incoming", "defer"])
        async with restoring as vm, qmp_of(vm) as qmp:
            await _give_fd(qmp, os.open(state, os.O_RDONLY | os.O_CLOEXEC), "migin")
            await qmp.execute("migrate-incoming", {"uri": "fd:migin"})
            await _migration_done(qmp)
            await qmp.execute("cont")
            out["restore_ms"] = (time.perf_counter() - t) * 1000
            status = as_dict(await qmp.execute("query-status"))["status"]
            if status != "running":
                raise RuntimeError(f"restored QEMU is {status}")
            out["stop_ms"] = await quit_and_wait(vm, qmp) * 1000
    return out


async def main() -> None:
    cfg = make_config(build_image("cloud"))
    qemu = str(host.find_binary(["qemu-system-x86_64"]))
    host.accelerator()
    print(json.dumps(await lifecycle(cfg, qemu, 0)))
    print(json.dumps(await operations(cfg, qemu)))


if __name__ == "__main__":
    asyncio.run(main())
