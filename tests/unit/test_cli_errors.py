"""CLI errors are one readable line naming the public error class, with no traceback."""

from __future__ import annotations

import json
import os
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


def test_more_cpus_than_allowed_is_refused_before_anything_is_recorded(tmp_path: Path) -> None:
    """`--cpus` above the limit (the host's CPUs, or --max-cpus) is a ConfigError naming it;
    before the fix the maximum was silently raised to --cpus and the sandbox recorded."""
    host = os.cpu_count() or 1
    out = _vc(
        tmp_path, "create", "--hypervisor", "mock", "--cpus", str(host + 7),
        "--max-cpus", str(host + 2), "--kernel", "/k", "--initrd", "/i",
    )  # fmt: skip
    assert out.returncode == 1, out.stdout
    assert f"ConfigError: --cpus {host + 7} exceeds the limit of {host} vCPUs" in out.stderr
    assert json.loads(_vc(tmp_path, "ps", "--json").stdout) == []


def test_run_pull_never_of_an_image_not_stored_names_the_policy(tmp_path: Path) -> None:
    out = _vc(
        tmp_path, "run", "--hypervisor", "mock", "--kernel", "/k", "--initrd", "/i",
        "--pull", "never", "--image", f"oci:{tmp_path}/layout", "--", "true",
    )  # fmt: skip
    assert out.returncode == 1, out.stdout
    assert out.stderr.startswith("error: ImageNotFoundError: ")
    assert "the pull policy is never" in out.stderr
    assert json.loads(_vc(tmp_path, "ps", "--json").stdout) == []
    bad = _vc(tmp_path, "run", "--pull", "sometimes", "--image", "x", "--", "true")
    assert bad.returncode == 2
    assert "'sometimes' is not one of 'missing', 'always', 'never'" in bad.stderr


def test_resize_without_a_flag_is_a_config_error(tmp_path: Path) -> None:
    """Before: `vc resize ID` with neither flag did nothing and exited 0."""
    out = _vc(tmp_path, "resize", "nosuch")
    assert out.returncode == 1
    assert out.stderr.startswith("error: ConfigError: resize needs --cpus or --memory")


def test_rm_of_an_unknown_id_names_it(tmp_path: Path) -> None:
    out = _vc(tmp_path, "rm", "nosuch")
    assert out.returncode == 1
    assert out.stderr.startswith("error: StoreError: ")
    assert "no sandbox 'nosuch'" in out.stderr
