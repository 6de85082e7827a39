"""Persisted state: the per-sandbox document store and the hypervisor's reattach state."""

from virtcontainers.persist.hypervisor_state import Bridge, HypervisorState
from virtcontainers.persist.store import (
    SCHEMA_VERSION,
    SandboxDocument,
    StateStore,
    default_root,
    validate_sandbox_id,
)

__all__ = [
    "SCHEMA_VERSION",
    "Bridge",
    "HypervisorState",
    "SandboxDocument",
    "StateStore",
    "default_root",
    "validate_sandbox_id",
]
