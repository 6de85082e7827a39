"""What a user asks of a sandbox's network: the mode, published ports, the egress policy.

Everything here is parsed and checked before anything is created, so a typo in ``--publish``
or a CIDR is a :class:`~virtcontainers.errors.ConfigError`, never a half-built network.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

from virtcontainers.errors import ConfigError, StoreError, parse_enum

__all__ = [
    "DEFAULT_TAP_RANGE",
    "EgressRule",
    "NetworkMode",
    "NetworkSpec",
    "PortMapping",
    "Protocol",
]

#: Where tap-mode sandboxes take their addresses from (a /29 each): a private range that
#: Docker, podman and libvirt leave alone by default. Configurable per sandbox.
DEFAULT_TAP_RANGE = "10.213.0.0/16"


class NetworkMode(Enum):
    """``none``: only ``lo``. ``user``: NAT inside the VMM (QEMU's slirp), no root.
    ``tap``: a per-sandbox network namespace, a tap for the VM, a veth pair to the host."""

    NONE = "none"
    USER = "user"
    TAP = "tap"

    @classmethod
    def parse(cls, value: NetworkMode | str) -> NetworkMode:
        """Raises ConfigError naming the allowed modes."""
        return parse_enum(cls, value, field="network", message=f"unknown network mode {value!r}")


class Protocol(Enum):
    TCP = "tcp"
    UDP = "udp"


def _port(text: str, what: str, option: str, spec: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(
            f"{option} {spec!r}: {what} {text!r} is not a port (1-65535)", field=option
        )
    return int(text)


@dataclass(frozen=True)
class PortMapping:
    """``[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp]``: the host's HOST_IP:HOST_PORT reaches the
    guest's GUEST_PORT. HOST_IP defaults to 127.0.0.1: a sandbox often runs untrusted code,
    so exposing it beyond this machine must be asked for (``-p 0.0.0.0:8080:80``)."""

    host_port: int
    guest_port: int
    host_ip: str = "127.0.0.1"
    protocol: Protocol = Protocol.TCP

    @classmethod
    def parse(cls, spec: str) -> PortMapping:
        """Raises ConfigError on anything but the documented form (IPv4 host addresses)."""
        option = "--publish"
        body, slash, proto_text = spec.partition("/")
        if slash and proto_text not in ("tcp", "udp"):
            raise ConfigError(
                f"{option} {spec!r}: unknown protocol {proto_text!r}",
                field=option,
                allowed=["tcp", "udp"],
            )
        parts = body.split(":")
        if len(parts) == 2:
            host_ip, host_text, guest_text = "127.0.0.1", parts[0], parts[1]
        elif len(parts) == 3:
            host_ip, host_text, guest_text = parts
        else:
            raise ConfigError(
                f"{option} {spec!r}: expected [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp]",
                field=option,
            )
        try:
            ip = ipaddress.IPv4Address(host_ip)
        except ValueError:
            raise ConfigError(
                f"{option} {spec!r}: {host_ip!r} is not an IPv4 address", field=option
            ) from None
        return cls(
            host_port=_port(host_text, "host port", option, spec),
            guest_port=_port(guest_text, "guest port", option, spec),
            host_ip=str(ip),
            protocol=Protocol(proto_text or "tcp"),
        )

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}:{self.guest_port}/{self.protocol.value}"

    def to_dict(self) -> dict[str, object]:
        return {
            "host_ip": self.host_ip,
            "host_port": self.host_port,
            "guest_port": self.guest_port,
            "protocol": self.protocol.value,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PortMapping:
        return cls(
            host_port=int(str(data["host_port"])),
            guest_port=int(str(data["guest_port"])),
            host_ip=str(data["host_ip"]),
            protocol=Protocol(str(data["protocol"])),
        )


@dataclass(frozen=True)
class EgressRule:
    """``CIDR[:PORT[-PORT]]``: the guest may open connections (TCP, or send UDP) to these
    addresses, on these ports (all ports when none are given)."""

    network: ipaddress.IPv4Network
    first_port: int = 0
    last_port: int = 0

    @classmethod
    def parse(cls, spec: str) -> EgressRule:
        """Raises ConfigError for a malformed CIDR or port range (IPv4 only)."""
        option = "--allow-egress"
        cidr, colon, ports = spec.partition(":")
        try:
            network = ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as exc:
            raise ConfigError(f"{option} {spec!r}: {exc}", field=option) from None
        if not colon:
            return cls(network)
        first_text, dash, last_text = ports.partition("-")
        first = _port(first_text, "port", option, spec)
        last = _port(last_text, "port", option, spec) if dash else first
        if last < first:
            raise ConfigError(
                f"{option} {spec!r}: port range {first}-{last} is empty", field=option
            )
        return cls(network, first, last)

    def __str__(self) -> str:
        if not self.first_port:
            return str(self.network)
        if self.first_port == self.last_port:
            return f"{self.network}:{self.first_port}"
        return f"{self.network}:{self.first_port}-{self.last_port}"

    def allows(self, address: str, port: int) -> bool:
        """Whether a connection to ``address:port`` matches this rule."""
        in_net = ipaddress.IPv4Address(address) in self.network
        return in_net and (not self.first_port or self.first_port <= port <= self.last_port)


@dataclass(frozen=True)
class NetworkSpec:
    """A sandbox's network request. ``allow_egress`` non-empty means deny-by-default egress.

    ``tap_range`` is the private range tap-mode addresses come from (a /29 per sandbox).
    """

    mode: NetworkMode = NetworkMode.NONE
    publish: tuple[PortMapping, ...] = ()
    allow_egress: tuple[EgressRule, ...] = ()
    tap_range: str = DEFAULT_TAP_RANGE

    @classmethod
    def build(
        cls,
        mode: NetworkMode | str = NetworkMode.NONE,
        publish: list[str] | tuple[str, ...] = (),
        allow_egress: list[str] | tuple[str, ...] = (),
        tap_range: str = DEFAULT_TAP_RANGE,
    ) -> NetworkSpec:
        """Parse and cross-check the command-line forms.

        Raises:
            ConfigError: a malformed value, the same host port published twice, ports or a
                policy with mode ``none``, or a tap range too small or not private.
        """
        kind = NetworkMode.parse(mode)
        ports = tuple(PortMapping.parse(p) for p in publish)
        rules = tuple(EgressRule.parse(r) for r in allow_egress)
        spec = cls(kind, ports, rules, tap_range)
        spec.check()
        return spec

    def check(self) -> None:
        """Raises ConfigError for contradictions (see :meth:`build`)."""
        if self.mode is NetworkMode.NONE and (self.publish or self.allow_egress):
            raise ConfigError(
                "--publish and --allow-egress need a network: add --network user or tap",
                field="network",
                allowed=["user", "tap"],
            )
        seen: set[tuple[str, int, Protocol]] = set()
        for p in self.publish:
            key = (p.host_ip, p.host_port, p.protocol)
            if key in seen:
                raise ConfigError(
                    f"--publish {p}: that host port is published twice", field="--publish"
                )
            seen.add(key)
        try:
            net = ipaddress.IPv4Network(self.tap_range, strict=True)
        except ValueError as exc:
            raise ConfigError(f"tap range {self.tap_range!r}: {exc}", field="tap_range") from None
        if not net.is_private or net.prefixlen > 29:
            raise ConfigError(
                f"tap range {self.tap_range!r} must be a private IPv4 range of /29 or larger",
                field="tap_range",
            )

    @property
    def enabled(self) -> bool:
        return self.mode is not NetworkMode.NONE

    def to_dict(self) -> dict[str, object]:
        """The persisted and ``vc ps --json`` form."""
        return {
            "mode": self.mode.value,
            "publish": [p.to_dict() for p in self.publish],
            "allow_egress": [str(r) for r in self.allow_egress],
            "egress_policy": "allow-list" if self.allow_egress else "open",
            "tap_range": self.tap_range,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> NetworkSpec:
        """Raises StoreError for a document this module did not write."""
        publish = data.get("publish", [])
        rules = data.get("allow_egress", [])
        if not isinstance(publish, list) or not isinstance(rules, list):
            raise StoreError(f"network record {data!r}: publish/allow_egress are not lists")
        return cls(
            mode=NetworkMode(str(data.get("mode", "none"))),
            publish=tuple(PortMapping.from_dict(p) for p in publish),
            allow_egress=tuple(EgressRule.parse(str(r)) for r in rules),
            tap_range=str(data.get("tap_range") or DEFAULT_TAP_RANGE),
        )
