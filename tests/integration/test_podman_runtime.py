"""podman 4.3 + conmon, unchanged, with ``--runtime vc-runtime``: each container runs in a VM.

The images are imported locally (no registry): Debian with python3 from mmdebstrap, and a
busybox tree. podman's storage is private to this module (``--root``/``--runroot`` in a
temporary directory, removed afterwards). The runtime keeps its default root
(``/run/vc-runtime``): podman's cleanup process calls ``delete`` without the runtime flags
the first call had, so only the default is seen by every call; each test checks that its
own container left nothing there. Each boot costs seconds under TCG: one container serves
several checks where that is natural.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtcontainers.guest.image import GuestImage
from virtcontainers.oci.state import DEFAULT_ROOT, StateDir
from virtcontainers.testing.oci_images import busybox_tree, debian_rootfs_tar

from .oci_helpers import RUNTIME, kata_config, leftovers

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Podman:
    """podman with private storage and vc-runtime as its runtime."""

    argv: list[str]
    env: dict[str, str]

    def __call__(
        self, *args: str, timeout: float = 300, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.argv, *args], capture_output=True, text=True, input=input,
                              timeout=timeout, check=False, env=self.env)  # fmt: skip

    def run(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self("run", "--network", "none", *args, input=input)


@pytest.fixture(scope="module")
def podman(guest_image: GuestImage) -> Iterator[Podman]:
    if shutil.which("podman") is None or shutil.which("conmon") is None:
        pytest.skip("podman/conmon not installed (scripts/setup installs them)")
    tmp = Path(tempfile.mkdtemp(prefix="vcpod-"))
    conf = tmp / "containers.conf"
    conf.write_text("[engine]\n")  # none of the machine's own podman configuration
    config = kata_config(guest_image, tmp / "vc.toml")
    tool = Podman(
        argv=["podman", "--root", str(tmp / "storage"), "--runroot", str(tmp / "run"),
              "--storage-driver", "overlay",
              "--runtime", RUNTIME, "--runtime-flag", f"config={config}"],
        env={**os.environ, "CONTAINERS_CONF": str(conf)},
    )  # fmt: skip
    try:
        busybox = tmp / "busybox"
        busybox_tree(busybox)
        with tarfile.open(tmp / "busybox.tar", "w") as tar:
            tar.add(busybox, arcname=".")
        for tar_path, name in ((tmp / "busybox.tar", "localhost/vc-busybox:test"),
                               (debian_rootfs_tar(), "localhost/vc-debian:test")):  # fmt: skip
            done = tool("import", str(tar_path), name, timeout=600)
            assert done.returncode == 0, done.stderr
        yield tool
    finally:
        tool("rm", "--all", "--force", "--time", "0")
        tool("rmi", "--all", "--force")
        subprocess.run(["umount", "-R", str(tmp / "storage" / "overlay")],
                       capture_output=True, check=False)  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)


def _full_id(podman: Podman, name: str) -> str:
    out = podman("inspect", "--format", "{{.Id}}", name)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _nothing_left(container_id: str) -> list[str]:
    return leftovers(StateDir(DEFAULT_ROOT), container_id)


def test_python_prints_42_and_nothing_is_left(podman: Podman) -> None:
    out = podman.run("--name", "vc-py", "localhost/vc-debian:test",
                     "python3", "-c", "print(6*7)")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == "42\n"
    cid = _full_id(podman, "vc-py")
    assert podman("rm", "vc-py").returncode == 0
    assert _nothing_left(cid) == []


def test_exit_code_stdio_env_workdir_user_and_a_volume(podman: Podman, tmp_path: Path) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    volume.chmod(0o777)  # uid 1000 writes into it, as it could with runc
    (volume / "hello.txt").write_text("host content\n")
    script = ('echo "$FOO|$(pwd)|$(id -u):$(id -g)"; cat /data/hello.txt; '
              "echo from-guest > /data/new.txt && cat /data/new.txt; "
              "read line; echo stdin:$line; echo to-stderr >&2; head -1 /proc/meminfo; "
              "exit 3")  # fmt: skip
    memory = "io.katacontainers.config.hypervisor.default_memory=1024"  # enabled in the config
    out = podman.run("--rm", "-i", "-e", "FOO=bar", "-w", "/tmp", "-u", "1000:1000",
                     "-v", f"{volume}:/data", "--annotation", memory,
                     "localhost/vc-busybox:test", "sh", "-c", script, input="typed\n")  # fmt: skip
    assert out.returncode == 3, out.stderr
    *lines, meminfo = out.stdout.splitlines()
    assert lines == ["bar|/tmp|1000:1000", "host content", "from-guest", "stdin:typed"]
    assert 900_000 < int(meminfo.split()[1]) <= 1024 * 1024  # kB: the 1 GiB VM, not 512 MiB
    assert "to-stderr" in out.stderr
    # The volume is a snapshot: the guest's writes do not come back (docs/oci-runtime.md).
    assert sorted(p.name for p in volume.iterdir()) == ["hello.txt"]


def test_a_refused_annotation_fails_run_before_any_vm_boots(podman: Podman) -> None:
    vcpus = "io.katacontainers.config.hypervisor.default_vcpus=2"  # not enabled
    out = podman.run("--rm", "--annotation", vcpus, "localhost/vc-busybox:test", "true")
    assert out.returncode != 0
    assert "annotation io.katacontainers.config.hypervisor.default_vcpus is not enabled" in (
        out.stderr
    )


def test_a_missing_program_is_exit_127_before_any_vm_boots(podman: Podman) -> None:
    out = podman.run("--rm", "localhost/vc-busybox:test", "no-such-program")
    assert out.returncode == 127, out.stderr
    assert "executable file `no-such-program` not found in $PATH" in out.stderr


def test_detached_exec_ps_stop_rm(podman: Podman) -> None:
    script = "trap 'echo got-TERM; exit 0' TERM; echo ready; while :; do sleep 0.2; done"
    started = podman.run("-d", "--name", "vc-bg", "localhost/vc-busybox:test", "sh", "-c", script)
    assert started.returncode == 0, started.stderr
    cid = started.stdout.strip()
    try:
        hostname = podman("exec", "vc-bg", "cat", "/etc/hostname")
        assert hostname.returncode == 0, hostname.stderr
        assert hostname.stdout.strip() == cid[:12]
        ps = podman("ps", "--format", "{{.ID}} {{.Status}}")
        assert any(line.startswith(cid[:12]) and "Up" in line for line in ps.stdout.splitlines())
        assert podman("exec", "vc-bg", "sh", "-c", "exit 5").returncode == 5
        assert podman("exec", "vc-bg", "no-such-program").returncode == 127  # as with runc
        assert podman("exec", "vc-bg", "/etc/passwd").returncode == 126
        code, lines = _under_pty(podman, ["exec", "-it", "vc-bg", "sh"],
                                 b"tty; echo $((6*7)); exit 4\n")  # fmt: skip
        assert code == 4, lines
        assert "42" in lines, lines
        assert any(line.startswith("/dev/pts/") for line in lines), lines
        for verb, status in (("pause", "paused"), ("unpause", "running")):
            assert podman(verb, "vc-bg").returncode == 0
            inspect = podman("inspect", "--format", "{{.State.Status}}", "vc-bg")
            assert inspect.stdout.strip() == status
        stopped = podman("stop", "--time", "60", "vc-bg")
        assert stopped.returncode == 0, stopped.stderr
        state = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", "vc-bg")
        assert state.stdout.split() == ["exited", "0"]  # the trap ran: SIGTERM reached it
        logs = podman("logs", "vc-bg")
        assert logs.stdout.splitlines() == ["ready", "got-TERM"]
    finally:
        removed = podman("rm", "--force", "vc-bg")
    assert removed.returncode == 0, removed.stderr
    assert _nothing_left(cid) == []


def _under_pty(podman: Podman, args: list[str], typed: bytes = b"") -> tuple[int, list[str]]:
    """Run podman on a new pty (``typed`` is sent once the first output arrived); returns
    its exit code and its output lines."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*podman.argv, *args], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, env=podman.env)  # fmt: skip
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1.0)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: podman exited and closed the terminal
                break
            if not chunk:
                break
            if typed and not output:
                os.write(master, typed)
            output += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(60), output.decode(errors="replace").replace("\r", "").splitlines()


def test_run_t_gets_a_terminal(podman: Podman) -> None:
    code, lines = _under_pty(podman, ["run", "--rm", "-t", "--network", "none",
                                      "localhost/vc-busybox:test", "sh", "-c",
                                      "tty; test -t 0 && echo stdin-is-a-tty"])  # fmt: skip
    assert code == 0, lines
    assert any(line.startswith("/dev/pts/") for line in lines), lines
    assert "stdin-is-a-tty" in lines
