"""The guest agent built for the host: the mock driver's guest.

The mock driver runs no VM; its guest is this same ``vc-agent`` run as a host process on a
unix socket (``--unix PATH --no-poweroff``), so a mock sandbox runs real processes over the
real protocol. The binary is built with the image builder's own compile step and kept under
the cache, one per agent source digest.
"""

from __future__ import annotations

import os
from pathlib import Path

from virtcontainers.guest.build_error import ImageBuildError
from virtcontainers.guest.image import AGENT_DIR, AGENT_SOURCE_NAME, _compile_agent, agent_digest
from virtcontainers.guest.image import default_cache_dir as _default_cache_dir

__all__ = ["host_agent"]


def host_agent(cache_dir: Path | None = None) -> Path:
    """The host build of ``vc-agent`` for this tree's source, compiled on first use into
    ``<cache>/host-agent/<digest>/vc-agent`` (several processes may race: each compiles to a
    temp name and renames).

    Raises:
        ImageBuildError: the agent source is missing, or gcc is missing or fails.
    """
    if not (AGENT_DIR / AGENT_SOURCE_NAME).is_file():
        raise ImageBuildError("find the guest agent", f"{AGENT_DIR / AGENT_SOURCE_NAME} is missing")
    out = (cache_dir or _default_cache_dir()) / "host-agent" / agent_digest()[:16] / "vc-agent"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = out.with_name(f".vc-agent.{os.getpid()}.tmp")
    try:
        _compile_agent(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
