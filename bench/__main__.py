"""``python -m bench``: every figure in one run, each against a baseline from the same run,
the peers beside us; writes results.json, results.md (Markdown tables) and a PNG chart.

Stages (``--only`` takes a comma-separated subset): lifecycle (cold start to first exec,
stop, our CPU), exec, pause, template (clone, memory), density, throughput, images, network,
cli and tracing (bench/cli.py, bench/tracing.py run as scripts when present), and the
peers floor (QEMU driven with qemu.qmp), libvirt, exec-sandbox, podman. A peer that cannot
run here is skipped with its reason, printed and recorded. Pairs run in a balanced
random order drawn from ``--seed`` (``bench/stats.py``); each paired figure reports its
order effect.

``--quick`` is for development: fewer pairs, smaller bounds (not for published figures).
The full run takes about 15 minutes on the loaded 2-core TCG project machine (it must stay
under 20); a quick run writes to a temp dir unless given ``--out``.

Usage: .venv/bin/python -m bench [--quick] [--only STAGES] [--seed N] [--out DIR] [--png F]
Exit status: 1 if a stage failed (its error is in results.json and printed), else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import (
    density,
    floor,
    images,
    network,
    peers,
    report,
    sandbox,
    scripts,
    template,
    throughput,
)
from bench.qemu_boot import make_config
from bench.stats import Figure
from virtcontainers import host
from virtcontainers.drivers.qemu.argv import kernel_params
from virtcontainers.guest.image import build_image
from virtcontainers.persist.store import StateStore

HERE = Path(__file__).parent
STAGES = (
    "lifecycle", "exec", "pause", "template", "density", "throughput", "images", "network",
    "cli", "tracing", "floor", "libvirt", "exec-sandbox", "podman",
)  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    pairs: int
    execs: int
    pause_rounds: int
    clone_pairs: int
    vms: int
    density_max: int
    density_budget_s: float
    window_s: float
    image_pairs: int
    image_execs: int
    net_pairs: int
    downloads: int
    peer_rounds: int
    cli_runs: int
    tracing_rounds: int


FULL = Sizes(4, 200, 20, 4, 2, 16, 60, 8, 2, 3, 2, 3, 2, 10, 10)
QUICK = Sizes(2, 20, 4, 2, 1, 2, 30, 4, 2, 2, 2, 2, 1, 3, 3)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.sizes = QUICK if args.quick else FULL
        self.rng = random.Random(args.seed)
        self.only = set(args.only.split(",")) if args.only else set(STAGES)
        unknown = self.only - set(STAGES)
        if unknown:
            raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
        self.figures: list[Figure] = []
        self.peers: list[peers.Peer] = []
        self.errors: list[dict[str, str]] = []
        self.timings: dict[str, float] = {}

    async def stage(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        if name not in self.only:
            return
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            await body()
        except Exception as exc:  # one broken stage must not hide the others' figures
            self.errors.append({"stage": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"!! {name} failed: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
        self.timings[name] = round(time.perf_counter() - start, 1)

    def add(self, figures: Figure | list[Figure]) -> None:
        for figure in figures if isinstance(figures, list) else [figures]:
            self.figures.append(figure)
            print("   " + figure.line(), flush=True)

    def peer(self, found: peers.Peer) -> None:
        self.peers.append(found)
        if found.ran:
            print(f"   {found.name} {found.version}: {found.figures}", flush=True)
        else:
            print(f"   {found.name} skipped: {found.reason}", flush=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    r = Run(args)
    s = r.sizes
    image = build_image("cloud")
    cfg = make_config(image)
    qemu = str(host.find_binary(["qemu-system-x86_64"]))
    accel = host.accelerator()  # probe once, outside the measurements
    cmdline = " ".join(kernel_params(cfg, "ttyS0", root_on_nvdimm=False))  # libvirt's guest
    root = Path(tempfile.mkdtemp(prefix="vc-bench-"))
    store = StateStore(root)
    before = uptime()
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    started = time.perf_counter()
    try:

        async def lifecycle() -> None:
            r.add(await sandbox.measure_lifecycle(cfg, qemu, store, s.pairs, r.rng))

        async def exec_rtt() -> None:
            r.add(await sandbox.measure_exec(store, cfg, s.execs, r.rng))

        async def pause() -> None:
            r.add(await sandbox.measure_pause(store, cfg, qemu, s.pause_rounds, r.rng))

        async def templates() -> None:
            tpl, created = await template.create_template(cfg)
            try:
                r.add(await template.measure_clone(cfg, store, tpl, created, s.clone_pairs, r.rng))
                r.add(await template.measure_memory(cfg, qemu, store, tpl, s.vms))
            finally:
                tpl.remove()

        async def dense() -> None:
            r.add(await density.measure(cfg, store, s.density_max, s.density_budget_s))

        async def rate() -> None:
            r.add(await throughput.measure(cfg, qemu, store, s.window_s, r.rng))

        async def image_figures() -> None:
            r.add(await images.measure(s.image_pairs, s.image_execs, r.rng))

        async def net() -> None:
            r.add(await network.measure(cfg, store, s.net_pairs, s.downloads, s.execs, r.rng))

        async def cli() -> None:
            if not scripts.present("cli.py"):
                print("   skipped: bench/cli.py is not in this checkout")
                return
            r.add(await asyncio.to_thread(scripts.cli, s.cli_runs, max(40, s.execs // 2)))

        async def traced() -> None:
            if not scripts.present("tracing.py"):
                print("   skipped: bench/tracing.py is not in this checkout")
                return
            r.add(await asyncio.to_thread(scripts.tracing, s.tracing_rounds, 20))

        async def qemu_floor() -> None:
            rounds = [await floor.operations(cfg, qemu) for _ in range(s.peer_rounds)]
            r.peer(
                peers.Peer(
                    "qemu.qmp floor",
                    ran=True,
                    version=".".join(map(str, peers.qemu_version(qemu))),
                    figures={
                        k: round(statistics.median(x[k] for x in rounds), 2) for k in rounds[0]
                    },
                    detail={"rounds": rounds},
                )
            )

        async def libvirt() -> None:
            r.peer(await asyncio.to_thread(peers.libvirt, cfg, cmdline, qemu, s.peer_rounds))

        async def exec_sandbox() -> None:
            r.peer(peers.exec_sandbox(qemu))

        async def podman() -> None:
            r.peer(await asyncio.to_thread(peers.podman_crun))

        for name, body in zip(
            STAGES,
            (lifecycle, exec_rtt, pause, templates, dense, rate, image_figures, net,
             cli, traced, qemu_floor, libvirt, exec_sandbox, podman),
            strict=True,
        ):  # fmt: skip
            await r.stage(name, body)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    effects = [f.order_effect for f in r.figures if f.order_effect]
    return {
        "schema": 1,
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "started": started_at,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "quick": args.quick,
        "stages": r.timings,
        "machine": {
            "uptime_before": before,
            "uptime_after": uptime(),
            "cpus": os.cpu_count(),
            "accelerator": accel,
            "qemu": ".".join(map(str, peers.qemu_version(qemu))),
            "host_kernel": platform.release(),
            "guest_kernel": image.kernel_release,
            "guest_memory_mib": cfg.resources.memory_size,
        },
        "order": {
            "method": "balanced random: per figure half the pairs ours first, half baseline "
            "first, shuffled by random.Random(seed)",
            "seed": args.seed,
            "order_effect_median": round(statistics.median(effects), 3) if effects else None,
            "order_effect_range": [min(effects), max(effects)] if effects else None,
        },
        "figures": [f.to_dict() for f in r.figures],
        "peers": [p.to_dict() for p in r.peers],
        "errors": r.errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(__doc__ or "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument("--only", default="", help=f"stages to run, of: {', '.join(STAGES)}")
    parser.add_argument("--seed", type=int, default=20261202, help="seed of the pair orders")
    parser.add_argument(
        "--out", type=Path, help="dir of results.json/.md (default bench/; --quick: a temp dir)"
    )
    parser.add_argument(
        "--png", type=Path, help="the chart (default docs/performance.png; --quick: in --out)"
    )
    args = parser.parse_args()
    # A quick run must not overwrite the published figures.
    out = args.out or (Path(tempfile.gettempdir()) / "vc-bench-quick" if args.quick else HERE)
    png = args.png or (out / "chart.png" if args.quick else HERE.parent / "docs/performance.png")
    results = asyncio.run(run(args))
    paths = report.write(results, out, png)
    print()
    print(report.markdown(results))
    order = results["order"]
    print(f"order effect (ours-first / baseline-first ratio), median over figures: "
          f"{order['order_effect_median']}, range {order['order_effect_range']}")  # fmt: skip
    print(f"{results['seconds']} s; load: {results['machine']['uptime_after']}")
    print("wrote " + ", ".join(map(str, paths)))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
