"""The jailer: argv, chroot layout, and a jailed start through a stand-in jailer.

The real jailer needs root, cgroups and a chroot with Firecracker's libraries; the stand-in
checks the arguments the real one requires, builds the same layout
(``<chroot base>/<exec name>/<id>/root``, with the binary copied in), and runs the
simulator with ``--sim-root`` in place of chroot(2), so every path the driver sends must be
chroot-relative to work.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from tests.behaviour.harness_firecracker import sim_config
from virtcontainers.devices import BlockDrive, HybridVSock
from virtcontainers.drivers.firecracker import FirecrackerHypervisor
from virtcontainers.drivers.firecracker import jailer as jailer_mod
from virtcontainers.drivers.firecracker.jailer import (
    JAILED_API_SOCKET,
    JailLayout,
    jail_id,
    jailer_argv,
)
from virtcontainers.errors import ConfigError
from virtcontainers.hypervisor import NetworkNamespace

_FAKE_JAILER = '''\
"""Stand-in for Firecracker's jailer (tests only)."""
import argparse, os, re, shutil, sys

argv = sys.argv[1:]
fc_args = argv[argv.index("--") + 1:] if "--" in argv else []
own = argv[: argv.index("--")] if "--" in argv else argv
p = argparse.ArgumentParser(prog="jailer")
p.add_argument("--id", required=True)
p.add_argument("--exec-file", required=True)
p.add_argument("--uid", required=True, type=int)
p.add_argument("--gid", required=True, type=int)
p.add_argument("--chroot-base-dir", default="/srv/jailer")
p.add_argument("--cgroup-version", type=int, choices=(1, 2), default=1)
p.add_argument("--cgroup", action="append", default=[])
p.add_argument("--parent-cgroup")
p.add_argument("--netns")
p.add_argument("--daemonize", action="store_true")
p.add_argument("--new-pid-ns", action="store_true")
args = p.parse_args(own)
if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", args.id):
    sys.exit(f"jailer: invalid id {args.id!r}")
for value in args.cgroup:
    if not re.fullmatch(r"[a-z_]+\\.[a-z_.]+=.+", value):
        sys.exit(f"jailer: invalid cgroup {value!r}")
exec_file = os.path.abspath(args.exec_file)
if not os.access(exec_file, os.X_OK):
    sys.exit(f"jailer: {exec_file} is not executable")
