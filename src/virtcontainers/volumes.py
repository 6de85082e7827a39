"""Volumes: host directories mounted live in the guest, as docker's ``-v HOST:GUEST[:ro]``.

A volume is a virtio-9p share (a :class:`~virtcontainers.devices.FsShare`, cold-plugged by the
driver like any other device) that the guest agent mounts at the volume's target once the
sandbox has started; in an image sandbox the target is in the image's root. Each side sees
the other's writes at once. ``read_only`` is enforced twice: by QEMU (``readonly=on``) and by
the guest's read-only mount. 9p needs a guest kernel that has it (the ``generic`` guest
flavour, which ``vc run -v`` picks) and a driver with virtio-9p (QEMU).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from virtcontainers.agent.protocol import AgentRequestError, MountFlag
from virtcontainers.devices import FsShare
from virtcontainers.errors import ConfigError
from virtcontainers.persist.records import VolumeRecord

if TYPE_CHECKING:
    from virtcontainers.agent.client import AgentClient

__all__ = ["Volume", "mount_volumes", "volume_shares"]

#: The 9p options of every volume mount: the virtio transport, Linux semantics (9p2000.L),
#: 512 KiB messages (the default 8 KiB makes large reads and writes slow).
NINE_P_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288"


class Volume(VolumeRecord, frozen=True):
    """A host directory (``source``) mounted in the guest at ``target``; a
    :class:`~virtcontainers.persist.records.VolumeRecord` (what the sandbox document keeps)."""

    @classmethod
    def parse(cls, text: str) -> Volume:
        """docker's ``HOST_DIR:GUEST_PATH[:ro|rw]``; a relative ``HOST_DIR`` is made absolute.

        Raises:
            ConfigError: another form, a mode other than ro/rw, or what :meth:`check` refuses.
        """
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise ConfigError(
                f"--volume {text!r}: give HOST_DIR:GUEST_PATH[:ro|rw]", field="--volume"
            )
        mode = parts[2] if len(parts) == 3 else "rw"
        if mode not in ("ro", "rw"):
            raise ConfigError(
                f"--volume {text!r}: the mode must be ro or rw, got {mode!r}", field="--volume"
            )
        volume = cls(source=str(Path(parts[0]).resolve()), target=parts[1], read_only=mode == "ro")
        volume.check()
        return volume

    def check(self) -> None:
        """Raises ConfigError: the source is not an existing directory (by absolute path), or
        the target is not an absolute guest path other than ``/``."""
        where = f"--volume {self.source}:{self.target}"
        source = Path(self.source)
        if not source.is_absolute() or not source.is_dir():
            raise ConfigError(
                f"{where}: {self.source} is not a directory (give an existing host directory "
                "by absolute path)",
                field="--volume",
            )
        if not self.target.startswith("/") or self.target.rstrip("/") == "" or "\0" in self.target:
            raise ConfigError(
                f"{where}: the guest path must be absolute and not / itself", field="--volume"
            )


def share_tag(index: int) -> str:
    """The 9p mount tag of the sandbox's ``index``-th volume."""
    return f"vcvol{index}"


def volume_shares(volumes: Sequence[VolumeRecord]) -> list[FsShare]:
    """The devices that carry ``volumes`` (cold-plugged with the sandbox's others)."""
    return [
        FsShare(host_path=v.source, mount_tag=share_tag(i), read_only=v.read_only)
        for i, v in enumerate(volumes)
    ]


async def mount_volumes(agent: AgentClient, volumes: Sequence[VolumeRecord]) -> None:
    """Mount each volume's share at its target, in order (so a volume may sit inside one
    mounted before it).

    Raises:
        ConfigError: the guest kernel has no 9p (ENODEV). AgentRequestError: another
            failure of the mount in the guest (errno and step in the message).
    """
    for index, volume in enumerate(volumes):
        flags = MountFlag.RDONLY if volume.read_only else MountFlag.NONE
        try:
            await agent.mount(
                volume.target, source=share_tag(index), fstype="9p", flags=flags,
                data=NINE_P_OPTIONS,
            )  # fmt: skip
        except AgentRequestError as exc:
            if exc.errno != errno.ENODEV:
                raise
            raise ConfigError(
                f"--volume {volume.source}:{volume.target}: the guest kernel has no 9p; use "
                "the generic guest flavour (--flavour generic, or leave --flavour out)",
                field="--volume",
            ) from exc
