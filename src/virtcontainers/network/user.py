"""User mode: NAT inside the VMM process (QEMU's slirp, ``-netdev user``).

Why slirp and not passt: slirp lives inside the QEMU process, so there is nothing on the host
to create, track or leak (a SIGKILLed VMM takes its whole network with it), its ``hostfwd``
publishes ports without a second process, and it is what QEMU here supports with
``-netdev user`` alone. passt is faster, but it is a separate daemon per sandbox with its own
socket and lifetime to supervise; user mode is the no-root convenience mode, tap is the
fast one.

The egress allow-list cannot be enforced here: slirp's ``restrict=on`` cuts the guest off
entirely and ``guestfwd`` only maps single ``IP:PORT`` pairs *inside* the virtual network,
so a ``CIDR[:PORT-PORT]`` policy has no faithful translation. That combination is refused
with a ConfigError (use ``--network tap``).
"""

from __future__ import annotations

from virtcontainers.devices import PortForward, UserNetDevice
from virtcontainers.errors import ConfigError
from virtcontainers.network.guest import GuestAddressing, mac_for
from virtcontainers.network.spec import NetworkMode, NetworkSpec

__all__ = ["GUEST", "user_device"]

#: slirp's own defaults, made explicit: the guest is .15, the host answers as .2, DNS is .3.
GUEST = GuestAddressing(
    interface="10.0.2.15/24", gateway="10.0.2.2", host="10.0.2.2", dns=("10.0.2.3",)
)


def user_device(spec: NetworkSpec, sandbox_id: str) -> UserNetDevice:
    """The NIC for a user-mode sandbox.

    Raises:
        ConfigError: an egress allow-list was asked for (not enforceable in this mode).
    """
    if spec.mode is not NetworkMode.USER:
        raise ConfigError(f"user_device for mode {spec.mode.value}", field="network")
    if spec.allow_egress:
        raise ConfigError(
            "--allow-egress cannot be enforced with --network user (slirp can only forward "
            "single addresses inside its own network, not a CIDR policy): use --network tap",
            field="--allow-egress",
            allowed=["tap"],
        )
    return UserNetDevice(
        id="net0",
        mac=mac_for(sandbox_id),
        network="10.0.2.0/24",
        gateway=GUEST.gateway,
        dns=GUEST.dns[0],
        guest_address=GUEST.address,
        forwards=[
            PortForward(p.host_ip, p.host_port, p.guest_port, p.protocol.value)
            for p in spec.publish
        ],
    )
