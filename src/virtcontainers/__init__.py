"""virtcontainers: lightweight VM sandboxes through one hypervisor interface."""

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
