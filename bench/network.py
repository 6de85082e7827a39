"""Sandbox networking: download throughput, and what ``--network user`` costs at start and exec.

Measured in one run on the same kernel and initrd (traffic only to a server this script
starts on the host):

* **1 MiB download** from an HTTP server on the host into the guest (busybox ``wget`` to
  ``/dev/null``) in ``user`` mode (slirp) and, as root, ``tap`` mode (netns + tap + veth);
  the in-guest time is the exec wall time minus the median exec round trip of ``true``.
  Reported as MiB/s (median of ``--downloads``).
* **start to first exec** with ``--network user`` vs ``none``, pairs in alternating order,
  median ratio (target <= 1.05), and the **exec round trip** of ``true`` in both (two
  sandboxes up at once, batches of 10 interleaved in alternating order).

Usage: .venv/bin/python bench/network.py [--pairs 6] [--downloads 5] [--execs 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from qemu_boot import make_config  # type: ignore[import-not-found]
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


async def measure(args: argparse.Namespace, cfg: HypervisorConfig, store: StateStore) -> None:
    none, user = NetworkSpec(), NetworkSpec.build("user")
    _, warm = await start_to_exec(store, cfg, user)
    await warm.remove()

    starts: dict[str, list[float]] = {"none": [], "user": []}
    ratios = []
    for i in range(args.pairs):
        order = [("none", none), ("user", user)] if i % 2 == 0 else [("user", user), ("none", none)]
        got: dict[str, float] = {}
        for name, spec in order:
            elapsed, sandbox = await start_to_exec(store, cfg, spec)
            await sandbox.remove()
            got[name] = elapsed
            starts[name].append(elapsed)
        ratios.append(got["user"] / got["none"])
        print(f"pair {i + 1:2d}: none {got['none'] * 1000:7.1f} ms  user "
              f"{got['user'] * 1000:7.1f} ms  ratio {ratios[-1]:5.3f}")  # fmt: skip

    # Exec round trip: both sandboxes up at once, batches interleaved, so load drift hits both.
    _, sb_none = await start_to_exec(store, cfg, none)
    _, sb_user = await start_to_exec(store, cfg, user)
    rtt: dict[str, float] = {}
    rates: dict[str, float] = {}
    try:
        samples: dict[str, list[float]] = {"none": [], "user": []}
        for i in range(max(1, args.execs // 10)):
            pair = [("none", sb_none), ("user", sb_user)]
            for name, sandbox in pair if i % 2 == 0 else pair[::-1]:
                samples[name].append(await exec_rtt(sandbox, 10))
        rtt = {name: statistics.median(v) for name, v in samples.items()}
        with http_server("127.0.0.1") as port:
            rates["user"] = await download(
                sb_user, f"http://10.0.2.2:{port}/", args.downloads, rtt["user"]
            )
    finally:
        await sb_none.remove()
        await sb_user.remove()
    if os.geteuid() == 0 and shutil.which("nft"):
        _, sandbox = await start_to_exec(store, cfg, NetworkSpec.build("tap"))
        try:
            att = Attachment.from_dict(sandbox.info().network, sandbox.id, str(sandbox.run_dir))
            assert att.tap is not None
            tap_rtt = await exec_rtt(sandbox, args.execs)
            # The server listens on the host end of this sandbox's veth only.
            with http_server(att.tap.host_address) as port:
                rates["tap"] = await download(
                    sandbox, f"http://{att.tap.host_address}:{port}/", args.downloads, tap_rtt
                )
        finally:
            await sandbox.remove()

    summary = {
        "accelerator": host.accelerator(),
        "pairs": args.pairs,
        "start_to_first_exec_none_median_ms": round(statistics.median(starts["none"]) * 1000, 1),
        "start_to_first_exec_user_median_ms": round(statistics.median(starts["user"]) * 1000, 1),
        "start_ratio_user_vs_none_median": round(statistics.median(ratios), 3),
        "exec_true_rtt_none_median_ms": round(rtt["none"] * 1000, 2),
        "exec_true_rtt_user_median_ms": round(rtt["user"] * 1000, 2),
        "exec_rtt_ratio_user_vs_none": round(rtt["user"] / rtt["none"], 3),
        "download_1mib_mib_per_s": {k: round(v, 2) for k, v in rates.items()},
        "targets": {"start_ratio": 1.05},
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary, indent=2))


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--downloads", type=int, default=5)
    parser.add_argument("--execs", type=int, default=100)
    args = parser.parse_args()
    cfg = make_config(build_image("cloud"))
    host.accelerator()
    root = Path(tempfile.mkdtemp(prefix="vc-bench-net-"))
    try:
        await measure(args, cfg, StateStore(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
