"""Shared by the OCI runtime's integration tests: the runtime's path, a Kata-style config
naming the test guest image, and what a container may leave behind."""

from __future__ import annotations

import sys
from pathlib import Path

from virtcontainers import procfs
from virtcontainers.guest.image import GuestImage
from virtcontainers.oci.state import StateDir

RUNTIME = str(Path(sys.executable).with_name("vc-runtime"))


def kata_config(image: GuestImage, path: Path) -> Path:
    """A configuration-qemu.toml of the test guest image (podman passes the runtime almost
    no environment, so the runtime is told where the image is); the memory size may be
    set by annotation."""
    path.write_text(
        "[hypervisor.qemu]\n"
        'path = "/usr/bin/qemu-system-x86_64"\n'
        f'kernel = "{image.kernel}"\n'
        f'initrd = "{image.initrd}"\n'
        "default_memory = 512\n"
        'enable_annotations = ["default_memory"]\n'
    )
    return path


def leftovers(states: StateDir, container_id: str) -> list[str]:
    """The state directory, VM run dir and processes of a container that still exist."""
    sandbox_id = states.sandbox_id(container_id)
    found = [str(p) for p in (states.path(container_id), states.vm_run_dir(sandbox_id))
             if p.exists()]  # fmt: skip
    for needle in (container_id, sandbox_id):
        found += [f"pid {pid}: {needle}" for pid in procfs.processes_mentioning(needle)]
    return found
