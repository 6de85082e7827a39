"""One sandbox server's Prometheus metrics, served on ``<run dir>/metrics.sock``.

Every series is labelled ``sandbox_id`` and ``driver`` (so ``vc metrics serve`` can put all
servers' series side by side). Three sources:

- at each scrape, read fresh: the sandbox's state, vCPUs and memory (its record, which this
  server alone writes), the VMM process's CPU seconds, RSS, PSS, threads and fds (/proc,
  :func:`virtcontainers.procfs.process_stats`) and the guest's ``/proc/meminfo``, read
  through the agent (READ_FILE) with a short timeout;
- the relay (:class:`virtcontainers.server.relay.Relay`) reports every agent request's
  duration and every exec's start and exit (:class:`SandboxMetrics` is its observer);
- every operation in this process (:mod:`.tracing`'s observers) feeds the operation
  duration histogram, the boot/start/stop histograms and the error counter.

A server's endpoint ends with its VM, so the one figure only known at the end, the stop's
duration, is also sent to ``vc metrics serve`` when one runs (:meth:`SandboxMetrics.report_end`:
a datagram on ``<store root>/monitor.sock``), which keeps it per driver.

The socket speaks HTTP/1.1 (h11) so ``curl --unix-socket metrics.sock http://x/metrics``
works too. It is 0600 and, like ``server.sock``, refuses peers that are neither the owner
nor root (``SO_PEERCRED``). Names and meanings: ``docs/observability.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path

import h11
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from virtcontainers.procfs import kib_fields, process_stats
from virtcontainers.telemetry.tracing import Attributes, observe

__all__ = ["METRICS_SOCKET", "MONITOR_SOCKET", "SandboxMetrics", "serve_http"]

log = logging.getLogger(__name__)

METRICS_SOCKET = "metrics.sock"
#: In the store's root: where ``vc metrics serve`` hears of sandboxes that ended.
MONITOR_SOCKET = "monitor.sock"
LABELS = ("sandbox_id", "driver")
#: Every VM state a sandbox can be in (``vc_sandbox_state`` has one series per state).
STATES = ("created", "running", "paused", "stopped", "failed")
#: Agent round trips under TCG: ~1 ms (ping) to seconds (a long exec's start, a big file).
_REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                    5, 10, 30)  # fmt: skip
#: Boots and stops: tens of ms (KVM, clone restore) to a minute (TCG under load).
LIFECYCLE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60)
_GUEST_MEMINFO_TIMEOUT = 2.0

# Counters and histograms only: their `_created` series double every series for nothing.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class SandboxMetrics(Collector):
    """The registry of one sandbox server (see the module docstring).

    ``snapshot()`` returns the sandbox's state, vCPUs, memory MiB and VMM pid;
    ``guest_meminfo()`` the guest's ``/proc/meminfo`` text (raises when it cannot).
    """

    def __init__(
        self,
        sandbox_id: str,
        driver: str,
        snapshot: Callable[[], tuple[str, int, int, int]],
        guest_meminfo: Callable[[], Awaitable[bytes]],
    ) -> None:
        self.sandbox_id = sandbox_id
        self.driver = driver
        self._labels = (sandbox_id, driver)
        self._snapshot = snapshot
        self._guest_meminfo = guest_meminfo
        self._meminfo: dict[str, int] = {}
        self._meminfo_errors = 0
        self._stop_seconds: float | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.agent_requests = Histogram(
            "vc_agent_request_duration_seconds",
            "Agent requests relayed by the sandbox server: request sent to reply received.",
            [*LABELS, "request", "outcome"], buckets=_REQUEST_BUCKETS, registry=reg,
        )  # fmt: skip
        self.execs = Counter(
            "vc_exec", "Processes the agent started in the guest.", LABELS, registry=reg
        )
        self.execs.labels(*self._labels)  # 0 until the first exec, not absent
        self.exec_exits = Counter(
            "vc_exec_exits", "Guest processes that exited, by exit code.",
            [*LABELS, "exit_code"], registry=reg,
        )  # fmt: skip
        self.exec_signals = Counter(
            "vc_exec_signaled", "Guest processes killed by a signal, by signal number.",
            [*LABELS, "signal"], registry=reg,
        )  # fmt: skip
        self.operations = Histogram(
            "vc_operation_duration_seconds",
            "Sandbox and hypervisor operations run by the sandbox server (span names).",
            [*LABELS, "operation"], buckets=LIFECYCLE_BUCKETS, registry=reg,
        )  # fmt: skip
        self.operation_errors = Counter(
            "vc_operation_errors", "Operations that failed, by error class.",
            [*LABELS, "operation", "error_type"], registry=reg,
        )  # fmt: skip
        self._lifecycle = {
            "StartVM": Histogram(
                "vc_sandbox_boot_duration_seconds",
                "VMM launch until its control API answered (the StartVM span).",
                LABELS, buckets=LIFECYCLE_BUCKETS, registry=reg,
            ),
            "sandbox.start": Histogram(
                "vc_sandbox_start_duration_seconds",
                "Sandbox start until the guest agent answered (network, VMM, boot, agent).",
                LABELS, buckets=LIFECYCLE_BUCKETS, registry=reg,
            ),
            "sandbox.stop": Histogram(
                "vc_sandbox_stop_duration_seconds",
                "Sandbox stop: agent shutdown, VMM exit, console drained, network removed.",
                LABELS, buckets=LIFECYCLE_BUCKETS, registry=reg,
            ),
        }  # fmt: skip
        reg.register(self)
        self._unobserve = observe(self._operation_done)

    def close(self) -> None:
        """Stop observing this process's operations."""
        self._unobserve()

    # -- the relay's observer ----------------------------------------------------------------

    def request_done(self, request: str, seconds: float, ok: bool) -> None:
        self.agent_requests.labels(*self._labels, request, "ok" if ok else "error").observe(seconds)

    def exec_started(self) -> None:
        self.execs.labels(*self._labels).inc()

    def exec_exited(self, exit_code: int | None, signal: int | None) -> None:
        if signal:
            self.exec_signals.labels(*self._labels, str(signal)).inc()
        else:
            self.exec_exits.labels(*self._labels, str(exit_code or 0)).inc()

    # -- operations (telemetry.tracing) ------------------------------------------------------

    def _operation_done(
        self, name: str, seconds: float, error: str | None, _attrs: Attributes
    ) -> None:
        self.operations.labels(*self._labels, name).observe(seconds)
        if error is not None:
            self.operation_errors.labels(*self._labels, name, error).inc()
        elif (histogram := self._lifecycle.get(name)) is not None:
            histogram.labels(*self._labels).observe(seconds)
            if name == "sandbox.stop":
                self._stop_seconds = seconds

    def report_end(self, store_root: Path, reason: str) -> None:
        """Tell a running ``vc metrics serve`` (if any) that this sandbox ended, how and how
        long its stop took. Never blocks, never fails: with no monitor nobody is told."""
        body = {"sandbox_id": self.sandbox_id, "driver": self.driver, "reason": reason,
                "stop_seconds": self._stop_seconds}  # fmt: skip
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.sendto(json.dumps(body).encode(), str(store_root / MONITOR_SOCKET))

    # -- at each scrape ----------------------------------------------------------------------

    async def render(self) -> bytes:
        """The exposition text, with the guest's meminfo read now when it runs (a paused
        guest cannot answer: its last values are kept; so are they when the agent does not
        answer in time, counted in ``vc_guest_meminfo_errors``)."""
        state = self._snapshot()[0]
        if state == "running":
            try:
                async with asyncio.timeout(_GUEST_MEMINFO_TIMEOUT):
                    text = await self._guest_meminfo()
                self._meminfo = kib_fields(text.decode(errors="replace"))
            except Exception as exc:  # a paused guest cannot answer: say so, keep serving
                log.debug("guest meminfo of %s: %s", self.sandbox_id, exc)
                self._meminfo_errors += 1
        return prometheus_client.generate_latest(self.registry)

    def describe(self) -> Iterable[Metric]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Metric]:
        state, vcpus, memory_mb, pid = self._snapshot()
        labels = list(self._labels)
        states = GaugeMetricFamily(
            "vc_sandbox_state", "1 for the state the sandbox is in, 0 for the others.",
            labels=[*LABELS, "state"],
        )  # fmt: skip
        for name in STATES:
            states.add_metric([*labels, name], 1.0 if name == state else 0.0)
        yield states
        yield _gauge("vc_sandbox_vcpus", "vCPUs of the VM (boot plus hot-plugged).", labels, vcpus)
        yield _gauge(
            "vc_sandbox_memory_bytes", "Memory of the VM (boot plus hot-plugged).", labels,
            memory_mb * 1024 * 1024,
        )  # fmt: skip
        stats = process_stats(pid) if pid else None
        if stats is not None:
            cpu = CounterMetricFamily(
                "vc_hypervisor_cpu_seconds", "CPU time of the VMM process, by mode.",
                labels=[*LABELS, "mode"],
            )  # fmt: skip
            cpu.add_metric([*labels, "user"], stats.cpu_user_seconds)
            cpu.add_metric([*labels, "system"], stats.cpu_system_seconds)
            yield cpu
            for name, doc, value in (
                ("vc_hypervisor_resident_memory_bytes", "RSS of the VMM process.",
                 stats.rss_bytes),
                ("vc_hypervisor_proportional_memory_bytes",
                 "PSS of the VMM process (shared pages divided among their users).",
                 stats.pss_bytes),
                ("vc_hypervisor_threads", "Threads of the VMM process.", stats.threads),
                ("vc_hypervisor_open_fds", "Open file descriptors of the VMM process.",
                 stats.fds),
            ):  # fmt: skip
                yield _gauge(name, doc, labels, value)
        if self._meminfo:
            guest = GaugeMetricFamily(
                "vc_guest_meminfo_bytes",
                "The guest's /proc/meminfo (kB lines, in bytes), read through the agent.",
                labels=[*LABELS, "item"],
            )
            for item, value in self._meminfo.items():
                guest.add_metric([*labels, item], value)
            yield guest
        errors = CounterMetricFamily(
            "vc_guest_meminfo_errors", "Scrapes whose guest meminfo read failed.", labels=LABELS
        )
        errors.add_metric(labels, self._meminfo_errors)
        yield errors


