"""Persisted state: the per-sandbox document store and the hypervisor's reattach state.

The names below are imported on first use (PEP 562): :mod:`.layout` (where a sandbox's run
dir is) must be importable without msgspec and the records, for `vc exec`'s fast path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtcontainers._lazy import lazy_exports

if TYPE_CHECKING:
    from virtcontainers.persist.document import SCHEMA_VERSION, SandboxDocument
    from virtcontainers.persist.hypervisor_state import Bridge, HypervisorState
    from virtcontainers.persist.layout import default_root, validate_sandbox_id
    from virtcontainers.persist.store import StateStore

__all__ = [
    "SCHEMA_VERSION",
    "Bridge",
    "HypervisorState",
    "SandboxDocument",
    "StateStore",
    "default_root",
    "validate_sandbox_id",
]

_HOMES = {
    "virtcontainers.persist.document": ("SCHEMA_VERSION", "SandboxDocument"),
    "virtcontainers.persist.hypervisor_state": ("Bridge", "HypervisorState"),
    "virtcontainers.persist.layout": ("default_root", "validate_sandbox_id"),
    "virtcontainers.persist.store": ("StateStore",),
}
__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)
