"""/proc lookups cheap enough for every ``vc`` command (no asyncio, unlike :mod:`.process`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ProcessStats",
    "children_of",
    "kib_fields",
    "process_matches",
    "process_stats",
    "processes_mentioning",
]


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


def kib_fields(text: str) -> dict[str, int]:
    """The ``Name: <n> kB`` lines of a /proc file (``meminfo``, ``status``, ``smaps_rollup``),
    in bytes; other lines are skipped."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[name.strip()] = int(parts[0]) * 1024
    return out


@dataclass(frozen=True)
class ProcessStats:
    """What /proc says of one process (a VMM): CPU seconds, memory, threads, open fds."""

    cpu_user_seconds: float
    cpu_system_seconds: float
    rss_bytes: int
    pss_bytes: int
    threads: int
    fds: int


def process_stats(pid: int) -> ProcessStats | None:
    """``pid``'s figures from /proc, or None when it is gone (or not ours to read)."""
    proc = Path(f"/proc/{pid}")
    try:
        # Fields after the command name (which may hold spaces): utime, stime are 14, 15.
        stat = (proc / "stat").read_text().rpartition(")")[2].split()
        status = (proc / "status").read_text()
        rollup = kib_fields((proc / "smaps_rollup").read_text())
        fds = len(os.listdir(proc / "fd"))
    except (OSError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    threads = next(
        (int(line.split()[1]) for line in status.splitlines() if line.startswith("Threads:")), 0
    )
    return ProcessStats(
        cpu_user_seconds=int(stat[11]) / tick,
        cpu_system_seconds=int(stat[12]) / tick,
        rss_bytes=kib_fields(status).get("VmRSS", 0),
        pss_bytes=rollup.get("Pss", 0),
        threads=threads,
        fds=fds,
    )


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (read from ``/proc/*/stat``)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            kids.append(int(entry.name))
    return kids
