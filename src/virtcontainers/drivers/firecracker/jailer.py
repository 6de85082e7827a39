"""Firecracker's jailer: its command line and the chroot layout it builds.

The jailer creates ``<chroot_base>/<exec file name>/<id>/root/``, copies the Firecracker
binary in, enters cgroups and a network namespace, drops to ``--uid``/``--gid``, chroots
and execs Firecracker. Everything Firecracker opens (kernel, initrd, drives, FIFOs, the
vsock socket) must then be inside that root, and the API sees chroot-relative paths
(``/vmlinux``). Like the reference, we hard-link the assets in (copy when the link crosses
file systems) before the jailer runs, and the host reaches the API socket at
``<root>/run/firecracker.socket``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from virtcontainers.errors import ConfigError

__all__ = [
    "JAILED_API_SOCKET",
    "JailLayout",
    "jail_id",
    "jailer_argv",
    "numa_node_cgroups",
]

#: Firecracker's default API socket, inside the chroot.
JAILED_API_SOCKET = "/run/firecracker.socket"
#: The jailer accepts ids of up to 64 characters: letters, digits and hyphens.
_ID_MAX = 64
_ID_BAD = re.compile(r"[^A-Za-z0-9-]")


def jail_id(sandbox_id: str) -> str:
    """A jailer ``--id`` for ``sandbox_id`` (the reference truncates to 64 characters)."""
    cleaned = _ID_BAD.sub("-", sandbox_id)[:_ID_MAX]
    if not cleaned:
        raise ConfigError("an empty sandbox id cannot name a jail", field="id")
    return cleaned


@dataclass(frozen=True)
class JailLayout:
    """Where one jailed Firecracker lives on the host."""

    chroot_base: Path
    exec_file: Path
    id: str

    @property
    def instance_dir(self) -> Path:
        """``<chroot_base>/<exec name>/<id>``: the jailer's per-VM directory."""
        return self.chroot_base / self.exec_file.name / self.id

    @property
    def root(self) -> Path:
        """The chroot: ``<instance_dir>/root``."""
        return self.instance_dir / "root"

    def host_path(self, jailed: str) -> Path:
        """The host path of a chroot-relative path such as ``/run/firecracker.socket``."""
        return self.root / jailed.lstrip("/")

    def prepare(self) -> None:
        """Create the chroot and its ``run`` directory (0700) before the jailer runs."""
        (self.root / "run").mkdir(mode=0o700, parents=True, exist_ok=True)

    def link_in(self, source: str | os.PathLike[str], name: str) -> str:
        """Make ``source`` visible in the jail as ``/<name>``: a hard link, or a copy when
        the jail is on another file system. Returns the chroot-relative path.

        Raises:
            ConfigError: ``source`` is missing, or is not a regular file and cannot be
                linked (a block device on another file system).
        """
        src = Path(source)
        dest = self.root / name
        dest.unlink(missing_ok=True)
        try:
            os.link(src, dest)
        except FileNotFoundError as exc:
            raise ConfigError(f"{src} does not exist", field=name) from exc
        except OSError as exc:
            if not src.is_file():
                raise ConfigError(
                    f"cannot link {src} into the jail at {dest}: {exc.strerror}", field=name
                ) from exc
            shutil.copy2(src, dest)
        return "/" + name

    def unlink(self, name: str) -> None:
        with contextlib.suppress(OSError):
            (self.root / name).unlink()

    def remove(self) -> None:
        """Remove the whole per-VM directory (links only: the sources stay)."""
        shutil.rmtree(self.instance_dir, ignore_errors=True)


def numa_node_cgroups(node: int = 0) -> list[str]:
    """``--cgroup`` values pinning the VM to one NUMA node: the reference passed the old
    jailer's ``--node 0``, which the jailer turned into exactly these two settings."""
    try:
        cpus = Path(f"/sys/devices/system/node/node{node}/cpulist").read_text().strip()
    except OSError:
        cpus = ""
    out = [f"cpuset.mems={node}"]
    if cpus:
        out.append(f"cpuset.cpus={cpus}")
    return out


def cgroup_version() -> int:
    """2 on a unified cgroup hierarchy, else 1."""
    return 2 if Path("/sys/fs/cgroup/cgroup.controllers").exists() else 1


def jailer_argv(
    jailer: str,
    layout: JailLayout,
    *,
    uid: int,
    gid: int,
    netns: str = "",
    daemonize: bool = False,
    cgroups: Sequence[str] = (),
    cgroup_ver: int | None = None,
    firecracker_args: Sequence[str] = (),
) -> list[str]:
    """The jailer's argv; ``firecracker_args`` go after ``--`` to Firecracker itself.

    ``daemonize`` is off by default: the jailer would call ``setsid()`` (which fails in a
    process that already leads its own session, as our VMMs do) and send Firecracker's
    output to /dev/null, so we supervise it as a plain child instead.
    """
    argv = [
        jailer,
        "--id",
        layout.id,
        "--exec-file",
        str(layout.exec_file),
        "--uid",
        str(uid),
        "--gid",
        str(gid),
        "--chroot-base-dir",
        str(layout.chroot_base),
        "--cgroup-version",
        str(cgroup_ver if cgroup_ver is not None else cgroup_version()),
    ]
    for value in cgroups:
        argv += ["--cgroup", value]
    if netns:
        argv += ["--netns", netns]
    if daemonize:
        argv.append("--daemonize")
    if firecracker_args:
        argv += ["--", *firecracker_args]
    return argv
