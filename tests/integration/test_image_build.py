"""The real guest image: build it from Debian packages, hit the cache, boot it under TCG."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtcontainers.guest.image import (
    GuestImage,
    build_image,
    concat_initrd,
    find_image,
    make_overlay_cpio,
)

pytestmark = pytest.mark.integration

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
BOOT_TIMEOUT = 90.0


def _sha512(path: Path) -> str:
    return hashlib.sha512(path.read_bytes()).hexdigest()


def _agent_included(img: GuestImage) -> bool:
    return bool(json.loads(img.manifest.read_text()).get("agent", {}).get("included"))


def test_manifest_describes_the_built_files(guest_image: GuestImage) -> None:
    doc = json.loads(guest_image.manifest.read_text())
    assert doc["flavour"] == guest_image.flavour == "cloud"
    assert doc["kernel"] == str(guest_image.kernel)
    assert doc["initrd"] == str(guest_image.initrd)
    assert doc["kernel_release"] == guest_image.kernel_release
    assert guest_image.kernel_release.endswith("-cloud-amd64")
    kernel_pkg = doc["packages"]["kernel"]
    assert kernel_pkg["name"] == f"linux-image-{guest_image.kernel_release}-unsigned"
    assert kernel_pkg["version"]
    assert doc["packages"]["busybox"]["version"].startswith("v1.")
    assert _sha512(guest_image.kernel) == guest_image.kernel_sha512 == doc["kernel_sha512"]
    assert _sha512(guest_image.initrd) == guest_image.initrd_sha512 == doc["initrd_sha512"]
    for module in ("virtio_pci", "virtio_console", "virtio_blk", "virtio_scsi", "sd_mod"):
        assert module in doc["modules"]["boot"]
    assert {"virtio_net", "vmw_vsock_virtio_transport", "virtio_rng"} <= set(doc["modules"]["boot"])
    # Dependencies load first.
    boot = doc["modules"]["boot"]
    assert boot.index("virtio_ring") < boot.index("virtio") < boot.index("virtio_console")
    folder = guest_image.manifest.parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in (guest_image.kernel, guest_image.initrd, guest_image.manifest):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert find_image("cloud") is not None


def test_initrd_layout(guest_image: GuestImage, tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("GNU cpio not installed")
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"],
        input=gzip.decompress(guest_image.initrd.read_bytes()),
        capture_output=True,
        check=True,
    ).stdout.decode()
    names = set(listing.split())
    release = guest_image.kernel_release
    for name in (
        "init",
        "bin/busybox",
        "bin/sh",
        "sbin/insmod",
        "dev/console",
        "etc/vc/init.d",
        "etc/vc/modules.load",
        f"lib/modules/{release}/modules.dep",
        f"lib/modules/{release}/kernel/drivers/char/virtio_console.ko",
    ):
        assert name in names, name
    assert "sbin/init" not in names
    assert ("sbin/vc-agent" in names) == _agent_included(guest_image)


def _fake_apt(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir()
    for tool in ("apt-get", "apt-cache"):
        script = bin_dir / tool
        script.write_text(
            f'#!/bin/sh\necho "{tool} $*" >> {log}\necho "E: offline" >&2\nexit 100\n'
        )
        script.chmod(0o755)


def test_second_build_is_a_cache_hit_without_apt(
    guest_image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "apt-calls"
    _fake_apt(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    started = time.monotonic()
    again = build_image("cloud")
    elapsed = time.monotonic() - started
    assert again == guest_image
    assert not log.exists(), log.read_text()
    assert elapsed < 2.0, f"cache hit took {elapsed:.2f} s"


def test_rebuild_is_offline_from_cached_debs(
    guest_image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With apt failing (offline), a fresh cache holding only the .debs still builds."""
    default_debs = guest_image.manifest.parents[2] / "debs"
    doc = json.loads(guest_image.manifest.read_text())
    kernel_pkg = doc["packages"]["kernel"]
    deb = (
        default_debs / f"{kernel_pkg['name']}_{kernel_pkg['version'].replace(':', '%3a')}_amd64.deb"
    )
    if not deb.is_file():
        pytest.skip(f"{deb} is not cached")
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    try:
        os.link(deb, cache / "debs" / deb.name)
    except OSError:  # another filesystem
        shutil.copy(deb, cache / "debs" / deb.name)
    log = tmp_path / "apt-calls"
    _fake_apt(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    rebuilt = build_image("cloud", cache_dir=cache)
    assert log.exists()  # apt was asked (and failed); the cached .deb was used instead
    assert rebuilt.kernel_sha512 == guest_image.kernel_sha512
    assert rebuilt.kernel_release == guest_image.kernel_release
    # Reproducible: same inputs, byte-identical initrd (unless the agent binary differs).
    if not _agent_included(guest_image):
        assert rebuilt.initrd_sha512 == guest_image.initrd_sha512


@dataclass
class Boot:
    lines: list[tuple[float, str]]
    returncode: int | None
    elapsed: float

    def first(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _boot(
    kernel: Path, initrd: Path, extra: Sequence[str] = (), timeout: float = BOOT_TIMEOUT
) -> Boot:
    assert QEMU is not None
    argv = [
        QEMU,
        "-accel",
        "tcg",
        "-M",
        "q35",
        "-m",
        "512",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 panic=-1 quiet",
        *extra,
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append((time.monotonic() - started, raw.decode(errors="replace").rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        returncode: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        returncode = None
    reader.join(5)
    return Boot(lines, returncode, time.monotonic() - started)


HELLO = b"""#!/bin/sh
echo "hello-marker from $(hostname)"
while read -r name _; do echo "module: $name"; done < /proc/modules
for p in /sys/class/virtio-ports/*; do echo "virtio-port: $(cat "$p/name")"; done
modprobe virtiofs && echo "modprobe: ok"
"""


@needs_qemu
@pytest.mark.parametrize("compress", [False, True], ids=["plain-overlay", "gzip-overlay"])
def test_boot_runs_init_d_and_powers_off(
    guest_image: GuestImage, tmp_path: Path, compress: bool
) -> None:
    script = HELLO
    if _agent_included(guest_image):
        script += b"poweroff -f\n"  # the agent would otherwise wait for a host forever
    overlay = make_overlay_cpio({"/etc/vc/init.d/10-hello": (script, 0o755)}, tmp_path / "ov")
    if compress:
        gz = tmp_path / "ov.gz"
        gz.write_bytes(gzip.compress(overlay.read_bytes()))
        overlay = gz
    initrd = concat_initrd(guest_image.initrd, [overlay], tmp_path / "initrd")
    boot = _boot(
        guest_image.kernel,
        initrd,
        [
            "-chardev",
            "null,id=vctest",
            "-device",
            "virtio-serial-pci",
            "-device",
            "virtserialport,name=vc.test,chardev=vctest",
        ],
    )
    assert boot.returncode == 0, f"QEMU did not power off by itself:\n{boot.text}"
    ready = boot.first("vc-init: ready")
    hello = boot.first("hello-marker from vc-guest")
    assert ready is not None, boot.text
    assert hello is not None, boot.text
    assert ready <= hello
    assert "module: virtio_console" in boot.text
    assert "module: virtio_pci" in boot.text
    assert "virtio-port: vc.test" in boot.text
    assert "modprobe: ok" in boot.text
    assert "insmod" not in boot.text, boot.text  # no module failed to load
    if not _agent_included(guest_image):
        assert "vc-init: nothing to run, powering off" in boot.text
    print(f"\nboot to 'vc-init: ready' {ready:.2f} s, to exit {boot.elapsed:.2f} s")


@needs_qemu
def test_init_d_failures_are_reported_and_ignored(guest_image: GuestImage, tmp_path: Path) -> None:
    files = {
        "/etc/vc/init.d/10-fail": (b"#!/bin/sh\nexit 3\n", 0o755),
        "/etc/vc/init.d/15-not-executable": (b"#!/bin/sh\necho SHOULD-NOT-RUN\n", 0o644),
        "/etc/vc/init.d/20-after": (b"#!/bin/sh\necho after-marker\npoweroff -f\n", 0o755),
    }
    overlay = make_overlay_cpio(files, tmp_path / "ov")
    initrd = concat_initrd(guest_image.initrd, [overlay], tmp_path / "initrd")
    boot = _boot(guest_image.kernel, initrd)
    assert boot.returncode == 0, boot.text
    assert "vc-init: /etc/vc/init.d/10-fail exited with 3" in boot.text
    assert "SHOULD-NOT-RUN" not in boot.text
    assert "after-marker" in boot.text


@needs_qemu
def test_generic_flavour_mounts_9p(guest_image_generic: GuestImage, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "f.txt").write_text("shared-content\n")
    script = (
        b"#!/bin/sh\nmkdir -p /mnt/s\n"
        b"mount -t 9p -o trans=virtio,version=9p2000.L share /mnt/s && cat /mnt/s/f.txt\n"
        b"poweroff -f\n"
    )
    overlay = make_overlay_cpio({"/etc/vc/init.d/10-9p": (script, 0o755)}, tmp_path / "ov")
    initrd = concat_initrd(guest_image_generic.initrd, [overlay], tmp_path / "initrd")
    boot = _boot(
        guest_image_generic.kernel,
        initrd,
        ["-virtfs", f"local,path={share},mount_tag=share,security_model=none"],
    )
    assert boot.returncode == 0, boot.text
    assert "vc-init: ready" in boot.text
    assert "shared-content" in boot.text
