"""Persisted state: the per-sandbox document store and the hypervisor's reattach state."""

from virtcontainers.persist.document import SCHEMA_VERSION, SandboxDocument
from virtcontainers.persist.hypervisor_state import Bridge, HypervisorState
from virtcontainers.persist.store import StateStore, default_root, validate_sandbox_id

__all__ = [
    "SCHEMA_VERSION",
    "Bridge",
    "HypervisorState",
    "SandboxDocument",
    "StateStore",
    "default_root",
    "validate_sandbox_id",
]
