"""`vc run/create -v HOST:GUEST[:ro]`, as docker's bind mounts, in real QEMU guests: the host's
files are in the guest, the guest's writes reach the host and the host's reach the guest while
it runs, `:ro` refuses writes, in the busybox guest and in an image's root; what cannot work
(a kernel without 9p, a driver without it, bad forms) is a ConfigError before or at boot that
leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.qemu_helpers import qemu_processes_for
from virtcontainers.guest.image import GuestImage

pytestmark = pytest.mark.integration
VC = str(Path(sys.executable).with_name("vc"))


def _vc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VC, *args], capture_output=True, text=True, timeout=300, env=os.environ)


def _nothing_left(vc_root: Path) -> None:
    assert qemu_processes_for(vc_root) == []
    sandboxes = vc_root / "sandboxes"
    assert not sandboxes.exists() or list(sandboxes.iterdir()) == []


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "frozen").mkdir(parents=True)
    (data / "in.txt").write_text("hello from the host\n")
    (data / "frozen" / "f").write_text("frozen\n")
    return data


def test_run_mounts_host_directories_both_ways_and_read_only(
    guest_image_generic: GuestImage, vc_root: Path, volume: Path
) -> None:
    script = (
        "cat /data/in.txt; echo from the guest > /data/out.txt; "
        "echo x > /data/frozen/g || echo refused; cat /data/frozen/f"
    )
    out = _vc(
        "run", "-v", f"{volume}:/data", "-v", f"{volume / 'frozen'}:/data/frozen:ro",
        "--", "sh", "-c", script,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from the host\nrefused\nfrozen\n"
    assert "Read-only file system" in out.stderr
    assert (volume / "out.txt").read_text() == "from the guest\n"
    assert not (volume / "frozen" / "g").exists()
    _nothing_left(vc_root)


def test_a_created_sandbox_sees_host_writes_while_it_runs(
    guest_image_generic: GuestImage, vc_root: Path, volume: Path
) -> None:
    created = _vc("create", "-v", f"{volume}:/mnt/live")
    assert created.returncode == 0, created.stderr
    sid = created.stdout.strip()
    try:
        assert _vc("start", sid).returncode == 0  # mounted by the sandbox's server, at start
        (volume / "later.txt").write_text("written after boot\n")
        seen = _vc("exec", sid, "--", "cat", "/mnt/live/later.txt")
        assert (seen.returncode, seen.stdout) == (0, "written after boot\n"), seen.stderr
    finally:
        assert _vc("rm", "--force", sid).returncode == 0
    _nothing_left(vc_root)


def test_what_cannot_mount_is_a_config_error_leaving_nothing(
    guest_image: GuestImage, guest_image_generic: GuestImage, vc_root: Path, volume: Path
) -> None:
    # The cloud kernel has no 9p: the VM boots, the mount fails, the sandbox is removed.
    cloud = _vc("run", "--flavour", "cloud", "-v", f"{volume}:/data", "--", "true")
    assert cloud.returncode == 1
    assert cloud.stderr.startswith("error: ConfigError: --volume ")
    assert "the guest kernel has no 9p" in cloud.stderr
    mock = _vc("run", "--hypervisor", "mock", "-v", f"{volume}:/data", "--", "true")
    assert "volumes need virtio-9p, which the mock driver does not have" in mock.stderr
    for bad, why in [
        (f"{volume}", "give HOST_DIR:GUEST_PATH[:ro|rw]"),
        (f"{volume}:/data:rx", "the mode must be ro or rw, got 'rx'"),
        (f"{volume}:data", "the guest path must be absolute"),
        (f"{volume}:/", "the guest path must be absolute and not / itself"),
        (f"{volume / 'missing'}:/data", "is not a directory"),
    ]:
        out = _vc("run", "-v", bad, "--", "true")
        assert (out.returncode, why in out.stderr) == (1, True), (bad, out.stderr)
    _nothing_left(vc_root)
