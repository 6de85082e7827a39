"""QEMU command-line safety and the agent transport, checked at argv level (no QEMU runs).

* Values inside QEMU's comma-separated options must have their commas doubled, or a path
  like ``/x,readonly=off`` adds an option of its own.
* On a host with ``/dev/vhost-vsock`` the agent channel is a real vhost-vsock device with a
  CID the kernel reserved for us, and the guest is told ``vc.agent=vsock``; elsewhere it is
  the virtio-serial port.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import BlockDrive, FsShare, SerialPort, VSock
from virtcontainers.drivers.qemu import QemuHypervisor, hotplug
from virtcontainers.drivers.qemu.argv import QemuPaths, build_argv
from virtcontainers.errors import LaunchError
from virtcontainers.hypervisor import NetworkNamespace
from virtcontainers.process import VmmProcess


def _split_opts(value: str) -> list[str]:
    """Split a QEMU option string the way QEMU does: ``,`` separates, ``,,`` is a comma."""
    parts, current, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += value[i]
        i += 1
    parts.append(current)
    return parts


def _keys(value: str) -> list[str]:
    return [p.split("=", 1)[0] for p in _split_opts(value)]


def _values(argv: Sequence[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def _config(tmp_path: Path) -> HypervisorConfig:
    cfg = HypervisorConfig()
    for name in ("vmlinuz", "initrd"):
        (tmp_path / name).write_text("")
    cfg.boot.kernel_path = str(tmp_path / "vmlinuz")
    cfg.boot.initrd_path = str(tmp_path / "initrd")
    cfg.boot.hypervisor_path = "/bin/true"
    cfg.resources.memory_size = 256
    return cfg


def test_commas_in_paths_do_not_add_options(tmp_path: Path) -> None:
    run_dir = tmp_path / "run,server=off"
    cfg = _config(tmp_path)
    cfg.boot.initrd_path = ""
    image = tmp_path / "root,readonly=off.img"
    image.write_bytes(b"\0" * 512)
    cfg.boot.image_path = str(image)
    cfg.boot.disable_image_nvdimm = True
    cfg.valid()
    argv = build_argv(
        cfg,
        binary="qemu-system-x86_64",
        sandbox_id="c",
        uuid="00000000-0000-0000-0000-000000000000",
        paths=QemuPaths(run_dir),
        accel="tcg",
        host_memory_mb=4096,
    )
    image_drive = next(d for d in _values(argv, "-drive") if d.startswith("id=image,"))
    assert _keys(image_drive) == ["id", "file", "format", "if", "readonly"]
    assert f"file={image}" in _split_opts(image_drive)
    assert "readonly=on" in _split_opts(image_drive)
    for chardev in _values(argv, "-chardev"):
        assert _keys(chardev) == ["socket", "id", "path", "server", "wait"], chardev
        path = next(p for p in _split_opts(chardev) if p.startswith("path="))
        assert path.startswith(f"path={run_dir}/")


def test_commas_in_cold_plugged_devices_do_not_add_options() -> None:
    argv = hotplug.cold_plug_argv(
        [
            BlockDrive(id="d0", file="/disks/a,if=ide,readonly=off", read_only=True),
            FsShare(host_path="/share/x,security_model=passthrough", mount_tag="tag0"),
            SerialPort(id="s0", name="port", host_path="/run/p,server=off"),
        ],
        "q35",
    )
    drive = _values(argv, "-drive")[0]
    assert _keys(drive) == ["id", "file", "format", "if", "readonly"]
    assert "file=/disks/a,if=ide,readonly=off" in _split_opts(drive)
    fsdev = _values(argv, "-fsdev")[0]
    assert _keys(fsdev) == ["local", "id", "path", "security_model", "multidevs"]
    assert "security_model=none" in _split_opts(fsdev)
    chardev = _values(argv, "-chardev")[0]
    assert _keys(chardev) == ["socket", "id", "path", "server", "wait"]
    assert "path=/run/p,server=off" in _split_opts(chardev)


class _Spawned(Exception):
    pass


@pytest.fixture
def captured_spawn(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """VmmProcess.spawn replaced: records argv and passed fds, then fails the start."""
    seen: dict[str, object] = {}

    async def spawn(argv: Sequence[str], **kwargs: object) -> VmmProcess:
        seen["argv"] = list(argv)
        fds = kwargs.get("pass_fds", ())
        seen["pass_fds"] = tuple(fds) if isinstance(fds, tuple | list) else ()
        seen["fds_open"] = [_is_open(fd) for fd in seen["pass_fds"]]  # type: ignore[attr-defined]
        raise OSError(errno.ENOEXEC, "not really starting QEMU here")

    monkeypatch.setattr(VmmProcess, "spawn", staticmethod(spawn))
    monkeypatch.setattr(host, "accelerator", lambda: "tcg")
    return seen


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_vhost_vsock_host_gets_a_vsock_device_and_the_guest_is_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured_spawn: dict[str, object]
) -> None:
    from virtcontainers.drivers.qemu import vsock

    monkeypatch.setattr(host, "device_nodes", lambda paths: dict.fromkeys(paths, True))
    fake_device = tmp_path / "vhost-vsock"
    fake_device.write_text("")
    monkeypatch.setattr(vsock, "VHOST_VSOCK_DEVICE", str(fake_device))
    tried: list[int] = []

    def set_cid(fd: int, cid: int) -> None:
        tried.append(cid)
        if len(tried) == 1:  # the first CID is another VM's
            raise OSError(errno.EADDRINUSE, "in use")

    monkeypatch.setattr(vsock, "_set_cid", set_cid)
    hv = QemuHypervisor()
    await hv.create_sandbox("vs", NetworkNamespace(), _config(tmp_path))
    with pytest.raises(LaunchError):
        await hv.start_sandbox(5)
    argv = captured_spawn["argv"]
    assert isinstance(argv, list)
    cid = tried[1]
    assert cid >= 3
    (fd,) = captured_spawn["pass_fds"]  # type: ignore[misc]
    assert captured_spawn["fds_open"] == [True]  # QEMU would get the descriptor holding it
    assert not _is_open(fd)  # and our copy is closed after the spawn
    assert f"vhost-vsock-pci,id=vsock0,guest-cid={cid},vhostfd={fd}" in _values(argv, "-device")
    assert "vc.agent=vsock" in _values(argv, "-append")[0].split()
    assert await hv.generate_socket("vs") == VSock(context_id=cid, port=1024)
    await hv.cleanup()


async def test_without_vhost_vsock_the_agent_stays_on_virtio_serial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured_spawn: dict[str, object]
) -> None:
    monkeypatch.setattr(host, "device_nodes", lambda paths: dict.fromkeys(paths, False))
    hv = QemuHypervisor()
    await hv.create_sandbox("vs", NetworkNamespace(), _config(tmp_path))
    with pytest.raises(LaunchError):
        await hv.start_sandbox(5)
    argv = captured_spawn["argv"]
    assert isinstance(argv, list)
    assert not any("vhost-vsock" in d for d in _values(argv, "-device"))
    assert "vc.agent=vsock" not in _values(argv, "-append")[0].split()
    assert captured_spawn["pass_fds"] == ()
    sock = await hv.generate_socket("vs")
    assert isinstance(sock, SerialPort)
    assert sock.host_path == str(hv.paths.agent)
    await hv.cleanup()
