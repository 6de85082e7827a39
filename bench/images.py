"""OCI image sandboxes: what an image costs at start, and what the image cache saves.

Measured in one run, on this machine, against a baseline from the same run:

* ``vc run --image <busybox test image> -- true`` vs ``vc run -- true`` (the busybox-only
  guest), end to end through the CLI, in alternating order; reported: the median of the
  per-pair ratios (target <= 1.15) and both medians;
* the first pull of each test image (copy, verify, unpack, root-disk build) vs the lookup a
  second ``vc run --image`` does (a cache hit: no build) and a second ``pull`` of the same
  reference (copy + verify again, the stored disk is reused);
* Python start in the guest: ``python3 -c pass`` vs ``true`` in one Debian image sandbox,
  exec round trips (median of several), so the interpreter's own start is its own figure.

The images are the test images of :mod:`virtcontainers.testing.oci_images` (built once and
cached); the image store and the sandbox store are private to this run and removed after.

Usage: .venv/bin/python bench/images.py [--pairs 5] [--execs 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from virtcontainers import Sandbox
from virtcontainers.config import HypervisorConfig
from virtcontainers.guest.image import build_image
from virtcontainers.images import ImageStore, ensure_image, pull
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
        again = ensure_image(ref, store=store)
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
    image = ensure_image(f"oci:{debian_python_layout()}", store=store)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--execs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vc-bench-img-"))
    store = ImageStore(work / "oci")
    env = {**os.environ, "VC_IMAGE_STORE": str(store.root), "VC_RUN_ROOT": str(work / "run")}
    os.environ.update({"VC_RUN_ROOT": env["VC_RUN_ROOT"]})
    try:
        build_image("cloud")
        report: dict[str, object] = pulls(store)
        busybox = f"oci:{busybox_layout()}"
        timed_run(["--", "true"], env)  # warm the page cache for both paths
        timed_run(["--image", busybox, "--", "true"], env)
        plain, image, ratios = [], [], []
        for i in range(args.pairs):
            order = ("plain", "image") if i % 2 == 0 else ("image", "plain")
            got: dict[str, float] = {}
            for kind in order:
                argv = ["--", "true"] if kind == "plain" else ["--image", busybox, "--", "true"]
                got[kind] = timed_run(argv, env)
            plain.append(got["plain"])
            image.append(got["image"])
            ratios.append(got["image"] / got["plain"])
        report.update(
            {
                "pairs": args.pairs,
                "vc_run_true_median_s": round(statistics.median(plain), 3),
                "vc_run_image_true_median_s": round(statistics.median(image), 3),
                "image_vs_plain_ratio_median": round(statistics.median(ratios), 3),
                "ratio_target": 1.15,
            }
        )
        report.update(asyncio.run(python_start(store, args.execs)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:32} {value}")


if __name__ == "__main__":
    main()
