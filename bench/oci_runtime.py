"""The podman path: ``podman run --rm --runtime vc-runtime IMG true`` vs ``vc run --image``.

Measured in one run, on this machine, in pairs of a balanced random order
(``bench/stats.py``):

* ours: ``podman run --rm --network none --runtime vc-runtime IMG true`` (podman + conmon +
  the runtime: ``create`` builds the root disk from podman's rootfs and boots the VM,
  ``start``, ``delete``);
* baseline: ``vc run --image oci:DIR -- true`` of the *same* image (copied out of podman's
  storage with ``skopeo copy containers-storage:...``), its root disk already in the image
  store (the steady state of ``vc run --image``);
* the figure: both medians and the median of the per-pair ratios (target <= 1.3);
* podman's default runtime (crun): :func:`bench.peers.podman_crun`; it cannot run here
  (``setrlimit RLIMIT_NOFILE: Operation not permitted``) and is reported with that reason;
* the part of ``create`` a shared directory would avoid: ``mkfs.erofs`` of the unpacked
  image (a single figure against the time to unpack it).

The image is the Debian + python3 test image (mmdebstrap), ``podman import``ed into a
private podman storage that is removed afterwards, as are the image and sandbox stores.

Usage: .venv/bin/python -m bench.oci_runtime [--pairs 5] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import peers
from bench.stats import Figure, from_pairs, run_pairs, single
from virtcontainers.guest.image import build_image
from virtcontainers.images.rootdisk import build_root_disk
from virtcontainers.testing.oci_images import debian_rootfs_tar

BIN = Path(sys.executable).parent
IMAGE = "localhost/vc-bench-debian:latest"
TARGET = 1.3


def _timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return took


def _erofs_build(tmp: Path) -> tuple[float, float]:
    """(seconds to build the erofs root disk, seconds to unpack the same tree)."""
    tree = tmp / "tree"
    tree.mkdir()
    start = time.perf_counter()
    subprocess.run(["tar", "-x", "-f", str(debian_rootfs_tar()), "-C", str(tree),
                    "--numeric-owner"], check=True)  # fmt: skip
    unpack = time.perf_counter() - start
    start = time.perf_counter()
    build_root_disk(tree, tmp / "root.img")
    build = time.perf_counter() - start
    shutil.rmtree(tree)
    (tmp / "root.img").unlink()
    return build, unpack


def _prepare(tmp: Path, podman: list[str], env: dict[str, str]) -> None:
    """Import the test image into podman, and copy it out as an OCI layout for `vc run`."""
    subprocess.run([*podman, "import", str(debian_rootfs_tar()), IMAGE], env=env,
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    storage = f"containers-storage:[overlay@{tmp / 'storage'}+{tmp / 'run'}]{IMAGE}"
    subprocess.run(["skopeo", "copy", storage, f"oci:{tmp / 'layout'}:latest"], env=env,
                   check=True, capture_output=True, timeout=600)  # fmt: skip


def _cleanup(tmp: Path, podman: list[str], env: dict[str, str]) -> None:
    subprocess.run([*podman, "rm", "--all", "--force"], env=env, capture_output=True)
    subprocess.run([*podman, "rmi", "--all", "--force"], env=env, capture_output=True)
    subprocess.run(["umount", "-R", str(tmp / "storage" / "overlay")], capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


async def measure(pairs: int, rng: random.Random) -> list[Figure]:
    """The podman-path figures, in private podman/image/sandbox stores removed after."""
    guest = build_image("cloud")
    tmp = Path(tempfile.mkdtemp(prefix="vc-bench-oci-"))
    conf = tmp / "containers.conf"
    conf.write_text("[engine]\n")
    kata = tmp / "vc.toml"
    kata.write_text(f'[hypervisor.qemu]\npath = "/usr/bin/qemu-system-x86_64"\n'
                    f'kernel = "{guest.kernel}"\ninitrd = "{guest.initrd}"\n'
                    "default_memory = 512\n")  # fmt: skip
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "VC_RUN_ROOT": str(tmp / "vc"),
           "VC_IMAGE_STORE": str(tmp / "images")}  # fmt: skip
    podman = ["podman", "--root", str(tmp / "storage"), "--runroot", str(tmp / "run"),
              "--storage-driver", "overlay"]  # fmt: skip
    ours = [*podman, "--runtime", str(BIN / "vc-runtime"), "--runtime-flag", f"config={kata}",
            "run", "--rm", "--network", "none", IMAGE, "true"]  # fmt: skip
    vc = [str(BIN / "vc"), "run", "--image", f"oci:{tmp / 'layout'}", "--", "true"]
    try:
        await asyncio.to_thread(_prepare, tmp, podman, env)
        await asyncio.to_thread(_timed, vc, env)  # the first run pulls and builds the disk
        await asyncio.to_thread(_timed, ours, env)  # warm both paths' page cache
        podman_s, vc_s, orders = await run_pairs(
            pairs,
            rng,
            lambda: asyncio.to_thread(_timed, ours, env),
            lambda: asyncio.to_thread(_timed, vc, env),
        )
        build, unpack = await asyncio.to_thread(_erofs_build, tmp)
    finally:
        await asyncio.to_thread(_cleanup, tmp, podman, env)
    crun = await asyncio.to_thread(peers.podman_crun)
    return [
        from_pairs(
            "oci_podman_run",
            "podman run --rm --runtime vc-runtime Debian true",
            "s",
            podman_s,
            vc_s,
            orders,
            "vc run --image (same image, disk cached) -- true",
            note=f"target ratio <= {TARGET}; podman's default runtime (crun): "
            + ("ran" if crun.ran else f"cannot be a baseline here: {crun.reason}"),
        ),
        single(
            "oci_rootfs_disk",
            "erofs root disk of the Debian + python3 rootfs (at every create)",
            "s",
            build,
            unpack,
            "unpacking the same tree from its tar",
        ),
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    for figure in await measure(args.pairs, random.Random(args.seed)):
        print(figure.line())
        if figure.note:
            print(f"  {figure.note}")
        if figure.ours_samples:
            print(f"  ours {figure.ours_samples}  baseline {figure.baseline_samples}")


if __name__ == "__main__":
    asyncio.run(main())
