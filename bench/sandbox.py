"""Sandbox latency: start to first exec, stop with complete logs, our CPU per lifecycle, exec
round trip, pause/resume, each against its floor measured in the same run.

* **lifecycle** pairs (balanced random order, ``bench.stats``): ours is ``Sandbox.create`` +
  ``start`` + ``exec(["true"])``, then ``stop`` (agent shutdown, guest power-off, VMM exit,
  console drained: checked to end with the kernel's power-down line) and ``remove``; the
  floor (``bench.floor.lifecycle``) is the same QEMU command bare, to guest init, then QMP
  ``quit``. Three figures: start to first exec vs bare boot to init; stop vs ``quit``; CPU
  of this process per lifecycle vs the floor's.
* **exec round trip** of ``true`` vs the agent's ``ping`` (the same channel, no process in
  the guest), in batches of 10 in a balanced random order, on one sandbox.
* **pause / resume** (``Sandbox.pause``/``resume``: QMP plus the state record) vs QMP
  ``stop``/``cont`` sent by ``qemu.qmp`` to a bare QEMU running at the same time; then one
  **save** of each, paused, to a file (the driver's ``save_sandbox`` vs ``migrate fd:``).

Usage: .venv/bin/python -m bench.sandbox [--pairs 6] [--execs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench import floor
from bench.qemu_boot import READY, bare_qemu, make_config
from bench.stats import Figure, from_pairs, run_pairs
from virtcontainers import Sandbox, host
from virtcontainers.config import HypervisorConfig
from virtcontainers.guest.image import build_image
from virtcontainers.persist.store import StateStore


async def boot_to_exec(store: StateStore, cfg: HypervisorConfig) -> tuple[float, Sandbox]:
    """Seconds from ``Sandbox.create`` to the first ``exec(["true"])`` answered."""
    start = time.perf_counter()
    sandbox = await Sandbox.create(cfg, store=store)
    try:
        await sandbox.start()
        result = await sandbox.exec(["true"])
        elapsed = time.perf_counter() - start
        if result.exit_code != 0:
            raise RuntimeError(f"exec true: {result}")
    except BaseException:
        await sandbox.remove()  # never leave a VM running behind a failed measurement
        raise
    return elapsed, sandbox


async def timed_stop(sandbox: Sandbox) -> float:
    """Seconds of ``stop()``, checked to have the whole console log; then removes it."""
    start = time.perf_counter()
    await sandbox.stop()
    elapsed = time.perf_counter() - start
    log = sandbox.logs().decode(errors="replace").rstrip().splitlines()
    await sandbox.remove()
    if not log or "reboot: Power down" not in log[-1]:
        raise RuntimeError(f"the console log is incomplete after stop: {log[-3:]}")
    return elapsed


async def lifecycle(store: StateStore, cfg: HypervisorConfig) -> dict[str, float]:
    cpu0 = time.process_time()
    start, sandbox = await boot_to_exec(store, cfg)
    stop = await timed_stop(sandbox)
    return {
        "start_ms": start * 1000,
        "stop_ms": stop * 1000,
        "cpu_ms": (time.process_time() - cpu0) * 1000,
    }


async def measure_lifecycle(
    cfg: HypervisorConfig, qemu: str, store: StateStore, pairs: int, rng: random.Random
) -> list[Figure]:
    await lifecycle(store, cfg)  # warm: page cache, imports
    count = iter(range(10**6))

    async def bare() -> dict[str, float]:
        return await floor.lifecycle(cfg, qemu, next(count))

    ours, base, orders = await run_pairs(pairs, rng, lambda: lifecycle(store, cfg), bare)

    def pick(key: str, rows: list[dict[str, float]]) -> list[float]:
        return [r[key] for r in rows]

    return [
        from_pairs(
            "start_to_first_exec",
            "cold start to first exec",
            "ms",
            pick("start_ms", ours),
            pick("boot_ms", base),
            orders,
            "same QEMU command bare, to guest init",
        ),
        from_pairs(
            "stop",
            "stop with complete logs",
            "ms",
            pick("stop_ms", ours),
            pick("stop_ms", base),
            orders,
            "QMP quit to QEMU exit (qemu.qmp)",
        ),
        from_pairs(
            "cpu_per_lifecycle",
            "our process's CPU per lifecycle",
            "ms",
            pick("cpu_ms", ours),
            pick("cpu_ms", base),
            orders,
            "CPU of a qemu.qmp script: launch, read console, quit",
            note="create+start+exec+stop+remove; QEMU's own CPU excluded",
        ),
    ]


async def measure_exec(
    store: StateStore, cfg: HypervisorConfig, execs: int, rng: random.Random
) -> Figure:
    _, sandbox = await boot_to_exec(store, cfg)
    try:
        agent = await sandbox._connect_agent()  # the sandbox's own channel, for ping

        async def batch(call: object) -> float:
            times = []
            for _ in range(10):
                t = time.perf_counter()
                await call()  # type: ignore[operator]
                times.append(time.perf_counter() - t)
            return statistics.median(times) * 1000

        ours, base, orders = await run_pairs(
            max(2, execs // 10),
            rng,
            lambda: batch(lambda: sandbox.exec(["true"])),
            lambda: batch(agent.ping),
        )
    finally:
        await sandbox.remove()
    return from_pairs(
        "exec_rtt",
        "exec round trip (true)",
        "ms",
        ours,
        base,
        orders,
        "agent ping on the same channel",
        note="each sample: the median of a batch of 10",
    )


async def measure_pause(
    store: StateStore, cfg: HypervisorConfig, qemu: str, rounds: int, rng: random.Random
) -> list[Figure]:
    tmp = Path(tempfile.mkdtemp(prefix="vc-bench-save-"))
    saving = cfg.copy()
    saving.template.devices_state_path = str(tmp / "ours.state")
    _, sandbox = await boot_to_exec(store, saving)
    try:
        async with bare_qemu(cfg, qemu, "floor-pause") as vm:
            await vm.wait_for(READY)
            async with floor.qmp_of(vm) as qmp:

                async def ours() -> tuple[float, float]:
                    t = time.perf_counter()
                    await sandbox.pause()
                    t1 = time.perf_counter()
                    await sandbox.resume()
                    return (t1 - t) * 1000, (time.perf_counter() - t1) * 1000

                async def bare() -> tuple[float, float]:
                    t = time.perf_counter()
                    await qmp.execute("stop")
                    t1 = time.perf_counter()
                    await qmp.execute("cont")
                    return (t1 - t) * 1000, (time.perf_counter() - t1) * 1000

                got, base, orders = await run_pairs(rounds, rng, ours, bare)
                if (await sandbox.exec(["true"])).exit_code != 0:
                    raise RuntimeError("the sandbox does not run after pause/resume")

                async def ours_save() -> float:
                    await sandbox.pause()
                    t = time.perf_counter()
                    await sandbox.hypervisor.save_sandbox()
                    return (time.perf_counter() - t) * 1000

                async def bare_save() -> float:
                    await qmp.execute("stop")
                    return await floor.save_to(qmp, tmp / "bare.state") * 1000

                saved, bare_saved, save_order = await run_pairs(1, rng, ours_save, bare_save)
                await floor.quit_and_wait(vm, qmp)
    finally:
        await sandbox.remove()
        shutil.rmtree(tmp, ignore_errors=True)
    return [
        from_pairs(
            f"{name}",
            f"{name} (Sandbox.{name})",
            "ms",
            [g[i] for g in got],
            [b[i] for b in base],
            orders,
            f"QMP {qmp_cmd} (qemu.qmp), bare QEMU",
        )
        for i, (name, qmp_cmd) in enumerate((("pause", "stop"), ("resume", "cont")))
    ] + [
        from_pairs(
            "save",
            "save a paused VM to a file",
            "ms",
            saved,
            bare_saved,
            save_order,
            "migrate fd: to a file (qemu.qmp), bare QEMU",
            note="one sample each (a save ends the VM's use); device state + 512 MiB RAM",
        )
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--execs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    cfg = make_config(build_image("cloud"))
    qemu = str(host.find_binary(["qemu-system-x86_64"]))
    host.accelerator()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="vc-bench-"))
    try:
        store = StateStore(root)
        figures = await measure_lifecycle(cfg, qemu, store, args.pairs, rng)
        figures.append(await measure_exec(store, cfg, args.execs, rng))
        figures += await measure_pause(store, cfg, qemu, 20, rng)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for figure in figures:
        print(figure.line())


if __name__ == "__main__":
    asyncio.run(main())
