"""The per-sandbox network keeper of tap mode: forwards published ports, cleans up after the VMM.

Run as ``python -m virtcontainers.network.keeper STATE --vmm-pid PID`` (by
:meth:`Attachment.started`, as root). It binds every published ``HOST_IP:HOST_PORT`` and
relays TCP connections and UDP datagrams to the guest's address, prints ``ready`` on stdout,
then waits on a pidfd of the VMM. When the VMM exits, however it exits (a SIGKILL included),
or when the keeper gets SIGTERM, it closes its ports and removes the sandbox's netns, veth,
route and nft tables, so a crashed VMM leaves nothing behind even if no ``vc`` command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from virtcontainers.fdwait import readable
from virtcontainers.network.attachment import Attachment
from virtcontainers.network.spec import PortMapping, Protocol

log = logging.getLogger("virtcontainers.network.keeper")

_CHUNK = 1 << 16
#: A UDP "connection" (one client address) is forgotten after this long without traffic.
UDP_IDLE = 60.0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _tcp_forward(port: PortMapping, guest: str) -> asyncio.Server:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            guest_r, guest_w = await asyncio.open_connection(guest, port.guest_port)
        except OSError as exc:
            log.info("%s: guest refused: %s", port, exc)
            client_w.close()
            return
        try:
            await asyncio.gather(_pipe(client_r, guest_w), _pipe(guest_r, client_w))
        finally:
            for w in (client_w, guest_w):
                w.close()

    return await asyncio.start_server(handle, port.host_ip, port.host_port, reuse_address=True)


class _UdpRelay(asyncio.DatagramProtocol):
    """host socket <-> one connected socket to the guest per client address."""

    def __init__(self, port: PortMapping, guest: str) -> None:
        self.port = port
        self.guest = guest
        self.transport: asyncio.DatagramTransport | None = None
        self.peers: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self.pending: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        peer = self.peers.get(addr)
        if peer is not None:
            peer.sendto(data)
            return
        task = asyncio.ensure_future(self._open(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _open(self, first: bytes, addr: tuple[str, int]) -> None:
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _: tuple[str, int]) -> None:
                if relay.transport is not None:
                    relay.transport.sendto(data, addr)

        loop = asyncio.get_running_loop()
        peer, _ = await loop.create_datagram_endpoint(
            Back, remote_addr=(self.guest, self.port.guest_port)
        )
        self.peers[addr] = peer
        peer.sendto(first)
        loop.call_later(UDP_IDLE, self._forget, addr)

    def _forget(self, addr: tuple[str, int]) -> None:
        peer = self.peers.pop(addr, None)
        if peer is not None:
            peer.close()


async def _wait_pid(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await readable(pidfd)
    finally:
        os.close(pidfd)


async def serve(data: dict[str, object], state: Path, vmm_pid: int) -> int:
    att = Attachment.from_dict(data, str(data.get("sandbox_id", "")), str(state.parent))
    att.keeper_pid = 0  # never signal ourselves on teardown
    if att.tap is None:
        print("no tap network in the state file", file=sys.stderr)
        return 2
    guest = att.tap.guest_address
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def stopping() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping)
    servers: list[asyncio.Server] = []
    transports: list[asyncio.BaseTransport] = []
    try:
        for port in att.spec.publish:
            if port.protocol is Protocol.TCP:
                servers.append(await _tcp_forward(port, guest))
            else:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda p=port: _UdpRelay(p, guest),  # type: ignore[misc]
                    local_addr=(port.host_ip, port.host_port),
                )
                transports.append(udp)
        print("ready", flush=True)
        vmm_exit = asyncio.ensure_future(_wait_pid(vmm_pid))
        await asyncio.wait({vmm_exit, stop}, return_when=asyncio.FIRST_COMPLETED)
        vmm_exit.cancel()
        why = "exited" if vmm_exit.done() and not vmm_exit.cancelled() else "asked to stop"
        log.info("VMM %d %s: tearing the network down", vmm_pid, why)
    finally:
        for server in servers:
            server.close()
        for transport in transports:
            transport.close()
        with contextlib.suppress(Exception):
            await att.teardown()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="virtcontainers tap-mode network keeper")
    parser.add_argument("state", type=Path)
    parser.add_argument("--vmm-pid", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s keeper: %(message)s")
    data = json.loads(args.state.read_text())
    sys.exit(asyncio.run(serve(data, args.state, args.vmm_pid)))


if __name__ == "__main__":
    main()
