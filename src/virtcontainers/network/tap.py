"""Tap mode, Kata's model: a network namespace per sandbox, a tap for the VM inside it and a
veth pair to the host. Built with ``ip`` and ``nft`` as argv lists (never a shell).

Layout of one sandbox (``KEY`` is 8 hex digits derived from its run dir; a /29 ``B`` from the
configured private range)::

    host                          netns vc-KEY                         guest
    vcvKEY  B+1/30  <-- veth -->  veth0  B+2/30
                                  tap0   B+5/30  <-- virtio-net -->    eth0  B+6/30

The guest's gateway is ``tap0``; the netns forwards and masquerades guest traffic out of
``veth0``, so the host (``host.vc.internal`` = B+1) sees it from B+2; the host routes B+4/30
via B+2 so published-port forwarders reach the guest directly. The netns also holds the
egress policy (:mod:`virtcontainers.network.nft`), where the guest cannot change it. On the
host one nft table ``ip vc-KEY`` masquerades the sandbox's traffic that leaves the host, and
IPv4 forwarding is enabled (as podman and Docker do). Deleting the netns destroys the tap,
both veth ends and the netns's table; the host route and table are removed explicitly.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from virtcontainers import fsutil
from virtcontainers.command import run_captured
from virtcontainers.errors import ConfigError, NetworkError
from virtcontainers.network import nft
from virtcontainers.network.guest import GuestAddressing
from virtcontainers.network.spec import NetworkSpec

__all__ = ["TapNetwork", "host_dns", "netns_exists", "require_tools"]

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
LOCK_PATH = Path("/run/lock/virtcontainers-network.lock")
TAP_NAME = "tap0"
NS_VETH = "veth0"
_TIMEOUT = 30.0


class _Address:
    """An address of a :class:`TapNetwork`, by its offset in the sandbox's /29 (a
    descriptor: ``net.gateway`` is the text of that address; with ``prefix`` a network)."""

    def __init__(self, offset: int, doc: str, *, prefix: int | None = None) -> None:
        self.offset, self.prefix, self.__doc__ = offset, prefix, doc

    @overload
    def __get__(self, net: None, owner: type[TapNetwork]) -> _Address: ...
    @overload
    def __get__(self, net: TapNetwork, owner: type[TapNetwork] | None = None) -> str: ...
    def __get__(
        self, net: TapNetwork | None, owner: type[TapNetwork] | None = None
    ) -> str | _Address:
        if net is None:  # on the class itself (help(), inspect)
            return self
        address = str(ipaddress.IPv4Network(net.subnet)[self.offset])
        return address if self.prefix is None else f"{address}/{self.prefix}"


@dataclass(frozen=True)
class TapNetwork:
    """The names and addresses of one sandbox's tap network (all persisted)."""

    key: str
    subnet: str  # the /29

    @classmethod
    def key_for(cls, run_dir: str) -> str:
        return hashlib.sha256(run_dir.encode()).hexdigest()[:8]

    @property
    def netns(self) -> str:
        return f"vc-{self.key}"

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    @property
    def host_veth(self) -> str:
        return f"vcv{self.key}"

    @property
    def host_table(self) -> str:
        return f"vc-{self.key}"

    # The /29's plan: a veth pair between the host and the netns, and the guest's /30 behind
    # the tap in the netns.
    host_address = _Address(1, "the host end of the veth pair")
    netns_address = _Address(2, "the netns end of the veth pair")
    guest_net = _Address(4, "the guest's /30 (tap and guest)", prefix=30)
    gateway = _Address(5, "the tap in the netns: the guest's gateway")
    guest_address = _Address(6, "the guest's eth0")

    def guest(self, dns: Sequence[str]) -> GuestAddressing:
        return GuestAddressing(
            interface=f"{self.guest_address}/30",
            gateway=self.gateway,
            host=self.host_address,
            dns=tuple(dns),
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "subnet": self.subnet,
            "netns": self.netns,
            "tap": TAP_NAME,
            "host_veth": self.host_veth,
            "host_address": self.host_address,
            "guest_address": self.guest_address,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> TapNetwork:
        return cls(key=str(data["key"]), subnet=str(data["subnet"]))

    # -- setup / teardown ---------------------------------------------------------------

    def setup(self, spec: NetworkSpec, dns: Sequence[str]) -> None:
        """Create the netns, tap, veth pair, routes and nft tables. On failure, undo it all.

        Raises:
            NetworkError: a step failed (the command and its stderr).
        """
        ns = ["ip", "-n", self.netns]
        try:
            _run(["ip", "netns", "add", self.netns])
            _run(["ip", "link", "add", self.host_veth, "type", "veth",
                  "peer", "name", NS_VETH, "netns", self.netns])  # fmt: skip
            _run(["ip", "addr", "add", f"{self.host_address}/30", "dev", self.host_veth])
            _run(["ip", "link", "set", self.host_veth, "up"])
            _run([*ns, "link", "set", "lo", "up"])
            _run([*ns, "addr", "add", f"{self.netns_address}/30", "dev", NS_VETH])
            _run([*ns, "link", "set", NS_VETH, "up"])
            _run([*ns, "tuntap", "add", "dev", TAP_NAME, "mode", "tap"])
            _run([*ns, "addr", "add", f"{self.gateway}/30", "dev", TAP_NAME])
            _run([*ns, "link", "set", TAP_NAME, "up"])
            _run([*ns, "route", "add", "default", "via", self.host_address])
            _run(["ip", "route", "add", self.guest_net, "via", self.netns_address])
            _write_sysctl(self.netns, "net/ipv4/ip_forward", "1")
            # The guest speaks IPv4 only; no IPv6 path through the netns to police.
            _write_sysctl(self.netns, "net/ipv6/conf/all/disable_ipv6", "1")
            _run(
                ["ip", "netns", "exec", self.netns, "nft", "-f", "-"],
                input=nft.netns_ruleset(
                    tap=TAP_NAME,
                    uplink=NS_VETH,
                    guest=self.guest_address,
                    rules=spec.allow_egress,
                ),
            )
            _run(["nft", "-f", "-"], input=nft.host_ruleset(self.host_table, self.host_veth,
                                                            self.netns_address))  # fmt: skip
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        """Remove everything :meth:`setup` made; what is already gone is skipped. Idempotent."""
        if netns_exists(self.netns):
            _run(["ip", "netns", "delete", self.netns], check=False)
        if _link_exists(self.host_veth):
            _run(["ip", "link", "delete", self.host_veth], check=False)
        _run(["ip", "route", "del", self.guest_net, "via", self.netns_address], check=False,
             quiet=True)  # fmt: skip
        if shutil.which("nft") and self.host_table in _host_tables():
            _run(["nft", "delete", "table", "ip", self.host_table], check=False)

    def leftovers(self) -> list[str]:
        """What of this network still exists on the host (for tests and ``vc ps``)."""
        found = []
        if netns_exists(self.netns):
            found.append(f"netns {self.netns}")
        if _link_exists(self.host_veth):
            found.append(f"link {self.host_veth}")
        if shutil.which("nft") and self.host_table in _host_tables():
            found.append(f"nft table ip {self.host_table}")
        return found


def allocate(spec: NetworkSpec, run_dir: str) -> TapNetwork:
    """A /29 of the spec's range that no host route or address overlaps. Hold :func:`locked`
    from here until :meth:`TapNetwork.setup` returned, so two sandboxes never pick the same.

    Raises:
        ConfigError: the range is exhausted.
    """
    key = TapNetwork.key_for(run_dir)
    pool = ipaddress.IPv4Network(spec.tap_range)
    used = _host_networks()
    subnets = list(pool.subnets(new_prefix=29))
    start = int(key, 16) % len(subnets)
    for i in range(len(subnets)):
        candidate = subnets[(start + i) % len(subnets)]
        if not any(candidate.overlaps(u) for u in used):
            return TapNetwork(key=key, subnet=str(candidate))
    raise ConfigError(f"no free /29 left in the tap range {spec.tap_range}", field="tap_range")


@contextlib.contextmanager
def locked() -> Iterator[None]:
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.locked(LOCK_PATH):
        yield


def require_tools() -> None:
    """Raises ConfigError unless we are root and ``ip``, ``nft`` and ``nsenter`` exist."""
    if os.geteuid() != 0:
        raise ConfigError(
            "--network tap needs root (it creates a network namespace, a tap and a veth "
            "pair); run as root or use --network user",
            field="network",
            allowed=["none", "user"],
        )
    missing = [t for t in ("ip", "nft", "nsenter") if shutil.which(t) is None]
    if missing:
        raise ConfigError(
            f"--network tap needs {', '.join(missing)} (packages iproute2, nftables, "
            "util-linux; scripts/setup installs them)",
            field="network",
        )


def host_dns() -> tuple[str, ...]:
    """The host's IPv4 nameservers the guest can reach through the host (not loopback ones)."""
    try:
        text = Path("/etc/resolv.conf").read_text()
    except OSError:
        return ()
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            with contextlib.suppress(ValueError):
                addr = ipaddress.IPv4Address(parts[1])
                if not addr.is_loopback:
                    found.append(str(addr))
    return tuple(found[:3])


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _host_tables() -> set[str]:
    out = _run(["nft", "-j", "list", "tables", "ip"], check=False, quiet=True)
    try:
        doc = json.loads(out or "{}")
    except json.JSONDecodeError:
        return set()
    items = doc.get("nftables", []) if isinstance(doc, dict) else []
    return {str(i["table"]["name"]) for i in items if isinstance(i, dict) and "table" in i}


def _host_networks() -> list[ipaddress.IPv4Network]:
    out = _run(["ip", "-j", "-4", "route", "show", "table", "all"], check=False, quiet=True)
    nets = []
    for route in json.loads(out or "[]"):
        dst = str(route.get("dst", ""))
        if dst in ("", "default") or dst.startswith("broadcast"):
            continue
        with contextlib.suppress(ValueError):
            net = ipaddress.IPv4Network(dst, strict=False)
            if net.prefixlen > 0:
                nets.append(net)
    return nets


def _write_sysctl(netns: str, key: str, value: str) -> None:
    # /proc/sys/net is per network namespace: write it from inside, as `sysctl -w` would.
    _run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", f"{key.replace('/', '.')}={value}"])


def _run(
    argv: list[str], *, check: bool = True, input: str | None = None, quiet: bool = False
) -> str:
    """Run one command (argv, no shell); its stdout. Raises NetworkError when ``check``."""
    try:
        proc = run_captured(argv, input=input, timeout=_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if check:
            raise NetworkError(f"{argv[0]} failed: {exc}", argv=argv) from exc
        return ""
    if proc.returncode != 0:
        if check:
            raise NetworkError(
                f"`{' '.join(argv)}` exited with {proc.returncode}", argv=argv, stderr=proc.stderr
            )
        if not quiet:
            log.debug("ignored: %s: %s", " ".join(argv), proc.stderr.strip())
    return proc.stdout
