"""virtcontainers: lightweight VM sandboxes through one hypervisor interface.

The public names below are imported on first use (PEP 562): ``import virtcontainers`` and
every ``vc`` command that needs only a part of the package (``vc ps`` reads the store, ``vc
exec`` talks to a sandbox server) do not pay for the drivers, the config tree and asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtcontainers._lazy import lazy_exports

if TYPE_CHECKING:
    from virtcontainers.config import HypervisorConfig, Param
    from virtcontainers.errors import (
        AgentError,
        AnnotationError,
        ApiError,
        AssetError,
        ConfigError,
        HypervisorError,
        HypervisorTimeout,
        LaunchError,
        NetworkError,
        StateError,
        StoreError,
        UnsupportedError,
        VirtContainersError,
    )
    from virtcontainers.hypervisor import (
        Capabilities,
        Capability,
        Hypervisor,
        HypervisorType,
        VmState,
        new_hypervisor,
    )
    from virtcontainers.network import NetworkMode, NetworkSpec
    from virtcontainers.sandbox import Sandbox, SandboxInfo
    from virtcontainers.sync import SyncSandbox

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "AnnotationError",
    "ApiError",
    "AssetError",
    "Capabilities",
    "Capability",
    "ConfigError",
    "Hypervisor",
    "HypervisorConfig",
    "HypervisorError",
    "HypervisorTimeout",
    "HypervisorType",
    "LaunchError",
    "NetworkError",
    "NetworkMode",
    "NetworkSpec",
    "Param",
    "Sandbox",
    "SandboxInfo",
    "StateError",
    "StoreError",
    "SyncSandbox",
    "UnsupportedError",
    "VirtContainersError",
    "VmState",
    "__version__",
    "new_hypervisor",
]

_HOMES = {
    "virtcontainers.config": ("HypervisorConfig", "Param"),
    "virtcontainers.errors": (
        "AgentError", "AnnotationError", "ApiError", "AssetError", "ConfigError",
        "HypervisorError", "HypervisorTimeout", "LaunchError", "NetworkError", "StateError",
        "StoreError",
        "UnsupportedError", "VirtContainersError",
    ),
    "virtcontainers.hypervisor": (
        "Capabilities", "Capability", "Hypervisor", "HypervisorType", "VmState",
        "new_hypervisor",
    ),
    "virtcontainers.network": ("NetworkMode", "NetworkSpec"),
    "virtcontainers.sandbox": ("Sandbox", "SandboxInfo"),
    "virtcontainers.sync": ("SyncSandbox",),
}  # fmt: skip
__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)
