"""Where one Firecracker VM's files live, on the host and as Firecracker is told them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from virtcontainers.drivers._runpaths import InRunDir, RunPaths
from virtcontainers.drivers.firecracker.jailer import JAILED_API_SOCKET, JailLayout

__all__ = ["FcPaths", "placeholder_id"]


def placeholder_id(slot: int) -> str:
    """The drive id of the ``slot``-th placeholder of the hot-plug pool."""
    return f"drive_{slot}"


class InVmmRoot(InRunDir):
    """A path attribute of :class:`FcPaths` for a file Firecracker opens (see ``host``)."""

    def resolve(self, paths: RunPaths) -> Path:
        assert isinstance(paths, FcPaths)
        return paths.host(self.name)


@dataclass(frozen=True)
class FcPaths(RunPaths):
    """Firecracker opens files by *API paths*: host paths, or chroot-relative paths when
    jailed; the host reaches them at :meth:`host`. Firecracker has no console socket (its
    serial console is its stdout, in :attr:`vmm_log`)."""

    jail: JailLayout | None = None

    vmm_log = InRunDir("firecracker.log")
    logger_log = InRunDir("fc-logger.log")
    metrics_log = InRunDir("fc-metrics.log")
    # Files Firecracker itself opens: inside the chroot when jailed.
    vsock = InVmmRoot("vsock.sock")
    log_fifo = InVmmRoot("fc-log.fifo")
    metrics_fifo = InVmmRoot("fc-metrics.fifo")

    def host(self, name: str) -> Path:
        """Host path of a file Firecracker itself opens."""
        if self.jail is not None:
            return self.jail.root / name
        return self.run_dir / name

    def api(self, name: str) -> str:
        """The path Firecracker is told for that file."""
        if self.jail is not None:
            return "/" + name
        return str(self.run_dir / name)

    @property
    def api_socket(self) -> Path:
        if self.jail is not None:
            return self.jail.host_path(JAILED_API_SOCKET)
        return self.run_dir / "fc.sock"

    def placeholder_name(self, slot: int) -> str:
        return placeholder_id(slot) if self.jail is not None else f"drives/{placeholder_id(slot)}"

    def sockets(self) -> tuple[Path, ...]:
        return (self.api_socket, self.vsock, self.log_fifo, self.metrics_fifo)

    def logs(self) -> tuple[Path, ...]:
        return (self.vmm_log, self.logger_log, self.metrics_log)

    @classmethod
    def from_api_socket(cls, run_dir: Path, api_socket: str) -> FcPaths:
        """The paths of a persisted VM: jailed when its API socket is not ``fc.sock``."""
        sock = Path(api_socket)
        if not api_socket or sock == run_dir / "fc.sock":
            return cls(run_dir)
        # <chroot base>/<exec name>/<id>/root/run/firecracker.socket
        instance = sock.parents[2]
        return cls(
            run_dir, JailLayout(instance.parents[1], Path(instance.parent.name), instance.name)
        )