root = os.path.join(args.chroot_base_dir, os.path.basename(exec_file), args.id, "root")
os.makedirs(root, exist_ok=True)
shutil.copy(exec_file, os.path.join(root, os.path.basename(exec_file)))
os.execv(exec_file, [exec_file, "--id", args.id, "--sim-root", root, *fc_args])
'''


def fake_jailer(path: Path) -> Path:
    """Write the stand-in jailer (an executable) to ``path``."""
    path.write_text(f"#!{sys.executable}\n{_FAKE_JAILER}")
    path.chmod(0o755)
    return path


def test_jail_id_follows_the_jailer_rules() -> None:
    assert jail_id("sb_1.two") == "sb-1-two"
    assert jail_id("x" * 100) == "x" * 64
    with pytest.raises(ConfigError):
        jail_id("")


def test_jailer_argv(tmp_path: Path) -> None:
    layout = JailLayout(tmp_path / "jail", Path("/usr/bin/firecracker"), "sb1")
    argv = jailer_argv(
        "/usr/bin/jailer",
        layout,
        uid=0,
        gid=0,
        netns="/var/run/netns/n1",
        daemonize=True,
        cgroups=["cpuset.mems=0", "cpuset.cpus=0-1"],
        cgroup_ver=2,
        firecracker_args=["--api-sock", JAILED_API_SOCKET],
    )
    assert argv == [
        "/usr/bin/jailer",
        "--id", "sb1",
        "--exec-file", "/usr/bin/firecracker",
        "--uid", "0",
        "--gid", "0",
        "--chroot-base-dir", str(tmp_path / "jail"),
        "--cgroup-version", "2",
        "--cgroup", "cpuset.mems=0",
        "--cgroup", "cpuset.cpus=0-1",
        "--netns", "/var/run/netns/n1",
        "--daemonize",
        "--", "--api-sock", "/run/firecracker.socket",
    ]  # fmt: skip
    assert layout.root == tmp_path / "jail" / "firecracker" / "sb1" / "root"
    assert layout.host_path(JAILED_API_SOCKET) == layout.root / "run" / "firecracker.socket"


def test_link_in_hard_links_or_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = JailLayout(tmp_path / "jail", Path("/usr/bin/firecracker"), "sb1")
    layout.prepare()
    assert oct((layout.root / "run").stat().st_mode & 0o777) == "0o700"
    src = tmp_path / "vmlinux"
    src.write_bytes(b"kernel")
    assert layout.link_in(src, "vmlinux") == "/vmlinux"
    assert (layout.root / "vmlinux").stat().st_ino == src.stat().st_ino
    with pytest.raises(ConfigError, match="does not exist"):
        layout.link_in(tmp_path / "missing", "missing")

    def cross_device(a: object, b: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(jailer_mod.os, "link", cross_device)
    assert layout.link_in(src, "copied") == "/copied"
    copied = layout.root / "copied"
    assert copied.read_bytes() == b"kernel"
    assert copied.stat().st_ino != src.stat().st_ino
    layout.remove()
    assert not layout.instance_dir.exists()
    assert src.exists()


async def test_jailed_start_uses_chroot_relative_paths(tmp_path: Path) -> None:
    cfg = sim_config(tmp_path / "assets")
    cfg.boot.jailer_path = str(fake_jailer(tmp_path / "jailer"))
    cfg.template.devices_state_path = str(tmp_path / "vm.state")
    cfg.template.memory_path = str(tmp_path / "vm.mem")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    sent: list[tuple[str, str, object]] = []

    async def record(request: httpx.Request) -> None:
        body = json.loads(request.content) if request.content else None
        sent.append((request.method, request.url.path, body))

    hv = FirecrackerHypervisor(request_hooks=[record])
    await hv.create_sandbox("jailed_sb", NetworkNamespace(), cfg)
    await hv.add_device(BlockDrive(file=str(disk), id="cold0"))
    await hv.start_sandbox(timeout=20)
    jail = hv.paths.jail
    assert jail is not None
    try:
        assert jail.id == "jailed-sb"
        assert hv.argv[0] == cfg.boot.jailer_path
        assert hv.argv[hv.argv.index("--exec-file") + 1] == cfg.boot.hypervisor_path
        assert hv.argv[hv.argv.index("--uid") + 1] == str(os.getuid())
        assert hv.paths.api_socket == jail.root / "run" / "firecracker.socket"
        # The jailer copied the binary in; we hard-linked the boot files.
        assert (jail.root / "firecracker").is_file()
        kernel = Path(cfg.boot.kernel_path)
        assert (jail.root / "vmlinux").stat().st_ino == kernel.stat().st_ino
        bodies = {(m, p): b for m, p, b in sent}
        boot = bodies[("PUT", "/boot-source")]
        assert isinstance(boot, dict)
        assert (boot["kernel_image_path"], boot["initrd_path"]) == ("/vmlinux", "/initrd")
        assert bodies[("PUT", "/drives/drive_0")] == {
            "drive_id": "drive_0",
            "path_on_host": "/drive_0",
            "is_root_device": False,
            "is_read_only": False,
        }
        cold = bodies[("PUT", "/drives/cold0")]
        assert isinstance(cold, dict)
        assert cold["path_on_host"] == "/cold-cold0"
        assert bodies[("PUT", "/vsock")] == {"guest_cid": 3, "uds_path": "/vsock.sock"}
        assert bodies[("PUT", "/logger")]["log_path"] == "/fc-log.fifo"  # type: ignore[index]
        sock = await hv.generate_socket("jailed_sb")
        assert isinstance(sock, HybridVSock)
        assert sock.uds_path == str(jail.root / "vsock.sock")
        assert Path(sock.uds_path).is_socket()

        drive = await hv.hotplug_add_device(BlockDrive(file=str(disk), id="hot"))
        assert sent[-1][2] == {"drive_id": "drive_0", "path_on_host": "/hotplug-0"}
        assert (jail.root / "hotplug-0").stat().st_ino == disk.stat().st_ino
        # A new driver rebuilds the jail layout from the persisted state.
        other = FirecrackerHypervisor()
        other.load(hv.save())
        assert other.paths.jail is not None
        assert other.paths.jail.root == jail.root
        assert other.paths.api_socket == hv.paths.api_socket
        assert other.paths.vsock == hv.paths.vsock
        await hv.hotplug_remove_device(drive)
        assert sent[-1][2] == {"drive_id": "drive_0", "path_on_host": "/drive_0"}
        assert not (jail.root / "hotplug-0").exists()

        await hv.pause_sandbox()
        await hv.save_sandbox()  # written in the jail, moved out
        assert json.loads((tmp_path / "vm.state").read_text())["simulated"] is True
        assert (tmp_path / "vm.mem").stat().st_size == 512 << 20
        await hv.resume_sandbox()
        await hv.check()
    finally:
        await hv.stop_sandbox()
    assert not jail.instance_dir.exists()
    assert kernel.exists()
    await hv.cleanup()
