"""A guest CID for QEMU's vhost-vsock device, reserved by the kernel, not guessed.

Every vsock guest on a host needs its own context id (CID). Picking a number and hoping is
racy (two sandboxes starting together, or another runtime's VMs). Instead the CID is set
on our own ``/dev/vhost-vsock`` descriptor with ``VHOST_VSOCK_SET_GUEST_CID``: the kernel
refuses a CID in use with ``EADDRINUSE`` (then the next one is tried), and holds an
accepted one for as long as the descriptor is open. QEMU gets that very descriptor
(``vhost-vsock-pci,vhostfd=N``), so the CID stays ours from allocation until QEMU exits,
with no window in which another VM could take it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import struct
from dataclasses import dataclass

from virtcontainers.errors import HypervisorError

__all__ = ["VHOST_VSOCK_DEVICE", "GuestCid", "allocate_guest_cid"]

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"
#: ``_IOW(VHOST_VIRTIO, 0x60, __u64)`` from linux/vhost.h.
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60
#: CIDs 0-2 are reserved (hypervisor, loopback, host); 0xFFFFFFFF is VMADDR_CID_ANY.
FIRST_GUEST_CID = 3
LAST_GUEST_CID = 0xFFFFFFFE
_ATTEMPTS = 64


@dataclass
class GuestCid:
    """A CID held by the open ``/dev/vhost-vsock`` descriptor ``fd`` (pass it to QEMU)."""

    cid: int
    fd: int

    def close(self) -> None:
        """Drop our descriptor (QEMU keeps its own copy, and with it the CID)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _set_cid(fd: int, cid: int) -> None:
    fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))


def allocate_guest_cid(first: int | None = None) -> GuestCid:
    """Open ``/dev/vhost-vsock`` and reserve a free guest CID on it.

    Tries ``first`` (default: a random CID, so concurrent starts rarely collide) and the
    following ones.

    Raises:
        HypervisorError: the device cannot be opened, or no free CID after 64 attempts.
    """
    try:
        fd = os.open(VHOST_VSOCK_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise HypervisorError(
            f"cannot open {VHOST_VSOCK_DEVICE}: {exc.strerror}", driver="qemu"
        ) from exc
    span = LAST_GUEST_CID - FIRST_GUEST_CID + 1
    start = first if first is not None else FIRST_GUEST_CID + secrets.randbelow(span)
    try:
        for i in range(_ATTEMPTS):
            cid = FIRST_GUEST_CID + (start - FIRST_GUEST_CID + i) % span
            try:
                _set_cid(fd, cid)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise HypervisorError(
                    f"VHOST_VSOCK_SET_GUEST_CID {cid} failed: {exc.strerror}", driver="qemu"
                ) from exc
            return GuestCid(cid, fd)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    raise HypervisorError(
        f"no free vsock guest CID in {_ATTEMPTS} attempts from {start}", driver="qemu"
    )
