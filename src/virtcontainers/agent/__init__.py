"""Host side of the guest agent protocol (``docs/agent-protocol.md``).

- :mod:`.protocol`: frame and TLV codec (pure, no I/O)
- :mod:`.transport`: unix socket / hybrid vsock / vsock connectors
- :mod:`.client`: :class:`AgentClient`, the asyncio client
"""

from __future__ import annotations

from virtcontainers.agent.client import (
    AgentClient,
    AgentRequestError,
    ExecProcess,
    ExecResult,
    ExitStatus,
    Stream,
    VersionInfo,
)
from virtcontainers.agent.protocol import PROTOCOL_MAJOR, PROTOCOL_MINOR
from virtcontainers.agent.transport import connect_hybrid_vsock, connect_unix, connect_vsock

__all__ = [
    "PROTOCOL_MAJOR",
    "PROTOCOL_MINOR",
    "AgentClient",
    "AgentRequestError",
    "ExecProcess",
    "ExecResult",
    "ExitStatus",
    "Stream",
    "VersionInfo",
    "connect_hybrid_vsock",
    "connect_unix",
    "connect_vsock",
]
