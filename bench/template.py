"""VM templating: clone to first exec vs cold boot to first exec, and memory per VM.

Measured in one run on the same kernel, initrd and config (512 MiB, 1 vCPU):

* **template creation** — ``Template.create``: boot, agent ping, pause, save, stop (once).
* **cold boot to first exec** — ``Sandbox.create`` + ``start`` + ``exec(["true"])``.
* **clone to first exec** — ``Template.clone`` (restore + ``cont`` + agent ping + RNG reseed
  and clock sync through the agent) + ``exec(["true"])``.
  N of each in alternating order (after one warm-up of each); median of the per-pair ratio.
* **memory** — with 3 cold VMs running, then with 3 clones running: each QEMU's ``VmRSS``
  (``/proc/<pid>/status``, counts the template's page-cache pages in every clone) and
  ``Pss`` (``/proc/<pid>/smaps_rollup``, shares them out), sampled right after first exec;
  plus the template memory file's resident tmpfs size, paid once for all clones.

Usage: .venv/bin/python bench/template.py [--pairs 5] [--vms 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from qemu_boot import make_config  # type: ignore[import-not-found]
from virtcontainers import Sandbox, host
from virtcontainers.config import HypervisorConfig
from virtcontainers.factory import Template
from virtcontainers.guest.image import build_image
from virtcontainers.persist.store import StateStore


def _kib(path: str, key: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def memory_of(sandbox: Sandbox) -> dict[str, int]:
    pid = sandbox.hypervisor.get_pids()[0]
    status = f"/proc/{pid}/status"
    return {
        "rss_kib": _kib(status, "VmRSS"),
        "rss_anon_kib": _kib(status, "RssAnon"),
        "rss_file_shmem_kib": _kib(status, "RssFile") + _kib(status, "RssShmem"),
        "pss_kib": _kib(f"/proc/{pid}/smaps_rollup", "Pss"),
    }


async def cold(store: StateStore, cfg: HypervisorConfig) -> tuple[float, Sandbox]:
    start = time.perf_counter()
    sandbox = await Sandbox.create(cfg, store=store)
    try:
        await sandbox.start()
        assert (await sandbox.exec(["true"])).exit_code == 0
    except BaseException:
        await sandbox.remove()  # never leave a VM running behind a failed measurement
        raise
    return time.perf_counter() - start, sandbox


async def clone(store: StateStore, template: Template) -> tuple[float, Sandbox]:
    start = time.perf_counter()
    sandbox = await template.clone(store=store)
    try:
        assert (await sandbox.exec(["true"])).exit_code == 0
    except BaseException:
        await sandbox.remove()
        raise
    return time.perf_counter() - start, sandbox


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--vms", type=int, default=3)
    args = parser.parse_args()

    cfg = make_config(build_image("cloud"))
    host.accelerator()
    root = Path(tempfile.mkdtemp(prefix="vc-bench-"))
    start = time.perf_counter()
    template = await Template.create(cfg)
    created = time.perf_counter() - start
    try:
        await measure(args, cfg, template, created, StateStore(root))
    finally:
        template.remove()
        shutil.rmtree(root, ignore_errors=True)


async def measure(
    args: argparse.Namespace,
    cfg: HypervisorConfig,
    template: Template,
    created: float,
    store: StateStore,
) -> None:
    for warm in (await cold(store, cfg), await clone(store, template)):
        await warm[1].remove()

    colds, clones, ratios = [], [], []
    for i in range(args.pairs):
        if i % 2:
            k, a = await clone(store, template)
            c, b = await cold(store, cfg)
        else:
            c, b = await cold(store, cfg)
            k, a = await clone(store, template)
        await a.remove()
        await b.remove()
        colds.append(c)
        clones.append(k)
        ratios.append(k / c)
        print(f"pair {i + 1}: cold boot->exec {c * 1000:7.1f} ms  "
              f"clone->exec {k * 1000:7.1f} ms  ratio {k / c:5.3f}")  # fmt: skip

    memory: dict[str, list[dict[str, int]]] = {}
    for kind in ("cold", "clone"):
        running = []
        try:
            for _ in range(args.vms):
                made = await (cold(store, cfg) if kind == "cold" else clone(store, template))
                running.append(made[1])
            memory[kind] = [memory_of(sb) for sb in running]
        finally:
            for sb in running:
                await sb.remove()
        print(kind, memory[kind])

    def total(kind: str, key: str) -> int:
        return sum(m[key] for m in memory[kind])

    summary = {
        "accelerator": host.accelerator(),
        "memory_mib": cfg.resources.memory_size,
        "pairs": args.pairs,
        "template_create_ms": round(created * 1000, 1),
        "cold_boot_to_first_exec_median_ms": round(statistics.median(colds) * 1000, 1),
        "clone_to_first_exec_median_ms": round(statistics.median(clones) * 1000, 1),
        "clone_over_cold_ratio_median": round(statistics.median(ratios), 3),
        "vms": args.vms,
        "cold_rss_total_mib": round(total("cold", "rss_kib") / 1024, 1),
        "clone_rss_total_mib": round(total("clone", "rss_kib") / 1024, 1),
        "cold_pss_total_mib": round(total("cold", "pss_kib") / 1024, 1),
        "clone_pss_total_mib": round(total("clone", "pss_kib") / 1024, 1),
        "clone_anon_total_mib": round(total("clone", "rss_anon_kib") / 1024, 1),
        "template_memory_file_mib": template.memory_path.stat().st_size >> 20,
        # tmpfs pages the file really holds: a fixed cost, paid once for all clones.
        "template_memory_file_resident_mib": (template.memory_path.stat().st_blocks * 512) >> 20,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
