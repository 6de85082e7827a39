"""VM templating: clone to first exec vs cold boot to first exec, and memory per sandbox.

Measured in one run on the same kernel, initrd and config:

* **clone to first exec** (``Template.clone``: restore + ``cont`` + agent ping + RNG reseed
  and clock sync, then ``exec(["true"])``) vs **cold boot to first exec**, pairs in a
  balanced random order (``bench.stats``); the template is created once (its time is noted).
* **memory**: with ``--vms`` cold sandboxes, then as many clones, running, each QEMU's
  ``/proc/<pid>/smaps`` split into the guest's RAM mapping and everything else. Figures:
  QEMU's own memory *beyond guest RAM* (PSS of every other mapping) vs the same QEMU command
  started bare; and the guest RAM's PSS per clone vs per cold sandbox (clones share the
  template's pages; the template's memory file is paid once, noted).

Usage: .venv/bin/python -m bench.template [--pairs 5] [--vms 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.qemu_boot import READY, bare_qemu, make_config
from bench.sandbox import boot_to_exec
from bench.stats import Figure, from_pairs, run_pairs, single
from virtcontainers import Sandbox, host
from virtcontainers.config import HypervisorConfig
from virtcontainers.factory import Template
from virtcontainers.guest.image import build_image
from virtcontainers.persist.store import StateStore

_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def memory_of(pid: int, guest_mib: int) -> dict[str, float]:
    """MiB of QEMU ``pid``: RSS and PSS of the guest RAM mapping (the one mapping of the
    guest's size, give or take QEMU's alignment) and of everything else."""
    out = {"guest_rss": 0.0, "guest_pss": 0.0, "other_rss": 0.0, "other_pss": 0.0}
    kind = "other"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if m := _MAPPING.match(line):
            size = (int(m[2], 16) - int(m[1], 16)) >> 20
            kind = "guest" if guest_mib <= size <= guest_mib + 4 else "other"
        elif line.startswith(("Rss:", "Pss:")):
            key = f"{kind}_{line[:3].lower()}"
            out[key] += int(line.split()[1]) / 1024
    return out


async def clone(store: StateStore, template: Template) -> tuple[float, Sandbox]:
    start = time.perf_counter()
    sandbox = await template.clone(store=store)
    try:
        if (await sandbox.exec(["true"])).exit_code != 0:
            raise RuntimeError("exec true failed in a clone")
    except BaseException:
        await sandbox.remove()
        raise
    return time.perf_counter() - start, sandbox


async def create_template(cfg: HypervisorConfig) -> tuple[Template, float]:
    start = time.perf_counter()
    template = await Template.create(cfg)
    return template, time.perf_counter() - start


async def measure_clone(
    cfg: HypervisorConfig,
    store: StateStore,
    template: Template,
    created_s: float,
    pairs: int,
    rng: random.Random,
) -> Figure:
    for _, warm in (await boot_to_exec(store, cfg), await clone(store, template)):
        await warm.remove()

    async def timed(make: object) -> float:
        took, sandbox = await make  # type: ignore[misc]
        await sandbox.remove()
        return float(took) * 1000

    ours, base, orders = await run_pairs(
        pairs, rng, lambda: timed(clone(store, template)), lambda: timed(boot_to_exec(store, cfg))
    )
    return from_pairs(
        "clone_to_first_exec",
        "template clone to first exec",
        "ms",
        ours,
        base,
        orders,
        "cold start to first exec",
        note=f"template created once in {created_s * 1000:.0f} ms",
    )


async def measure_memory(
    cfg: HypervisorConfig, qemu: str, store: StateStore, template: Template, vms: int
) -> list[Figure]:
    mib = cfg.resources.memory_size
    per: dict[str, list[dict[str, float]]] = {}
    for kind in ("cold", "clone"):
        running: list[Sandbox] = []
        try:
            for _ in range(vms):
                made = await (
                    boot_to_exec(store, cfg) if kind == "cold" else clone(store, template)
                )
                running.append(made[1])
            per[kind] = [memory_of(sb.hypervisor.get_pids()[0], mib) for sb in running]
        finally:
            for sb in running:
                await sb.remove()
    async with bare_qemu(cfg, qemu, "bare-memory") as vm:
        await vm.wait_for(READY)
        await asyncio.sleep(0.5)  # as long as the agent's start takes in ours, roughly
        per["bare"] = [memory_of(vm.proc.pid, mib)]

    def med(kind: str, key: str) -> float:
        return statistics.median(m[key] for m in per[kind])

    resident = (template.memory_path.stat().st_blocks * 512) / 2**20
    return [
        single(
            "qemu_memory_beyond_guest_ram",
            "QEMU memory beyond guest RAM (PSS)",
            "MiB",
            med("cold", "other_pss"),
            med("bare", "other_pss"),
            "the same QEMU command bare, after guest init",
            n=vms,
            note=f"RSS beyond guest RAM: ours {med('cold', 'other_rss'):.1f} MiB, "
            f"bare {med('bare', 'other_rss'):.1f} MiB; guest RAM {mib} MiB",
        ),
        single(
            "clone_guest_ram_pss",
            "guest RAM per sandbox, clone (PSS)",
            "MiB",
            med("clone", "guest_pss"),
            med("cold", "guest_pss"),
            "guest RAM per cold sandbox (PSS)",
            n=vms,
            note=f"{vms} of each running at once; the template's memory file holds "
            f"{resident:.0f} MiB once for all clones; RSS clone "
            f"{med('clone', 'guest_rss'):.1f} vs cold {med('cold', 'guest_rss'):.1f} MiB",
        ),
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--vms", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    cfg = make_config(build_image("cloud"))
    qemu = str(host.find_binary(["qemu-system-x86_64"]))
    host.accelerator()
    root = Path(tempfile.mkdtemp(prefix="vc-bench-"))
    template, created = await create_template(cfg)
    try:
        store = StateStore(root)
        rng = random.Random(args.seed)
        figures = [await measure_clone(cfg, store, template, created, args.pairs, rng)]
        figures += await measure_memory(cfg, qemu, store, template, args.vms)
    finally:
        template.remove()
        shutil.rmtree(root, ignore_errors=True)
    for figure in figures:
        print(figure.line())


if __name__ == "__main__":
    asyncio.run(main())
