"""Telemetry without a VM: spans of the hypervisor boundary (mock driver), errors on spans,
trace context over the server wire, JSON log lines, the SDK setup, per-sandbox metrics on a
real unix socket and the monitor merging two servers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_agent_client import Agent, agent_binary, start_agent  # noqa: F401
from virtcontainers.agent import connect_unix
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import CpuDevice, MemoryDevice
from virtcontainers.drivers.mock import MockHypervisor
from virtcontainers.errors import AgentError, ConfigError, MissingDependencyError, StateError
from virtcontainers.hypervisor import NetworkNamespace
from virtcontainers.server import wire
from virtcontainers.server.relay import Relay
from virtcontainers.telemetry import export, logs, tracing
from virtcontainers.telemetry.metrics import (
    METRICS_SOCKET,
    MONITOR_SOCKET,
    SandboxMetrics,
    serve_http,
)
from virtcontainers.telemetry.monitor import EndedSandboxes, Monitor, parse_listen


class _Context:
    def __init__(self, run_dir: Path) -> None:
        self.id = "sb1"
        self.run_dir = run_dir


def _mock(tmp_path: Path) -> tuple[MockHypervisor, HypervisorConfig]:
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = str(tmp_path / "vmlinuz")
    cfg.boot.initrd_path = str(tmp_path / "initrd")
    cfg.resources.num_vcpus = 1
    cfg.resources.default_max_vcpus = 4
    cfg.resources.memory_size = 512
    hv = MockHypervisor()
    hv.set_sandbox(_Context(tmp_path))
    return hv, cfg


def _attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_every_hypervisor_call_is_a_span_with_kata_names(tmp_path: Path, spans: Any) -> None:
    hv, cfg = _mock(tmp_path)
    await hv.create_sandbox("sb1", NetworkNamespace(), cfg)
    await hv.start_sandbox(5.0)
    await hv.hotplug_add_device(CpuDevice(amount=1))
    await hv.resize_vcpus(3)
    await hv.pause_sandbox()
    await hv.resume_sandbox()
    with pytest.raises(StateError):
        await hv.save_sandbox()  # not a template VM
    await hv.stop_sandbox()
    names = [s.name for s in spans.get_finished_spans()]
    assert names == [
        "CreateVM", "StartVM", "HotplugAddDevice", "HotplugAddDevice", "ResizeVCPUs",
        "PauseVM", "ResumeVM", "SaveVM", "StopVM",
    ]  # fmt: skip
    by_name = {s.name: s for s in spans.get_finished_spans()}
    assert _attrs(by_name["CreateVM"]) == {
        "vc.driver": "mock", "vc.sandbox.id": "sb1", "vc.vcpus": 1, "vc.memory_mib": 512,
        "vc.template.boot_from": False, "vc.template.boot_to_be": False,
    }  # fmt: skip
    resize = by_name["ResizeVCPUs"]
    assert _attrs(resize)["vc.vcpus.before"] == 2
    assert _attrs(resize)["vc.vcpus.after"] == 3
    # resize_vcpus hot-plugs through hotplug_add_device: a child span of ResizeVCPUs
    nested = [s for s in spans.get_finished_spans() if s.name == "HotplugAddDevice"][1]
    assert nested.parent is not None
    assert nested.parent.span_id == resize.context.span_id
    assert _attrs(nested)["vc.device.kind"] == "cpu"
    save = by_name["SaveVM"]
    assert save.status.status_code is StatusCode.ERROR
    assert _attrs(save)["error.type"] == "StateError"
    assert [e.name for e in save.events] == ["exception"]


async def test_a_drivers_super_call_is_one_span(tmp_path: Path, spans: Any) -> None:
    class Layered(MockHypervisor):
        async def stop_sandbox(self, wait_only: bool = False) -> None:
            await super().stop_sandbox(wait_only)

    hv = Layered()
    hv.set_sandbox(_Context(tmp_path))
    _, cfg = _mock(tmp_path)
    await hv.create_sandbox("sb1", NetworkNamespace(), cfg)
    await hv.start_sandbox(5.0)
    await hv.stop_sandbox(wait_only=True)
    assert [s.name for s in spans.get_finished_spans()] == ["CreateVM", "StartVM", "StopVM"]


async def test_a_refused_hotplug_is_a_span_with_its_error(tmp_path: Path, spans: Any) -> None:
    hv, _cfg = _mock(tmp_path)
    with pytest.raises(StateError):
        await hv.hotplug_add_device(MemoryDevice(size_mb=128))  # not running yet
    (span,) = spans.get_finished_spans()
    assert span.name == "HotplugAddDevice"
    assert _attrs(span)["vc.device.kind"] == "memory"
    assert _attrs(span)["error.type"] == "StateError"


async def test_cancellation_is_marked_not_an_error(spans: Any) -> None:
    async def slow() -> None:
        with tracing.operation("sandbox.exec"):
            await asyncio.sleep(10)

    task = asyncio.create_task(slow())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET
    assert _attrs(span) == {"vc.cancelled": True}


def test_traceparent_crosses_the_server_wire(spans: Any) -> None:
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("client") as client:
        payload = wire.encode_request("stop", {"wait_only": True}, tracing.traceparent())
    op, args, parent = wire.decode_request(payload)
    assert (op, args) == ("stop", {"wait_only": True})
    assert parent is not None
    with tracing.attached(parent), tracing.operation("server.stop"):
        pass
    server = next(s for s in spans.get_finished_spans() if s.name == "server.stop")
    assert server.context.trace_id == client.get_span_context().trace_id
    assert server.parent is not None
    assert server.parent.span_id == client.get_span_context().span_id
    # Untraced: no key at all (old servers and clients see the same JSON as before).
    assert "traceparent" not in json.loads(wire.encode_request("stop", {}, None))
    assert wire.decode_request(b'{"op": "x", "args": {}, "traceparent": 5}')[2] is None


def test_operation_log_line_is_json_with_the_spans_ids(spans: Any) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    ops = logging.getLogger("virtcontainers.ops")
    handler, old_level = Keep(), ops.level
    ops.addHandler(handler)
    ops.setLevel(logging.INFO)
    try:
        with (
            pytest.raises(ConfigError),
            tracing.operation("sandbox.start", {"vc.sandbox.id": "sb9"}),
        ):
            raise ConfigError("bad", field="x")
    finally:
        ops.removeHandler(handler)
        ops.setLevel(old_level)
    (span,) = spans.get_finished_spans()
    (record,) = records
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["operation"] == "sandbox.start"
    assert line["sandbox_id"] == "sb9"
    assert line["error"] == "ConfigError"
    assert line["level"] == "info"
    assert line["trace_id"] == f"{span.context.trace_id:032x}"
    assert line["span_id"] == f"{span.context.span_id:016x}"
    assert line["duration_ms"] >= 0


def test_log_format_is_checked() -> None:
    with pytest.raises(ConfigError, match="unknown log format"):
        logs.configure("yaml")


def test_export_needs_the_sdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # import fails
    with pytest.raises(MissingDependencyError) as info:
        export.configure(tmp_path / "t.jsonl", env={})
    assert info.value.extra == "otlp"
    assert "virtcontainers[otlp]" in str(info.value)


def test_export_environment() -> None:
    assert not export.requested({})
    assert export.requested({"VC_TRACE_FILE": "/tmp/x"})
    assert export.requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not export.requested({"OTEL_TRACES_EXPORTER": "none"})
    assert not export.requested({"VC_TRACE_FILE": "/x", "OTEL_SDK_DISABLED": "true"})
    with pytest.raises(ConfigError) as info:
        export.requested({"OTEL_TRACES_EXPORTER": "zipkin"})
    assert info.value.allowed == ("otlp", "console", "none")
    assert export.configure(env={}) is None


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:8090") == ("127.0.0.1", 8090)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":9") == ("0.0.0.0", 9)
    for bad in ("8090", "host:", "h:99999", "h:x"):
        with pytest.raises(ConfigError, match="not an address"):
            parse_listen(bad)


# -- metrics ---------------------------------------------------------------------------------


MEMINFO = b"MemTotal:         413736 kB\nMemFree:   1000 kB\nHugePages_Total:       0\n"


def _families(text: str) -> dict[str, list[Any]]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples: list[Any], **labels: str) -> float:
    (match,) = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    return float(match)


async def _serve(
    run_dir: Path, sandbox_id: str, meminfo: bytes | None, state: str = "running"
) -> tuple[SandboxMetrics, asyncio.Server]:
    async def guest_meminfo() -> bytes:
        if meminfo is None:
            raise TimeoutError("the guest is paused")
        return meminfo

    run_dir.mkdir(parents=True)
    metrics = SandboxMetrics(
        sandbox_id, "qemu", lambda: (state, 2, 768, os.getpid()), guest_meminfo
    )
    server = await serve_http(run_dir / METRICS_SOCKET, metrics.render)
    return metrics, server


async def _get(socket: Path) -> str:
    transport = httpx.AsyncHTTPTransport(uds=str(socket))
    async with httpx.AsyncClient(transport=transport) as client:
        reply = await client.get("http://sandbox/metrics")
        assert reply.status_code == 200
        return reply.text


async def test_sandbox_metrics_on_the_unix_socket(tmp_path: Path) -> None:
    metrics, server = await _serve(tmp_path / "sb1", "sb1", MEMINFO)
    try:
        metrics.exec_started()
        metrics.exec_started()
        metrics.exec_exited(3, None)
        metrics.exec_exited(None, 9)
        metrics.request_done("exec", 0.004, True)
        with tracing.operation("StartVM"):
            pass
        with pytest.raises(StateError), tracing.operation("sandbox.pause"):
            raise StateError("pause", "stopped", ["running"])
        socket = tmp_path / "sb1" / METRICS_SOCKET
        assert socket.stat().st_mode & 0o777 == 0o600
        fam = _families(await _get(socket))
    finally:
        server.close()
        metrics.close()
    ids = {"sandbox_id": "sb1", "driver": "qemu"}
    assert _value(fam["vc_sandbox_state"], state="running", **ids) == 1
    assert _value(fam["vc_sandbox_state"], state="paused", **ids) == 0
    assert _value(fam["vc_sandbox_memory_bytes"], **ids) == 768 * 1024 * 1024
    assert _value(fam["vc_sandbox_vcpus"], **ids) == 2
    assert _value(fam["vc_exec"], **ids) == 2
    assert _value(fam["vc_exec_exits"], exit_code="3", **ids) == 1
    assert _value(fam["vc_exec_signaled"], signal="9", **ids) == 1
    count = [s for s in fam["vc_agent_request_duration_seconds"] if s.name.endswith("_count")]
    assert _value(count, request="exec", outcome="ok") == 1
    boots = [s for s in fam["vc_sandbox_boot_duration_seconds"] if s.name.endswith("_count")]
    assert _value(boots, **ids) == 1
    errors = fam["vc_operation_errors"]
    assert _value(errors, operation="sandbox.pause", error_type="StateError") == 1
    assert _value(fam["vc_guest_meminfo_bytes"], item="MemTotal") == 413736 * 1024
    assert {s.labels["item"] for s in fam["vc_guest_meminfo_bytes"]} == {"MemTotal", "MemFree"}
    # This process stands in for the VMM: its own /proc figures.
    assert _value(fam["vc_hypervisor_resident_memory_bytes"], **ids) > 1024 * 1024
    assert _value(fam["vc_hypervisor_threads"], **ids) >= 1
    assert _value(fam["vc_hypervisor_open_fds"], **ids) >= 3
    assert "vc_exec_created" not in fam


async def test_a_guest_that_does_not_answer_is_counted(tmp_path: Path) -> None:
    metrics, server = await _serve(tmp_path / "sb1", "sb1", None)
    try:
        fam = _families(await _get(tmp_path / "sb1" / METRICS_SOCKET))
    finally:
        server.close()
        metrics.close()
    assert "vc_guest_meminfo_bytes" not in fam
    assert _value(fam["vc_guest_meminfo_errors"]) == 1
    assert _value(fam["vc_sandbox_state"], state="running") == 1


async def test_a_paused_guest_is_not_asked(tmp_path: Path) -> None:
    # It could not answer: asking would stall every scrape by the read's timeout.
    metrics, server = await _serve(tmp_path / "sb1", "sb1", None, state="paused")
    try:
        fam = _families(await _get(tmp_path / "sb1" / METRICS_SOCKET))
    finally:
        server.close()
        metrics.close()
    assert _value(fam["vc_guest_meminfo_errors"]) == 0
    assert _value(fam["vc_sandbox_state"], state="paused") == 1


async def test_monitor_merges_servers_and_counts_a_dead_one(tmp_path: Path) -> None:
    root = tmp_path / "store"
    a, server_a = await _serve(root / "sandboxes" / "a", "a", MEMINFO)
    b, server_b = await _serve(root / "sandboxes" / "b", "b", MEMINFO)
    a.exec_started()
    dead = root / "sandboxes" / "c"
    dead.mkdir()
    (dead / METRICS_SOCKET).touch()  # what a SIGKILLed server leaves
    try:
        # The monitor scrapes synchronously (prometheus_client's HTTP thread): off the loop.
        monitor = Monitor(root, timeout=2.0)
        families = await asyncio.to_thread(lambda: {f.name: f for f in monitor.collect()})
    finally:
        for server, metrics in ((server_a, a), (server_b, b)):
            server.close()
            metrics.close()
    assert families["vc_monitor_running_servers"].samples[0].value == 2
    assert families["vc_monitor_scrape_failures"].samples[0].value == 1
    assert families["vc_monitor_scrapes"].samples[0].value == 3
    execs = {s.labels["sandbox_id"]: s.value for s in families["vc_exec"].samples}
    assert execs == {"a": 1.0, "b": 0.0}
    memory = {s.labels["sandbox_id"] for s in families["vc_sandbox_memory_bytes"].samples}
    assert memory == {"a", "b"}


async def test_an_ended_sandbox_reports_its_stop_to_the_monitor(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    ends = EndedSandboxes(tmp_path, registry)
    ends.start()
    metrics = SandboxMetrics("sb1", "qemu", lambda: ("stopped", 1, 512, 0), _no_guest)
    try:
        with tracing.operation("sandbox.stop"):
            await asyncio.sleep(0.05)
        metrics.report_end(tmp_path, "stopped on request")
        deadline = time.monotonic() + 5
        while (
            registry.get_sample_value(
                "vc_monitor_sandboxes_ended_total",
                {"driver": "qemu", "reason": "stopped on request"},
            )
            != 1.0
        ):
            assert time.monotonic() < deadline, "the end was not received"
            await asyncio.sleep(0.01)
        labels = {"driver": "qemu"}
        assert (
            registry.get_sample_value("vc_monitor_sandbox_stop_duration_seconds_count", labels) == 1
        )
        stop = registry.get_sample_value("vc_monitor_sandbox_stop_duration_seconds_sum", labels)
        assert stop is not None
        assert 0.05 <= stop < 5
        assert (tmp_path / MONITOR_SOCKET).stat().st_mode & 0o777 == 0o600
    finally:
        metrics.close()
        ends.close()
    assert not (tmp_path / MONITOR_SOCKET).exists()
    # No monitor listening: the report is dropped, nothing raises.
    metrics.report_end(tmp_path, "stopped on request")


async def _no_guest() -> bytes:
    raise TimeoutError("no guest")


# -- the relay's observer (the real agent, run on the host) ------------------------------------


@pytest.fixture
def agent(agent_binary: Path, tmp_path: Path) -> Iterator[Agent]:  # noqa: F811
    yield from start_agent(agent_binary, tmp_path)


class _Seen:
    def __init__(self) -> None:
        self.requests: list[tuple[str, bool]] = []
        self.started = 0
        self.exits: list[tuple[int | None, int | None]] = []

    def request_done(self, request: str, seconds: float, ok: bool) -> None:
        assert 0 <= seconds < 30
        self.requests.append((request, ok))

    def exec_started(self) -> None:
        self.started += 1

    def exec_exited(self, exit_code: int | None, signal: int | None) -> None:
        self.exits.append((exit_code, signal))


async def _no_ops(op: str, args: wire.JsonObject) -> object:
    raise StateError(op, "test", ["none"])


async def test_relay_reports_requests_execs_and_survives_unknown_types(agent: Agent) -> None:
    seen = _Seen()
    relay = Relay(_no_ops, seen)
    relay.attach_upstream(await connect_unix(agent.sock), resync=True)
    client = await relay.internal_client()
    try:
        assert (await client.exec(["sh", "-c", "exit 3"])).exit_code == 3
        proc = await client.exec_stream(["sleep", "30"])
        await proc.signal(9)
        assert (await proc.wait()).signal == 9
        # A request type this host does not know: the agent refuses it; the relay lives on.
        with pytest.raises(AgentError):
            await client._call(0x1F, b"", "unknown", 5.0)  # type: ignore[arg-type]
        assert (await client.ping()).protocol_major == 1
    finally:
        await client.close()
        await relay.close()
    assert seen.started == 2
    assert sorted(seen.exits, key=str) == sorted([(3, None), (None, 9)], key=str)
    assert ("type_0x1f", False) in seen.requests
    assert [r for r in seen.requests if r[0] == "exec"] == [("exec", True), ("exec", True)]
    assert ("ping", True) in seen.requests
    assert ("signal", True) in seen.requests
