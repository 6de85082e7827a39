"""The sandbox server under faults and attack: killed mid-start (then `vc ps`, `vc rm` clean
up), its socket's permissions, and a peer of another uid refused."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reliability.leaks import Snapshot
from tests.reliability.test_vm_faults import check_private
from virtcontainers.guest.image import GuestImage
from virtcontainers.procfs import processes_mentioning

pytestmark = pytest.mark.integration
VC = str(Path(sys.executable).with_name("vc"))
NOBODY = 65534


def vc(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VC, *args], capture_output=True, text=True, timeout=timeout)


def ps(sandbox_id: str) -> dict[str, object] | None:
    out = vc("ps", "--json")
    assert out.returncode == 0, out.stderr
    return next((i for i in json.loads(out.stdout) if i["id"] == sandbox_id), None)


def wait_until(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def _in_child(work: object) -> int:
    """Run ``work()`` (returns an exit code) in a forked child; its exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 99
        try:
            code = work()  # type: ignore[operator]
        except BaseException as exc:
            os.write(2, f"child: {exc!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _connect_as_nobody(path: str) -> int:
    """0: the file system refused the connection (EACCES)."""
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    try:
        socket.socket(socket.AF_UNIX).connect(path)
    except PermissionError:
        return 0
    return 1


def _connect_with_nobodys_credentials(path: str) -> int:
    """Pass the file system check as root (fsuid 0) but connect with euid nobody, which is
    what SO_PEERCRED reports: 0 when the server closes the connection unanswered."""
    libc = ctypes.CDLL(None, use_errno=True)
    os.setegid(NOBODY)
    os.seteuid(NOBODY)  # the real uid stays 0, so setfsuid(0) is allowed
    libc.setfsuid(0)
    conn = socket.socket(socket.AF_UNIX)
    try:
        conn.connect(path)
    except OSError as exc:
        return 10 + (exc.errno or 0)
    conn.settimeout(10)
    try:
        conn.sendall(b"\0" * 64)
        return 0 if conn.recv(1) == b"" else 2
    except (ConnectionResetError, BrokenPipeError):  # closed by the server
        return 0
    except TimeoutError:
        return 3


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another uid needs root")
def test_server_socket_is_private_and_refuses_another_uid(
    guest_image: GuestImage, vc_root: Path
) -> None:
    assert vc("create", "--id", "sec", "--memory", "256").returncode == 0
    started = vc("start", "sec")
    assert started.returncode == 0, started.stderr
    run_dir = vc_root / "sandboxes" / "sec"
    sock = run_dir / "server.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert check_private(run_dir) == {}
    assert _in_child(lambda: _connect_as_nobody(str(sock))) == 0
    assert _in_child(lambda: _connect_with_nobodys_credentials(str(sock))) == 0
    log = (run_dir / "server.log").read_text()
    assert f"uid {NOBODY} is neither the owner nor root" in log
    out = vc("exec", "sec", "--", "echo", "still-serving")
    assert (out.returncode, out.stdout) == (0, "still-serving\n")
    assert vc("stop", "sec").returncode == 0
    assert vc("rm", "sec").returncode == 0
    assert not run_dir.exists()
    assert processes_mentioning(str(vc_root)) == []


def test_server_killed_mid_start(guest_image: GuestImage, vc_root: Path) -> None:
    before = Snapshot.take(vc_root)
    assert vc("create", "--id", "mid", "--memory", "256").returncode == 0
    run_dir = vc_root / "sandboxes" / "mid"
    start = subprocess.Popen([VC, "start", "mid"], stderr=subprocess.PIPE, text=True)
    wait_until("QEMU booting", lambda: (run_dir / "qemu.pid").exists())
    servers = [
        pid for pid in processes_mentioning("virtcontainers.server")
        if pid in processes_mentioning(str(vc_root))
    ]  # fmt: skip
    assert len(servers) == 1
    os.kill(servers[0], signal.SIGKILL)
    _, err = start.communicate(timeout=120)
    assert start.returncode == 1
    assert err.startswith("error: LaunchError: "), err
    info = ps("mid")
    assert info is not None
    print(f"after the kill: {info['state']}, server {info['server']!r}")
    removed = vc("rm", "--force", "mid")
    assert removed.returncode == 0, removed.stderr
    wait_until("nothing left", lambda: Snapshot.take(vc_root).leaked_since(before) == {}, 30)
    assert ps("mid") is None
    assert not run_dir.exists()


def test_cli_killed_mid_start(guest_image: GuestImage, vc_root: Path) -> None:
    # `vc start` only waits for the server it launched: killed mid-boot, the server boots on.
    before = Snapshot.take(vc_root)
    assert vc("create", "--id", "cli", "--memory", "256").returncode == 0
    run_dir = vc_root / "sandboxes" / "cli"
    start = subprocess.Popen([VC, "start", "cli"], stderr=subprocess.DEVNULL)
    wait_until("QEMU booting", lambda: (run_dir / "qemu.pid").exists())
    start.send_signal(signal.SIGKILL)
    assert start.wait(10) == -signal.SIGKILL
    wait_until("running in its server", lambda: (ps("cli") or {}).get("server") == "running", 90)
    assert (ps("cli") or {}).get("state") == "running"
    out = vc("exec", "cli", "--", "echo", "booted-without-its-starter")
    assert (out.returncode, out.stdout) == (0, "booted-without-its-starter\n")
    assert vc("rm", "--force", "cli").returncode == 0
    wait_until("nothing left", lambda: Snapshot.take(vc_root).leaked_since(before) == {}, 30)
    assert ps("cli") is None
