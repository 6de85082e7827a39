"""``vc-runtime create``: check everything, build the disks, fork the container process.

Nothing is created until the bundle, its mounts and the VM config have been checked; if a
later step fails (a disk cannot be built, the VM does not boot), everything made so far is
removed before the error is reported: the state directory, the disks, the VM and its run dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

from virtcontainers.errors import ContainerError
from virtcontainers.fsutil import atomic_write
from virtcontainers.oci.ready import child_main, wait_report
from virtcontainers.oci.state import StateDir

__all__ = ["create"]


def create(
    states: StateDir,
    container_id: str,
    bundle_dir: Path,
    *,
    pid_file: Path | None,
    console_socket: str | None,
    config_file: Path | None,
) -> int:
    """Create the container; returns the container process's pid once its VM is up.

    Raises:
        BundleError: the bundle cannot be run (nothing was created). ContainerError: the id
            is invalid or taken; the VM did not come up (the reason; nothing is left).
        ConfigError / AnnotationError: the VM config or an annotation is refused.
        ImageError: a disk could not be built.
    """
    from virtcontainers.oci.shim import (
        BOOT_TIMEOUT,
        ContainerJob,
        program_not_found,
        run_container,
    )
    from virtcontainers.oci.spec import find_program, load_bundle
    from virtcontainers.oci.vm import (
        build_rootfs_disk,
        build_snapshots,
        hypervisor_config,
        plan_mounts,
    )

    states.check_id(container_id)
    if states.path(container_id).exists():
        raise ContainerError(f"container {container_id} already exists", id=container_id)
    bundle = load_bundle(bundle_dir)
    plan = plan_mounts(bundle)
    mounted = [m.destination for m in bundle.spec.mounts]
    if find_program(bundle.rootfs, bundle.process, mounted) is None:
        # runc's words: podman turns them into exit code 127
        raise program_not_found(bundle.process.args[0], container_id)
    if bundle.process.terminal and not console_socket:
        raise ContainerError("process.terminal is set but no --console-socket was given",
                             id=container_id)  # fmt: skip
    hypervisor, config = hypervisor_config(bundle.spec.annotations, config_file=config_file)
    directory = states.create(container_id, bundle.path, dict(bundle.spec.annotations))
    child = 0
    try:
        disks = [build_rootfs_disk(bundle, directory), *build_snapshots(plan, directory)]
        job = ContainerJob(
            container_id, states, bundle, hypervisor, config, disks, plan, console_socket
        )
        ready_r, ready_w = os.pipe()
        child = os.fork()
        if child == 0:  # the container process
            os.close(ready_r)
            child_main(lambda: run_container(job, ready_w))
        os.close(ready_w)
        reply = wait_report(ready_r, BOOT_TIMEOUT + 30.0)
        if reply != "ok":
            raise ContainerError(
                f"container {container_id}: "
                + (reply.removeprefix("error: ") or "the container process died while starting"),
                id=container_id,
            )
        if pid_file is not None:
            atomic_write(pid_file.absolute(), f"{child}".encode())
    except BaseException:
        _undo(states, container_id, child)
        raise
    return child


def _undo(states: StateDir, container_id: str, child: int) -> None:
    """Remove what a failed create made: the container process (whose exit makes its
    ephemeral sandbox server remove the VM), the VM's run dir, the state directory."""
    from virtcontainers.oci.cli import remove_vm

    if child:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, 0)
    with contextlib.suppress(Exception):
        remove_vm(states, states.sandbox_id(container_id))
    shutil.rmtree(states.path(container_id), ignore_errors=True)
