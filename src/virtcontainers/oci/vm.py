"""What a container's sandbox VM gets: its config, its disks, and the mounts made in the guest.

How the bundle's files reach the guest (measured choice, ``docs/oci-runtime.md``):

* the root file system becomes a read-only erofs disk built at ``create`` from the directory
  podman prepared (:func:`~virtcontainers.images.rootdisk.build_root_disk`, the images
  machinery), under the agent's usual overlay with a tmpfs upper. A shared directory would
  avoid the copy, but the fast (cloud) guest kernel has no 9p and this host has no
  virtiofsd: 9p would mean the generic kernel, whose boot costs ~3 s more than the ~1 s
  the copy of a Debian root costs;
* a host directory bind-mounted into the container (a podman volume, ``-v DIR:/data``) is
  snapshotted into an ext4 disk of its own (label ``vcm-N``) that the agent mounts at the
  destination: the container sees the host's content as of ``create``; its writes stay in
  the VM and do **not** come back to the host;
* a bind-mounted host *file* (podman's ``/etc/hosts``, ``/etc/hostname``,
  ``/run/.containerenv``) is copied in with WRITE_FILE;
* ``tmpfs`` mounts are made in the guest; ``/proc``, ``/sys``, ``/dev`` (with ``/dev/pts``,
  ``/dev/shm``, ``/dev/mqueue``) and ``/sys/fs/cgroup`` are the guest's own.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from virtcontainers.agent.protocol import MountFlag
from virtcontainers.config import HypervisorConfig, Param
from virtcontainers.devices import BlockDrive
from virtcontainers.errors import BundleError, ConfigError
from virtcontainers.images.rootdisk import build_root_disk, tree_size
from virtcontainers.images.sandbox_image import IMAGE_DRIVE_ID, ROOTFS_PARAM
from virtcontainers.images.tools import run_tool
from virtcontainers.oci.spec import Bundle, Mount

if TYPE_CHECKING:
    from virtcontainers.agent.client import AgentClient

__all__ = ["GuestMount", "MountPlan", "hypervisor_config", "plan_mounts"]

#: Destinations the guest provides itself (its kernel's /proc, /sys, devtmpfs and devpts).
GUEST_PROVIDED = frozenset(
    {"/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys/fs/cgroup"}
)
#: File systems the guest kernel makes without a host source.
GUEST_FSTYPES = frozenset({"tmpfs"})
#: Room left in a directory snapshot for the container's writes.
SNAPSHOT_SLACK_MB = 64
_OPTION_FLAGS = {
    "ro": MountFlag.RDONLY,
    "nosuid": MountFlag.NOSUID,
    "nodev": MountFlag.NODEV,
    "noexec": MountFlag.NOEXEC,
}
#: Mount options that are propagation or defaults: nothing to do in a VM of one container.
_IGNORED_OPTIONS = frozenset(
    {"rw", "bind", "rbind", "private", "rprivate", "slave", "rslave", "shared", "rshared",
     "suid", "dev", "exec", "relatime", "norelatime", "strictatime", "z", "Z", "U",
     "noatime", "atime", "async", "sync", "copy", "nocopy", "tmpcopyup", "notmpcopyup"}
)  # fmt: skip


@dataclass(frozen=True)
class GuestMount:
    """One MOUNT request for the agent."""

    target: str
    source: str
    fstype: str = ""
    flags: MountFlag = MountFlag.NONE
    data: str = ""


@dataclass
class MountPlan:
    """The disks to attach, then what the agent does in the container root, in order."""

    #: (ext4 label, host directory): snapshot disks to build.
    snapshots: list[tuple[str, Path]] = field(default_factory=list)
    mounts: list[GuestMount] = field(default_factory=list)
    files: list[tuple[str, Path]] = field(default_factory=list)
    readonly_root: bool = False


def hypervisor_config(
    annotations: Mapping[str, str], *, config_file: Path | None = None
) -> tuple[str, HypervisorConfig]:
    """The VM's driver and config: a Kata-style configuration file when given, else QEMU
    with the built cloud guest image, 1 vCPU and 512 MiB; then the bundle's
    ``io.katacontainers.config.hypervisor.*`` annotations through the annotation rules.

    Raises:
        ConfigError: no guest image built and no file; a bad file (see
            :func:`~virtcontainers.config.kata.load_kata_config`). AnnotationError: an
            annotation that is unknown, not enabled or outside the allowed paths.
    """
    from virtcontainers.config.annotations import apply_annotations

    if config_file is not None:
        from virtcontainers.config.kata import load_kata_config

        kata = load_kata_config(config_file)
        kind, config = kata.hypervisor_type.value, kata.config
    else:
        from virtcontainers.guest.image import find_image

        built = find_image("cloud")
        if built is None:
            raise ConfigError(
                "no guest image yet: run `vc guest build` (or give a Kata configuration "
                "file with --config / VC_RUNTIME_CONFIG)"
            )
        kind, config = "qemu", HypervisorConfig()
        config.boot.kernel_path = str(built.kernel)
        config.boot.initrd_path = str(built.initrd)
        config.resources.num_vcpus = 1
        config.resources.memory_size = 512
    config.storage.block_device_driver = "virtio-blk"
    apply_annotations(config, annotations)
    return kind, config


def configure_guest(config: HypervisorConfig, hostname: str) -> HypervisorConfig:
    """Kernel parameters: the container root (``vc.rootfs=tmpfs``) and the hostname."""
    out = config.copy()
    keys = {ROOTFS_PARAM, "vc.hostname"}
    out.boot.kernel_params = [p for p in out.boot.kernel_params if p.key not in keys]
    out.add_kernel_param(Param(ROOTFS_PARAM, "tmpfs"))
    if hostname:
        out.add_kernel_param(Param("vc.hostname", hostname))
    return out


def build_rootfs_disk(bundle: Bundle, directory: Path) -> BlockDrive:
    """The bundle's root file system as a read-only disk in ``directory``.

    Raises:
        ImageError: the tool failed.
    """
    out = directory / "rootfs.img"
    build_root_disk(bundle.rootfs, out, ref=str(bundle.rootfs))
    out.chmod(0o600)
    return BlockDrive(file=str(out), id=IMAGE_DRIVE_ID, read_only=True)


def plan_mounts(bundle: Bundle) -> MountPlan:
    """Classify the spec's mounts (nothing is built yet).

    Raises:
        BundleError: a bind source that does not exist or is neither file nor directory,
            or a mount type the VM cannot make (names it and what is supported).
    """
    plan = MountPlan(readonly_root=bool(bundle.spec.root and bundle.spec.root.readonly))
    for i, mount in enumerate(bundle.spec.mounts):
        where = f"mounts[{i}] ({mount.destination})"
        if mount.destination.rstrip("/") in GUEST_PROVIDED:
            continue
        flags, data = _options(mount)
        if mount.is_bind:
            _plan_bind(plan, mount, flags, where)
        elif mount.type in GUEST_FSTYPES:
            plan.mounts.append(GuestMount(mount.destination, mount.type, mount.type, flags, data))
        else:
            raise BundleError(
                f"{where}: mount type {mount.type!r} is unsupported in a VM",
                field=f"mounts[{i}].type", allowed=["bind", *sorted(GUEST_FSTYPES)],
            )  # fmt: skip
    return plan


def _plan_bind(plan: MountPlan, mount: Mount, flags: MountFlag, where: str) -> None:
    try:
        st = os.stat(mount.source)
    except OSError as exc:
        raise BundleError(f"{where}: bind source {mount.source}: {exc.strerror}",
                          field="mounts.source") from None  # fmt: skip
    if stat.S_ISREG(st.st_mode):
        plan.files.append((mount.destination, Path(mount.source)))
    elif stat.S_ISDIR(st.st_mode):
        label = f"vcm-{len(plan.snapshots)}"
        plan.snapshots.append((label, Path(mount.source)))
        plan.mounts.append(GuestMount(mount.destination, f"LABEL={label}", "ext4", flags))
    else:
        raise BundleError(f"{where}: bind source {mount.source} is neither a file nor a "
                          "directory", field="mounts.source")  # fmt: skip


def _options(mount: Mount) -> tuple[MountFlag, str]:
    flags = MountFlag.NONE
    data: list[str] = []
    for option in mount.options:
        if option in _OPTION_FLAGS:
            flags |= _OPTION_FLAGS[option]
        elif "=" in option:
            data.append(option)  # mode=, size=, uid=, gid= of a tmpfs
        elif option not in _IGNORED_OPTIONS:
            raise BundleError(f"mount {mount.destination}: unsupported option {option!r}",
                              field="mounts.options")  # fmt: skip
    return flags, ",".join(data)


def build_snapshots(plan: MountPlan, directory: Path) -> list[BlockDrive]:
    """Build the plan's directory snapshots as ext4 disks in ``directory``.

    Raises:
        ImageError: mke2fs failed.
    """
    drives = []
    for label, source in plan.snapshots:
        out = directory / f"{label}.img"
        size_kb = int(tree_size(source) * 1.25) // 1024 + SNAPSHOT_SLACK_MB * 1024
        with open(out, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
        run_tool(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-m", "0",
             "-E", "lazy_itable_init=1,lazy_journal_init=1", "-d", str(source),
             str(out), f"{size_kb}k"],
            step=f"snapshot the bind mount source {source}",
        )  # fmt: skip
        # mke2fs -d gives the disk's root directory its own defaults (root, 0755): the
        # mount point must have the source's owner and mode, as a bind mount would.
        st = source.stat()
        commands = out.with_suffix(".debugfs")
        commands.write_text(
            f"sif / mode 0{stat.S_IFDIR | stat.S_IMODE(st.st_mode):o}\n"
            f"sif / uid {st.st_uid}\nsif / gid {st.st_gid}\n"
        )
        try:
            run_tool(["debugfs", "-w", "-f", str(commands), str(out)],
                     step=f"set the owner and mode of the snapshot of {source}")  # fmt: skip
        finally:
            commands.unlink()
        drives.append(BlockDrive(file=str(out), id=label))
    return drives


async def apply_in_guest(agent: AgentClient, plan: MountPlan) -> None:
    """Make the plan's mounts and copies in the container root, then make it read-only.

    Raises:
        AgentRequestError: a mount or copy failed in the guest.
    """
    for m in plan.mounts:
        await agent.mount(m.target, source=m.source, fstype=m.fstype, flags=m.flags, data=m.data)
    for destination, source in plan.files:
        # In place: the agent has bind-mounted some of these (/etc/hostname, /etc/hosts),
        # and a rename onto a mount point fails. The mode is the host file's (podman's
        # --init binary must stay executable).
        mode = stat.S_IMODE(source.stat().st_mode)
        await agent.write_file(destination, source.read_bytes(), mode, atomic=False,
                               parents=True)  # fmt: skip
    if plan.readonly_root:
        await agent.mount("/", flags=MountFlag.REMOUNT | MountFlag.BIND | MountFlag.RDONLY)
