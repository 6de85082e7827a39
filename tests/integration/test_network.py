"""Sandbox networking in real guests: user mode (slirp) and tap mode (netns + tap + veth).

Traffic goes only to servers these tests start on this machine: HTTP servers on the host's
loopback (user mode) or on the host side of the sandbox's own veth (tap mode). The forbidden
destination of the egress test is a second such server on another port.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_sandbox import _config
from virtcontainers import Sandbox
from virtcontainers.errors import ConfigError
from virtcontainers.guest.image import GuestImage
from virtcontainers.network import Attachment, NetworkSpec
from virtcontainers.process import process_matches

pytestmark = pytest.mark.integration
VC = str(Path(sys.executable).with_name("vc"))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="tap mode needs root")


class _Server:
    """A tiny HTTP server on the host that counts the connections it accepted."""

    def __init__(self, address: str, body: bytes) -> None:
        server = self
        self.body = body
        self.connections = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def setup(self) -> None:
                server.connections += 1
                super().setup()

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def _server(address: str, body: bytes) -> Iterator[_Server]:
    s = _Server(address, body)
    try:
        yield s
    finally:
        s.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _host_get(url: str, timeout: float = 20.0) -> bytes:
    """GET from the host, retrying while the guest's server is still starting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return bytes(r.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


_HTTPD = ["sh", "-c", "mkdir -p /www && echo guest-page > /www/index.html && httpd -p 80 -h /www"]


async def test_user_mode_fetch_publish_and_ps(guest_image: GuestImage, vc_root: Path) -> None:
    port = _free_port()
    spec = NetworkSpec.build("user", publish=[f"127.0.0.1:{port}:80"])
    with _server("127.0.0.1", b"page-from-host\n") as srv:
        async with await Sandbox.create(_config(guest_image), network=spec) as sb:
            # The guest reaches the host's loopback through slirp's gateway, by name too.
            hosts = (await sb.read_file("/etc/hosts")).decode()
            assert "10.0.2.2\thost.vc.internal" in hosts
            assert (await sb.read_file("/etc/resolv.conf")) == b"nameserver 10.0.2.3\n"
            for host in ("10.0.2.2", "host.vc.internal"):
                got = await sb.exec(["wget", "-qO-", f"http://{host}:{srv.port}/"], timeout=30)
                assert (got.exit_code, got.stdout) == (0, b"page-from-host\n"), got
            # A server in the guest answers on the published host port.
            assert (await sb.exec(_HTTPD)).exit_code == 0
            assert _host_get(f"http://127.0.0.1:{port}/") == b"guest-page\n"
            ps = json.loads(subprocess.run([VC, "ps", "--json"], capture_output=True,
                                           check=True, text=True).stdout)  # fmt: skip
            mine = next(i for i in ps if i["id"] == sb.id)
            assert mine["network"]["mode"] == "user"
            assert mine["network"]["publish"] == [
                {"host_ip": "127.0.0.1", "host_port": port, "guest_port": 80, "protocol": "tcp"}
            ]
            assert mine["network"]["egress_policy"] == "open"


async def test_none_is_the_default_and_has_only_lo(guest_image: GuestImage, vc_root: Path) -> None:
    async with await Sandbox.create(_config(guest_image)) as sb:
        links = (await sb.exec(["ls", "/sys/class/net"])).stdout.split()
        assert links == [b"lo"]
        assert b"host.vc.internal" not in await sb.read_file("/etc/hosts")


