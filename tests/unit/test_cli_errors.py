"""CLI errors are one readable line naming the public error class, with no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

VC = str(Path(sys.executable).with_name("vc"))


def _vc(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "VC_RUN_ROOT": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)}
    return subprocess.run([VC, *args], capture_output=True, text=True, env=env, timeout=60)


def test_unknown_sandbox(tmp_path: Path) -> None:
    out = _vc(tmp_path, "exec", "nosuch", "--", "true")
    assert out.returncode == 1
    assert out.stderr.startswith("error: StoreError: ")
    assert "no sandbox 'nosuch'" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_hypervisor_lists_the_allowed_ones(tmp_path: Path) -> None:
    out = _vc(tmp_path, "create", "--hypervisor", "xen", "--kernel", "/k", "--initrd", "/i")
    assert out.returncode == 1
    assert "Unknown hypervisor type xen (allowed: firecracker, qemu, acrn, clh, mock)" in out.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    out = _vc(tmp_path, "--debug", "exec", "nosuch", "--", "true")
    assert out.returncode != 0
    assert "Traceback" in out.stderr
