"""The typed parts of a sandbox record: agent channel, devices, network, image, how it ended.

They are msgspec Structs (strict decoding, unknown fields refused; see ``document.py`` for
why msgspec). The layers above own the behaviour and convert to and from these records:
``sandbox.py`` (channels, devices), ``network/`` (:class:`NetworkRecord`), ``images/``
(:class:`ImageRecord`; ``SandboxImage`` is one). They live here, below those layers, because
the store and ``vc ps`` must read a whole record without importing them (``images/`` alone
costs ~0.4 s to import).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

if typing.TYPE_CHECKING:
    from virtcontainers import devices

    Device = devices.ColdPlugDevice | devices.HotplugDevice

__all__ = [
    "AgentChannel",
    "DeviceRecord",
    "ExitRecord",
    "GuestRecord",
    "HybridVsockChannel",
    "ImageConfig",
    "ImageRecord",
    "NetworkRecord",
    "PortRecord",
    "SerialChannel",
    "TapRecord",
    "VolumeRecord",
    "VsockChannel",
    "json_object",
]


def json_object(record: msgspec.Struct) -> dict[str, Any]:
    """A record as the JSON object it is stored as (lists, not tuples; string keys)."""
    out: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(record))
    return out


class _Record(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every record: immutable, keyword-only, no unknown fields on decode."""


# -- the agent channel ------------------------------------------------------------------------


class SerialChannel(_Record, frozen=True, tag_field="kind", tag="serial"):
    """virtio-serial: the host end is a unix socket."""

    path: str


class HybridVsockChannel(_Record, frozen=True, tag_field="kind", tag="hybrid-vsock"):
    """Firecracker / Cloud Hypervisor: a unix socket, then ``CONNECT <port>``."""

    path: str
    port: int


class VsockChannel(_Record, frozen=True, tag_field="kind", tag="vsock"):
    """AF_VSOCK to the guest's CID."""

    cid: int
    port: int


AgentChannel = SerialChannel | HybridVsockChannel | VsockChannel


# -- how the VM ended -------------------------------------------------------------------------


class ExitRecord(_Record, frozen=True):
    """Why a VM ended, when (seconds since the epoch) and the VMM's exit code, where known
    (negative: killed by that signal)."""

    reason: str
    time: float | None = None
    exit_code: int | None = None


# -- devices ----------------------------------------------------------------------------------


@functools.cache
def _device_types() -> Mapping[str, type]:
    """The device classes a record may name (never an arbitrary attribute). ``devices.py``
    is imported on the first record that names a device: `vc ps` of sandboxes without one
    does not pay for it (~5 ms, bench/cli.py)."""
    from virtcontainers import devices

    return {
        cls.__name__: cls
        for cls in (
            *typing.get_args(devices.ColdPlugDevice),
            *typing.get_args(devices.HotplugDevice),
        )
    }


class DeviceRecord(_Record, frozen=True):
    """One device of ``devices.py``: its class name and its fields, checked on decode."""

    type: str
    spec: dict[str, Any] = {}

    def __post_init__(self) -> None:
        self.device()  # a record that names no device, or mistypes a field, never loads

    @classmethod
    def of(cls, device: Device) -> DeviceRecord:
        return cls(type=type(device).__name__, spec=msgspec.to_builtins(device))

    def device(self) -> Device:
        """The device.

        Raises:
            ValueError: an unknown device type, or a missing, unknown or mistyped field.
        """
        kinds = _device_types()
        kind = kinds.get(self.type)
        if kind is None:
            allowed = ", ".join(sorted(kinds))
            raise ValueError(f"unknown device type {self.type!r} (allowed: {allowed})")
        names = {f.name for f in dataclasses.fields(kind)}
        unknown = self.spec.keys() - names
        if unknown:
            raise ValueError(f"{self.type} has no fields {sorted(unknown)}")
        device: Device = msgspec.convert(self.spec, kind, strict=True)
        return device

    def cold_plug(self) -> devices.ColdPlugDevice:
        """The device, which must be one that can be cold-plugged.

        Raises:
            ValueError: as :meth:`device`, or a device that cannot be cold-plugged.
        """
        from virtcontainers import devices

        device = self.device()
        if not isinstance(device, typing.get_args(devices.ColdPlugDevice)):
            raise ValueError(f"a {self.type} cannot be cold-plugged")
        return typing.cast(devices.ColdPlugDevice, device)


