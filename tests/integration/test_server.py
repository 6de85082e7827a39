"""The sandbox server end to end: real guests, the real `vc` processes as clients."""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.integration.qemu_helpers import qemu_processes_for
from virtcontainers import SyncSandbox
from virtcontainers.config import HypervisorConfig
from virtcontainers.errors import StateError
from virtcontainers.guest.image import GuestImage

pytestmark = pytest.mark.integration
VC = str(Path(sys.executable).with_name("vc"))


def vc(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VC, *args], capture_output=True, text=True, timeout=timeout)


def ps(sandbox_id: str) -> dict[str, object]:
    out = vc("ps", "--json")
    assert out.returncode == 0, out.stderr
    return next(i for i in json.loads(out.stdout) if i["id"] == sandbox_id)


def wait_until(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def leftovers(root: Path) -> list[str]:
    """What of any sandbox remains: run dirs and QEMU or server processes."""
    left = [str(p) for p in root.glob("sandboxes/*")]
    return left + [f"process {pid}" for pid in qemu_processes_for(root)]


@pytest.fixture
def detached(guest_image: GuestImage, vc_root: Path) -> str:
    assert vc("create", "--id", "srv", "--cpus", "1", "--memory", "512").returncode == 0
    started = vc("start", "srv")
    assert started.returncode == 0, started.stderr
    return "srv"


def test_many_clients_one_sandbox(detached: str, vc_root: Path, tmp_path: Path) -> None:
    # 8 execs from 8 processes at once: all run concurrently in the guest (each sleeps 1 s,
    # and the guest shows them overlapping), all exit 0.
    uptime = "cut -d' ' -f1 /proc/uptime"
    procs = [
        subprocess.Popen(
            [VC, "exec", detached, "--", "sh", "-c", f"{uptime}; sleep 1; {uptime}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0
        start, end = map(float, out.split())
        spans.append((start, end))
    latest_start = max(s for s, _ in spans)
    earliest_end = min(e for _, e in spans)
    assert latest_start < earliest_end, f"the 8 sleeps did not overlap: {spans}"

    # 20 concurrent execs with distinct output: each gets exactly its own.
    procs = [
        subprocess.Popen(
            [VC, "exec", detached, "--", "sh", "-c", f"for i in 1 2 3; do echo out-{n}-$i; done"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(20)
    ]
    for n, p in enumerate(procs):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        assert out == "".join(f"out-{n}-{i}\n" for i in (1, 2, 3))

    # 4 concurrent control operations: the server serializes them, none is lost.
    disks = []
    for name in ("a", "b"):
        disk = tmp_path / f"{name}.img"
        disk.write_bytes(b"\0" * (8 << 20))
        disks.append(disk)
    ops = [
        [VC, "resize", detached, "--cpus", "2"],
        [VC, "resize", detached, "--memory", "768"],
        [VC, "hotplug", detached, "--disk", str(disks[0]), "--json"],
        [VC, "hotplug", detached, "--disk", str(disks[1]), "--json"],
    ]
    running = [subprocess.Popen(op, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for op in ops]
    outputs = [p.communicate(timeout=300) for p in running]
    for p, (_, err) in zip(running, outputs, strict=True):
        assert p.returncode == 0, err
    plugged = [json.loads(out)["id"] for out, _ in outputs[2:]]
    info = ps(detached)
    assert info["vcpus"] == 2
    assert info["memory_mb"] == 768
    assert sorted(info["devices"]) == sorted(plugged)  # type: ignore[arg-type]
    assert vc("exec", detached, "--", "nproc").stdout == "2\n"
    mem_kb = int(vc("exec", detached, "--", "sh", "-c", "head -1 /proc/meminfo").stdout.split()[1])
    assert mem_kb > 600 * 1024  # 512 MiB boot + 256 MiB onlined, less the kernel's share
    blocks = vc("exec", detached, "--", "ls", "/sys/block").stdout.split()
    assert len([b for b in blocks if b.startswith("vd")]) == 2

    # The server dies: `vc ps` says so; `vc start` adopts the VM with a new server.
    kill_server(vc_root, detached)
    assert ps(detached)["server"] == "dead"
    assert "server dead" in vc("ps").stdout
    adopted = vc("start", detached)
    assert adopted.returncode == 0, adopted.stderr
    assert ps(detached)["server"] == "running"
    assert vc("exec", detached, "--", "echo", "adopted").stdout == "adopted\n"
    # It dies again: `vc stop` / `vc rm` still clean up completely (directly).
    kill_server(vc_root, detached)
    assert ps(detached)["server"] == "dead"
    stop = vc("stop", detached)
    assert stop.returncode == 0, stop.stderr
    assert ps(detached)["state"] == "stopped"
    assert "reboot: Power down" in vc("logs", detached).stdout
    assert vc("rm", detached).returncode == 0
    assert leftovers(vc_root) == []


def kill_server(root: Path, sandbox_id: str) -> None:
    state = json.loads((root / "sandboxes" / sandbox_id / "state.json").read_text())
    pid = state["owner_pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until("server gone", lambda: not Path(f"/proc/{pid}").exists(), 10)


def _boot_then_kill(vc_root: Path, *, during_exec: bool) -> float:
    run = subprocess.Popen(
        [VC, "run", "--", "sh", "-c", "echo started; sleep 60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert run.stdout is not None
    if during_exec:
        assert run.stdout.readline() == "started\n"
    else:
        wait_until("the server booting", lambda: list(vc_root.glob("sandboxes/*/qemu.pid")), 60)
    run.send_signal(signal.SIGKILL)
    run.wait()
    killed = time.monotonic()
    wait_until("no leftovers", lambda: leftovers(vc_root) == [], 30)
    return time.monotonic() - killed


def test_vc_run_killed_leaves_nothing(guest_image: GuestImage, vc_root: Path) -> None:
    # The figures (seconds to clean up after the SIGKILL) go to the log for the report.
    during_boot = _boot_then_kill(vc_root, during_exec=False)
    during_exec = _boot_then_kill(vc_root, during_exec=True)
    print(f"cleanup after kill -9: during boot {during_boot:.2f} s, exec {during_exec:.2f} s")


def test_guest_poweroff_is_recorded(guest_image: GuestImage, vc_root: Path) -> None:
    assert vc("create", "--id", "off").returncode == 0
    assert vc("start", "off").returncode == 0
    vc("exec", "off", "--", "sh", "-c", "echo bye from the guest; poweroff -f")

    # It ended by itself: recorded as exited (not stopped), with how and when. Wait for the
    # server's record (it has a time), not for `vc ps` seeing QEMU gone, which comes first.
    def recorded() -> bool:
        ended = ps("off")["exit"]
        return isinstance(ended, dict) and ended.get("time") is not None

    wait_until("recorded as exited", recorded, 30)
    info = ps("off")
    assert info["state"] == "exited"
    assert info["exit"]["reason"] == "the guest powered off"  # type: ignore[index]
    assert info["exit"]["exit_code"] == 0  # type: ignore[index]
    assert isinstance(info["exit"]["time"], float)  # type: ignore[index]
    assert info["server"] == ""
    log = vc("logs", "off").stdout
    assert "reboot: Power down" in log
    assert "vc-init: ready" in log
    assert vc("rm", "off").returncode == 0
    assert leftovers(vc_root) == []


class Terminal:
    """The host side of a pty whose slave is `vc exec -it`'s controlling terminal."""

    def __init__(self, argv: list[str], rows: int, cols: int) -> None:
        self.master, slave = os.openpty()
        self.resize(rows, cols)
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            # The pty becomes vc's controlling terminal, so SIGWINCH and ^C reach it as they
            # would in a terminal emulator.
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.seen = b""

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.master)

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def command(self, text: str) -> None:
        """Type ``text`` at the next prompt. Busybox's shell asks the terminal for the cursor
        position after each prompt and drops keys that arrive together with the answer (a
        person types slower than a test): wait for the question, then a little."""
        self.expect("\x1b[6n")
        time.sleep(0.3)
        self.type(text)

    def expect(self, needle: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while needle.encode() not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} not seen; got {self.seen[-400:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # EIO: the other side closed
                    break
                if b"\x1b[6n" in data:  # where is the cursor? (a terminal answers)
                    os.write(self.master, b"\x1b[1;5R")
                self.seen += data
        assert needle.encode() in self.seen, self.seen[-400:]
        self.seen = self.seen[self.seen.index(needle.encode()) + len(needle) :]


def test_exec_it_is_a_real_terminal(guest_image: GuestImage, vc_root: Path) -> None:
    assert vc("create", "--id", "tty").returncode == 0
    assert vc("start", "tty").returncode == 0
    with Terminal([VC, "exec", "-it", "tty", "sh"], 33, 101) as term:
        term.command("stty size\n")
        term.expect("33 101")
        term.command("echo typed-'in'-here\n")  # the echo of the input has the quotes
        term.expect("typed-in-here")
        term.resize(40, 120)  # SIGWINCH to vc, forwarded to the guest's pty
        time.sleep(0.5)
        term.command("stty size\n")
        term.expect("40 120")
        term.command("sleep 30; echo slept\n")
        time.sleep(1.0)
        term.type("\x03")  # Ctrl-C: raw mode passes it to the guest's line discipline
        term.command("echo after-ctrl-c $?\n")
        term.expect("after-ctrl-c 130", timeout=20)
        assert b"slept" not in term.seen
        term.command("exit 3\n")
        assert term.proc.wait(30) == 3
    assert vc("rm", "--force", "tty").returncode == 0
    assert leftovers(vc_root) == []


def test_run_it_is_a_real_terminal(guest_image: GuestImage, vc_root: Path) -> None:
    """`vc run -it -- sh`, as `docker run -it`: before, `vc run` had no -t/-i."""
    with Terminal([VC, "run", "-it", "--", "sh"], 27, 93) as term:
        term.command("stty size; tty\n")
        term.expect("27 93")
        term.expect("/dev/pts/")
        term.command("echo typed-'in'-here\n")
        term.expect("typed-in-here")
        term.command("exit 4\n")
        assert term.proc.wait(60) == 4
    assert leftovers(vc_root) == []


def test_sync_facade_as_a_client_of_an_ephemeral_server(
    guest_image: GuestImage, vc_root: Path
) -> None:
    cfg = HypervisorConfig()
    cfg.boot.kernel_path, cfg.boot.initrd_path = str(guest_image.kernel), str(guest_image.initrd)
    cfg.resources.memory_size = 512
    sb = SyncSandbox.create(cfg)
    sb.start(server=True, ephemeral=True)
    with sb:
        assert sb.info().server == "running"
        other = SyncSandbox.attach(sb.id)  # another client of the same server
        try:
            assert other.exec(["echo", "from", "the", "other"]).stdout == b"from the other\n"
            assert sb.exec(["cat"], stdin=b"mine").stdout == b"mine"
            with pytest.raises(StateError):
                other.resume()  # running, not paused: the server's Sandbox says so
        finally:
            other.close()
    assert leftovers(vc_root) == []
