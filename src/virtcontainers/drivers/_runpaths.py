"""Where one VM's files live: :class:`RunPaths` (a run dir and names inside it), the one
pattern every driver's paths follow, and :class:`InRunDir`, the attribute that names them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import overload

from virtcontainers.persist.layout import CONSOLE_LOG

__all__ = ["InRunDir", "RunPaths"]


class InRunDir:
    """A path attribute of a :class:`RunPaths`: ``name`` inside its run dir."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type[RunPaths]) -> InRunDir: ...

    @overload
    def __get__(self, obj: RunPaths, owner: type[RunPaths]) -> Path: ...

    def __get__(self, obj: RunPaths | None, owner: type[RunPaths]) -> Path | InRunDir:
        return self if obj is None else self.resolve(obj)

    def resolve(self, paths: RunPaths) -> Path:
        return paths.run_dir / self.name


@dataclass(frozen=True)
class RunPaths:
    """Where one VM's files live: ``run_dir`` and names inside it (:class:`InRunDir`).
    Drivers subclass this with their own names; :meth:`sockets` are removed at stop,
    :meth:`logs` at cleanup."""

    run_dir: Path

    console = InRunDir("console.sock")
    console_log = InRunDir(CONSOLE_LOG)
    #: The VMM's stdout and stderr (drivers rename it).
    vmm_log = InRunDir("vmm.log")

    @property
    def unset(self) -> bool:
        """True before create (no run dir yet)."""
        return self.run_dir == Path()

    def sockets(self) -> tuple[Path, ...]:
        return (self.console,)

    def logs(self) -> tuple[Path, ...]:
        return (self.console_log, self.vmm_log)
