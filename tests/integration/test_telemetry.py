"""Traces of real QEMU sandboxes: the span tree an exporter receives, in one process and
across the CLI -> sandbox server boundary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from virtcontainers import Sandbox
from virtcontainers.config import HypervisorConfig
from virtcontainers.errors import AgentError
from virtcontainers.guest.image import GuestImage
from virtcontainers.telemetry.export import TRACE_FILE_ENV

pytestmark = pytest.mark.integration


def _config(image: GuestImage, memory: int = 512) -> HypervisorConfig:
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = str(image.kernel)
    cfg.boot.initrd_path = str(image.initrd)
    cfg.resources.num_vcpus = 1
    cfg.resources.default_max_vcpus = 2
    cfg.resources.memory_size = memory
    return cfg


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[str]:
    assert parent.context is not None
    return [
        s.name for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {len(found)} spans in {[s.name for s in spans]}"
    return found[0]


async def test_create_start_exec_stop_span_tree(
    guest_image: GuestImage, vc_root: Path, spans: InMemorySpanExporter
) -> None:
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("job") as job:
        sb = await Sandbox.create(_config(guest_image), hypervisor="qemu")
        try:
            await sb.start()
            ok = await sb.exec(["sh", "-c", "exit 3"])
            with pytest.raises(AgentError):
                await sb.exec(["/no/such/program"])
            await sb.stop()
            console = sb.logs().decode(errors="replace").splitlines()
        finally:
            await sb.remove()
    assert ok.exit_code == 3
    finished = list(spans.get_finished_spans())
    trace_ids = {s.context.trace_id for s in finished if s.context is not None}
    assert trace_ids == {job.get_span_context().trace_id}, "one trace"

    root = _one(finished, "job")
    assert _children(finished, root) == [
        "sandbox.create", "sandbox.start", "sandbox.exec", "sandbox.exec", "sandbox.stop",
        "sandbox.remove",
    ]  # fmt: skip
    create = _one(finished, "sandbox.create")
    assert create.attributes is not None
    assert create.attributes["vc.sandbox.id"] == sb.id
    assert create.attributes["vc.driver"] == "qemu"
    assert create.attributes["vc.memory_mib"] == 512

    start = _one(finished, "sandbox.start")
    assert _children(finished, start) == [
        "CreateVM", "StartVM", "GenerateSocket", "sandbox.wait_for_agent",
    ]  # fmt: skip
    create_vm = _one(finished, "CreateVM")
    assert create_vm.attributes is not None
    expected = {"vc.driver": "qemu", "vc.sandbox.id": sb.id, "vc.vcpus": 1, "vc.memory_mib": 512}
    assert {k: create_vm.attributes.get(k) for k in expected} == expected

    done, failed = (s for s in finished if s.name == "sandbox.exec")
    assert done.attributes is not None
    assert failed.attributes is not None
    assert done.attributes["vc.exec.exit_code"] == 3
    assert done.attributes["vc.exec.command"] == "sh"
    assert done.status.status_code is StatusCode.UNSET, "a non-zero exit is not a span error"
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == "AgentError"
    assert failed.attributes["vc.exec.command"] == "/no/such/program"
    (event,) = failed.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert "/no/such/program" in str(event.attributes["exception.message"])

    stop = _one(finished, "sandbox.stop")
    assert "StopVM" in _children(finished, stop)
    stop_vm = _one(finished, "StopVM")
    assert stop_vm.attributes is not None
    assert stop_vm.attributes["vc.wait_only"] is True
    flush = _one(finished, "ConsoleFlush")
    assert flush.parent is not None
    assert stop_vm.context is not None
    assert flush.parent.span_id == stop_vm.context.span_id, "the console flush is in StopVM"
    assert flush.attributes is not None
    assert flush.attributes["vc.console.complete"] is True
    assert "reboot: Power down" in console[-1], "the flush read the guest's last line"
    assert int(str(flush.attributes["vc.console.lines"])) == len(console)
    assert all(s.end_time is not None for s in finished)


async def test_server_spans_join_the_clients_trace(
    guest_image: GuestImage,
    vc_root: Path,
    tmp_path: Path,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sandbox server (another process) writes its spans to the trace file it inherits;
    its boot span is a child of this process's sandbox.start, its stop of sandbox.stop."""
    trace_file = tmp_path / "server-spans.jsonl"
    monkeypatch.setenv(TRACE_FILE_ENV, str(trace_file))
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("job") as job:
        sb = await Sandbox.create(_config(guest_image), hypervisor="qemu")
        try:
            await sb.start(server=True)
            await sb.exec(["true"])
            await sb.stop()
        finally:
            await sb.remove()
    ours = {s.name: s for s in spans.get_finished_spans()}
    theirs = [json.loads(line) for line in trace_file.read_text().splitlines()]
    by_name = {s["name"]: s for s in theirs}
    trace_id = f"0x{job.get_span_context().trace_id:032x}"
    assert {s["context"]["trace_id"] for s in theirs} == {trace_id}
    assert by_name["server.boot"]["parent_id"] == f"0x{ours['sandbox.start'].context.span_id:016x}"  # type: ignore[union-attr]
    assert by_name["server.stop"]["parent_id"] == f"0x{ours['sandbox.stop'].context.span_id:016x}"  # type: ignore[union-attr]
    # Below the server's spans: the in-process sandbox and the driver's.
    for name in ("CreateVM", "StartVM", "StopVM", "ConsoleFlush"):
        assert name in by_name, f"{name} missing from {sorted(by_name)}"
    assert by_name["StartVM"]["resource"]["attributes"]["service.name"] == "vc-server"
    assert trace_file.stat().st_mode & 0o777 == 0o600


