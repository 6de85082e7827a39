"""``vc metrics``: the sandboxes' Prometheus metrics (names and meanings in
docs/observability.md)."""

from __future__ import annotations

import signal
import sys
import threading

import click


@click.group()
def metrics() -> None:
    """Prometheus metrics of the running sandboxes.

    Each sandbox server serves its own on `metrics.sock` in the sandbox's run dir
    (`curl --unix-socket RUN_DIR/metrics.sock http://x/metrics`); `vc metrics serve`
    puts all of them behind one HTTP target.
    """


@metrics.command()
@click.option(
    "--listen",
    default="127.0.0.1:8090",
    metavar="ADDR",
    help="HOST:PORT, [IPV6]:PORT, or :PORT for every interface; port 0 picks a free one.",
)
def serve(listen: str) -> None:
    """Serve every sandbox server's metrics on http://ADDR/metrics, for Prometheus.

    Like kata-monitor: each scrape scrapes the servers of the running sandboxes and adds
    vc_monitor_running_servers. Runs until interrupted (Ctrl-C, SIGTERM).

    \b
    A Prometheus job for it:
      scrape_configs:
        - job_name: vc
          static_configs: [{targets: ['127.0.0.1:8090']}]
    """
    from virtcontainers.persist.store import StateStore
    from virtcontainers.telemetry.monitor import serve as start

    root = StateStore().root
    host, port, stop = start(listen, root)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving the sandboxes of {root} on http://{shown}:{port}/metrics")
    sys.stdout.flush()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    stop.set()


@metrics.command()
@click.argument("sandbox_id")
def show(sandbox_id: str) -> None:
    """Print one sandbox's metrics (Prometheus text format), read from its server."""
    import httpx

    from virtcontainers.errors import StateError
    from virtcontainers.persist.store import StateStore
    from virtcontainers.telemetry.metrics import METRICS_SOCKET
    from virtcontainers.telemetry.monitor import Monitor

    store = StateStore()
    store.load(sandbox_id)  # StoreError: no such sandbox
    socket = store.sandbox_dir(sandbox_id) / METRICS_SOCKET
    try:
        click.echo(Monitor(store.root).scrape(socket), nl=False)
    except httpx.HTTPError as exc:
        raise StateError(
            "read the metrics", f"no sandbox server answers ({exc})",
            ["running in a sandbox server (vc start, vc run)"],
        ) from None  # fmt: skip
