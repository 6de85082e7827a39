"""Building blocks for tests that boot real QEMU guests."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from virtcontainers.config import HypervisorConfig, Param
from virtcontainers.guest.cpio import concat_initrd, make_overlay_cpio
from virtcontainers.guest.image import GuestImage


def guest_config(
    image: GuestImage,
    tmp: Path,
    *,
    init_scripts: dict[str, str] | None = None,
    hold: bool = True,
    machine: str = "q35",
) -> HypervisorConfig:
    """A config booting ``image``; ``init_scripts`` (name -> sh text) run from
    /etc/vc/init.d; ``hold`` keeps the guest up (a shell on the console) afterwards."""
    initrd = image.initrd
    if init_scripts:
        overlay = make_overlay_cpio(
            {
                f"etc/vc/init.d/{name}": (b"#!/bin/sh\n" + body.encode(), 0o755)
                for name, body in init_scripts.items()
            },
            tmp / "overlay.cpio",
        )
        initrd = concat_initrd(image.initrd, [overlay], tmp / "initrd.img")
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = str(image.kernel)
    cfg.boot.initrd_path = str(initrd)
    cfg.boot.hypervisor_machine_type = machine
    cfg.resources.num_vcpus = 1
    cfg.resources.default_max_vcpus = 4
    cfg.resources.memory_size = 512
    cfg.resources.mem_slots = 4
    if hold:
        cfg.boot.kernel_params.append(Param("vc.shell", "1"))
    return cfg


async def wait_for_console(path: Path, text: str, timeout: float = 60.0) -> str:
    """Wait until the console log contains ``text``; returns the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log:
            return log
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not in console log after {timeout} s:\n{log[-2000:]}")


def qemu_processes_for(run_dir: Path) -> list[int]:
    """Pids of live processes whose command line mentions ``run_dir`` (checks /proc)."""
    needle = str(run_dir).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            pids.append(int(entry))
    return pids
