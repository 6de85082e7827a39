"""`vc run` end to end: a real guest, the real agent, the real CLI process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from virtcontainers.guest.image import GuestImage

pytestmark = pytest.mark.integration
VC = str(Path(sys.executable).with_name("vc"))


def test_vc_run_prints_the_guest_kernel(guest_image: GuestImage, vc_root: Path) -> None:
    out = subprocess.run(
        [VC, "run", "--", "uname", "-r"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == guest_image.kernel_release


def test_vc_run_exits_with_the_command_code(guest_image: GuestImage, vc_root: Path) -> None:
    out = subprocess.run(
        [VC, "run", "--", "sh", "-c", "echo to-stderr >&2; exit 7"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 7
    assert "to-stderr" in out.stderr


def test_vc_run_without_an_image_says_how_to_get_one(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "VC_RUN_ROOT": str(tmp_path)}
    out = subprocess.run(
        [VC, "run", "--", "true"], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 1
    assert "vc guest build" in out.stderr
    assert "Traceback" not in out.stderr


def test_vc_run_pipes_10_mib_of_binary_stdin_byte_identical(
    guest_image: GuestImage, vc_root: Path
) -> None:
    data = os.urandom(10 << 20)
    out = subprocess.run([VC, "run", "--", "cat"], input=data, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) == len(data)
    assert out.stdout == data
