"""OCI image sandboxes: what an image costs at start, and what the image cache saves.

Measured in one run, on this machine, against a baseline from the same run:

* ``vc run --image <busybox test image> -- true`` vs ``vc run -- true`` (the busybox-only
  guest), end to end through the CLI, in a balanced random order (``bench.stats``);
  reported: the median of the per-pair ratios (target <= 1.15) and both medians;
* the first pull of each test image (copy, verify, unpack, root-disk build) vs the lookup a
  second ``vc run --image`` does (a cache hit: no build) and a second ``pull`` of the same
  reference (copy + verify again, the stored disk is reused);
* Python start in the guest: ``python3 -c pass`` vs ``true`` in one Debian image sandbox,
  exec round trips (median of several), so the interpreter's own start is its own figure.

The images are the test images of :mod:`virtcontainers.testing.oci_images` (built once and
cached); the image store and the sandbox store are private to this run and removed after.

Usage: .venv/bin/python -m bench.images [--pairs 5] [--execs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.stats import Figure, from_pairs, run_pairs, single
from virtcontainers import Sandbox
from virtcontainers.config import HypervisorConfig
from virtcontainers.guest.image import build_image
from virtcontainers.images import ImageStore, PullPolicy, pull
from virtcontainers.testing.oci_images import busybox_layout, debian_python_layout

VC = str(Path(sys.executable).with_name("vc"))


def timed_run(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([VC, "run", *argv], env=env, capture_output=True, timeout=600)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"vc run {argv} exited {proc.returncode}: {proc.stderr[-2000:]!r}")
    return took


def pulls(store: ImageStore) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, layout in (("busybox", busybox_layout()), ("debian_python", debian_python_layout())):
        ref = f"oci:{layout}"
        start = time.perf_counter()
        image = pull(ref, store=store)
        out[f"{name}_first_pull_s"] = round(time.perf_counter() - start, 3)
        out[f"{name}_disk_mb"] = round(image.disk_size / 1e6, 1)
        start = time.perf_counter()
        again = pull(ref, policy=PullPolicy.MISSING, store=store)
        out[f"{name}_cached_lookup_ms"] = round((time.perf_counter() - start) * 1000, 2)
        if again.disk != image.disk:
            raise RuntimeError("the cache hit returned another disk")
        start = time.perf_counter()
        repulled = pull(ref, store=store)
        out[f"{name}_second_pull_s"] = round(time.perf_counter() - start, 3)
        if repulled.disk != image.disk or repulled.pulled_at != image.pulled_at:
            raise RuntimeError("a second pull rebuilt the root disk")
    return out


async def python_start(store: ImageStore, execs: int) -> dict[str, float]:
    guest = build_image("cloud")
    cfg = HypervisorConfig()
    cfg.boot.kernel_path, cfg.boot.initrd_path = str(guest.kernel), str(guest.initrd)
    cfg.resources.memory_size = 512
    cfg.storage.block_device_driver = "virtio-blk"
    image = pull(f"oci:{debian_python_layout()}", policy=PullPolicy.MISSING, store=store)
    async with await Sandbox.create(cfg, image=image) as sb:
        true_s, py_s = [], []
        for _ in range(execs):
            start = time.perf_counter()
            await sb.exec(["true"])
            true_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = await sb.exec(["python3", "-c", "pass"])
            py_s.append(time.perf_counter() - start)
            if result.exit_code != 0:
                raise RuntimeError(f"python3 failed: {result.stderr!r}")
    return {
        "exec_true_median_ms": round(statistics.median(true_s) * 1000, 1),
        "exec_python_median_ms": round(statistics.median(py_s) * 1000, 1),
        "python_start_ms": round((statistics.median(py_s) - statistics.median(true_s)) * 1000, 1),
    }


async def measure(pairs: int, execs: int, rng: random.Random) -> list[Figure]:
    """The image figures, in a private image store and sandbox store removed after."""
    work = Path(tempfile.mkdtemp(prefix="vc-bench-img-"))
    store = ImageStore(work / "oci")
    env = {**os.environ, "VC_IMAGE_STORE": str(store.root), "VC_RUN_ROOT": str(work / "run")}
    saved_root = os.environ.get("VC_RUN_ROOT")
    os.environ["VC_RUN_ROOT"] = env["VC_RUN_ROOT"]
    try:
        pulled = pulls(store)
        busybox = f"oci:{busybox_layout()}"
        plain_argv, image_argv = ["--", "true"], ["--image", busybox, "--", "true"]
        timed_run(plain_argv, env)  # warm the page cache for both paths
        timed_run(image_argv, env)
        image, plain, orders = await run_pairs(
            pairs,
            rng,
            lambda: asyncio.to_thread(timed_run, image_argv, env),
            lambda: asyncio.to_thread(timed_run, plain_argv, env),
        )
        python = await python_start(store, execs)
    finally:
        if saved_root is None:
            os.environ.pop("VC_RUN_ROOT", None)
        else:
            os.environ["VC_RUN_ROOT"] = saved_root
        shutil.rmtree(work, ignore_errors=True)
    return [
        from_pairs(
            "image_run",
            "vc run --image busybox -- true",
            "ms",
            [t * 1000 for t in image],
            [t * 1000 for t in plain],
            orders,
            "vc run -- true (no image)",
        ),
        single(
            "image_second_pull",
            "second pull of the Debian image (disk reused)",
            "s",
            pulled["debian_python_second_pull_s"],
            pulled["debian_python_first_pull_s"],
            "first pull (copy, verify, unpack, root disk)",
            note=f"cached lookup {pulled['debian_python_cached_lookup_ms']} ms; "
            f"disk {pulled['debian_python_disk_mb']} MB; busybox first pull "
            f"{pulled['busybox_first_pull_s']} s",
        ),
        single(
            "python_exec",
            "exec python3 -c pass in a Debian image",
            "ms",
            python["exec_python_median_ms"],
            python["exec_true_median_ms"],
            "exec true in the same sandbox",
            n=execs,
        ),
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--execs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    build_image("cloud")
    for figure in await measure(args.pairs, args.execs, random.Random(args.seed)):
        print(figure.line())


if __name__ == "__main__":
    asyncio.run(main())
