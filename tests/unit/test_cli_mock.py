"""`vc` on the mock driver, without QEMU: the error paths of the whole command line, each with
its exit code and its one-line message. The mock's guest is the real vc-agent run on the host
(driven through the sandbox server as `vc start` always does), so `vc exec` runs real
processes and a killed guest is a VMM that really died between two commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtcontainers.procfs import process_matches, processes_mentioning

VC = str(Path(sys.executable).with_name("vc"))

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the agent")


class Cli:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {
            "PATH": "/usr/bin:/bin",
            "VC_RUN_ROOT": str(root / "vc"),
            # The host build of the agent is cached there (built once per agent source).
            "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME") or str(root / "cache"),
        }
        for name in ("k", "i"):
            (root / name).write_bytes(b"not booted by the mock")

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [VC, *args], capture_output=True, text=True, env=self.env, timeout=120, check=False
        )

    def create(self, sandbox_id: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self(
            "create", "--hypervisor", "mock", "--id", sandbox_id,
            "--kernel", str(self.root / "k"), "--initrd", str(self.root / "i"), *extra,
        )  # fmt: skip

    def started(self, sandbox_id: str) -> None:
        assert self.create(sandbox_id).returncode == 0
        out = self("start", sandbox_id)
        assert out.returncode == 0, out.stderr

    def ps(self) -> dict[str, dict[str, object]]:
        out = self("ps", "--json")
        assert out.returncode == 0, out.stderr
        return {i["id"]: i for i in json.loads(out.stdout)}

    def state_path(self, sandbox_id: str) -> Path:
        return self.root / "vc" / "sandboxes" / sandbox_id / "state.json"


@pytest.fixture
def vc() -> Iterator[Cli]:
    root = Path(tempfile.mkdtemp(prefix="vcc-", dir="/tmp"))  # short: socket paths
    cli = Cli(root)
    try:
        yield cli
    finally:
        for sandbox_id in cli.ps():
            cli("rm", "--force", sandbox_id)
        left = processes_mentioning(str(root))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        assert left == [], "a process of a mock sandbox outlived the test"


def _error(out: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The one error line (no traceback), after checking the exit code."""
    assert out.returncode == code, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    return out.stderr.strip()


def test_the_mock_serves_the_whole_lifecycle(vc: Cli) -> None:
    vc.started("m1")
    out = vc("exec", "m1", "--", "sh", "-c", "echo from the guest agent; exit 4")
    assert (out.returncode, out.stdout) == (4, "from the guest agent\n")
    info = vc.ps()["m1"]
    assert (info["state"], info["server"]) == ("running", "running")
    assert vc("stop", "m1").returncode == 0
    assert vc.ps()["m1"]["state"] == "stopped"
    assert "shutdown requested" in vc("logs", "m1").stdout
    assert vc("rm", "m1").returncode == 0
    assert vc.ps() == {}


def test_cp_with_a_malformed_target(vc: Cli, tmp_path: Path) -> None:
    local = tmp_path / "f"
    local.write_text("x")
    for source, dest in ((str(local), "no-colon-here"), ("no-colon", str(local))):
        line = _error(vc("cp", source, dest))
        assert line == "error: ConfigError: exactly one of SOURCE and DEST must be ID:PATH"
    line = _error(vc("cp", str(local), "nosuch:/tmp/f"))
    assert line.startswith("error: StoreError: ")
    assert line.endswith("no sandbox 'nosuch'")


