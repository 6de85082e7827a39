"""The read-only root disk of an image: erofs (compact, fast to build) or ext4 as fallback.

The guest mounts it read-only under an overlay (see ``docs/agent-protocol.md``, "Container
root"); the agent tells the image disk from others by its read-only flag and its superblock
magic, so the disk needs no label and no partition table.
"""

from __future__ import annotations

import os
import shutil
from enum import StrEnum
from pathlib import Path

from virtcontainers.errors import ConfigError, ImageError
from virtcontainers.images.tools import run_tool

__all__ = ["DiskFormat", "build_root_disk", "make_scratch_disk", "tree_size"]

#: ext4 label of a scratch (writable upper) disk: the guest agent looks for it.
SCRATCH_LABEL = "vc-scratch"
#: The smallest scratch disk: ext4 metadata alone takes a few MiB.
MIN_SCRATCH_MB = 16


class DiskFormat(StrEnum):
    EROFS = "erofs"
    EXT4 = "ext4"


def tree_size(root: Path) -> int:
    """Bytes used by the regular files under ``root`` (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _format() -> DiskFormat:
    forced = os.environ.get("VC_ROOT_DISK_FORMAT", "")
    if forced:
        try:
            return DiskFormat(forced)
        except ValueError:
            raise ConfigError(
                f"VC_ROOT_DISK_FORMAT={forced!r}", field="VC_ROOT_DISK_FORMAT",
                allowed=[f.value for f in DiskFormat],
            ) from None  # fmt: skip
    has_erofs = shutil.which("mkfs.erofs") or shutil.which("mkfs.erofs", path="/usr/sbin:/sbin")
    return DiskFormat.EROFS if has_erofs else DiskFormat.EXT4


def build_root_disk(rootfs: Path, out: Path, *, ref: str = "") -> DiskFormat:
    """Write a read-only file system image of the directory ``rootfs`` to ``out``.

    erofs when ``mkfs.erofs`` is installed, else ext4 with ``mke2fs -d``;
    ``VC_ROOT_DISK_FORMAT=erofs|ext4`` forces one. Ownership is kept as unpacked (root
    unpacks keep the image's uids; a rootless unpack makes every file root's).

    Raises:
        ImageError: the tool is missing or failed.
    """
    fmt = _format()
    rootless = os.geteuid() != 0
    if fmt is DiskFormat.EROFS:
        argv = ["mkfs.erofs", "--quiet", "-T0"]
        if rootless:
            argv.append("--all-root")
        run_tool([*argv, str(out), str(rootfs)], step="build the erofs root disk", ref=ref)
        return fmt
    # ext4 needs a size up front: the data plus room for metadata (inodes, journal-less).
    size = tree_size(rootfs)
    size_kb = max(int(size * 1.25) // 1024 + 16 * 1024, 32 * 1024)
    argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0", "-d", str(rootfs)]
    if rootless:
        argv += ["-E", "root_owner=0:0"]
    run_tool([*argv, str(out), f"{size_kb}k"], step="build the ext4 root disk", ref=ref)
    return fmt


def make_scratch_disk(path: Path, size_mb: int) -> None:
    """A sparse ext4 disk labelled ``vc-scratch`` for the writable upper of an image sandbox.

    Raises:
        ConfigError: ``size_mb`` below :data:`MIN_SCRATCH_MB`. ImageError: mke2fs failed.
    """
    if size_mb < MIN_SCRATCH_MB:
        raise ConfigError(
            f"--disk-size {size_mb} MiB is too small for a scratch disk "
            f"(at least {MIN_SCRATCH_MB} MiB)",
            field="disk_size",
        )
    with open(path, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.truncate(size_mb * 1024 * 1024)
    try:
        run_tool(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-L", SCRATCH_LABEL, "-m", "0",
             "-E", "lazy_itable_init=1,lazy_journal_init=1", str(path)],
            step="make the scratch disk",
        )  # fmt: skip
    except ImageError:
        path.unlink(missing_ok=True)
        raise
