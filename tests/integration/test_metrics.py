"""Per-sandbox metrics seen by a real Prometheus: two sandboxes run, ``vc metrics serve``
aggregates their servers, Prometheus 2.42 (Debian) scrapes it on 127.0.0.1, and the test
reads the series back through Prometheus's HTTP API."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from virtcontainers.guest.image import GuestImage

pytestmark = pytest.mark.integration
VC = str(Path(sys.executable).with_name("vc"))
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
MiB = 1024 * 1024


def vc(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VC, *args], capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def monitor(vc_root: Path) -> Iterator[str]:
    """``vc metrics serve`` on a port of its choosing; yields ``host:port``."""
    proc = subprocess.Popen(
        [VC, "metrics", "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # the address line (a warning may come first)
            seen.append(line)
            if found := re.search(r"http://(127\.0\.0\.1:\d+)/metrics", line):
                break
            assert len(seen) < 20, f"vc metrics serve printed {seen}"
        else:
            pytest.fail(f"vc metrics serve exited: {seen}")
        yield found.group(1)
    finally:
        _stop(proc)


@pytest.fixture
def prometheus(monitor: str, tmp_path: Path) -> Iterator[httpx.Client]:
    """A Prometheus scraping the monitor every second; yields a client of its API."""
    if not Path(PROMETHEUS).exists():
        pytest.skip("prometheus is not installed (scripts/setup installs it)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
        f"scrape_configs:\n  - job_name: vc\n    static_configs:\n"
        f"      - targets: ['{monitor}']\n"
    )
    for _ in range(5):  # another process may take the free port first
        port = _free_port()
        proc = subprocess.Popen(
            [
                PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/-/ready").status_code == 200:
                    break
            time.sleep(0.2)
        if proc.poll() is None:
            break
        client.close()
    else:
        pytest.fail(f"prometheus did not start: {proc.stderr.read() if proc.stderr else ''}")
    try:
        yield client
    finally:
        client.close()
        _stop(proc)


def _query(api: httpx.Client, promql: str, label: str = "sandbox_id") -> dict[str, float]:
    """``label``'s value -> value, for each series of an instant query."""
    reply = api.get("/api/v1/query", params={"query": promql}).json()
    assert reply["status"] == "success", reply
    result = reply["data"]["result"]
    values = {r["metric"].get(label, ""): float(r["value"][1]) for r in result}
    assert len(values) == len(result), f"{promql}: {label} does not tell the series apart"
    return values


def _wait_for(
    api: httpx.Client, promql: str, want: dict[str, float], label: str = "sandbox_id"
) -> None:
    """Until Prometheus has scraped what the query expects (it scrapes every second)."""
    deadline = time.monotonic() + 60
    while (got := _query(api, promql, label)) != want:
        assert time.monotonic() < deadline, f"{promql}: {got}, expected {want}"
        time.sleep(0.5)


def test_prometheus_scrapes_two_sandboxes(
    guest_image: GuestImage, vc_root: Path, prometheus: httpx.Client
) -> None:
    sizes = {"ma": 512, "mb": 768}
    execs = {"ma": 3, "mb": 5}
    try:
        for sandbox_id, memory in sizes.items():
            assert vc("create", "--id", sandbox_id, "--memory", str(memory)).returncode == 0
            started = vc("start", sandbox_id)
            assert started.returncode == 0, started.stderr
        for sandbox_id, count in execs.items():
            for i in range(count):
                ran = vc("exec", sandbox_id, "--", "sh", "-c", f"exit {i}")
                assert ran.returncode == i
        api = prometheus
        _wait_for(api, 'up{job="vc"}', {"vc": 1.0}, label="job")
        _wait_for(api, "vc_monitor_running_servers", {"": 2.0})
        _wait_for(api, "vc_exec_total", {k: float(v) for k, v in execs.items()})
        # Sandbox mb ran `exit 0` .. `exit 4`: one exit of each code.
        exits = _query(api, 'vc_exec_exits_total{sandbox_id="mb"}', label="exit_code")
        assert exits == {str(i): 1.0 for i in range(5)}
        exec_requests = (
            'sum by (sandbox_id) (vc_agent_request_duration_seconds_count{request="exec"})'
        )
        assert _query(api, exec_requests) == {k: float(v) for k, v in execs.items()}
        assert _query(api, "vc_sandbox_memory_bytes") == {k: v * MiB for k, v in sizes.items()}
        assert _query(api, 'vc_sandbox_state{state="running"}') == {"ma": 1.0, "mb": 1.0}
        assert _query(api, 'vc_sandbox_state{state="stopped"}') == {"ma": 0.0, "mb": 0.0}
        assert _query(api, "vc_sandbox_vcpus") == {"ma": 1.0, "mb": 1.0}
        assert _query(api, "vc_sandbox_boot_duration_seconds_count") == {"ma": 1.0, "mb": 1.0}
        # The guest sees a little less than its RAM (the kernel's own reservations).
        mem_total = _query(api, 'vc_guest_meminfo_bytes{item="MemTotal"}')
        assert set(mem_total) == set(sizes)
        for sandbox_id, memory in sizes.items():
            assert 0.6 * memory * MiB < mem_total[sandbox_id] <= memory * MiB
        # The VMM process: RSS at least what the booted guest touched, PSS <= RSS.
        rss = _query(api, "vc_hypervisor_resident_memory_bytes")
        pss = _query(api, "vc_hypervisor_proportional_memory_bytes")
        for sandbox_id, memory in sizes.items():
            assert 20 * MiB < rss[sandbox_id] < (memory + 512) * MiB
            assert 0 < pss[sandbox_id] <= rss[sandbox_id]
        threads = _query(api, "vc_hypervisor_threads")
        fds = _query(api, "vc_hypervisor_open_fds")
        assert set(threads) == set(fds) == set(sizes)
        assert all(v >= 2 for v in threads.values()), threads  # QEMU: main + vCPU + RCU ...
        assert all(v >= 5 for v in fds.values()), fds
        cpu = _query(api, 'vc_hypervisor_cpu_seconds_total{mode="user"}')
        assert set(cpu) == set(sizes)
        assert all(v > 0.1 for v in cpu.values()), cpu  # a TCG boot takes CPU seconds
        # A paused sandbox is reported as paused, and its silent guest slows no scrape.
        assert vc("pause", "mb").returncode == 0
        _wait_for(api, 'vc_sandbox_state{state="paused"}', {"ma": 0.0, "mb": 1.0})
        assert _query(api, 'up{job="vc"}', label="job") == {"vc": 1.0}
        assert _query(api, "vc_monitor_running_servers") == {"": 2.0}
    finally:
        for sandbox_id in sizes:
            vc("rm", "-f", sandbox_id)
