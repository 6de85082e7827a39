"""The peers measured beside us, each run or skipped with the reason it cannot run here.

* the QEMU floor (``bench.floor``): always runs;
* libvirt: ``bench/libvirt_peer.py`` with the system Python, libvirtd started in a private
  mount namespace and stopped after;
* exec-sandbox (PyPI): skipped with its reason, docs/performance.md quotes its published
  figures as anchors;
* podman with crun: skipped with its reason (probed: ``crun`` fails its rlimit setup here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.libvirt_peer import DIRS
from virtcontainers.config import HypervisorConfig

SYSTEM_PYTHON = "/usr/bin/python3"
LIBVIRT_SCRIPT = Path(__file__).with_name("libvirt_peer.py")


@dataclass
class Peer:
    name: str
    ran: bool
    reason: str = ""
    version: str = ""
    figures: dict[str, float] = field(default_factory=dict)
    detail: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ran": self.ran,
            "reason": self.reason,
            "version": self.version,
            "figures": self.figures,
            "detail": self.detail,
        }


def qemu_version(qemu: str) -> tuple[int, int]:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"version (\d+)\.(\d+)", out)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def libvirt_skip_reason() -> str:
    if os.geteuid() != 0:
        return "libvirtd's system instance needs root"
    for binary in ("libvirtd", "unshare", "mount"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (scripts/setup installs libvirt-daemon)"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import libvirt"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return f"{SYSTEM_PYTHON} cannot import libvirt (python3-libvirt is not installed)"
    return ""


def libvirt(cfg: HypervisorConfig, cmdline: str, qemu: str, rounds: int) -> Peer:
    """Run the libvirt peer in a private mount namespace; the directories libvirtd's paths
    need as mount points are created here when missing and removed after."""
    if reason := libvirt_skip_reason():
        return Peer("libvirt", ran=False, reason=reason)
    created = [Path(d) for d in DIRS.values() if not Path(d).exists()]
    root = Path(tempfile.mkdtemp(prefix="vc-bench-libvirt-"))
    try:
        for d in created:
            d.mkdir(mode=0o700, parents=True)
        argv = [
            "unshare", "--mount", "--propagation", "private", SYSTEM_PYTHON, str(LIBVIRT_SCRIPT),
            "--root", str(root), "--kernel", cfg.boot.kernel_path,
            "--initrd", cfg.boot.initrd_path, "--cmdline", cmdline, "--qemu", qemu,
            "--memory", str(cfg.resources.memory_size), "--rounds", str(rounds),
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    finally:
        for d in reversed(created):
            d.rmdir()
        shutil.rmtree(root, ignore_errors=True)
    lines = done.stdout.strip().splitlines()
    report: dict[str, Any] = json.loads(lines[-1]) if lines else {"error": done.stderr[-1000:]}
    if done.returncode != 0 or "error" in report:
        return Peer("libvirt", ran=False, reason=f"libvirt failed: {report.get('error')}")
    return Peer(
        "libvirt",
        ran=True,
        version=str(report["version"]),
        figures={k: round(v, 2) for k, v in report["medians"].items()},
        detail={"rounds": report["rounds"], "daemon_start_ms": report["daemon_start_ms"]},
    )


def exec_sandbox(qemu: str) -> Peer:
    """exec-sandbox is not run: both reasons are facts of this machine, checked or stated."""
    major, minor = qemu_version(qemu)
    reasons = [
        "it downloads its guest kernel and images from the internet at run time, and this "
        "machine (and the project's network rule) allows no traffic to outside servers"
    ]
    if (major, minor) < (8, 2):
        reasons.append(f"its snapshot path needs QEMU >= 8.2, this machine has {major}.{minor}")
    return Peer("exec-sandbox", ran=False, reason="; ".join(reasons))


def podman_crun() -> Peer:
    """podman with its default runtime (crun) running ``true`` in a one-file busybox image, in
    a private podman root (nothing of the host's podman storage is touched): its wall time
    when it runs, else the error podman printed."""
    busybox = shutil.which("busybox")
    if shutil.which("podman") is None or busybox is None:
        return Peer("podman+crun", ran=False, reason="podman or busybox is not installed")
    with tempfile.TemporaryDirectory(prefix="vc-bench-podman-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy(busybox, rootfs / "bin" / "busybox")
        (rootfs / "bin" / "true").symlink_to("busybox")
        tar = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
        podman = ["podman", "--root", f"{tmp}/root", "--runroot", f"{tmp}/run"]
        try:
            subprocess.run([*podman, "import", str(tar), "vc-bench-busybox"],
                           capture_output=True, check=True, timeout=120)  # fmt: skip
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                done = subprocess.run(
                    [*podman, "run", "--rm", "--network", "none", "vc-bench-busybox", "true"],
                    capture_output=True, text=True, timeout=120, check=False,
                )  # fmt: skip
                if done.returncode != 0:
                    error = done.stderr.strip().splitlines()[-1:] or ["(no message)"]
                    return Peer("podman+crun", ran=False, reason=f"podman run failed: {error[0]}")
                runs.append((time.perf_counter() - start) * 1000)
        finally:
            subprocess.run([*podman, "system", "reset", "--force"], capture_output=True,
                           check=False, timeout=120)  # fmt: skip
    return Peer("podman+crun", ran=True, figures={"run_true_ms": round(statistics.median(runs), 1)})
