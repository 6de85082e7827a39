"""``ImageBuildError``: the guest image could not be built (kept apart to avoid import cycles)."""

from __future__ import annotations

from virtcontainers.errors import VirtContainersError

__all__ = ["ImageBuildError"]

_HINT = (
    "to boot without the builder, pass your own kernel and initrd "
    "(--kernel PATH --initrd PATH) or a guest root disk (--guest-disk PATH)"
)


class ImageBuildError(VirtContainersError):
    """Building the guest image failed.

    ``step`` names what was being done (``download linux-image-...``, ``compile the agent``),
    ``detail`` is what went wrong (a command's stderr tail, a missing tool).
    """

    def __init__(self, step: str, detail: str) -> None:
        self.step = step
        self.detail = detail
        super().__init__(f"cannot {step}: {detail.rstrip()}\nhint: {_HINT}")