def test_bad_network_input_is_refused_before_anything_exists(
    guest_image: GuestImage, vc_root: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        busy_port = busy.getsockname()[1]
        cases = [
            (["--network", "user", "-p", "80"], "expected [HOST_IP:]HOST_PORT:GUEST_PORT"),
            (["--network", "user", "-p", "127.0.0.1:99999:80"], "is not a port"),
            (["--network", "user", "-p", "8080:80/sctp"], "unknown protocol"),
            (["--network", "user", "-p", "300.1.1.1:8080:80"], "is not an IPv4 address"),
            (["--network", "tap", "--allow-egress", "10.0.0.0/33"], "--allow-egress"),
            (["--network", "tap", "--allow-egress", "10.0.0.1/8"], "has host bits set"),
            (["--network", "tap", "--allow-egress", "10.0.0.0/8:90-80"], "is empty"),
            (["--network", "user", "--allow-egress", "127.0.0.1/32:80"], "cannot be enforced"),
            (["--network", "user", "-p", f"127.0.0.1:{busy_port}:80"], "is already in use"),
            (["--network", "bridge"], "unknown network mode"),
            (["--hypervisor", "firecracker", "--network", "user"], "no user-mode networking"),
            (["-p", "8080:80"], "need a network"),
        ]
        for args, message in cases:
            proc = subprocess.run([VC, "create", *args], capture_output=True, text=True, timeout=60)
            assert proc.returncode != 0, args
            assert message in proc.stderr, (args, proc.stderr)
    assert Sandbox.list() == []


async def test_api_errors_are_config_errors(guest_image: GuestImage, vc_root: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be enforced"):
        await Sandbox.create(
            _config(guest_image),
            network=NetworkSpec.build("user", allow_egress=["127.0.0.1/32"]),
        )
    with pytest.raises(ConfigError, match="no user-mode networking"):
        await Sandbox.create(
            _config(guest_image), hypervisor="firecracker", network=NetworkSpec.build("user")
        )
    assert Sandbox.list() == []


# -- tap mode --------------------------------------------------------------------------


def _leftovers(att: Attachment) -> list[str]:
    found = att.leftovers()
    assert att.tap is not None
    ip_netns = subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    if att.tap.netns in ip_netns:
        found.append("ip netns")
    if att.tap.host_veth in links:
        found.append("ip link")
    if att.tap.host_table in tables:
        found.append("nft table")
    return found


def _attachment(sb: Sandbox) -> Attachment:
    return Attachment.from_dict(sb.info().network, sb.id, str(sb.run_dir))


@needs_root
async def test_tap_fetch_publish_egress_and_cleanup(guest_image: GuestImage, vc_root: Path) -> None:
    port = _free_port()
    with (
        _server("0.0.0.0", b"server-A\n") as a,
        _server("0.0.0.0", b"server-B\n") as b,
    ):
        # The sandbox's host address is known only once it runs; the policy names it by the
        # whole tap range with A's port only, so B (same address, other port) is forbidden.
        spec = NetworkSpec.build(
            "tap",
            publish=[f"127.0.0.1:{port}:80"],
            allow_egress=[f"10.213.0.0/16:{a.port}"],
        )
        sb = await Sandbox.create(_config(guest_image), network=spec)
        try:
            await sb.start()
            att = _attachment(sb)
            assert att.tap is not None
            assert att.guest is not None
            host = att.tap.host_address
            hosts = (await sb.read_file("/etc/hosts")).decode()
            assert f"{host}\thost.vc.internal" in hosts
            got = await sb.exec(["wget", "-qO-", f"http://host.vc.internal:{a.port}/"], timeout=30)
            assert (got.exit_code, got.stdout) == (0, b"server-A\n"), got
            denied = await sb.exec(
                ["wget", "-T", "3", "-qO-", f"http://{host}:{b.port}/"], timeout=30
            )
            assert denied.exit_code != 0
            assert denied.stdout == b""
            assert b.connections == 0
            # Published port: host loopback -> keeper -> guest httpd.
            assert (await sb.exec(_HTTPD)).exit_code == 0
            assert _host_get(f"http://127.0.0.1:{port}/") == b"guest-page\n"
            info = sb.info().network
            assert info["egress_policy"] == "allow-list"
            assert info["allow_egress"] == [f"10.213.0.0/16:{a.port}"]
            # While it runs the check sees everything (so an empty result below means gone).
            assert {"ip netns", "ip link", "nft table"} <= set(_leftovers(att))
        finally:
            await sb.stop()
        assert _leftovers(att) == []
        await sb.remove()


@needs_root
async def test_tap_sigkill_of_the_vmm_leaves_nothing(
    guest_image: GuestImage, vc_root: Path
) -> None:
    with _server("0.0.0.0", b"open-egress\n") as srv:
        sb = await Sandbox.create(
            _config(guest_image), network=NetworkSpec.build("tap", publish=[f"{_free_port()}:80"])
        )
        try:
            await sb.start()
            att = _attachment(sb)
            assert att.tap is not None
            # Open egress (no policy): the host server answers the guest via the gateway.
            got = await sb.exec(
                ["wget", "-qO-", f"http://{att.tap.host_address}:{srv.port}/"], timeout=30
            )
            assert (got.exit_code, got.stdout) == (0, b"open-egress\n"), got
            pid = sb.info().pid
            assert process_matches(pid, str(sb.run_dir))
            os.kill(pid, signal.SIGKILL)
            # The keeper notices the VMM's end through a pidfd and removes the network,
            # with no vc command running.
            deadline = time.monotonic() + 20
            while _leftovers(att) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _leftovers(att) == []
        finally:
            await sb.remove()


def _wait_gone(pid: int, needle: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while process_matches(pid, needle):
        assert time.monotonic() < deadline, f"pid {pid} still runs"
        time.sleep(0.05)


@needs_root
async def test_vc_ps_sweeps_what_a_dead_sandbox_left(
    guest_image: GuestImage, vc_root: Path
) -> None:
    sb = await Sandbox.create(_config(guest_image), network=NetworkSpec.build("tap"))
    try:
        await sb.start()
        att = _attachment(sb)
        # A crash that takes the keeper along (or a reboot the record survived): nobody
        # removed the network when the VMM died.
        os.kill(att.keeper_pid, signal.SIGKILL)
        _wait_gone(att.keeper_pid, "virtcontainers.network.keeper")
        pid = sb.info().pid
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, str(sb.run_dir))
        assert {"ip netns", "ip link", "nft table"} <= set(_leftovers(att))
        ps = subprocess.run([VC, "ps", "--json"], capture_output=True, check=True, text=True)
        [mine] = [i for i in json.loads(ps.stdout) if i["id"] == sb.id]
        assert mine["state"] == "exited"
        assert _leftovers(att) == []
    finally:
        await sb.remove()