def _gauge(name: str, doc: str, labels: list[str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(LABELS))
    family.add_metric(labels, value)
    return family


# -- the HTTP endpoint on a unix socket -------------------------------------------------------

Render = Callable[[], Awaitable[bytes]]


async def serve_http(
    path: Path, render: Render, *, allowed: Callable[[socket.socket], bool] | None = None
) -> asyncio.Server:
    """Serve ``GET /metrics`` (``render()``'s text) on the unix socket ``path`` (0600).

    ``allowed(socket)`` may refuse a peer (the connection is closed unanswered).
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if allowed is None or allowed(writer.get_extra_info("socket")):
                await _answer(reader, writer, render)
        except (OSError, h11.ProtocolError) as exc:
            log.debug("metrics request failed: %s", exc)
        except Exception:  # a scrape must never take the sandbox server down
            log.exception("metrics request failed")
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path))
    os.chmod(path, 0o600)
    return server


async def _answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, render: Render
) -> None:
    """One request, one response, then the connection closes (scrapers reconnect)."""
    conn = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            conn.receive_data(data)
            if not data and request is None:
                return
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if request is None:
        return
    if request.method not in (b"GET", b"HEAD"):
        status, body, ctype = 405, b"only GET\n", "text/plain"
    elif request.target.split(b"?")[0] not in (b"/metrics", b"/"):
        status, body, ctype = 404, b"try /metrics\n", "text/plain"
    else:
        status, body, ctype = 200, await render(), prometheus_client.CONTENT_TYPE_LATEST
    headers = [
        ("Content-Type", ctype),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    if request.method == b"GET":
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    writer.write(out)
    with contextlib.suppress(OSError):
        await writer.drain()
