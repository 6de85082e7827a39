"""The one error tree of virtcontainers.

::

    VirtContainersError
    ├── ConfigError            bad configuration; names the field / file:key and the allowed values
    │   ├── AnnotationError    an annotation not enabled, or a path outside the allowed globs
    │   └── MissingDependencyError  an optional feature's package is not installed: which extra
    ├── AssetError             missing / relative / hash mismatch
    ├── HypervisorError        carries driver and sandbox id
    │   ├── LaunchError        VMM exited or never became ready: exit code, argv, log tail
    │   ├── StateError         operation not valid in the current state
    │   ├── ApiError           QMP / REST error reply: request, reply
    │   ├── UnsupportedError   driver lacks the capability
    │   └── HypervisorTimeout  a deadline passed: which operation, how long
    ├── AgentError             guest agent unreachable or protocol error
    ├── NetworkError           a host-side network step (ip / nft) failed: argv, stderr
    ├── StoreError             state store problems (corrupt document, lock, disk full)
    └── ImageError             OCI images: carries the reference
        ├── ImageNotFoundError   unknown reference, unreachable registry, not in the store
        ├── ImageDigestError     a blob's content does not match its digest (corrupt/truncated)
        ├── ImageArchError       the image is for another OS/architecture
        └── ImageSpaceError      the image does not fit the space it needs (host cache, scratch)

Errors carry data as attributes so callers never parse messages. Backend exceptions
(``qemu.qmp``, ``httpx``, ``OSError``) are translated at one boundary per driver with
``raise ... from exc``; ``asyncio.CancelledError`` and ``KeyboardInterrupt`` are never wrapped.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import TypeVar

__all__ = [
    "AgentError",
    "AnnotationError",
    "ApiError",
    "AssetError",
    "BundleError",
    "ContainerError",
    "ContainerNotFoundError",
    "ContainerStateError",
    "ConfigError",
    "HypervisorError",
    "HypervisorTimeout",
    "ImageArchError",
    "ImageDigestError",
    "ImageError",
    "ImageNotFoundError",
    "ImageSpaceError",
    "LaunchError",
    "MissingDependencyError",
    "NetworkError",
    "StateError",
    "StoreError",
    "UnsupportedError",
    "VirtContainersError",
]


class VirtContainersError(Exception):
    """Root of every error raised by virtcontainers."""


class ConfigError(VirtContainersError):
    """A configuration value is missing or wrong.

    ``field`` names the offending field (``file:section.key`` for config files) and
    ``allowed`` lists the accepted values where there is a closed set.
    """

    def __init__(
        self, message: str, *, field: str | None = None, allowed: Iterable[str] | None = None
    ) -> None:
        self.field = field
        self.allowed: tuple[str, ...] = tuple(allowed) if allowed is not None else ()
        if self.allowed:
            message = f"{message} (allowed: {', '.join(self.allowed)})"
        super().__init__(message)


E = TypeVar("E", bound=enum.Enum)


def parse_enum(kind: type[E], value: object, *, field: str, message: str) -> E:
    """``kind(value)`` (a member passes as it is).

    Raises:
        ConfigError: ``message``, naming ``field`` and the allowed values.
    """
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(message, field=field, allowed=[str(m.value) for m in kind]) from None


class AnnotationError(ConfigError):
    """An annotation that is not enabled, unknown, or names a path outside the allowed globs."""

    def __init__(self, message: str, *, annotation: str) -> None:
        self.annotation = annotation
        super().__init__(message, field=annotation)


class MissingDependencyError(ConfigError):
    """An optional feature was asked for but its package is not installed.

    ``package`` is the missing import, ``extra`` the ``virtcontainers[...]`` extra that
    installs it.
    """

    def __init__(self, feature: str, *, package: str, extra: str, field: str | None = None) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{feature} needs {package}, which is not installed: "
            f"pip install 'virtcontainers[{extra}]'",
            field=field,
        )


class AssetError(VirtContainersError):
    """A boot asset (kernel, image, initrd, firmware, binary) is missing, relative or corrupt."""

    def __init__(self, message: str, *, asset: str, path: str) -> None:
        self.asset = asset
        self.path = path
        super().__init__(message)


class HypervisorError(VirtContainersError):
    """A failure inside a hypervisor driver. Carries the driver name and sandbox id."""

    def __init__(self, message: str, *, driver: str = "", sandbox_id: str = "") -> None:
        self.driver = driver
        self.sandbox_id = sandbox_id
        prefix = ":".join(p for p in (driver, sandbox_id) if p)
        super().__init__(f"[{prefix}] {message}" if prefix else message)


class LaunchError(HypervisorError):
    """The VMM exited early or never became ready."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None,
        argv: Sequence[str],
        log_tail: str,
        driver: str = "",
        sandbox_id: str = "",
    ) -> None:
        self.exit_code = exit_code
        self.argv = tuple(argv)
        self.log_tail = log_tail
        detail = f"{message} (exit code {exit_code})" if exit_code is not None else message
        if log_tail.strip():
            detail += "\n--- VMM log tail ---\n" + log_tail.rstrip()
        super().__init__(detail, driver=driver, sandbox_id=sandbox_id)