# -- the network ------------------------------------------------------------------------------


class PortRecord(_Record, frozen=True):
    host_ip: str
    host_port: int
    guest_port: int
    protocol: Literal["tcp", "udp"]


class GuestRecord(_Record, frozen=True):
    """The guest's addresses (kernel parameter ``vc.net=``)."""

    interface: str
    gateway: str
    host: str
    dns: tuple[str, ...] = ()


class TapRecord(_Record, frozen=True):
    """A tap network: its key (which names the netns and the veth pair) and its /29 (which
    gives the addresses); ``network/tap.py`` derives the rest."""

    key: str
    subnet: str


class NetworkRecord(_Record, frozen=True):
    """The network spec (mode, published ports, egress allow-list) and, while the host side
    exists, what was created for it (guest addressing, tap network, port keeper)."""

    mode: Literal["none", "user", "tap"] = "none"
    publish: tuple[PortRecord, ...] = ()
    allow_egress: tuple[str, ...] = ()
    egress_policy: Literal["open", "allow-list"] = "open"
    #: "" is the default range (``network.DEFAULT_TAP_RANGE``).
    tap_range: str = ""
    guest: GuestRecord | None = None
    tap: TapRecord | None = None
    keeper_pid: int = 0

    @property
    def has_host_side(self) -> bool:
        """Whether host resources (tap network, keeper) may still exist."""
        return self.tap is not None or bool(self.keeper_pid)


# -- the image --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of an OCI image config a sandbox honours, plus the platform it is for.

    Re-exported by ``virtcontainers.images``; defined here because a sandbox record carries it.
    """

    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    architecture: str = ""
    os: str = ""

    @classmethod
    def from_oci(cls, doc: Mapping[str, object]) -> ImageConfig:
        """From an image config blob (``application/vnd.oci.image.config.v1+json``)."""
        raw = doc.get("config")
        run: Mapping[str, object] = raw if isinstance(raw, Mapping) else {}

        def strings(key: str) -> tuple[str, ...]:
            value = run.get(key)
            return tuple(str(v) for v in value) if isinstance(value, list) else ()

        return cls(
            env=strings("Env"),
            entrypoint=strings("Entrypoint"),
            cmd=strings("Cmd"),
            working_dir=str(run.get("WorkingDir") or ""),
            user=str(run.get("User") or ""),
            architecture=str(doc.get("architecture") or ""),
            os=str(doc.get("os") or ""),
        )

    def to_dict(self) -> dict[str, object]:
        """The OCI-style form the image store keeps (``from_dict`` reads it back)."""
        return {
            "Env": list(self.env),
            "Entrypoint": list(self.entrypoint),
            "Cmd": list(self.cmd),
            "WorkingDir": self.working_dir,
            "User": self.user,
            "architecture": self.architecture,
            "os": self.os,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, object]) -> ImageConfig:
        return cls.from_oci({"config": doc, "architecture": doc.get("architecture"),
                             "os": doc.get("os")})  # fmt: skip


class ImageRecord(_Record, frozen=True):
    """A sandbox's image: which disk, which config, how big a scratch upper (0: tmpfs);
    ``passwd``/``group`` are the image's own files, for ``-u NAME``."""

    id: str
    ref: str
    disk: str
    config: ImageConfig = ImageConfig()
    passwd: str = ""
    group: str = ""
    scratch_mb: int = 0


class VolumeRecord(_Record, frozen=True):
    """A host directory mounted in the guest at ``target`` (``vc run -v``); its share's
    tag is its position in the sandbox's list (``volumes.share_tag``)."""

    source: str
    target: str
    read_only: bool = False
