"""What a test counts before and after: our descriptors, child processes, run-dir files,
mounts and unix sockets, so "nothing leaked" is a number the test compares."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from virtcontainers.procfs import processes_mentioning


def _children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(stat[1]) == pid and stat[0] != "Z":
            kids.append(int(entry))
    return kids


@dataclass(frozen=True)
class Snapshot:
    """Resources held at one moment, on behalf of the sandboxes under ``root``."""

    fds: int
    children: tuple[int, ...]
    processes: tuple[int, ...]
    files: tuple[str, ...]
    mounts: tuple[str, ...]
    sockets: tuple[str, ...]

    @classmethod
    def take(cls, root: Path) -> Snapshot:
        mounts = tuple(
            line.split()[1]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if str(root) in line
        )
        sockets = tuple(
            line.split()[-1]
            for line in Path("/proc/net/unix").read_text().splitlines()[1:]
            if str(root) in line
        )
        return cls(
            fds=len(os.listdir("/proc/self/fd")),
            children=tuple(sorted(_children_of(os.getpid()))),
            processes=tuple(sorted(processes_mentioning(str(root)))),
            files=tuple(sorted(str(p) for p in (root / "sandboxes").glob("**/*"))),
            mounts=mounts,
            sockets=sockets,
        )

    def leaked_since(self, before: Snapshot) -> dict[str, object]:
        """What this snapshot holds beyond ``before`` (empty: nothing leaked)."""
        out: dict[str, object] = {}
        if self.fds > before.fds:
            out["fds"] = self.fds - before.fds
        for name in ("children", "processes", "files", "mounts", "sockets"):
            extra = sorted(set(getattr(self, name)) - set(getattr(before, name)))
            if extra:
                out[name] = extra
        return out
