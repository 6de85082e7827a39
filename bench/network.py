"""Sandbox networking: download throughput, and what ``--network user`` costs at start and exec.

Measured in one run on the same kernel and initrd (traffic only to a server this script
starts on the host):

* **1 MiB download** from an HTTP server on the host into the guest (busybox ``wget`` to
  ``/dev/null``) in ``user`` mode (slirp) and, as root, ``tap`` mode (netns + tap + veth);
  the in-guest time is the exec wall time minus the median exec round trip of ``true``.
  Reported as MiB/s (median of ``--downloads``).
* **start to first exec** with ``--network user`` vs ``none``, pairs in a balanced random
  order (``bench.stats``), median ratio (target <= 1.05), and the **exec round trip** of
  ``true`` in both (two sandboxes up at once, batches of 10 interleaved the same way).

Usage: .venv/bin/python -m bench.network [--pairs 6] [--downloads 5] [--execs 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench.qemu_boot import make_config
from bench.stats import Figure, from_pairs, run_pairs, single
from virtcontainers import Sandbox, host
from virtcontainers.config import HypervisorConfig
from virtcontainers.guest.image import build_image
from virtcontainers.network import Attachment, NetworkSpec
from virtcontainers.persist.store import StateStore

PAYLOAD = os.urandom(1 << 20)


@contextlib.contextmanager
def http_server(address: str) -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer((address, 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


async def start_to_exec(
    store: StateStore, cfg: HypervisorConfig, spec: NetworkSpec
) -> tuple[float, Sandbox]:
    start = time.perf_counter()
    sandbox = await Sandbox.create(cfg, store=store, network=spec)
    try:
        await sandbox.start()
        result = await sandbox.exec(["true"])
        if result.exit_code != 0:
            raise RuntimeError(f"exec true: {result}")
    except BaseException:
        await sandbox.remove()
        raise
    return time.perf_counter() - start, sandbox


async def exec_rtt(sandbox: Sandbox, n: int) -> float:
    rtts = []
    for _ in range(n):
        t = time.perf_counter()
        await sandbox.exec(["true"])
        rtts.append(time.perf_counter() - t)
    return statistics.median(rtts)


async def download(sandbox: Sandbox, url: str, n: int, rtt: float) -> float:
    """Median MiB/s of ``n`` 1 MiB downloads (checked: size in the guest)."""
    rates = []
    for _ in range(n):
        t = time.perf_counter()
        got = await sandbox.exec(["sh", "-c", f"wget -qO- {url} | wc -c"], timeout=120)
        elapsed = time.perf_counter() - t - rtt
        if got.exit_code != 0 or got.stdout.strip() != str(len(PAYLOAD)).encode():
            raise RuntimeError(f"download failed: {got}")
        rates.append(1.0 / max(elapsed, 1e-6))
    return statistics.median(rates)


async def measure(
    cfg: HypervisorConfig, store: StateStore, pairs: int, downloads: int, execs: int,
    rng: random.Random,
) -> list[Figure]:  # fmt: skip
    none, user = NetworkSpec(), NetworkSpec.build("user")
    _, warm = await start_to_exec(store, cfg, user)
    await warm.remove()

    async def timed(spec: NetworkSpec) -> float:
        elapsed, sandbox = await start_to_exec(store, cfg, spec)
        await sandbox.remove()
        return elapsed * 1000

    started_user, started_none, orders = await run_pairs(
        pairs, rng, lambda: timed(user), lambda: timed(none)
    )
    figures = [
        from_pairs(
            "network_user_start",
            "start to first exec, --network user",
            "ms",
            started_user,
            started_none,
            orders,
            "--network none",
        )
    ]

    # Exec round trip: both sandboxes up at once, batches interleaved, so load drift hits both.
    _, sb_none = await start_to_exec(store, cfg, none)
    _, sb_user = await start_to_exec(store, cfg, user)
    try:
        rtt_user, rtt_none, orders = await run_pairs(
            max(2, execs // 10),
            rng,
            lambda: exec_rtt(sb_user, 10),
            lambda: exec_rtt(sb_none, 10),
        )
        figures.append(
            from_pairs(
                "network_user_exec_rtt",
                "exec round trip, --network user",
                "ms",
                [t * 1000 for t in rtt_user],
                [t * 1000 for t in rtt_none],
                orders,
                "--network none",
            )
        )
        with http_server("127.0.0.1") as port:
            user_rate = await download(
                sb_user, f"http://10.0.2.2:{port}/", downloads, statistics.median(rtt_user)
            )
    finally:
        await sb_none.remove()
        await sb_user.remove()
    if os.geteuid() != 0 or not shutil.which("nft"):
        print("network: tap download skipped (needs root and nft)")
        return figures
    _, sandbox = await start_to_exec(store, cfg, NetworkSpec.build("tap"))
    try:
        att = Attachment.from_dict(sandbox.info().network, sandbox.id, str(sandbox.run_dir))
        assert att.tap is not None
        tap_rtt = await exec_rtt(sandbox, 20)
        # The server listens on the host end of this sandbox's veth only.
        with http_server(att.tap.host_address) as port:
            tap_rate = await download(
                sandbox, f"http://{att.tap.host_address}:{port}/", downloads, tap_rtt
            )
    finally:
        await sandbox.remove()
    figures.append(
        single(
            "network_tap_download",
            "1 MiB download from the host, --network tap",
            "MiB/s",
            tap_rate,
            user_rate,
            "--network user (slirp)",
            n=downloads,
            lower_is_better=False,
        )
    )
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--downloads", type=int, default=5)
    parser.add_argument("--execs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    cfg = make_config(build_image("cloud"))
    host.accelerator()
    root = Path(tempfile.mkdtemp(prefix="vc-bench-net-"))
    try:
        figures = await measure(
            cfg, StateStore(root), args.pairs, args.downloads, args.execs,
            random.Random(args.seed),
        )  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for figure in figures:
        print(figure.line())


if __name__ == "__main__":
    asyncio.run(main())
