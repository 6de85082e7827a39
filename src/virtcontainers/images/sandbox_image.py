"""What a sandbox needs from its image: devices, a kernel parameter, exec defaults.

A sandbox made with an image gets, through every driver's ordinary cold-plug path:

* the image's root disk as a read-only :class:`~virtcontainers.devices.BlockDrive`
  (``id="vc-image"``), shared by every sandbox (and template clone) of that image;
* with ``disk_size_mb`` a scratch disk of its own (``<run dir>/scratch.img``, sparse ext4
  labelled ``vc-scratch``) that holds the overlay's writable upper instead of guest RAM;
* ``vc.rootfs=tmpfs`` or ``vc.rootfs=scratch`` on the kernel command line, which makes the
  guest agent build the container root and enter it (``docs/agent-protocol.md``).

It is recorded in the sandbox document (its ``image`` field), so ``vc exec`` from another
process applies the same Env, WorkingDir and User.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

from virtcontainers.config import HypervisorConfig, Param
from virtcontainers.devices import BlockDrive
from virtcontainers.images.config import ProcessSpec, process_spec, resolve_user
from virtcontainers.images.rootdisk import make_scratch_disk
from virtcontainers.images.store import StoredImage
from virtcontainers.persist.records import ImageRecord

__all__ = ["IMAGE_DRIVE_ID", "SCRATCH_DRIVE_ID", "SandboxImage", "exec_defaults"]

IMAGE_DRIVE_ID = "vc-image"
SCRATCH_DRIVE_ID = "vc-scratch"
ROOTFS_PARAM = "vc.rootfs"


class SandboxImage(ImageRecord, frozen=True):
    """A sandbox's image: which disk, which config, how big a scratch upper (0: tmpfs).

    It is the :class:`~virtcontainers.persist.records.ImageRecord` the sandbox document
    stores, with what the sandbox does with it."""

    @classmethod
    def from_stored(cls, image: StoredImage, ref: str, *, scratch_mb: int = 0) -> SandboxImage:
        return cls(
            id=image.id,
            ref=ref,
            disk=str(image.disk),
            config=image.config,
            passwd=image.passwd,
            group=image.group,
            scratch_mb=scratch_mb,
        )

    def with_scratch(self, scratch_mb: int) -> SandboxImage:
        return msgspec.structs.replace(self, scratch_mb=scratch_mb)

    # -- what the VM gets --------------------------------------------------------------

    def configure(self, config: HypervisorConfig) -> HypervisorConfig:
        """A copy of ``config`` with the ``vc.rootfs`` kernel parameter (set once)."""
        out = config.copy()
        out.boot.kernel_params = [p for p in out.boot.kernel_params if p.key != ROOTFS_PARAM]
        out.add_kernel_param(Param(ROOTFS_PARAM, "scratch" if self.scratch_mb else "tmpfs"))
        return out

    def devices(self, run_dir: Path) -> list[BlockDrive]:
        """The read-only image disk, and the scratch disk (created now in ``run_dir``).

        Raises:
            ConfigError: a scratch size below the minimum. ImageError: mke2fs failed.
        """
        drives = [BlockDrive(file=self.disk, id=IMAGE_DRIVE_ID, read_only=True)]
        if self.scratch_mb:
            scratch = run_dir / "scratch.img"
            make_scratch_disk(scratch, self.scratch_mb)
            drives.append(BlockDrive(file=str(scratch), id=SCRATCH_DRIVE_ID))
        return drives

    # -- what processes get --------------------------------------------------------------

    def process(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        entrypoint: Sequence[str] | None = None,
    ) -> ProcessSpec:
        """The process ``vc run`` starts (Entrypoint + Cmd rules; see :func:`process_spec`)."""
        return process_spec(
            self.config, argv, env=env, workdir=workdir, user=user, entrypoint=entrypoint,
            passwd=self.passwd, group=self.group,
        )  # fmt: skip

    def resolve_user(self, user: str) -> tuple[int, int]:
        return resolve_user(user, self.passwd, self.group)

    @staticmethod
    def numeric_user(user: str) -> tuple[int, int]:
        """``user`` for a guest without an image (its /etc/passwd has only root).

        Raises:
            ConfigError: a name other than root.
        """
        return resolve_user(user, "root:x:0:0:root:/root:/bin/sh\n", "root:x:0:\n")

    @classmethod
    def from_record(cls, record: ImageRecord) -> SandboxImage:
        """The image a sandbox record names."""
        return record if isinstance(record, SandboxImage) else cls(**msgspec.structs.asdict(record))


def exec_defaults(
    image: SandboxImage | None,
    env: Mapping[str, str] | None,
    cwd: str | None,
    uid: int | None,
    gid: int | None,
    user: str | None,
) -> tuple[dict[str, str] | None, str | None, int | None, int | None]:
    """``docker exec``'s defaults in a sandbox. With its ``image``: the image's Env under
    ``env``, its WorkingDir unless ``cwd``, its User unless ``user`` or ``uid``/``gid`` (no
    Entrypoint for an exec). Without one (the busybox guest): ``env`` and ``cwd`` as given
    (``None``: the agent's own), ``user`` a number or root, the one name that guest knows.

    Raises:
        ConfigError: ``user`` is not in the image's /etc/passwd or /etc/group (without an
            image: a name other than root).
    """
    ids: tuple[int | None, int | None] = (None, None)
    if image is not None:
        spec = image.process(["-"], env=env, workdir=cwd, user=user)
        env, cwd, ids = spec.env, spec.cwd, (spec.uid, spec.gid)
    elif user is not None:
        ids = SandboxImage.numeric_user(user)
    return (
        None if env is None else dict(env),
        cwd,
        ids[0] if uid is None else uid,
        ids[1] if gid is None else gid,
    )
