"""Benchmarks kept as scripts by their owners (``bench/cli.py``, ``bench/tracing.py``), run as
subprocesses so their process-wide settings (``VC_RUN_ROOT``, the tracer provider) stay out of
this run; their JSON becomes figures with the baselines they measure themselves."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.stats import Figure, single

HERE = Path(__file__).parent


def _run(script: str, *args: str) -> str:
    module = f"bench.{script.removesuffix('.py')}"
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=HERE.parent, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"bench/{script} exited {done.returncode}: {done.stderr[-1500:]}")
    return done.stdout


def present(script: str) -> bool:
    return (HERE / script).is_file()


def _ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def cli(runs: int, execs: int) -> list[Figure]:
    """``vc ps`` and ``vc exec`` per command vs the interpreter's own start, and the API's exec
    through the sandbox server vs in-process."""
    data: dict[str, Any] = json.loads(
        _run("cli.py", "--runs", str(runs), "--execs", str(execs), "--json").splitlines()[-1]
    )
    cmd, api = data["cli"], data["api"]
    note = f"bench/cli.py: interleaved rounds in a fixed order, median of {runs}"
    return [
        single(
            f"cli_{key}",
            f"`{name}`, wall per command",
            "ms",
            _ms(cmd[name]),
            _ms(cmd["python -c pass"]),
            "python -c pass (the interpreter's start)",
            n=runs,
            note=note,
        )
        for key, name in (("ps", "vc ps --json"), ("exec", "vc exec ID -- true"))
    ] + [
        single(
            "server_exec_rtt",
            "exec round trip through the sandbox server (Python API)",
            "ms",
            _ms(api["through the server"]),
            _ms(api["in-process"]),
            "the same exec on an in-process sandbox",
            n=len(api["in-process"]),
            note="bench/cli.py",
        )
    ]


def tracing(rounds: int, per_round: int) -> list[Figure]:
    """The exec round trip with tracing off (the API's no-op tracer) vs the method without
    its span."""
    out = _run("tracing.py", "--rounds", str(rounds), "--per-round", str(per_round))
    data: dict[str, Any] = json.loads(out[out.index("{") :])
    med = data["exec_median_ms"]
    return [
        single(
            "tracing_off_exec_rtt",
            "exec round trip, tracing off (no-op tracer)",
            "ms",
            med["off"],
            med["baseline"],
            "the same exec without its span",
            n=rounds * per_round,
            note=f"bench/tracing.py; implied by the span cost alone: "
            f"{data['implied_ratio_off_over_baseline']}; SDK without exporter / off: "
            f"{data['ratio_sdk_over_off']}",
        )
    ]
