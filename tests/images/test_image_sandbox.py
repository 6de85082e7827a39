"""Image sandboxes in real QEMU guests: the acceptance points of OCI images, checked from
inside the guest (python from the Debian image, Env/WorkingDir/User, whiteouts, isolation
between sandboxes, exec/cp, scratch disks, templates) and through `vc`."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.qemu_helpers import qemu_processes_for
from virtcontainers import Sandbox
from virtcontainers.agent.client import AgentRequestError
from virtcontainers.config import HypervisorConfig
from virtcontainers.errors import ConfigError
from virtcontainers.factory.template import Template
from virtcontainers.guest.image import GuestImage
from virtcontainers.images import ImageStore, StoredImage
from virtcontainers.images.sandbox_image import IMAGE_DRIVE_ID

pytestmark = pytest.mark.integration
VC = str(Path(sys.executable).with_name("vc"))


def _config(image: GuestImage, memory: int = 512) -> HypervisorConfig:
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = str(image.kernel)
    cfg.boot.initrd_path = str(image.initrd)
    cfg.resources.num_vcpus = 1
    cfg.resources.default_max_vcpus = 2
    cfg.resources.memory_size = memory
    cfg.storage.block_device_driver = "virtio-blk"
    return cfg


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


async def test_debian_image_runs_python_with_the_images_config(
    guest_image: GuestImage, vc_root: Path, debian_image: StoredImage
) -> None:
    disk_before = _sha256(debian_image.disk)
    async with await Sandbox.create(_config(guest_image), image=debian_image) as sb:
        py = await sb.exec(["python3", "-c", "print(6*7)"])
        assert (py.exit_code, py.stdout) == (0, b"42\n"), py.stderr
        assert (await sb.exec(["sh", "-c", "exit 3"])).exit_code == 3
        with pytest.raises(AgentRequestError, match="nosuchprogram"):
            await sb.exec(["nosuchprogram"])

        # The image's Env, WorkingDir and User (app = 1000:1000 in its /etc/passwd) ...
        ids = await sb.exec(["sh", "-c", 'id -u; id -g; pwd; echo "$GREETING"; echo "$HOME"'])
        assert ids.stdout.decode().split("\n")[:5] == [
            "1000", "1000", "/work", "hello from the image", "/home/app",
        ]  # fmt: skip
        # ... and what -e/-w/-u give instead.
        over = await sb.exec(
            ["sh", "-c", 'id -u; pwd; echo "$GREETING"'],
            env={"GREETING": "overridden"}, cwd="/tmp", user="root",
        )  # fmt: skip
        assert over.stdout == b"0\n/tmp\noverridden\n"

        # Layer 3's whiteout deleted /opt/doomed.txt; layer 2's other file is there.
        files = await sb.exec(["sh", "-c", "ls /opt; test -e /opt/doomed.txt"])
        assert (files.stdout, files.exit_code) == (b"keep.txt\n", 1)

        # The container root: an overlay on /, proc/sys/dev/tmp, the guest's name files.
        mounts = (await sb.read_file("/proc/self/mounts")).decode()
        assert any(line.startswith("overlay / overlay rw") for line in mounts.splitlines())
        for where in ("/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/tmp", "/etc/hosts",
                      "/etc/hostname", "/etc/resolv.conf"):  # fmt: skip
            assert f" {where} " in mounts, where
        assert (await sb.read_file("/etc/hostname")).strip() == b"vc-guest"
        assert b"localhost" in await sb.read_file("/etc/hosts")
        assert b"bookworm" in await sb.read_file("/etc/os-release")

        # Files written into the image root (by the API and by a process).
        await sb.write_file("/work/from-host.txt", b"written by the host\n")
        made = await sb.exec(["sh", "-c", "cat /work/from-host.txt; echo mine > /work/mine.txt"])
        assert made.stdout == b"written by the host\n"
        assert await sb.read_file("/work/mine.txt") == b"mine\n"
        assert "vc.rootfs=tmpfs" in (await sb.read_file("/proc/cmdline")).decode()

        # Root in the guest writing to the image's block device itself, past the overlay:
        # QEMU attached it read-only, so the write fails and the cached image stays intact.
        raw = await sb.exec(
            ["sh", "-c", "ls /dev/vd?; for d in /dev/vd?; do dd if=/dev/zero of=$d bs=512 "
             "count=1 conv=notrunc,fsync 2>&1 && echo WROTE $d; done; true"],
            user="root",
        )  # fmt: skip
        assert raw.stdout.startswith(b"/dev/vd"), raw
        assert b"WROTE" not in raw.stdout, raw
        # dd ran, and the kernel refused the write to the read-only disk.
        assert b"error writing '/dev/vda': Operation not permitted" in raw.stdout, raw

    # A second sandbox of the same image starts from the image, not from the first one.
    async with await Sandbox.create(_config(guest_image), image=debian_image) as sb2:
        fresh = await sb2.exec(["sh", "-c", "ls /work"])
        assert fresh.stdout == b"README\n"
    assert _sha256(debian_image.disk) == disk_before


async def test_scratch_disk_holds_the_writable_layer(
    guest_image: GuestImage, vc_root: Path, busybox_image: StoredImage
) -> None:
    sb = await Sandbox.create(_config(guest_image), image=busybox_image, disk_size_mb=32)
    scratch = sb.run_dir / "scratch.img"
    assert scratch.is_file()
    async with sb:
        assert "vc.rootfs=scratch" in (await sb.read_file("/proc/cmdline")).decode()
        small = await sb.exec(["sh", "-c", "echo hi > /data.txt && cat /data.txt"])
        assert small.stdout == b"hi\n"
        # 48 MiB does not fit a 32 MiB scratch disk (it would fit the tmpfs of 512 MiB RAM).
        big = await sb.exec(["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=48 2>&1"])
        assert big.exit_code != 0
        assert b"No space left on device" in big.stdout
    assert not sb.run_dir.exists()
    with pytest.raises(ConfigError, match="too small"):
        await Sandbox.create(_config(guest_image), image=busybox_image, disk_size_mb=4)


async def test_template_from_an_image_sandbox_shares_the_image_disk(
    guest_image: GuestImage, vc_root: Path, busybox_image: StoredImage, tmp_path: Path
) -> None:
    template = await Template.create(
        _config(guest_image, memory=256), tmp_path / "tpl", require_tmpfs=False,
        image=busybox_image,
    )  # fmt: skip
    try:
        clone = await template.clone()
        try:
            drives = [d for d in clone._devices if getattr(d, "id", "") == IMAGE_DRIVE_ID]
            assert [getattr(d, "file", "") for d in drives] == [str(busybox_image.disk)]
            out = await clone.exec(["sh", "-c", 'pwd; echo "$GREETING"; ls /opt'])
            assert out.stdout == b"/srv\nhello from busybox\nkeep.txt\n"
        finally:
            await clone.remove()
    finally:
        template.remove()
    assert qemu_processes_for(vc_root) == []


def _vc(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VC, *args], capture_output=True, text=True, timeout=300, env=os.environ, input=stdin
    )


def test_vc_run_image_acceptance(
    guest_image: GuestImage, vc_root: Path, debian_oci: Path, store: ImageStore
) -> None:
    ref = f"oci:{debian_oci}"
    py = _vc("run", "--image", ref, "--", "python3", "-c", "print(6*7)")
    assert (py.returncode, py.stdout) == (0, "42\n"), py.stderr
    assert store.get(ref) is not None  # pulled on first use, like docker run
    assert _vc("run", "--image", ref, "--", "sh", "-c", "exit 3").returncode == 3
    missing = _vc("run", "--image", ref, "--", "nosuchprogram")
    assert missing.returncode == 127
    assert "nosuchprogram" in missing.stderr
    default = _vc("run", "--image", ref)
    assert default.stdout == "python default command\n"
    assert qemu_processes_for(vc_root) == []


def test_vc_run_volume_in_the_image_root(
    guest_image_generic: GuestImage, vc_root: Path, busybox_oci: Path, store: ImageStore,
    tmp_path: Path,
) -> None:  # fmt: skip
    """-v in an image sandbox mounts in the image's root (so on the generic flavour, which
    could not mount an image at all before: its initramfs lacked crc32c_generic for erofs)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    out = _vc(
        "run", "--image", f"oci:{busybox_oci}", "-v", f"{data}:/srv/data", "--",
        "sh", "-c", "cat /srv/data/in.txt; ls /opt; echo from the image > /srv/data/out.txt",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == "from the host\nkeep.txt\n"  # /opt: the image's (whiteouts applied)
    assert (data / "out.txt").read_text() == "from the image\n"
    assert qemu_processes_for(vc_root) == []


def test_vc_create_exec_cp_in_an_image_sandbox(
    guest_image: GuestImage, vc_root: Path, busybox_oci: Path, store: ImageStore, tmp_path: Path
) -> None:
    created = _vc("create", "--image", f"oci:{busybox_oci}")
    assert created.returncode == 0, created.stderr
    sid = created.stdout.strip()
    try:
        assert _vc("start", sid).returncode == 0
        env = _vc("exec", sid, "--", "sh", "-c", 'pwd; echo "$GREETING"')
        assert env.stdout == "/srv\nhello from busybox\n"
        over = _vc("exec", "-e", "GREETING=x", "-w", "/", "-u", "1000", sid, "--",
                   "sh", "-c", 'pwd; echo "$GREETING"; id -u')  # fmt: skip
        assert over.stdout == "/\nx\n1000\n", over.stderr
        src = tmp_path / "in.txt"
        src.write_text("to the guest\n")
        assert _vc("cp", str(src), f"{sid}:/srv/in.txt").returncode == 0
        assert _vc("exec", sid, "--", "cat", "/srv/in.txt").stdout == "to the guest\n"
        assert _vc("exec", sid, "--", "sh", "-c", "echo back > /tmp/out.txt").returncode == 0
        assert _vc("cp", f"{sid}:/tmp/out.txt", str(tmp_path / "out.txt")).returncode == 0
        assert (tmp_path / "out.txt").read_text() == "back\n"
        assert _vc("exec", sid, "--", "nosuchprogram").returncode == 127
    finally:
        _vc("stop", sid)
        _vc("rm", sid)
    assert qemu_processes_for(vc_root) == []


def test_vc_run_without_image_takes_env_workdir_user(guest_image: GuestImage, vc_root: Path):
    out = _vc("run", "-e", "A=1", "-w", "/proc", "-u", "0", "--", "sh", "-c", 'echo "$A"; pwd')
    assert out.stdout == "1\n/proc\n", out.stderr
