"""The nftables rulesets of a tap-mode sandbox, as text for ``nft -f -`` (one atomic load).

In the sandbox's netns (table ``inet vc``): masquerade guest traffic leaving through the
veth; with an egress allow-list, forwarding from the tap is deny-by-default: replies to
connections the guest did not open (``ct state established,related``) and the listed
destinations pass, everything else from the guest is dropped, as is anything the guest
sends to the netns itself or over IPv6. The guest cannot touch these rules: they live in a
namespace that only the host's root can enter.

On the host (table ``ip vc-KEY``): masquerade the sandbox's traffic when it leaves the host,
so it can reach beyond this machine when the host forwards.
"""

from __future__ import annotations

from collections.abc import Sequence

from virtcontainers.network.spec import EgressRule

__all__ = ["NETNS_TABLE", "host_ruleset", "netns_ruleset"]

NETNS_TABLE = "vc"


def _allow(tap: str, rule: EgressRule) -> list[str]:
    dest = f'iifname "{tap}" ip daddr {rule.network}'
    if not rule.first_port:
        return [f"{dest} accept"]
    ports = (
        str(rule.first_port)
        if rule.first_port == rule.last_port
        else f"{rule.first_port}-{rule.last_port}"
    )
    return [f"{dest} tcp dport {ports} accept", f"{dest} udp dport {ports} accept"]


def netns_ruleset(*, tap: str, uplink: str, guest: str, rules: Sequence[EgressRule]) -> str:
    """The netns table; ``rules`` empty means open egress (NAT only)."""
    forward = ["type filter hook forward priority filter; policy accept;"]
    inp = ["type filter hook input priority filter; policy accept;"]
    if rules:
        forward.append("ct state established,related accept")
        forward.append(f'iifname "{uplink}" oifname "{tap}" accept')
        for rule in rules:
            forward += _allow(tap, rule)
        forward.append(f'iifname "{tap}" counter drop')
        inp.append(f'iifname "{tap}" ct state established,related accept')
        inp.append(f'iifname "{tap}" counter drop')
    chains = {
        "forward": forward,
        "input": inp,
        "postrouting": [
            "type nat hook postrouting priority srcnat; policy accept;",
            f'oifname "{uplink}" ip saddr {guest} masquerade',
        ],
    }
    return _table("inet", NETNS_TABLE, chains)


def host_ruleset(table: str, veth: str, source: str) -> str:
    """The host table: masquerade what the sandbox (seen as ``source``) sends off-host."""
    return _table(
        "ip",
        table,
        {
            "postrouting": [
                "type nat hook postrouting priority srcnat; policy accept;",
                f'ip saddr {source} oifname != "{veth}" masquerade',
            ]
        },
    )


def _table(family: str, name: str, chains: dict[str, list[str]]) -> str:
    lines = [f"table {family} {name} {{"]
    for chain, body in chains.items():
        lines.append(f"  chain {chain} {{")
        lines += [f"    {line}" for line in body]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"