class StateError(HypervisorError):
    """An operation was called in a state that does not allow it."""

    def __init__(
        self,
        operation: str,
        state: str,
        required: Iterable[str],
        *,
        driver: str = "",
        sandbox_id: str = "",
    ) -> None:
        self.operation = operation
        self.state = state
        self.required = tuple(required)
        super().__init__(
            f"cannot {operation} while {state}; requires {' or '.join(self.required)}",
            driver=driver,
            sandbox_id=sandbox_id,
        )


class ApiError(HypervisorError):
    """The VMM's control API (QMP or REST) answered with an error."""

    def __init__(
        self,
        message: str,
        *,
        request: str,
        reply: str,
        status: int | None = None,
        driver: str = "",
        sandbox_id: str = "",
    ) -> None:
        self.request = request
        self.reply = reply
        self.status = status
        super().__init__(f"{request}: {message}", driver=driver, sandbox_id=sandbox_id)


class UnsupportedError(HypervisorError):
    """The driver does not have this capability."""

    def __init__(self, operation: str, *, driver: str, sandbox_id: str = "") -> None:
        self.operation = operation
        super().__init__(
            f"{operation} is not supported by the {driver} driver",
            driver=driver,
            sandbox_id=sandbox_id,
        )


class HypervisorTimeout(HypervisorError):
    """A deadline passed while waiting for the VMM."""

    def __init__(
        self, operation: str, seconds: float, *, driver: str = "", sandbox_id: str = ""
    ) -> None:
        self.operation = operation
        self.seconds = seconds
        super().__init__(
            f"{operation} did not finish within {seconds:g} s",
            driver=driver,
            sandbox_id=sandbox_id,
        )


class AgentError(VirtContainersError):
    """The guest agent is unreachable, incompatible, or broke the protocol."""


class NetworkError(VirtContainersError):
    """Setting up or tearing down a sandbox's host-side network failed (an ``ip`` or ``nft``
    command, or a forwarder): what ran and what it said."""

    def __init__(self, message: str, *, argv: Sequence[str] = (), stderr: str = "") -> None:
        self.argv = list(argv)
        self.stderr = stderr
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{message}{detail}")


class StoreError(VirtContainersError):
    """The state store failed: corrupt or future-version document, lock, or disk error."""

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class ImageError(VirtContainersError):
    """An OCI image could not be resolved, fetched, verified, unpacked or turned into a disk.

    ``ref`` is the reference as the user wrote it; ``detail`` the tool's or check's own words.
    """

    def __init__(self, message: str, *, ref: str = "", detail: str = "") -> None:
        self.ref = ref
        self.detail = detail
        text = f"image {ref}: {message}" if ref else message
        super().__init__(f"{text}: {detail}" if detail else text)


class ImageNotFoundError(ImageError):
    """No such image: an unknown reference, an unreachable registry, or not in the local store."""


class ImageDigestError(ImageError):
    """A blob (manifest, config or layer) does not hash to its digest: ``digest`` names it."""

    def __init__(self, message: str, *, ref: str = "", digest: str, actual: str = "") -> None:
        self.digest = digest
        self.actual = actual
        super().__init__(message, ref=ref)


class ImageArchError(ImageError):
    """The image was built for another OS/architecture than this host's."""

    def __init__(self, message: str, *, ref: str = "", image_arch: str, host_arch: str) -> None:
        self.image_arch = image_arch
        self.host_arch = host_arch
        super().__init__(message, ref=ref)


class ImageSpaceError(ImageError):
    """The image needs more space than there is (``needed`` and ``available`` in bytes)."""

    def __init__(self, message: str, *, ref: str = "", needed: int, available: int) -> None:
        self.needed = needed
        self.available = available
        super().__init__(message, ref=ref)


class BundleError(ConfigError):
    """An OCI bundle cannot be run: no or unreadable config.json, bad JSON, a missing root
    file system, or a feature the runtime does not support (``field`` names the spec field)."""


class ContainerError(VirtContainersError):
    """An OCI runtime (``vc-runtime``) operation on a container failed; ``id`` names it."""

    def __init__(self, message: str, *, id: str = "") -> None:
        self.id = id
        super().__init__(message)


class ContainerNotFoundError(ContainerError):
    """No container with this id in the runtime's root (the words podman and CRI-O match:
    "does not exist")."""

    def __init__(self, id: str) -> None:
        super().__init__(f"container {id} does not exist", id=id)


class ContainerStateError(ContainerError):
    """The container's state does not allow the operation (e.g. delete while running)."""

    def __init__(self, id: str, operation: str, state: str, required: Iterable[str]) -> None:
        self.operation = operation
        self.state = state
        self.required = tuple(required)
        super().__init__(
            f"cannot {operation} container {id}: it is {state}; "
            f"requires {' or '.join(self.required)}",
            id=id,
        )
