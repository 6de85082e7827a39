"""The QEMU driver against real guests under TCG (KVM where it really works)."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from tests.integration.qemu_helpers import guest_config, qemu_processes_for, wait_for_console
from virtcontainers.devices import (
    BlockDrive,
    CpuDevice,
    MemoryDevice,
    NetDevice,
    VfioDevice,
    VhostUserDevice,
    VhostUserKind,
)
from virtcontainers.drivers.qemu import QemuHypervisor
from virtcontainers.errors import ApiError, ConfigError, HypervisorError, UnsupportedError
from virtcontainers.guest.image import GuestImage
from virtcontainers.hypervisor import NetworkNamespace, VmState

pytestmark = pytest.mark.integration

LINES_SCRIPT = """
i=1
while [ $i -le 1000 ]; do echo "console-line $i"; i=$((i+1)); done
stty -F /dev/console opost  # set with TCSADRAIN: wait for the guest's serial driver to send it all
poweroff -f
"""


async def _started(cfg_image: GuestImage, tmp_path: Path, **kw: object) -> QemuHypervisor:
    hv = QemuHypervisor()
    await hv.create_sandbox("it", NetworkNamespace(), guest_config(cfg_image, tmp_path, **kw))  # type: ignore[arg-type]
    await hv.start_sandbox(timeout=60)
    return hv


async def test_boot_check_pause_resume_stop_leaves_nothing(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    hv = await _started(guest_image, tmp_path)
    run_dir = hv.paths.run_dir
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    pid = hv.get_pids()[0]
    assert qemu_processes_for(run_dir) == [pid]
    assert "-sandbox" in hv.argv
    await wait_for_console(hv.paths.console_log, "vc-init: ready")
    await hv.check()
    await hv.pause_sandbox()
    assert (await hv.qmp("query-status")) == {
        "status": "paused",
        "singlestep": False,
        "running": False,
    }
    await hv.resume_sandbox()
    assert (await hv.qmp("query-status"))["running"] is True  # type: ignore[index]
    threads = await hv.get_thread_ids()
    assert list(threads) == [0]
    assert Path(f"/proc/{pid}/task/{threads[0]}").exists()
    await hv.stop_sandbox()
    assert hv.state is VmState.STOPPED
    assert qemu_processes_for(run_dir) == []
    assert not any(p.exists() for p in hv.paths.sockets())
    assert not hv.paths.pidfile.exists()
    assert "vc-init: ready" in hv.paths.console_log.read_text()
    await hv.cleanup()
    assert not run_dir.exists()
    await hv.stop_sandbox()  # idempotent


async def _run_lines_guest(guest_image: GuestImage, tmp_path: Path) -> str:
    hv = await _started(guest_image, tmp_path, init_scripts={"10-lines": LINES_SCRIPT}, hold=False)
    # What is checked is that a guest-driven stop loses no line, not how fast a guest prints:
    # 1000 lines through an emulated 8250 under TCG take well over the reference's 15 s when
    # the host's two cores are busy, and the forced stop would then cut them (by design).
    hv.stop_timeout = 120.0
    await hv.stop_sandbox(wait_only=True)
    text = hv.paths.console_log.read_text(errors="replace")
    assert qemu_processes_for(hv.paths.run_dir) == []
    await hv.cleanup()
    return text


def _assert_complete(text: str) -> None:
    lines = [ln for ln in text.splitlines() if ln.startswith("console-line ")]
    assert lines == [f"console-line {i}" for i in range(1, 1001)]
    assert "reboot: Power down" in text.splitlines()[-1]


async def test_wait_only_stop_keeps_every_console_line(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    _assert_complete(await _run_lines_guest(guest_image, tmp_path))


@pytest.mark.slow
async def test_wait_only_stop_keeps_every_console_line_30_runs(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    for run in range(30):
        d = tmp_path / str(run)
        d.mkdir()
        _assert_complete(await _run_lines_guest(guest_image, d))


async def test_closing_the_watcher_before_the_vmm_exits_loses_lines(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """The reference's bug, reproduced: cut the console first, then wait for QEMU."""
    hv = await _started(guest_image, tmp_path, init_scripts={"10-lines": LINES_SCRIPT}, hold=False)
    assert hv._console is not None
    await hv._console.close_now()
    await hv.stop_sandbox(wait_only=True)
    text = hv.paths.console_log.read_text(errors="replace")
    assert "console-line 1000" not in text
    assert "reboot: Power down" not in text
    await hv.cleanup()


async def test_vmm_killed_while_running(guest_image: GuestImage, tmp_path: Path) -> None:
    hv = await _started(guest_image, tmp_path)
    run_dir = hv.paths.run_dir
    os.kill(hv.get_pids()[0], signal.SIGKILL)
    with pytest.raises(HypervisorError, match="not running"):
        await hv.check()
    assert hv.state is VmState.FAILED
    await hv.stop_sandbox()
    assert qemu_processes_for(run_dir) == []
    assert not any(p.exists() for p in hv.paths.sockets())
    await hv.cleanup()
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: setattr(c.boot, "kernel_path", ""), "kernel"),
        (
            lambda c: (setattr(c.boot, "initrd_path", ""), setattr(c.boot, "image_path", "")),
            "image and initrd",
        ),
        (lambda c: setattr(c.boot, "hypervisor_machine_type", "virt"), "machine type"),
        (lambda c: setattr(c.resources, "memory_size", 200), "256"),
        (lambda c: setattr(c.boot, "kernel_path", "/nonexistent/vmlinuz"), "does not exist"),
    ],
)
async def test_bad_config_fails_before_any_process(
    guest_image: GuestImage, tmp_path: Path, mutate: object, message: str
) -> None:
    cfg = guest_config(guest_image, tmp_path)
    mutate(cfg)  # type: ignore[operator]
    hv = QemuHypervisor()
    with pytest.raises(ConfigError, match=message):
        await hv.create_sandbox("bad", NetworkNamespace(), cfg)
    assert hv.get_pids() == []
    assert hv.state is VmState.NEW


