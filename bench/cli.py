"""CLI overhead and the server's exec round trip, against baselines measured in the same run.

* **per-command wall time** of ``vc ps --json`` and ``vc exec ID -- true`` (a sandbox
  started with ``vc start``, so the exec goes through its server), with ``python -c pass``
  (the interpreter's own start-up) measured interleaved with them. Targets on the project
  machine: ``vc ps`` <= 100 ms median, ``vc exec -- true`` <= 120 ms median end to end.
* **8 concurrent execs**: wall time of 8 ``vc exec ID -- sleep 1`` started at once from 8
  processes, until all exited 0 (target < 2.5 s: they run concurrently in the guest); and
  the same 8 execs from 8 connected clients in this process, which leaves out the 8
  interpreters' start-up: what the server and the guest take.
* **exec round trip from the Python API**: ``await sandbox.exec(["true"])`` on a sandbox
  served by its server (``Sandbox.attach`` in this process is a client), against the same
  call on a sandbox run in-process (this process holds the agent connection). Target: ratio
  of medians <= 1.5.

Usage: .venv/bin/python bench/cli.py [--runs 30] [--execs 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from virtcontainers import Sandbox
from virtcontainers.config import HypervisorConfig
from virtcontainers.guest.image import build_image
from virtcontainers.persist.store import StateStore
from virtcontainers.server.sync_client import ServerConnection

VC = str(Path(sys.executable).with_name("vc"))


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def cpu(argv: list[str]) -> float:
    """CPU seconds (user + system) the command used: less sensitive to a loaded machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def commands(sandbox_id: str, runs: int) -> dict[str, list[float]]:
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "vc ps --json": [VC, "ps", "--json"],
        "vc exec ID -- true": [VC, "exec", sandbox_id, "--", "true"],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    times |= {f"{name} (cpu)": [] for name in cases}
    for argv in cases.values():
        wall(argv)  # warm the page cache (and write the bytecode cache)
    for _ in range(runs):
        for name, argv in cases.items():  # interleaved: load changes hit all alike
            times[name].append(wall(argv))
            times[f"{name} (cpu)"].append(cpu(argv))
    return times


def concurrent_sleeps(sandbox_id: str, trials: int = 3) -> list[float]:
    out = []
    for _ in range(trials):
        start = time.perf_counter()
        procs = [subprocess.Popen([VC, "exec", sandbox_id, "--", "sleep", "1"]) for _ in range(8)]
        codes = [p.wait() for p in procs]
        out.append(time.perf_counter() - start)
        assert codes == [0] * 8, codes
    return out


def concurrent_sleeps_from_clients(
    sandbox_id: str, store: StateStore, trials: int = 3
) -> list[float]:
    """The same 8 execs from 8 already-connected blocking clients (threads of this process):
    what the server and the guest take, without 8 interpreters starting."""
    run_dir = store.sandbox_dir(sandbox_id)
    out = []
    for _ in range(trials):
        connections = [ServerConnection.connect(run_dir) for _ in range(8)]
        try:
            start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(_sleep_one, connections))
            out.append(time.perf_counter() - start)
        finally:
            for connection in connections:
                connection.close()
        assert codes == [0] * 8, codes
    return out


def _sleep_one(connection: ServerConnection) -> int | None:
    proc = connection.start_exec(["sleep", "1"], no_stdin=True)
    while proc.status is None:
        for frame in connection.receive():
            proc.on_frame(frame)
    return proc.status.exit_code


async def round_trips(sandbox: Sandbox, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        result = await sandbox.exec(["true"])
        out.append(time.perf_counter() - start)
        assert result.exit_code == 0
    return out


async def api(cfg: HypervisorConfig, store: StateStore, execs: int) -> dict[str, list[float]]:
    local = await Sandbox.create(cfg, store=store)
    served = await Sandbox.create(cfg, store=store)
    try:
        await local.start()
        await served.start(server=True)
        client = await Sandbox.attach(served.id, store=store)  # as another process would
        try:
            await round_trips(local, 10)
            await round_trips(client, 10)
            times: dict[str, list[float]] = {"in-process": [], "through the server": []}
            for _ in range(execs // 20):  # interleaved batches
                times["in-process"] += await round_trips(local, 20)
                times["through the server"] += await round_trips(client, 20)
            return times
        finally:
            await client.close()
    finally:
        await local.remove()
        await served.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--execs", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args()
    # The commands run as installed: with their bytecode cached (pip compiles it; a
    # PYTHONDONTWRITEBYTECODE inherited from a developer's shell would make every changed
    # module compile from source on every run and measure that instead).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    load_start = os.getloadavg()[0]
    image = build_image("cloud")
    root = Path(tempfile.mkdtemp(prefix="vc-bench-cli-"))
    os.environ["VC_RUN_ROOT"] = str(root)
    store = StateStore(root)
    cfg = HypervisorConfig()
    cfg.boot.kernel_path, cfg.boot.initrd_path = str(image.kernel), str(image.initrd)
    cfg.resources.memory_size = 512
    try:
        subprocess.run([VC, "create", "--id", "bench"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([VC, "start", "bench"], check=True, stdout=subprocess.DEVNULL)
        try:
            cli = commands("bench", args.runs)
            sleeps = concurrent_sleeps("bench")
            served = concurrent_sleeps_from_clients("bench", store)
        finally:
            subprocess.run([VC, "rm", "--force", "bench"], check=False)
        rt = asyncio.run(api(cfg, store, args.execs))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def ms(xs: list[float]) -> float:
        return statistics.median(xs) * 1000

    print(f"load average at the start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f}")
    print(f"per command (median of {args.runs}, interleaved):")
    for name, xs in cli.items():
        base = ms(cli["python -c pass (cpu)" if "(cpu)" in name else "python -c pass"])
        extra = "" if name.startswith("python") else f"  (+{ms(xs) - base:.1f} ms over python)"
        print(f"  {name:<28} {ms(xs):7.1f} ms{extra}")
    median = statistics.median(sleeps)
    print(f"8 x `vc exec ID -- sleep 1` at once: wall {median:.2f} s median of {len(sleeps)}"
          f" (each: {', '.join(f'{x:.2f}' for x in sleeps)} s)")  # fmt: skip
    print(f"  the same from 8 connected clients in one process: wall "
          f"{statistics.median(served):.2f} s median (the server's and guest's share)")  # fmt: skip
    print(f"exec round trip from the Python API (median of {len(rt['in-process'])}):")
    for name, xs in rt.items():
        print(f"  {name:<22} {ms(xs):7.2f} ms")
    ratio = ms(rt["through the server"]) / ms(rt["in-process"])
    print(f"  ratio server / in-process: {ratio:.2f}")
    print("targets (issue 11):")
    for what, value, target, unit in (
        ("vc ps --json median", ms(cli["vc ps --json"]), 100, "ms"),
        ("vc exec ID -- true median", ms(cli["vc exec ID -- true"]), 120, "ms"),
        ("8 concurrent sleep 1 execs", median, 2.5, "s"),
        ("server / in-process round trip", ratio, 1.5, "x"),
    ):
        verdict = "met" if value <= target else "NOT met"
        print(f"  {what:<32} {value:8.2f} {unit:<2} <= {target:g}: {verdict}")
    if args.json:
        print(json.dumps({"cli": cli, "api": rt, "sleeps": sleeps, "served": served}))


if __name__ == "__main__":
    main()
