"""/proc lookups cheap enough for every ``vc`` command (no asyncio, unlike :mod:`.process`)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["process_matches"]


def process_matches(pid: int, needle: str) -> bool:
    """True when ``pid`` is alive and ``needle`` is one of its argv words or inside one
    (guards against signalling a recycled pid when reattaching)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    raw = needle.encode()
    return any(raw in arg for arg in argv)
