"""/proc lookups cheap enough for every ``vc`` command (no asyncio, unlike :mod:`.process`)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["process_matches", "processes_mentioning"]


def process_matches(pid: int, needle: str) -> bool:
    """True when ``pid`` is alive and ``needle`` is one of its argv words or inside one
    (guards against signalling a recycled pid when reattaching)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    raw = needle.encode()
    return any(raw in arg for arg in argv)


def processes_mentioning(needle: str) -> list[int]:
    """Pids of live (not zombie) processes with ``needle`` in one of their argv words."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not process_matches(int(entry.name), needle):
            continue
        try:
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found
