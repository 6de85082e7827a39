"""``vc metrics serve``: every sandbox server's metrics behind one Prometheus target.

As kata-monitor does for Kata's shims: at each scrape of ``http://ADDR/metrics`` the monitor
finds the sandbox servers of the state store (a ``metrics.sock`` in a sandbox's run dir),
scrapes each of them over its unix socket, merges their series by metric family (every
series already carries ``sandbox_id`` and ``driver``) and adds its own:

- ``vc_monitor_running_servers``: the servers that answered this scrape;
- ``vc_monitor_scrapes_total`` / ``vc_monitor_scrape_failures_total``: server scrapes done
  and failed (a socket left by a killed server, a server that did not answer within the
  timeout) since the monitor started;
- ``vc_monitor_sandboxes_ended_total`` and ``vc_monitor_sandbox_stop_duration_seconds``:
  what servers report as they end (:class:`EndedSandboxes`), which no scrape of theirs
  could show.

The HTTP side is ``prometheus_client``'s own server (a thread per request).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from virtcontainers.errors import ConfigError
from virtcontainers.fsutil import mkdir_private
from virtcontainers.telemetry.metrics import LIFECYCLE_BUCKETS, METRICS_SOCKET, MONITOR_SOCKET

__all__ = ["EndedSandboxes", "Monitor", "parse_listen", "serve"]

log = logging.getLogger(__name__)

#: How long one server may take to answer (its scrape reads the guest's meminfo).
SERVER_TIMEOUT = 5.0


class Monitor(Collector):
    """The merged metrics of the sandbox servers under ``store_root`` (see module docstring)."""

    def __init__(self, store_root: Path, *, timeout: float = SERVER_TIMEOUT) -> None:
        self.store_root = store_root
        self.timeout = timeout
        self._lock = threading.Lock()
        self._scrapes = 0
        self._failures = 0

    def sockets(self) -> list[Path]:
        """The metrics sockets of the sandboxes recorded in the store."""
        return sorted((self.store_root / "sandboxes").glob(f"*/{METRICS_SOCKET}"))

    def scrape(self, path: Path) -> str:
        """One server's exposition text. Raises ``httpx.HTTPError`` when it does not answer."""
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, timeout=self.timeout) as client:
            reply = client.get("http://sandbox/metrics")
            reply.raise_for_status()
            return reply.text

    def describe(self) -> Iterable[Metric]:
        return []  # the families depend on what the servers report

    def _families(self, path: Path) -> list[Metric] | None:
        try:
            return list(text_string_to_metric_families(self.scrape(path)))
        except (httpx.HTTPError, ValueError) as exc:
            log.info("scraping %s failed: %s", path.parent.name, exc)
            return None

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        answered = failed = 0
        sockets = self.sockets()
        # In parallel: one slow server (a guest slow to answer) must not delay the others.
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(sockets)))) as pool:
            results = list(pool.map(self._families, sockets))
        for parsed in results:
            if parsed is None:
                failed += 1
                continue
            answered += 1
            for family in parsed:
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                merged.samples.extend(family.samples)
        with self._lock:
            self._scrapes += answered + failed
            self._failures += failed
            scrapes, failures = self._scrapes, self._failures
        yield from families.values()
        yield GaugeMetricFamily(
            "vc_monitor_running_servers",
            "Sandbox servers that answered this scrape.",
            value=answered,
        )
        yield CounterMetricFamily(
            "vc_monitor_scrapes", "Sandbox server scrapes since the monitor started.", scrapes
        )
        yield CounterMetricFamily(
            "vc_monitor_scrape_failures",
            "Sandbox server scrapes that failed (no answer, killed server's socket).",
            failures,
        )


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every interface) -> (host, port).

    Raises:
        ConfigError: anything else, or a port outside 0-65535.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"--listen {listen!r} is not an address",
            field="--listen",
            allowed=["HOST:PORT", "[IPV6]:PORT", ":PORT"],
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)  # noqa: S104 (":PORT" asks for every interface)


def serve(listen: str, store_root: Path) -> tuple[str, int, threading.Event]:
    """Start serving the merged metrics on ``listen``; returns the address really bound
    (port 0 picks one) and an event that stops the server when set.

    Raises:
        ConfigError: a malformed address, or one that cannot be bound.
    """
    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Monitor(store_root))
    try:
        httpd, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {listen}: {exc.strerror or exc}", field="--listen"
        ) from exc
    ends = EndedSandboxes(store_root, registry)
    ends.start()
    stop = threading.Event()

    def shutdown() -> None:
        stop.wait()
        ends.close()
        httpd.shutdown()
        httpd.server_close()
        thread.join()

    threading.Thread(target=shutdown, name="vc-metrics-shutdown", daemon=True).start()
    bound_host, bound_port = httpd.server_address[:2]
    return str(bound_host), int(bound_port), stop


class EndedSandboxes:
    """Sandboxes that ended while the monitor ran, as their servers reported them on
    ``<store root>/monitor.sock`` (their own endpoints ended with them)."""

    def __init__(self, store_root: Path, registry: CollectorRegistry) -> None:
        self.path = store_root / MONITOR_SOCKET
        self.stops = Histogram(
            "vc_monitor_sandbox_stop_duration_seconds",
            "Stops of sandboxes that ended while the monitor ran (agent shutdown to console "
            "drained), by driver.",
            ["driver"], buckets=LIFECYCLE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ended = Counter(
            "vc_monitor_sandboxes_ended",
            "Sandboxes that ended while the monitor ran, by driver and reason.",
            ["driver", "reason"], registry=registry,
        )  # fmt: skip
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._bound = False

    def start(self) -> None:
        """Listen (in a daemon thread). A socket left by a monitor that died is replaced;
        one a live monitor holds is left to it (this one then hears of no ends)."""
        if self.path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                probe.sendto(b"", str(self.path))
                log.warning("another vc metrics serve receives the ends at %s", self.path)
                return
            except OSError:
                self.path.unlink(missing_ok=True)
            finally:
                probe.close()
        try:
            mkdir_private(self.path.parent)  # the store may not exist yet: sandboxes will
            self._sock.bind(str(self.path))
        except OSError as exc:
            log.warning("cannot listen at %s (stop durations stay unknown): %s", self.path, exc)
            return
        self._bound = True
        os.chmod(self.path, 0o600)
        threading.Thread(target=self._receive, name="vc-metrics-ends", daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return  # closed
            try:
                end = json.loads(data) if data else {}
                driver, reason, seconds = (
                    str(end["driver"]),
                    str(end["reason"]),
                    end.get("stop_seconds"),
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # an empty probe from another monitor, or garbage
            self.ended.labels(driver, reason).inc()
            if isinstance(seconds, int | float):
                self.stops.labels(driver).observe(float(seconds))

    def close(self) -> None:
        self._sock.close()
        if self._bound:
            self.path.unlink(missing_ok=True)
