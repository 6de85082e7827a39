"""Boot and binary assets: paths that must be absolute and may carry a SHA-512 to verify."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from virtcontainers.errors import AssetError

__all__ = ["Asset", "AssetType"]


class AssetType(StrEnum):
    """The reference's asset kinds; the value is the annotation suffix that overrides it."""

    KERNEL = "kernel"
    IMAGE = "image"
    INITRD = "initrd"
    HYPERVISOR = "hypervisor"
    HYPERVISOR_CTL = "hypervisor_ctl"
    JAILER = "jailer"
    FIRMWARE = "firmware"


@dataclass(frozen=True, slots=True)
class Asset:
    """A file the VM needs, optionally pinned by its SHA-512 (hex)."""

    type: AssetType
    path: str
    sha512: str = ""

    def validate(self) -> None:
        """Check the asset is usable.

        Raises:
            AssetError: the path is empty or relative, the file is missing, or its SHA-512
                differs from the pinned one.
        """
        if not self.path:
            raise AssetError(f"{self.type} asset has an empty path", asset=self.type, path="")
        if not Path(self.path).is_absolute():
            raise AssetError(
                f"{self.type} asset path must be absolute, got {self.path!r}",
                asset=self.type,
                path=self.path,
            )
        if not self.sha512:
            return
        try:
            digest = _sha512_of(Path(self.path))
        except OSError as exc:
            raise AssetError(
                f"cannot read {self.type} asset: {exc.strerror}", asset=self.type, path=self.path
            ) from exc
        if not hmac.compare_digest(digest, self.sha512.lower()):
            raise AssetError(
                f"{self.type} asset SHA-512 mismatch: expected {self.sha512}, file has {digest}",
                asset=self.type,
                path=self.path,
            )


def _sha512_of(path: Path) -> str:
    h = hashlib.sha512()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
