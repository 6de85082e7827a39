"""Sandbox networking: modes ``none`` / ``user`` / ``tap``, published ports, egress policy.

Knows nothing of drivers: it hands the sandbox a NIC from :mod:`virtcontainers.devices`
(:class:`~virtcontainers.devices.UserNetDevice` for user mode, a tap
:class:`~virtcontainers.devices.NetDevice` for tap mode), a kernel parameter telling the
guest its address (:mod:`.guest`), and the network namespace the VMM must run in; the
host-side resources it made (:mod:`.tap`, :mod:`.nft`, :mod:`.keeper`) are its own to clean up.
"""

from virtcontainers.network.attachment import USER_MODE_DRIVERS, Attachment
from virtcontainers.network.guest import HOST_NAME, GuestAddressing
from virtcontainers.network.spec import (
    DEFAULT_TAP_RANGE,
    EgressRule,
    NetworkMode,
    NetworkSpec,
    PortMapping,
    Protocol,
)

__all__ = [
    "DEFAULT_TAP_RANGE",
    "HOST_NAME",
    "USER_MODE_DRIVERS",
    "Attachment",
    "EgressRule",
    "GuestAddressing",
    "NetworkMode",
    "NetworkSpec",
    "PortMapping",
    "Protocol",
]
