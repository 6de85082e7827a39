"""Host side of the guest agent protocol (``docs/agent-protocol.md``).

- :mod:`.protocol`: frame and TLV codec (pure, no I/O)
- :mod:`.transport`: unix socket / hybrid vsock / vsock connectors
- :mod:`.client`: :class:`AgentClient`, the asyncio client
- :mod:`.attach`: following an exec attached to a terminal or stdio (the CLI, the OCI relay)

The names below are imported on first use (PEP 562), so that importing the codec
(``virtcontainers.agent.protocol``, as the CLI's blocking server client does) does not
import asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtcontainers._lazy import lazy_exports

if TYPE_CHECKING:
    from virtcontainers.agent.client import (
        AgentClient,
        AgentRequestError,
        ExecProcess,
        ExecResult,
        ExitStatus,
        Stream,
        VersionInfo,
    )
    from virtcontainers.agent.protocol import PROTOCOL_MAJOR, PROTOCOL_MINOR, ExecSpec
    from virtcontainers.agent.transport import (
        connect_hybrid_vsock,
        connect_unix,
        connect_vsock,
    )

__all__ = [
    "PROTOCOL_MAJOR", "PROTOCOL_MINOR", "AgentClient", "AgentRequestError", "ExecProcess",
    "ExecResult", "ExecSpec", "ExitStatus", "Stream", "VersionInfo", "connect_hybrid_vsock",
    "connect_unix", "connect_vsock",
]  # fmt: skip

_HOMES = {
    "virtcontainers.agent.client": (
        "AgentClient", "AgentRequestError", "ExecProcess", "ExecResult", "ExitStatus",
        "Stream", "VersionInfo",
    ),
    "virtcontainers.agent.protocol": ("PROTOCOL_MAJOR", "PROTOCOL_MINOR", "ExecSpec"),
    "virtcontainers.agent.transport": ("connect_hybrid_vsock", "connect_unix", "connect_vsock"),
}  # fmt: skip
__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)