def test_control_commands_go_to_the_server_and_direct_once_it_died(vc: Cli) -> None:
    vc.started("m1")
    traced = {**vc.env, "PYTHONPROFILEIMPORTTIME": "1"}

    def control(*argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
        out = subprocess.run([VC, *argv], capture_output=True, text=True, env=traced,
                             timeout=60, check=False)  # fmt: skip
        lines = out.stderr.splitlines()
        imported = {line.rsplit("|", 1)[-1].strip() for line in lines if "|" in line}
        out.stderr = "\n".join(line for line in lines if not line.startswith("import time:"))
        return out, imported

    # Through the server: the blocking client, no sandbox layer (drivers, asyncio).
    out, imported = control("pause", "m1")
    assert out.returncode == 0, out.stderr
    assert "virtcontainers.sandbox" not in imported
    assert "asyncio" not in imported
    assert vc.ps()["m1"]["state"] == "paused"
    out, _ = control("pause", "m1")
    assert (out.returncode, out.stderr) == (
        1,
        "error: StateError: [mock:m1] cannot pause while paused; requires running",
    )
    assert control("resume", "m1")[0].returncode == 0
    out, imported = control("resize", "m1", "--cpus", "2", "--json")
    assert (out.returncode, json.loads(out.stdout)) == (0, {"cpus": [1, 2]}), out.stderr
    assert "virtcontainers.sandbox" not in imported
    assert vc.ps()["m1"]["vcpus"] == 2
    sysfs = vc.root / "vc" / "sandboxes" / "m1" / "mock-sysfs" / "devices" / "system" / "cpu"
    assert (sysfs / "cpu1" / "online").read_text() == "1"  # hot-added offline, onlined
    # `vc cp` both ways (the mock's guest is the host: guest paths are host paths).
    local, inside, back = (vc.root / name for name in ("local", "inside", "back"))
    local.write_bytes(os.urandom(100_000))
    out, imported = control("cp", str(local), f"m1:{inside}")
    assert out.returncode == 0, out.stderr
    assert "virtcontainers.sandbox" not in imported
    assert inside.read_bytes() == local.read_bytes()
    assert control("cp", f"m1:{inside}", str(back))[0].returncode == 0
    assert back.read_bytes() == local.read_bytes()
    # Traced, the sandbox layer runs it (as a client of the server) and its span is there.
    trace = vc.root / "trace.jsonl"
    out, imported = control("--trace", str(trace), "cp", str(local), f"m1:{inside}")
    assert out.returncode == 0, out.stderr
    assert "virtcontainers.sandbox" in imported
    names = {json.loads(line)["name"] for line in trace.read_text().splitlines()}
    assert {"vc cp", "sandbox.write_file"} <= names, names
    out, _ = control("cp", f"m1:{vc.root}/nosuch", str(back))
    assert out.returncode == 1
    assert out.stderr == (
        f"error: AgentError: read_file {vc.root}/nosuch: No such file or directory (OS [ENOENT])"
    )
    # The server killed: the same commands attach the VM directly.
    state = json.loads(vc.state_path("m1").read_text())
    os.kill(state["owner_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while vc.ps()["m1"]["server"] != "dead":
        assert time.monotonic() < deadline, vc.ps()["m1"]
        time.sleep(0.05)
    out, imported = control("pause", "m1")
    assert out.returncode == 0, out.stderr
    assert "virtcontainers.sandbox" in imported
    assert vc.ps()["m1"]["state"] == "paused"
    assert control("resume", "m1")[0].returncode == 0
    out, _ = control("resize", "m1", "--cpus", "1", "--json")
    assert (out.returncode, json.loads(out.stdout)) == (0, {"cpus": [2, 1]}), out.stderr
    inside.unlink()
    out, imported = control("cp", str(local), f"m1:{inside}")
    assert out.returncode == 0, out.stderr
    assert "virtcontainers.sandbox" in imported
    assert inside.read_bytes() == local.read_bytes()
    assert sorted(cpu.name for cpu in sysfs.iterdir()) == ["cpu0"]


def test_logs_reads_the_console_and_follows_it_to_the_end(vc: Cli) -> None:
    vc.started("m1")
    traced = {**vc.env, "PYTHONPROFILEIMPORTTIME": "1"}
    out = subprocess.run([VC, "logs", "m1"], capture_output=True, env=traced, timeout=60,
                         check=False)  # fmt: skip
    assert out.returncode == 0
    console = vc.root / "vc" / "sandboxes" / "m1" / "console.log"
    assert out.stdout == console.read_bytes()
    assert b"virtcontainers.sandbox" not in out.stderr  # the record and the file only
    follower = subprocess.Popen([VC, "logs", "-f", "m1"], stdout=subprocess.PIPE, env=vc.env)
    try:
        time.sleep(0.5)
        assert follower.poll() is None, "a follower waits while the VM runs"
        assert vc("stop", "m1").returncode == 0
        followed, _ = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert follower.returncode == 0
    assert followed == console.read_bytes()
    assert b"shutdown requested" in followed  # written as the VM ended


def test_cp_into_directories_and_bad_host_side_input(vc: Cli) -> None:
    vc.started("m1")
    into, out_dir = vc.root / "into", vc.root / "out"
    into.mkdir()
    out_dir.mkdir()
    local = vc.root / "app.py"
    local.write_text("print('hi')\n")
    # A guest path ending in / and a local directory take the file under its own name.
    assert vc("cp", str(local), f"m1:{into}/").returncode == 0
    assert (into / "app.py").read_text() == "print('hi')\n"
    assert vc("cp", f"m1:{into}/app.py", str(out_dir)).returncode == 0
    assert (out_dir / "app.py").read_text() == "print('hi')\n"
    # What is wrong on the host side is a one-line ConfigError naming the path (it was a
    # traceback), and nothing is written.
    root, missing = vc.root, "No such file or directory"
    octal = "is not an octal mode such as 644"
    for argv, line in (
        ((str(into), "m1:/tmp/x"), f"cannot read {into}: Is a directory"),
        ((f"{root}/nosuch", "m1:/tmp/x"), f"cannot read {root}/nosuch: {missing}"),
        ((f"m1:{local}", f"{root}/nodir/f"), f"cannot write {root}/nodir/f: {missing}"),
        (("--mode", "9", str(local), f"m1:{into}/"), f"--mode '9' {octal}"),
        (("--mode", "17777", str(local), f"m1:{into}/"), f"--mode '17777' {octal}"),
    ):  # fmt: skip
        assert _error(vc("cp", *argv)) == f"error: ConfigError: {line}"
    assert sorted(p.name for p in into.iterdir()) == ["app.py"]
    line = _error(vc("hotplug", "m1", "--disk", f"{root}/nosuch.img"), code=2)
    assert f"Invalid value for '--disk': File '{root}/nosuch.img' does not exist." in line
    assert vc.ps()["m1"]["devices"] == []
    line = _error(vc("resize", "m1", "--cpus", "0"), code=2)
    assert "Invalid value for '--cpus': 0 is not in the range x>=1." in line


def test_create_with_zero_cpus_is_a_usage_error(vc: Cli) -> None:
    line = _error(vc.create("z", "--cpus", "0"), code=2)
    assert "Invalid value for '--cpus': 0 is not in the range x>=1." in line
    assert vc.ps() == {}, "nothing was recorded"


def test_resize_with_no_flag(vc: Cli) -> None:
    vc.started("m1")
    line = _error(vc("resize", "m1"))
    assert line == "error: ConfigError: resize needs --cpus or --memory (or both)"
    assert vc.ps()["m1"]["state"] == "running"


def test_double_start(vc: Cli) -> None:
    vc.started("m1")
    pid = vc.ps()["m1"]["pid"]
    line = _error(vc("start", "m1"))
    assert line == "error: StateError: cannot start while running; requires created"
    assert vc.ps()["m1"]["pid"] == pid, "the running VM is untouched"


def test_exec_on_a_stopped_sandbox(vc: Cli) -> None:
    vc.started("m1")
    assert vc("stop", "m1").returncode == 0
    line = _error(vc("exec", "m1", "--", "true"))
    assert line == (
        "error: StateError: [m1] cannot talk to the guest agent while stopped; requires running"
    )
    line = _error(vc("start", "m1"))
    assert line == "error: StateError: cannot start while stopped; requires created"


def test_rm_of_an_unknown_id(vc: Cli) -> None:
    line = _error(vc("rm", "nosuch"))
    assert line.startswith("error: StoreError: ")
    assert line.endswith("no sandbox 'nosuch'")


def test_a_vmm_that_died_between_commands(vc: Cli) -> None:
    vc.started("m1")
    pid = int(str(vc.ps()["m1"]["pid"]))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    # Until the server has recorded the end (with its time), `vc ps` already shows `exited`,
    # with "nobody recorded how it ended".
    while not isinstance(ended := vc.ps()["m1"]["exit"], dict) or ended["time"] is None:
        assert time.monotonic() < deadline, vc.ps()["m1"]
        time.sleep(0.1)
    info = vc.ps()["m1"]
    assert info["state"] == "exited"
    assert info["pid"] == 0
    assert info["exit"]["reason"] == "the VMM was killed by signal 9"  # type: ignore[index]
    assert info["exit"]["exit_code"] == -9  # type: ignore[index]
    line = _error(vc("exec", "m1", "--", "true"))
    assert line.startswith("error: StateError: [m1] cannot talk to the guest agent while exited")
    assert vc("stop", "m1").returncode == 0  # nothing left to stop: how it ended is kept
    assert vc.ps()["m1"]["state"] == "exited"
    assert vc("rm", "m1").returncode == 0
    assert not process_matches(pid, str(vc.root))


def test_a_corrupt_state_document_in_ps_and_rm(vc: Cli) -> None:
    assert vc.create("bad").returncode == 0
    assert vc.create("good").returncode == 0
    path = vc.state_path("bad")
    path.write_text('{"version": 2, "id": "bad", "state": "sleeping"')
    before = path.read_bytes()
    out = vc("ps", "--json")
    assert out.returncode == 0
    assert [i["id"] for i in json.loads(out.stdout)] == ["good"]
    # The same warning line from the fast path (`ps --json`, which sets up logging only to
    # give it) and from click's (the table, and a global option before the command).
    warning = (
        "WARNING virtcontainers.listing: skipping sandbox bad: "
        f"{path}: corrupt state document: Input data was truncated"
    )
    assert out.stderr.splitlines() == [warning]
    for argv in (["ps"], ["--log-format", "text", "ps", "--json"]):
        listed = vc(*argv)
        assert listed.returncode == 0, listed.stderr
        assert listed.stderr.splitlines() == [warning]
    line = _error(vc("rm", "bad"))
    assert line == f"error: StoreError: {path}: corrupt state document: Input data was truncated"
    assert path.read_bytes() == before, "a corrupt record is left for a human to look at"
    newer = '{"version": 3, "id": "bad"}'
    path.write_text(newer)
    line = _error(vc("rm", "bad"))
    assert "state document version 3 is newer than this virtcontainers supports (2)" in line
    shutil.rmtree(path.parent)  # what the user does after reading the message