VC = str(Path(sys.executable).with_name("vc"))


def _vc(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VC_TRACE"))}
    return subprocess.run([VC, *args], capture_output=True, text=True, timeout=180, env=env)


def _tree(spans: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    """(depth, name, service) in start order, depth first."""
    kids: dict[str | None, list[dict[str, Any]]] = {}
    for s in spans:
        kids.setdefault(s["parent_id"], []).append(s)
    out: list[tuple[int, str, str]] = []

    def walk(span: dict[str, Any], depth: int) -> None:
        out.append((depth, span["name"], span["resource"]["attributes"]["service.name"]))
        for child in sorted(
            kids.get(span["context"]["span_id"], []), key=lambda s: s["start_time"]
        ):
            walk(child, depth + 1)

    for root in kids.get(None, []):
        walk(root, 0)
    return out


def test_one_vc_run_is_one_trace(guest_image: GuestImage, vc_root: Path, tmp_path: Path) -> None:
    trace_file = tmp_path / "run.jsonl"
    done = _vc("--trace", str(trace_file), "run", "--", "sh", "-c", "echo hi; exit 3")
    assert done.returncode == 3, done.stderr
    assert done.stdout == "hi\n"
    spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert len({s["context"]["trace_id"] for s in spans}) == 1, "one trace"
    tree = _tree(spans)
    assert tree == [
        (0, "vc run", "vc"),
        (1, "sandbox.create", "vc"),
        (1, "sandbox.start", "vc"),
        (2, "server.boot", "vc-server"),
        (3, "sandbox.start", "vc-server"),
        (4, "CreateVM", "vc-server"),
        (4, "StartVM", "vc-server"),
        (4, "GenerateSocket", "vc-server"),
        (4, "sandbox.wait_for_agent", "vc-server"),
        (1, "sandbox.exec_stream", "vc"),
        (1, "sandbox.remove", "vc"),
        (2, "server.remove", "vc-server"),
        (3, "sandbox.remove", "vc-server"),
        (4, "sandbox.stop", "vc-server"),
        (5, "StopVM", "vc-server"),
        (6, "ConsoleFlush", "vc-server"),
    ], tree
    root = next(s for s in spans if s["name"] == "vc run")
    assert root["attributes"]["vc.exit_code"] == 3
    # Every span names the one sandbox (ConsoleFlush, below StopVM, names its log file).
    ids = {s["attributes"].get("vc.sandbox.id") for s in spans if s["name"] != "vc run"}
    flush = next(s for s in spans if s["name"] == "ConsoleFlush")
    assert ids == {None, Path(flush["attributes"]["vc.console.log"]).parent.name}
    assert not list(vc_root.glob("sandboxes/*")), "vc run removed its sandbox"


def test_server_log_is_json_with_the_spans_ids(
    guest_image: GuestImage, vc_root: Path, tmp_path: Path
) -> None:
    trace_file = tmp_path / "detached.jsonl"
    common = ("--trace", str(trace_file), "--log-format", "json")
    try:
        assert _vc(*common, "create", "--id", "logs1").returncode == 0
        started = _vc(*common, "start", "logs1")
        assert started.returncode == 0, started.stderr
        server_log = (vc_root / "sandboxes" / "logs1" / "server.log").read_text()
    finally:
        _vc("rm", "-f", "logs1")
    lines = [json.loads(line) for line in server_log.splitlines() if line.startswith("{")]
    assert lines, server_log
    assert all(line["logger"].startswith("virtcontainers") for line in lines)
    spans = {s["context"]["span_id"].removeprefix("0x"): s for s in
             map(json.loads, trace_file.read_text().splitlines())}  # fmt: skip
    ops = [line for line in lines if "operation" in line]
    assert {"StartVM", "sandbox.start", "server.boot"} <= {op["operation"] for op in ops}
    for op in ops:
        span = spans[op["span_id"]]  # the op's own span, in the trace file
        assert span["name"] == op["operation"]
        assert span["context"]["trace_id"].removeprefix("0x") == op["trace_id"]
        assert op["sandbox_id"] == "logs1"
