"""`vc-runtime` without podman: a hand-made bundle through create/start/state/kill/delete."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtcontainers import procfs
from virtcontainers.guest.image import GuestImage
from virtcontainers.oci.state import StateDir
from virtcontainers.testing.oci_images import busybox_tree

from .oci_helpers import RUNTIME, kata_config, leftovers

pytestmark = pytest.mark.integration

SCRIPT = (
    'echo "env=$GREETING cwd=$(pwd) ids=$(id -u):$(id -g) groups=$(id -G) '
    'host=$(hostname) nofile=$(ulimit -n)"; cat /data/hello.txt; '
    "touch /ro-test 2>/dev/null && echo root-rw || echo root-ro; "
    "touch /scratch/t && echo tmpfs-ok; "
    "trap 'echo got-TERM; exit 0' TERM; echo started; while :; do sleep 0.2; done"
)


@pytest.fixture
def root() -> Iterator[Path]:
    """A short --root (unix socket paths stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vcrt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _bundle(tmp_path: Path, host_dir: Path) -> Path:
    bundle = tmp_path / "bundle"
    busybox_tree(bundle / "rootfs")
    spec = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "handmade",
        "process": {
            "args": ["sh", "-c", SCRIPT],
            "env": ["PATH=/bin", "GREETING=hello"],
            "cwd": "/tmp",
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [1234]},
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 256, "hard": 512}],
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": str(host_dir),
             "options": ["rbind", "ro"]},
            {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
             "options": ["mode=1777", "size=16m"]},
        ],
    }  # fmt: skip
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _wait_status(run: object, cid: str, want: str, timeout: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        state: dict[str, object] = json.loads(run("state", cid).stdout)  # type: ignore[operator]
        if state["status"] == want or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def test_lifecycle_created_running_stopped_and_nothing_left(
    guest_image: GuestImage, root: Path, tmp_path: Path
) -> None:
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    (host_dir / "hello.txt").write_text("from the host\n")
    bundle = _bundle(tmp_path, host_dir)
    config = kata_config(guest_image, tmp_path / "vc.toml")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RUNTIME, "--root", str(root), "--config", str(config), *args],
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    unknown = run("state", "no-such-container")
    assert unknown.returncode == 1
    assert "container no-such-container does not exist" in unknown.stderr

    out_path, pid_file = tmp_path / "ctr.out", tmp_path / "ctr.pid"
    with open(out_path, "wb") as out:
        # The container process keeps create's stdout: a file, not a pipe to wait on.
        created = subprocess.run(
            [RUNTIME, "--root", str(root), "--config", str(config), "create",
             "--bundle", str(bundle), "--pid-file", str(pid_file), "ctr1"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=300,
        )  # fmt: skip
    assert created.returncode == 0, out_path.read_text()
    state = json.loads(run("state", "ctr1").stdout)
    assert state["status"] == "created"
    assert state["pid"] == int(pid_file.read_text()) > 0
    assert state["bundle"] == str(bundle)
    os.kill(state["pid"], 0)  # the container process conmon would wait for is alive
    directory = StateDir(root).path("ctr1")
    modes = {p.name: p.stat().st_mode & 0o777 for p in [directory, *directory.iterdir()]}
    assert modes == {"ctr1": 0o700, "state.json": 0o600, "shim.sock": 0o600,
                     "rootfs.img": 0o600, "vcm-0.img": 0o600}  # fmt: skip

    assert run("start", "ctr1").returncode == 0
    assert _wait_status(run, "ctr1", "running")["status"] == "running"
    deadline = time.monotonic() + 60
    while "started" not in out_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    refused = run("delete", "ctr1")
    assert refused.returncode == 1
    assert "running" in refused.stderr
    assert run("start", "ctr1").returncode == 1  # not created any more

    assert run("kill", "ctr1", "TERM").returncode == 0
    assert _wait_status(run, "ctr1", "stopped")["status"] == "stopped"
    lines = out_path.read_text().splitlines()
    assert lines[0] == (
        "env=hello cwd=/tmp ids=1000:1000 groups=1000 1234 host=handmade nofile=256"
    )
    assert lines[1:6] == ["from the host", "root-ro", "tmpfs-ok", "started", "got-TERM"]

    assert run("delete", "ctr1").returncode == 0
    assert leftovers(StateDir(root), "ctr1") == []
    assert run("state", "ctr1").returncode == 1


def test_a_killed_vm_stops_the_container_and_delete_leaves_nothing(
    guest_image: GuestImage, root: Path, tmp_path: Path
) -> None:
    import signal

    bundle = tmp_path / "bundle"
    busybox_tree(bundle / "rootfs")
    spec = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": ["sh", "-c", "echo up; sleep 300"], "env": ["PATH=/bin"]},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    config = kata_config(guest_image, tmp_path / "vc.toml")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RUNTIME, "--root", str(root), "--config", str(config), *args],
                              capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)  # fmt: skip

    with open(tmp_path / "out", "wb") as out:
        created = subprocess.run([RUNTIME, "--root", str(root), "--config", str(config),
                                  "create", "--bundle", str(bundle), "ctr2"],
                                 stdout=out, stderr=out, timeout=300)  # fmt: skip
    assert created.returncode == 0, (tmp_path / "out").read_text()
    assert run("start", "ctr2").returncode == 0
    states = StateDir(root)
    run_dir = str(states.vm_run_dir(states.sandbox_id("ctr2")))
    qemu = [pid for pid in procfs.processes_mentioning(run_dir)
            if "qemu" in Path(f"/proc/{pid}/comm").read_text()]  # fmt: skip
    assert len(qemu) == 1
    os.kill(qemu[0], signal.SIGKILL)
    assert _wait_status(run, "ctr2", "stopped")["status"] == "stopped"
    assert run("delete", "ctr2").returncode == 0
    assert leftovers(states, "ctr2") == []
