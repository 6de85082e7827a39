"""Reliability soak: the whole ``vc`` lifecycle, many times over, optionally under CPU load.

Each cycle runs every step as its own ``vc`` process, so each one reattaches to the sandbox as
a user's shell would: create, start, exec, cp in and out, pause, resume, resize --cpus 2
(checked with nproc), exec with 1 MiB of stdin (checked by its SHA-256), stop, rm. Then it checks
that nothing is left: no process that names the sandbox's run directory, no run directory.

A failed step records the step, its error line and the tail of the guest console; the
sandbox is then force-removed and the next cycle starts. ``--load N`` keeps N busy-looping
processes running meanwhile: the races this finds hide on an idle machine (both agent bugs
fixed in session 2 showed up only under load, about once in 10 to 40 cycles).

Prints each step's latency (median, p90, max) and the failures. Exits 1 if a cycle failed.

Usage: .venv/bin/python bench/soak.py [--cycles 20] [--load 0] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from virtcontainers.procfs import processes_mentioning

VC = str(Path(sys.executable).with_name("vc"))
STEP_TIMEOUT = 120.0
STDIN_BYTES = 1 << 20


class StepFailed(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


@dataclass
class Soak:
    root: Path
    work: Path
    timings: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: list[dict[str, object]] = field(default_factory=list)

    def vc(self, *args: str, step: str = "", stdin: bytes | None = None) -> bytes:
        """Run ``vc ARGS`` as the step ``step`` (default: the subcommand), time it, and return
        its stdout; raise StepFailed otherwise."""
        step = step or args[0]
        start = time.perf_counter()
        try:
            done = subprocess.run(
                [VC, *args], input=stdin, capture_output=True, timeout=STEP_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            raise StepFailed(step, f"no exit within {STEP_TIMEOUT:.0f} s") from None
        self.timings[step].append(time.perf_counter() - start)
        if done.returncode != 0:
            error = done.stderr.decode(errors="replace").strip() or "(no message)"
            raise StepFailed(step, f"exit {done.returncode}: {error}")
        return done.stdout

    def expect(self, step: str, got: bytes, want: bytes) -> None:
        if got != want:
            raise StepFailed(step, f"printed {got[:80]!r}, expected {want[:80]!r}")

    def cycle(self, n: int) -> None:
        sid = f"soak{n}"
        payload = os.urandom(STDIN_BYTES)
        src, back = self.work / f"in{n}", self.work / f"out{n}"
        src.write_bytes(payload[:4096])
        try:
            created = self.vc("create", "--id", sid, "--cpus", "1")
            self.expect("create", created, f"{sid}\n".encode())
            self.vc("start", sid)
            self.expect("exec", self.vc("exec", sid, "--", "echo", "hi"), b"hi\n")
            self.vc("cp", str(src), f"{sid}:/tmp/in", step="cp-in")
            self.vc("cp", f"{sid}:/tmp/in", str(back), step="cp-out")
            self.expect("cp-out", back.read_bytes(), src.read_bytes())
            self.vc("pause", sid)
            self.vc("resume", sid)
            self.vc("resize", sid, "--cpus", "2")
            self.expect("nproc", self.vc("exec", sid, "--", "nproc", step="nproc"), b"2\n")
            digest = hashlib.sha256(payload).hexdigest()
            got = self.vc("exec", sid, "--", "sha256sum", step="exec-stdin", stdin=payload)
            self.expect("exec-stdin", got.split(b" ")[0], digest.encode())
            self.vc("stop", sid)
            self.vc("rm", sid)
            self.check_clean(sid)
        except StepFailed as failure:
            console = self.root / "sandboxes" / sid / "console.log"
            tail = console.read_text(errors="replace").splitlines()[-5:] if console.exists() else []
            self.failures.append(
                {"cycle": n, "step": failure.step, "error": failure.message, "console": tail}
            )
            print(f"cycle {n}: FAILED at {failure.step}: {failure.message}", flush=True)
            subprocess.run([VC, "rm", "--force", sid], capture_output=True, check=False)
        finally:
            src.unlink(missing_ok=True)
            back.unlink(missing_ok=True)

    def check_clean(self, sid: str) -> None:
        run_dir = self.root / "sandboxes" / sid
        if run_dir.exists():
            raise StepFailed("leftovers", f"{run_dir} still exists: {sorted(os.listdir(run_dir))}")
        if pids := processes_mentioning(str(run_dir)):
            raise StepFailed("leftovers", f"processes still name the run dir: {pids}")


def summary(soak: Soak, cycles: int, load: int, seconds: float) -> dict[str, object]:
    steps = {}
    for step, times in soak.timings.items():
        ms = sorted(t * 1000 for t in times)
        steps[step] = {
            "runs": len(ms),
            "median_ms": round(statistics.median(ms), 1),
            "p90_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.9))], 1),
            "max_ms": round(ms[-1], 1),
        }
    return {
        "cycles": cycles,
        "failed_cycles": len(soak.failures),
        "load_processes": load,
        "cpus": os.cpu_count(),
        "seconds": round(seconds, 1),
        "steps": steps,
        "failures": soak.failures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20, help="lifecycles to run (default 20)")
    parser.add_argument("--load", type=int, default=0, help="busy-looping processes meanwhile")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="vc-soak-"))
    work = Path(tempfile.mkdtemp(prefix="vc-soak-files-"))
    os.environ["VC_RUN_ROOT"] = str(root)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    soak = Soak(root, work)
    start = time.perf_counter()
    try:
        for n in range(args.cycles):
            soak.cycle(n)
            if not args.json:
                print(f"cycle {n + 1}/{args.cycles} done, {len(soak.failures)} failed", flush=True)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    report = summary(soak, args.cycles, args.load, time.perf_counter() - start)
    if not args.json:
        for step, row in report["steps"].items():  # type: ignore[attr-defined]
            print(f"{step:>11}: median {row['median_ms']:8.1f} ms  p90 {row['p90_ms']:8.1f} ms  "
                  f"max {row['max_ms']:8.1f} ms  ({row['runs']} runs)")  # fmt: skip
    print(json.dumps(report, indent=2))
    return 1 if soak.failures else 0


if __name__ == "__main__":
    sys.exit(main())