async def test_hotplug_at_the_qmp_level(guest_image: GuestImage, tmp_path: Path) -> None:
    cfg = guest_config(guest_image, tmp_path)
    cfg.storage.block_device_driver = "virtio-blk"
    hv = QemuHypervisor()
    await hv.create_sandbox("hot", NetworkNamespace(), cfg)
    await hv.start_sandbox(timeout=60)
    try:
        # Devices behind a bridge show in query-pci once the guest has numbered its bus.
        await wait_for_console(hv.paths.console_log, "vc-init: ready")
        disk = tmp_path / "disk.img"
        with disk.open("wb") as f:
            f.truncate(64 << 20)
        drive = await hv.hotplug_add_device(BlockDrive(file=str(disk), id="disk0"))
        blocks = await hv.qmp("query-block")
        assert any("disk0" in b.get("qdev", "") for b in blocks)  # type: ignore[union-attr, attr-defined]
        assert "disk0" in _pci_ids(await hv.qmp("query-pci"))
        assert drive.pci_path == "02/01"

        assert await hv.resize_vcpus(2) == (1, 2)
        cpus = await hv.qmp("query-hotpluggable-cpus")
        assert sum("qom-path" in c for c in cpus) == 2  # type: ignore[union-attr, operator]
        assert sorted(await hv.get_thread_ids()) == [0, 1]

        new_mb, dimm = await hv.resize_memory(512 + 256, 128, probe=False)
        assert (new_mb, dimm.size_mb, dimm.slot) == (768, 256, 0)
        mem = await hv.qmp("query-memory-devices")
        assert mem[0]["data"]["size"] == 256 << 20  # type: ignore[index]
        with pytest.raises(UnsupportedError):
            await hv.hotplug_remove_device(MemoryDevice(size_mb=256))

        removed = await hv.hotplug_remove_device(CpuDevice(1))
        assert removed.ids == ["cpu-1-0-0"]
        cpus = await hv.qmp("query-hotpluggable-cpus")
        assert sum("qom-path" in c for c in cpus) == 1  # type: ignore[union-attr, operator]
        with pytest.raises(HypervisorError, match="only 0 were hot-added"):
            await hv.hotplug_remove_device(CpuDevice(1))
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


async def test_vfio_and_vhost_user_requests_reach_qemu(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """No VFIO device or vhost-user back-end here: each request reaches QEMU and QEMU's own
    refusal surfaces intact (and QEMU keeps running)."""
    hv = await _started(guest_image, tmp_path)
    try:
        with pytest.raises(ApiError, match=r"0000:ff:1f\.7.*no such host device"):
            await hv.hotplug_add_device(VfioDevice(bdf="0000:ff:1f.7"))
        sock = tmp_path / "vhost-user-blk.sock"
        with pytest.raises(ApiError, match=r"chardev-add.*vhost-user-blk\.sock"):
            await hv.hotplug_add_device(
                VhostUserDevice(socket_path=str(sock), id="vub0", type=VhostUserKind.BLK)
            )
        await hv.check()
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a tap device needs root")
async def test_net_hotplug_passes_a_tap_fd(guest_image: GuestImage, tmp_path: Path) -> None:
    hv = await _started(guest_image, tmp_path)
    try:
        await wait_for_console(hv.paths.console_log, "vc-init: ready")
        nic = await hv.hotplug_add_device(
            NetDevice(id="nic0", tap_name=f"vctap{os.getpid() % 10000}", mac="02:00:00:00:00:42")
        )
        assert nic.pci_path == "02/01"
        assert "nic0" in _pci_ids(await hv.qmp("query-pci"))
        info = str(await hv.qmp("human-monitor-command", {"command-line": "info network"}))
        assert "netdev-nic0" in info
        assert "02:00:00:00:00:42" in info
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


def _pci_ids(node: object) -> list[str]:
    """Every qdev_id in a query-pci reply, bridges included."""
    if isinstance(node, list):
        return [i for item in node for i in _pci_ids(item)]
    if isinstance(node, dict):
        own = [node["qdev_id"]] if node.get("qdev_id") else []
        return own + [i for v in node.values() for i in _pci_ids(v)]
    return []


async def test_save_sandbox_writes_device_state(guest_image: GuestImage, tmp_path: Path) -> None:
    hv = await _started(guest_image, tmp_path)
    try:
        hv._config.template.devices_state_path = str(tmp_path / "state.bin")
        await hv.pause_sandbox()
        await hv.save_sandbox()
        data = (tmp_path / "state.bin").read_bytes()
        assert data[:4] == b"QEVM"  # QEMU's migration stream magic
        assert stat.S_IMODE((tmp_path / "state.bin").stat().st_mode) == 0o600
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


async def test_microvm_boots_and_refuses_hotplug(guest_image: GuestImage, tmp_path: Path) -> None:
    hv = await _started(guest_image, tmp_path, machine="microvm")
    try:
        await hv.check()
        with pytest.raises(UnsupportedError, match="microvm"):
            await hv.hotplug_add_device(CpuDevice(1))
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
