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


LOADED = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('LOADED', sorted({m.split('.')[0] for m in sys.modules"
    " if m.startswith(('opentelemetry', 'prometheus_client', 'h11'))}), file=sys.stderr))\n"
    "{block}\n"
    "from virtcontainers.cli import main\n"
    "sys.argv = ['vc', *sys.argv[1:]]\n"
    "main()\n"
)


def _vc(tmp_path: Path, *args: str, block: str = "") -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VC_"))}
    return subprocess.run(
        [sys.executable, "-c", LOADED.replace("{block}", block), *args],
        env={**clean, "VC_RUN_ROOT": str(tmp_path / "root")}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_fast_commands_load_no_telemetry_library_unless_asked(tmp_path: Path) -> None:
    ps = _vc(tmp_path, "ps", "--json")
    assert ps.returncode == 0, ps.stderr
    assert ps.stderr.strip().endswith("LOADED []")
    missing = _vc(tmp_path, "exec", "nosuch", "--", "true")
    assert "StoreError" in missing.stderr
    assert missing.stderr.strip().endswith("LOADED []")
    traced = _vc(tmp_path, "--trace", str(tmp_path / "t.jsonl"), "ps", "--json")
    assert traced.returncode == 0, traced.stderr
    assert traced.stderr.strip().endswith("LOADED ['opentelemetry']")
    (root,) = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert root["name"] == "vc ps"
    assert root["attributes"] == {"vc.exit_code": 0}


def test_trace_without_the_sdk_is_a_typed_error(tmp_path: Path) -> None:
    done = _vc(
        tmp_path, "--trace", str(tmp_path / "t.jsonl"), "ps",
        block="sys.modules['opentelemetry.sdk.trace'] = None  # as if not installed",
    )  # fmt: skip
    assert done.returncode == 1
    assert (
        "error: MissingDependencyError: tracing needs opentelemetry-sdk, which is not "
        "installed: pip install 'virtcontainers[otlp]'" in done.stderr
    )
    assert not (tmp_path / "t.jsonl").exists()


def test_log_format_json_logs_each_operation(tmp_path: Path) -> None:
    done = _vc(tmp_path, "--log-format", "json", "--trace", str(tmp_path / "t.jsonl"),
               "rm", "nosuch")  # fmt: skip
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    spans = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    (root,) = spans
    (op,) = [line for line in lines if line.get("operation") == "vc rm"]
    assert op["error"] == "StoreError"
    assert op["trace_id"] == root["context"]["trace_id"].removeprefix("0x")
    assert op["span_id"] == root["context"]["span_id"].removeprefix("0x")
    assert root["status"]["status_code"] == "ERROR"
    assert root["attributes"]["error.type"] == "StoreError"
    bad = _vc(tmp_path, "--log-format", "yaml", "ps")
    assert bad.returncode == 2  # click's usage error names the choices
    assert "'text', 'json'" in bad.stderr or "text, json" in bad.stderr


def test_metrics_commands_refuse_bad_input(tmp_path: Path) -> None:
    bad = _vc(tmp_path, "metrics", "serve", "--listen", "nope")
    assert bad.returncode == 1
    assert "error: ConfigError: --listen 'nope' is not an address (allowed: HOST:PORT" in bad.stderr
    missing = _vc(tmp_path, "metrics", "show", "nosuch")
    assert missing.returncode == 1
    assert "error: StoreError" in missing.stderr
