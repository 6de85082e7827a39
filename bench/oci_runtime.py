"""The podman path: ``podman run --rm --runtime vc-runtime IMG true`` vs ``vc run --image``.

Measured in one run, on this machine, alternating the order of each pair:

* ``podman run --rm --network none --runtime vc-runtime IMG true`` (podman + conmon + the
  runtime: create builds the root disk from podman's rootfs, boots the VM, start, delete);
* ``vc run --image oci:DIR -- true`` of the *same* image (copied out of podman's storage
  with ``skopeo copy containers-storage:...``),
  its root disk already in the image store (the steady state of ``vc run --image``);
* reported: both medians and the median of the per-pair ratios (target <= 1.3);
* podman's default runtime (crun) on the same image: run once; on this machine it fails
  (``setrlimit RLIMIT_NOFILE: Operation not permitted``, see docs/oci-runtime.md), which is
  reported instead of a figure;
* the part of ``create`` that copies the bundle's root file system into a disk
  (``mkfs.erofs`` of the unpacked image), the cost a shared directory would avoid.

The image is the Debian + python3 test image (mmdebstrap), ``podman import``ed into a
private podman storage that is removed afterwards, as are the image and sandbox stores.

Usage: .venv/bin/python bench/oci_runtime.py [--pairs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from virtcontainers.guest.image import build_image
from virtcontainers.images.rootdisk import build_root_disk
from virtcontainers.testing.oci_images import debian_rootfs_tar

BIN = Path(sys.executable).parent
IMAGE = "localhost/vc-bench-debian:latest"


def _timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return took


def _podman_default(podman: list[str], env: dict[str, str]) -> dict[str, object]:
    proc = subprocess.run([*podman, "run", "--rm", "--network", "none", IMAGE, "true"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    if proc.returncode == 0:
        return {"podman_default_runtime": "ran", "podman_default_s": _timed(
            [*podman, "run", "--rm", "--network", "none", IMAGE, "true"], env)}  # fmt: skip
    return {"podman_default_runtime": f"unavailable: exit {proc.returncode}: "
            + proc.stderr.strip().splitlines()[-1][:300]}  # fmt: skip


def _erofs_build(tmp: Path) -> float:
    tree = tmp / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-x", "-f", str(debian_rootfs_tar()), "-C", str(tree),
                    "--numeric-owner"], check=True)  # fmt: skip
    start = time.perf_counter()
    build_root_disk(tree, tmp / "root.img")
    took = time.perf_counter() - start
    shutil.rmtree(tree)
    (tmp / "root.img").unlink()
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    guest = build_image("cloud")
    tmp = Path(tempfile.mkdtemp(prefix="vcbench-oci-"))
    conf = tmp / "containers.conf"
    conf.write_text("[engine]\n")
    kata = tmp / "vc.toml"
    kata.write_text(f'[hypervisor.qemu]\npath = "/usr/bin/qemu-system-x86_64"\n'
                    f'kernel = "{guest.kernel}"\ninitrd = "{guest.initrd}"\n'
                    "default_memory = 512\n")  # fmt: skip
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "VC_RUN_ROOT": str(tmp / "vc")}
    env["XDG_CACHE_HOME"] = env.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    env["VC_IMAGE_STORE"] = str(tmp / "images")  # the store of `vc run --image` (see below)
    podman = ["podman", "--root", str(tmp / "storage"), "--runroot", str(tmp / "run"),
              "--storage-driver", "overlay"]  # fmt: skip
    ours = [*podman, "--runtime", str(BIN / "vc-runtime"), "--runtime-flag", f"config={kata}",
            "run", "--rm", "--network", "none", IMAGE, "true"]  # fmt: skip
    vc = [str(BIN / "vc"), "run", "--image", f"oci:{tmp / 'layout'}", "--", "true"]
    results: dict[str, object] = {"pairs": args.pairs}
    try:
        subprocess.run([*podman, "import", str(debian_rootfs_tar()), IMAGE], env=env,
                       check=True, capture_output=True, timeout=600)  # fmt: skip
        storage = f"containers-storage:[overlay@{tmp / 'storage'}+{tmp / 'run'}]{IMAGE}"
        subprocess.run(["skopeo", "copy", storage, f"oci:{tmp / 'layout'}:latest"], env=env,
                       check=True, capture_output=True, timeout=600)  # fmt: skip
        results.update(_podman_default(podman, env))
        _timed(vc, env)  # the first run pulls the image into the store and builds its disk
        _timed(ours, env)  # warm both paths' page cache
        podman_s: list[float] = []
        vc_s: list[float] = []
        ratios = []
        for i in range(args.pairs):
            if i % 2:
                a = _timed(vc, env)
                b = _timed(ours, env)
            else:
                b = _timed(ours, env)
                a = _timed(vc, env)
            vc_s.append(a)
            podman_s.append(b)
            ratios.append(b / a)
        results.update({
            "podman_vc_runtime_median_s": round(statistics.median(podman_s), 3),
            "vc_run_image_median_s": round(statistics.median(vc_s), 3),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratios": [round(r, 3) for r in ratios],
            "target_ratio": 1.3,
            "rootfs_erofs_build_s": round(_erofs_build(tmp), 3),
            "load_average": os.getloadavg()[0],
        })  # fmt: skip
    finally:
        subprocess.run([*podman, "rm", "--all", "--force"], env=env, capture_output=True)
        subprocess.run([*podman, "rmi", "--all", "--force"], env=env, capture_output=True)
        subprocess.run(["umount", "-R", str(tmp / "storage" / "overlay")], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key:32} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
