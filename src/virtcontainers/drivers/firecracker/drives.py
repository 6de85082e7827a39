"""Firecracker's block hot-plug: the reference's pool of placeholder drives.

Firecracker cannot add a drive to a running VM, so every VM boots with
:data:`DISK_POOL_SIZE` drives backed by empty files; "hot-plugging" a disk is
``PATCH /drives/drive_N`` with the disk's path, and unplugging it swaps the placeholder
back. :class:`DrivePool` keeps which slot holds which drive (and, when jailed, the name of
the link made inside the chroot); the driver sends the requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from virtcontainers.devices import BlockDrive
from virtcontainers.drivers.firecracker.paths import FcPaths, placeholder_id
from virtcontainers.errors import ConfigError, HypervisorError

__all__ = ["DISK_POOL_SIZE", "ROOT_DRIVE_ID", "DrivePool", "Swap", "guest_disk_name"]

#: The reference's pool of placeholder drives, swapped by ``PATCH /drives`` for hot-plug.
DISK_POOL_SIZE = 8
ROOT_DRIVE_ID = "rootfs"


def guest_disk_name(index: int) -> str:
    """``vda``, ``vdb`` ... ``vdz``, ``vdaa`` ...: the guest's name of the index-th disk."""
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return "vd" + letters


@dataclass(frozen=True)
class Swap:
    """One ``PATCH /drives/<drive_id>`` that puts ``path`` behind placeholder ``slot``."""

    slot: int
    drive_id: str
    path: str


@dataclass
class DrivePool:
    """Placeholder slot -> id of the drive swapped in ("" when restored from a state)."""

    error: Callable[[str], HypervisorError]
    slots: dict[int, str] = field(default_factory=dict)
    #: Jail-relative names of files linked in for hot-plugged drives, by slot.
    jail_links: dict[int, str] = field(default_factory=dict)

    def plug(self, drive: BlockDrive, paths: FcPaths) -> Swap:
        """Claim a free slot for ``drive`` (linking its file into the jail when jailed).

        Raises:
            HypervisorError: the drive is plugged already, no slot is free, or its file
                cannot be linked into the jail.
        """
        if drive.id in self.slots.values():
            raise self.error(f"drive {drive.id!r} is already plugged")
        free = next((s for s in range(DISK_POOL_SIZE) if s not in self.slots), None)
        if free is None:
            raise self.error(f"all {DISK_POOL_SIZE} hot-plug drive slots are in use")
        path = drive.file
        if paths.jail is not None:
            name = f"hotplug-{free}"
            try:
                path = paths.jail.link_in(drive.file, name)
            except ConfigError as exc:
                raise self.error(f"cannot hot-plug {drive.id}: {exc}") from exc
            self.jail_links[free] = name
        self.slots[free] = drive.id
        return Swap(free, placeholder_id(free), path)

    def undo(self, swap: Swap, paths: FcPaths) -> None:
        """Give back a slot whose ``PATCH`` failed."""
        del self.slots[swap.slot]
        self._unlink(swap.slot, paths)

    def unplug(self, drive: BlockDrive, paths: FcPaths) -> Swap:
        """The swap that puts the placeholder back behind ``drive``'s slot.

        Raises:
            HypervisorError: ``drive`` is not plugged.
        """
        # By index (the caller's record of our answer; survives save/load), else by id.
        slot: int | None = None
        if self.slots.get(drive.index) in (drive.id, ""):
            slot = drive.index
        else:
            slot = next((s for s, i in self.slots.items() if i == drive.id), None)
        if slot is None:
            raise self.error(f"drive {drive.id!r} is not plugged")
        return Swap(slot, placeholder_id(slot), paths.api(paths.placeholder_name(slot)))

    def unplugged(self, swap: Swap, paths: FcPaths) -> None:
        """Forget the drive of a slot whose placeholder is back."""
        del self.slots[swap.slot]
        self._unlink(swap.slot, paths)

    def _unlink(self, slot: int, paths: FcPaths) -> None:
        if paths.jail is not None and slot in self.jail_links:
            paths.jail.unlink(self.jail_links.pop(slot))

    def clear(self) -> None:
        self.jail_links.clear()
