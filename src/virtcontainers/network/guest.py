"""What the guest is told about its network, and how: one kernel parameter read by /init.

``vc.net=ADDRESS/PREFIX,GATEWAY,HOST[,DNS...]`` (IPv4, comma-separated, no spaces): /init
(``guest/files/init``) brings ``eth0`` up with ADDRESS/PREFIX, adds a default route via
GATEWAY, writes ``HOST host.vc.internal`` into ``/etc/hosts`` and one ``nameserver`` line per
DNS address into ``/etc/resolv.conf``. A kernel parameter rather than an agent request: the
network is up before the agent (and anything in ``/etc/vc/init.d``) starts, and it costs no
round trip at boot. The guest can change its own address, but that grants nothing: what it
may reach is decided on the host side (slirp, or nftables in the sandbox's netns).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

__all__ = ["HOST_NAME", "GuestAddressing", "mac_for"]

#: The name under which the guest reaches the host (like podman's host.containers.internal).
HOST_NAME = "host.vc.internal"


@dataclass(frozen=True)
class GuestAddressing:
    """The guest's side of its NIC."""

    interface: str  # "10.0.2.15/24"
    gateway: str
    host: str
    dns: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return self.interface.partition("/")[0]

    def kernel_param(self) -> str:
        """The ``vc.net=...`` parameter for the guest kernel command line."""
        return "vc.net=" + ",".join((self.interface, self.gateway, self.host, *self.dns))

    def to_dict(self) -> dict[str, object]:
        return {
            "interface": self.interface,
            "gateway": self.gateway,
            "host": self.host,
            "dns": list(self.dns),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> GuestAddressing:
        dns = data.get("dns", [])
        return cls(
            interface=str(data["interface"]),
            gateway=str(data["gateway"]),
            host=str(data["host"]),
            dns=tuple(str(d) for d in dns) if isinstance(dns, list) else (),
        )

    def __post_init__(self) -> None:
        # Values come from our own code, but they land on a kernel command line: keep them
        # plain addresses so nothing can smuggle in another parameter.
        ipaddress.IPv4Interface(self.interface)
        for a in (self.gateway, self.host, *self.dns):
            ipaddress.IPv4Address(a)


def mac_for(sandbox_id: str) -> str:
    """A stable, locally administered unicast MAC for the sandbox's NIC."""
    digest = hashlib.sha256(sandbox_id.encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])
