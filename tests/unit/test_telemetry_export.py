"""Tracing turned on by the environment, in a fresh process each (a process sets its tracer
provider once): the JSON-lines trace file, and OTLP/HTTP to a collector the test runs on
127.0.0.1."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

PROGRAM = """
from virtcontainers.telemetry import export, tracing
export.configure(service_name="vc-test")
with tracing.operation("sandbox.exec", {"vc.sandbox.id": "sb1", "vc.driver": "qemu"}):
    with tracing.operation("StartVM"):
        pass
"""


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VC_TRACE"))}
    return subprocess.run(
        [sys.executable, "-c", PROGRAM], env={**clean, **env}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_trace_file_gets_one_json_line_per_span(tmp_path: Path) -> None:
    out = tmp_path / "spans.jsonl"
    done = _run({"VC_TRACE_FILE": str(out)})
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["name"] for s in lines] == ["StartVM", "sandbox.exec"]
    start_vm, exec_ = lines
    assert start_vm["parent_id"] == exec_["context"]["span_id"]
    assert exec_["attributes"] == {"vc.sandbox.id": "sb1", "vc.driver": "qemu"}
    assert exec_["resource"]["attributes"]["service.name"] == "vc-test"
    assert out.stat().st_mode & 0o777 == 0o600
    again = _run({"VC_TRACE_FILE": str(out)})  # appends
    assert again.returncode == 0, again.stderr
    assert len(out.read_text().splitlines()) == 4


@pytest.fixture
def collector() -> Iterator[tuple[str, list[bytes]]]:
    """An OTLP/HTTP receiver on 127.0.0.1: yields its endpoint and the bodies posted to
    /v1/traces."""
    bodies: list[bytes] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            if self.path == "/v1/traces":
                bodies.append(self.rfile.read(length))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


def test_otlp_endpoint_receives_the_spans(collector: tuple[str, list[bytes]]) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the otlp extra")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    endpoint, bodies = collector
    done = _run({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert done.returncode == 0, done.stderr
    assert bodies, "nothing was exported"
    names, services = [], set()
    for body in bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for attr in resource_spans.resource.attributes:
                if attr.key == "service.name":
                    services.add(attr.value.string_value)
            for scope in resource_spans.scope_spans:
                assert scope.scope.name == "virtcontainers"
                names += [span.name for span in scope.spans]
    assert sorted(names) == ["StartVM", "sandbox.exec"]
    assert services == {"vc-test"}


def test_an_unknown_exporter_is_refused_before_anything_runs() -> None:
    done = _run({"OTEL_TRACES_EXPORTER": "zipkin"})
    assert done.returncode == 1
    assert "ConfigError" in done.stderr
    assert "OTEL_TRACES_EXPORTER names unknown exporters zipkin" in done.stderr
