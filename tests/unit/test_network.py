"""The network package without VMs: parsing, refusals, rulesets, argv, addressing."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess

import pytest

from virtcontainers.devices import NetDevice, PortForward, UserNetDevice
from virtcontainers.drivers.qemu.argv import net_argv
from virtcontainers.errors import ConfigError
from virtcontainers.network import (
    Attachment,
    EgressRule,
    GuestAddressing,
    NetworkMode,
    NetworkSpec,
    PortMapping,
    Protocol,
    nft,
    tap,
)
from virtcontainers.network.user import user_device


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("8080:80", PortMapping(8080, 80)),
        ("0.0.0.0:8080:80", PortMapping(8080, 80, "0.0.0.0")),
        ("127.0.0.2:53:5353/udp", PortMapping(53, 5353, "127.0.0.2", Protocol.UDP)),
        ("1:65535/tcp", PortMapping(1, 65535)),
    ],
)
def test_publish_forms(text: str, want: PortMapping) -> None:
    assert PortMapping.parse(text) == want
    assert PortMapping.parse(str(want)) == want
    assert PortMapping.from_dict(want.to_dict()) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("80", "expected [HOST_IP:]HOST_PORT:GUEST_PORT"),
        ("a:b:c:d", "expected"),
        ("0:80", "is not a port"),
        ("8080:65536", "is not a port"),
        ("8080:-1", "is not a port"),
        ("8080:80/sctp", "unknown protocol"),
        ("localhost:8080:80", "is not an IPv4 address"),
        ("::1:8080:80", "expected"),
    ],
)
def test_publish_malformed(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        PortMapping.parse(text)
    assert err.value.field == "--publish"


def test_egress_forms_and_matching() -> None:
    any_8080 = EgressRule.parse("0.0.0.0/0:8080")
    assert any_8080.allows("192.0.2.1", 8080)
    assert not any_8080.allows("192.0.2.1", 8081)
    lan = EgressRule.parse("10.1.0.0/16:1000-2000")
    assert (lan.first_port, lan.last_port) == (1000, 2000)
    assert lan.allows("10.1.255.255", 2000)
    assert not lan.allows("10.2.0.1", 1500)
    host = EgressRule.parse("192.0.2.7/32")
    assert host.allows("192.0.2.7", 1)
    for rule in (any_8080, lan, host):
        assert EgressRule.parse(str(rule)) == rule


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.0/33", "--allow-egress"),
        ("10.0.0.1/8", "has host bits set"),
        ("example.com", "--allow-egress"),
        ("10.0.0.0/8:", "is not a port"),
        ("10.0.0.0/8:90-80", "is empty"),
        ("10.0.0.0/8:1-70000", "is not a port"),
    ],
)
def test_egress_malformed(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        EgressRule.parse(text)


def test_spec_contradictions() -> None:
    with pytest.raises(ConfigError, match="unknown network mode") as err:
        NetworkSpec.build("bridge")
    assert err.value.allowed == ("none", "user", "tap")
    with pytest.raises(ConfigError, match="need a network"):
        NetworkSpec.build("none", publish=["8080:80"])
    with pytest.raises(ConfigError, match="published twice"):
        NetworkSpec.build("user", publish=["8080:80", "127.0.0.1:8080:81"])
    with pytest.raises(ConfigError, match="private IPv4 range"):
        NetworkSpec.build("tap", tap_range="8.8.0.0/16")
    with pytest.raises(ConfigError, match="/29 or larger"):
        NetworkSpec.build("tap", tap_range="10.0.0.0/30")
    # The same port over UDP is another socket.
    NetworkSpec.build("user", publish=["8080:80", "8080:80/udp"])


def test_spec_round_trips_through_its_record() -> None:
    spec = NetworkSpec.build(
        "tap", publish=["8080:80", "0.0.0.0:53:53/udp"], allow_egress=["10.0.0.0/8:443"]
    )
    data = spec.to_dict()
    assert data["egress_policy"] == "allow-list"
    assert data["allow_egress"] == ["10.0.0.0/8:443"]
    assert NetworkSpec.from_dict(data) == spec
    assert NetworkSpec().to_dict()["mode"] == "none"
    assert NetworkSpec.from_dict({}).mode is NetworkMode.NONE


def test_user_mode_refuses_an_egress_policy_and_other_drivers() -> None:
    with pytest.raises(ConfigError, match="cannot be enforced") as err:
        user_device(NetworkSpec.build("user", allow_egress=["127.0.0.1/32"]), "x")
    assert err.value.allowed == ("tap",)
    for driver in ("firecracker", "clh", "acrn"):
        with pytest.raises(ConfigError, match=f"the {driver} driver has no user-mode"):
            Attachment.check(NetworkSpec.build("user"), driver)
    Attachment.check(NetworkSpec.build("user"), "qemu")


def test_tap_without_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="needs root") as err:
        Attachment.check(NetworkSpec.build("tap"), "qemu")
    assert "tap" not in err.value.allowed


def test_a_busy_host_port_is_refused() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match="already in use"):
            Attachment.check(NetworkSpec.build("user", publish=[f"{port}:80"]), "qemu")
        # The UDP port of the same number is free.
        Attachment.check(NetworkSpec.build("user", publish=[f"{port}:80/udp"]), "qemu")


def test_user_device_and_its_qemu_argv() -> None:
    spec = NetworkSpec.build("user", publish=["8080:80", "0.0.0.0:5353:53/udp"])
    dev = user_device(spec, "sb1")
    assert dev.forwards == [
        PortForward("127.0.0.1", 8080, 80, "tcp"),
        PortForward("0.0.0.0", 5353, 53, "udp"),
    ]
    assert net_argv(dev, "pci") == [
        "-netdev",
        "user,id=netdev-net0,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,dhcpstart=10.0.2.15,"
        "ipv6=off,hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80,hostfwd=udp:0.0.0.0:5353-10.0.2.15:53",
        "-device",
        f"virtio-net-pci,netdev=netdev-net0,mac={dev.mac},id=net0,romfile=",
    ]
    restricted = UserNetDevice(id="n", mac="02:00:00:00:00:01", restrict=True)
    assert "restrict=on" in net_argv(restricted, "device")[1].split(",")
    assert (
        net_argv(restricted, "device")[3]
        == "virtio-net-device,netdev=netdev-n,mac=02:00:00:00:00:01,id=n"
    )


def test_tap_device_qemu_argv_opens_the_tap_by_name() -> None:
    dev = NetDevice(id="net0", tap_name="tap0", mac="02:00:00:00:00:02", netns_path="/run/netns/x")
    assert net_argv(dev, "pci")[:2] == [
        "-netdev",
        "tap,id=netdev-net0,ifname=tap0,script=no,downscript=no",
    ]


def test_guest_addressing_kernel_parameter() -> None:
    g = GuestAddressing("10.213.0.6/30", "10.213.0.5", "10.213.0.1", ("192.0.2.53", "192.0.2.54"))
    assert g.kernel_param() == "vc.net=10.213.0.6/30,10.213.0.5,10.213.0.1,192.0.2.53,192.0.2.54"
    assert GuestAddressing.from_dict(g.to_dict()) == g
    with pytest.raises(ValueError, match="Unexpected"):
        GuestAddressing("10.0.0.2/24", "10.0.0.1 init=/bin/sh", "10.0.0.1")


def test_tap_layout_and_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = NetworkSpec.build("tap", tap_range="10.50.0.0/28")  # two /29s
    key = tap.TapNetwork.key_for("/run/x")
    first = tap.allocate
    monkeypatch.setattr(tap, "_host_networks", lambda: [])
    net = first(spec, "/run/x")
    assert net.key == key
    assert len(net.host_veth) <= 15
    subnet = ipaddress.IPv4Network(net.subnet)
    assert subnet.prefixlen == 29
    assert subnet.subnet_of(ipaddress.IPv4Network("10.50.0.0/28"))
    assert [net.host_address, net.netns_address, net.gateway, net.guest_address] == [
        str(subnet[1]), str(subnet[2]), str(subnet[5]), str(subnet[6])
    ]  # fmt: skip
    # The /29 in use by a host route is skipped; when both are, the range is exhausted.
    monkeypatch.setattr(tap, "_host_networks", lambda: [subnet])
    other = first(spec, "/run/x")
    assert not ipaddress.IPv4Network(other.subnet).overlaps(subnet)
    monkeypatch.setattr(tap, "_host_networks", lambda: [ipaddress.IPv4Network("10.50.0.0/24")])
    with pytest.raises(ConfigError, match="no free /29"):
        first(spec, "/run/x")
    assert tap.TapNetwork.from_dict(net.to_dict()) == net


def test_netns_ruleset_is_deny_by_default_with_a_policy() -> None:
    rules = (EgressRule.parse("192.0.2.0/24:80-81"), EgressRule.parse("198.51.100.7/32"))
    text = nft.netns_ruleset(tap="tap0", uplink="veth0", guest="10.0.0.6", rules=rules)
    assert 'iifname "tap0" ip daddr 192.0.2.0/24 tcp dport 80-81 accept' in text
    assert 'iifname "tap0" ip daddr 192.0.2.0/24 udp dport 80-81 accept' in text
    assert 'iifname "tap0" ip daddr 198.51.100.7/32 accept' in text
    forward = text.split("chain forward {")[1].split("}")[0].strip().splitlines()
    assert forward[-1].strip() == 'iifname "tap0" counter drop'
    assert 'oifname "veth0" ip saddr 10.0.0.6 masquerade' in text
    open_text = nft.netns_ruleset(tap="tap0", uplink="veth0", guest="10.0.0.6", rules=())
    assert "drop" not in open_text


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None, reason="nft -c needs root and nftables"
)
def test_rulesets_are_valid_nftables() -> None:
    rules = (EgressRule.parse("192.0.2.0/24:80-81"), EgressRule.parse("0.0.0.0/0:53"))
    for text in (
        nft.netns_ruleset(tap="tap0", uplink="veth0", guest="10.0.0.6", rules=rules),
        nft.host_ruleset("vc-test0000", "vcvtest0000", "10.0.0.2"),
    ):
        # -c: parse and check against the kernel, commit nothing.
        proc = subprocess.run(["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_attachment_record_round_trip(tmp_path: object) -> None:
    spec = NetworkSpec.build("tap", publish=["8080:80"], allow_egress=["10.0.0.0/8"])
    net = tap.TapNetwork(key="0123abcd", subnet="10.213.0.0/29")
    att = Attachment(spec, "sb", "/run/sb", guest=net.guest(("192.0.2.53",)), tap=net)
    back = Attachment.from_dict(att.to_dict(), "sb", "/run/sb")
    assert (back.spec, back.guest, back.tap) == (spec, att.guest, net)
    assert back.netns_path == "/run/netns/vc-0123abcd"
    assert [p.value for p in back.kernel_params()] == [
        "10.213.0.6/30,10.213.0.5,10.213.0.1,192.0.2.53"
    ]
    forgotten = back.forgotten()
    assert (forgotten.tap, forgotten.guest, forgotten.spec) == (None, None, spec)


def test_the_cli_default_tap_range_is_the_library_default() -> None:
    from virtcontainers.cli import options
    from virtcontainers.network import DEFAULT_TAP_RANGE

    assert options.DEFAULT_TAP_RANGE == DEFAULT_TAP_RANGE
