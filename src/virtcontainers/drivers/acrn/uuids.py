"""The pool of the 8 UUIDs ACRN launches post-launched VMs with, shared by every process on
the host through one JSON file under a lock (:mod:`virtcontainers.fsutil`)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from virtcontainers.errors import HypervisorError, StoreError
from virtcontainers.fsutil import atomic_write, flock, mkdir_private, open_private

__all__ = ["ACRN_UUIDS", "UuidPool"]

log = logging.getLogger(__name__)

_DRIVER = "acrn"

#: The only UUIDs ACRN launches a post-launched VM with (the reference's ``acrnUUIDsToIdx``).
ACRN_UUIDS: tuple[str, ...] = (
    "a7ada506-1ab0-4b6b-a0da-e513ca9b8c2f",
    "dbeae168-26e4-4084-9227-622193e56325",
    "18ed60cd-e9ea-4bf4-8f87-8523fc8347a3",
    "3f90b6f8-449a-4e72-b99c-063a889fc422",
    "1ae8587b-e599-4b59-8260-6d14ac166a55",
    "75f3b94b-49ed-48fc-b019-577ef45adf2b",
    "ca62cf3c-8359-47e8-a3f7-de2d682dfb02",
    "e3189497-c3f6-4b97-9e2c-18ac0ab9064d",
)


def _running_pool_uuids() -> dict[str, int]:
    """UUID -> pid of every live process whose argv has ``-U``/``--uuid`` with a pool UUID."""
    found: dict[str, int] = {}
    pool = set(ACRN_UUIDS)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for flag, value in itertools.pairwise(argv):
            if flag in ("-U", "--uuid") and value in pool:
                found[value] = int(entry.name)
    return found


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _Claim:
    sandbox_id: str
    owner_pid: int
    vmm_pid: int = 0


class UuidPool:
    """The 8 ACRN UUIDs, shared by every process on the host through ``<dir>/acrn-uuids.json``.

    A UUID is taken when the file says so and the claim is live (its ``acrn-dm`` runs, or it
    has none yet and the process that claimed it runs), or when any process runs with it on
    its command line. Dead claims are dropped on the next allocation.
    """

    FILE = "acrn-uuids.json"

    def __init__(
        self, directory: Path, *, scan: Callable[[], dict[str, int]] = _running_pool_uuids
    ) -> None:
        self.directory = directory
        self.path = directory / self.FILE
        self._scan = scan

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, _Claim]]:
        try:
            mkdir_private(self.directory)
            fd = open_private(self.directory / ".acrn-uuids.lock")
        except OSError as exc:
            raise StoreError(f"cannot open the ACRN UUID pool: {exc}", path=str(self.path)) from exc
        try:
            flock(fd)
            claims = self._read()
            before = {k: (v.sandbox_id, v.owner_pid, v.vmm_pid) for k, v in claims.items()}
            yield claims
            after = {k: (v.sandbox_id, v.owner_pid, v.vmm_pid) for k, v in claims.items()}
            if after != before:
                self._write(claims)
        finally:
            os.close(fd)  # releases the flock

    def _read(self) -> dict[str, _Claim]:
        try:
            raw = json.loads(self.path.read_text())
            return {
                str(u): _Claim(str(c["sandbox_id"]), int(c["owner_pid"]), int(c["vmm_pid"]))
                for u, c in dict(raw["claims"]).items()
                if u in ACRN_UUIDS
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Rebuilding is safe: live acrn-dm processes are found by the argv scan anyway.
            log.warning("ignoring unreadable ACRN UUID pool %s: %s", self.path, exc)
            return {}

    def _write(self, claims: dict[str, _Claim]) -> None:
        doc = {
            "version": 1,
            "claims": {
                u: {"sandbox_id": c.sandbox_id, "owner_pid": c.owner_pid, "vmm_pid": c.vmm_pid}
                for u, c in claims.items()
            },
        }
        try:
            atomic_write(self.path, json.dumps(doc, indent=1).encode(), tmp_prefix=".acrn-uuids.")
        except OSError as exc:
            raise StoreError(
                f"cannot write the ACRN UUID pool: {exc}", path=str(self.path)
            ) from exc

    @staticmethod
    def _live(claim: _Claim) -> bool:
        return _pid_alive(claim.vmm_pid) if claim.vmm_pid else _pid_alive(claim.owner_pid)

    def in_use(self) -> dict[str, str]:
        """UUID -> holder (a sandbox id, or ``pid N`` for a process we did not start)."""
        with self._locked() as claims:
            return self._taken(claims)

    def _taken(self, claims: dict[str, _Claim]) -> dict[str, str]:
        for u in [u for u, c in claims.items() if not self._live(c)]:
            log.info("ACRN UUID %s: dropping the stale claim of %s", u, claims[u].sandbox_id)
            del claims[u]
        taken = {u: c.sandbox_id for u, c in claims.items()}
        for u, pid in self._scan().items():
            taken.setdefault(u, f"pid {pid}")
        return taken

    def allocate(self, sandbox_id: str) -> str:
        """Claim the first free UUID for ``sandbox_id``.

        Raises:
            HypervisorError: all 8 are in use (the message lists the holders).
            StoreError: the pool file cannot be written.
        """
        with self._locked() as claims:
            taken = self._taken(claims)
            for u in ACRN_UUIDS:
                if u not in taken:
                    claims[u] = _Claim(sandbox_id, os.getpid())
                    return u
        holders = ", ".join(f"{u[:8]}…={h}" for u, h in taken.items())
        raise HypervisorError(
            f"all {len(ACRN_UUIDS)} ACRN VM UUIDs are in use ({holders})",
            driver=_DRIVER,
            sandbox_id=sandbox_id,
        )

    def set_vmm_pid(self, uuid: str, sandbox_id: str, pid: int) -> None:
        """Record the ``acrn-dm`` holding ``uuid`` (the claim then lives as long as it does)."""
        with self._locked() as claims:
            claim = claims.get(uuid)
            if claim is not None and claim.sandbox_id == sandbox_id:
                claim.vmm_pid = pid

    def release(self, uuid: str, sandbox_id: str) -> None:
        """Give ``uuid`` back if ``sandbox_id`` holds it. Idempotent."""
        with self._locked() as claims:
            claim = claims.get(uuid)
            if claim is not None and claim.sandbox_id == sandbox_id:
                del claims[uuid]
