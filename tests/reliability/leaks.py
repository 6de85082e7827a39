"""What a test counts before and after: our descriptors, child processes, run-dir files,
mounts, unix sockets, and the host side of tap networks (netns, host veth, nft table) of the
sandboxes it names, so "nothing leaked" is a number the test compares."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from virtcontainers.network.tap import NETNS_DIR, TapNetwork
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
    netns: tuple[str, ...] = ()
    links: tuple[str, ...] = ()
    nft_tables: tuple[str, ...] = ()

    @classmethod
    def take(cls, root: Path, sandbox_ids: Iterable[str] = ()) -> Snapshot:
        """``sandbox_ids``: whose tap networks to look for (their names derive from the
        run dir; only these are counted, so other users' networks on the host do not)."""
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
            **_networks(sandbox_ids, root),
        )

    def leaked_since(self, before: Snapshot) -> dict[str, object]:
        """What this snapshot holds beyond ``before`` (empty: nothing leaked)."""
        out: dict[str, object] = {}
        if self.fds > before.fds:
            out["fds"] = self.fds - before.fds
        for name in (
            "children", "processes", "files", "mounts", "sockets", "netns", "links", "nft_tables"
        ):  # fmt: skip
            extra = sorted(set(getattr(self, name)) - set(getattr(before, name)))
            if extra:
                out[name] = extra
        return out


def _networks(sandbox_ids: Iterable[str], root: Path) -> dict[str, tuple[str, ...]]:
    nets = [TapNetwork(TapNetwork.key_for(str(root / "sandboxes" / i)), "") for i in sandbox_ids]
    if not nets:
        return {}
    names = {n.netns for n in nets}
    netns = sorted(set(os.listdir(NETNS_DIR)) & names) if NETNS_DIR.is_dir() else []
    links = sorted(set(os.listdir("/sys/class/net")) & {n.host_veth for n in nets})
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False)
    listed = {line.split()[-1] for line in tables.stdout.splitlines() if line.startswith("table")}
    return {
        "netns": tuple(netns),
        "links": tuple(links),
        "nft_tables": tuple(sorted(listed & {n.host_table for n in nets})),
    }
