"""ACRN driver: the acrn-dm command line, the UUID pool, config checks, and the whole
lifecycle against the fake acrn-dm / acrnctl of tests/behaviour/harness_acrn.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.behaviour.harness_acrn import FakeAcrn, fake_config, write_fakes
from virtcontainers import host
from virtcontainers.config import HypervisorConfig
from virtcontainers.config.kata import load_kata_config
from virtcontainers.config.params import Param
from virtcontainers.devices import (
    BlockDrive,
    ColdPlugDevice,
    CpuDevice,
    FsShare,
    HybridVSock,
    ImageDevice,
    MemoryDevice,
    NetDevice,
    SerialPort,
    VfioDevice,
    VhostUserDevice,
    VhostUserKind,
    VSock,
)
from virtcontainers.drivers import acrn
from virtcontainers.drivers.acrn import (
    ACRN_UUIDS,
    AcrnHypervisor,
    AcrnPaths,
    UuidPool,
    build_argv,
    kernel_parameters,
)
from virtcontainers.drivers.acrn import uuids as acrn_uuids
from virtcontainers.errors import (
    ApiError,
    ConfigError,
    HypervisorError,
    LaunchError,
    StateError,
    UnsupportedError,
)
from virtcontainers.hypervisor import (
    Capability,
    HypervisorType,
    NetworkNamespace,
    VmState,
    new_hypervisor,
)
from virtcontainers.persist.hypervisor_state import HypervisorState

U0, U1 = ACRN_UUIDS[0], ACRN_UUIDS[1]
DEFAULT_CMDLINE = (
    "tsc=reliable no_timer_check nohpet console=tty0 console=ttyS0 console=hvc0 "
    "log_buf_len=16M consoleblank=0 iommu=off i915.avail_planes_per_pipe=0x070F00 "
    "i915.enable_hangcheck=0 i915.nuclear_pageflip=1 i915.enable_guc_loading=0 "
    "i915.enable_guc_submission=0 i915.enable_guc=0 root=/dev/vda1 rw rootwait "
    "quiet systemd.show_status=false panic=1 maxcpus=1"
)


def _cfg() -> HypervisorConfig:
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = "/k/vmlinuz"
    cfg.boot.image_path = "/k/rootfs.img"
    cfg.resources.memory_size = 512
    cfg.resources.default_max_vcpus = 1
    return cfg


PATHS = AcrnPaths(Path("/run/vc/x"))


# -- the acrn-dm command line --------------------------------------------------------------


def test_argv_exact_contents() -> None:
    built = build_argv(_cfg(), binary="/usr/bin/acrn-dm", name="sandbox-x", uuid=U0, paths=PATHS)
    dummies: list[str] = []
    for slot in range(5, 13):
        dummies += ["-s", f"{slot},virtio-blk,nodisk"]
    assert built.argv == [
        "/usr/bin/acrn-dm",
        "-U",
        U0,
        "-A",
        "-m",
        "512M",
        "-s",
        "0:0,hostbridge",
        "-s",
        "1:0,lpc",
        "-l",
        "com1,stdio",
        # slot 2 is ACRN's GVT-g slot: skipped
        "-s",
        "3,virtio-console,@socket:console0=/run/vc/x/console.sock",
        "-s",
        "4,virtio-blk,/k/rootfs.img",
        *dummies,
        "-s",
        "13,virtio-console,socket:vc.agent=/run/vc/x/agent.sock",
        "-k",
        "/k/vmlinuz",
        "-B",
        DEFAULT_CMDLINE,
        "sandbox-x",
    ]
    assert built.dummy_slots == {i: 4 + i for i in range(1, 9)}
    assert built.dummy_slots == acrn.DUMMY_SLOTS


def test_argv_cold_plugged_devices_follow_in_order() -> None:
    cold: list[ColdPlugDevice] = [
        NetDevice(id="n0", tap_name="tap0", mac="02:00:00:00:00:01"),
        BlockDrive(file="/data/a.img", id="a"),
        BlockDrive(file="/data/b.img", id="b", read_only=True),
        SerialPort(id="s", name="extra", host_path="/run/s.sock"),
        VSock(context_id=7, port=1024),
    ]
    argv = build_argv(_cfg(), binary="acrn-dm", name="n", uuid=U0, paths=PATHS, cold=cold).argv
    tail = argv[argv.index("13,virtio-console,socket:vc.agent=/run/vc/x/agent.sock") + 1 :]
    assert tail[: tail.index("-k")] == [
        "-s",
        "14,virtio-net,tap0,mac=02:00:00:00:00:01",
        "-s",
        "15,virtio-blk,/data/a.img",
        "-s",
        "16,virtio-blk,/data/b.img,ro",
        "-s",
        "17,virtio-console,socket:extra=/run/s.sock",
        "-s",
        "18,vhost-vsock,cid=7",
    ]
    assert "-c" not in argv  # acrn-dm has no vCPU option: the scenario sizes the VM


def test_argv_uses_custom_memory_and_no_vcpu_flag() -> None:
    cfg = _cfg()
    cfg.resources.memory_size = 2048
    cfg.resources.num_vcpus = 4
    cfg.resources.default_max_vcpus = 4
    argv = build_argv(cfg, binary="b", name="n", uuid=U1, paths=PATHS).argv
    assert argv[1:6] == ["-U", U1, "-A", "-m", "2048M"]
    assert argv[argv.index("-B") + 1].endswith("panic=1 maxcpus=4")


def test_kernel_parameters_debug_and_user_params_last() -> None:
    cfg = _cfg()
    cfg.debugging.debug = True
    cfg.boot.kernel_params = [Param("console", "ttyS1"), Param("init", "/sbin/vc-init")]
    cmdline = kernel_parameters(cfg)
    assert " debug systemd.show_status=true systemd.log_level=debug" in cmdline
    assert "systemd.log_target=kmsg printk.devkmsg=on panic=1 maxcpus=1" in cmdline
    assert "quiet" not in cmdline.split()
    assert cmdline.endswith("maxcpus=1 console=ttyS1 init=/sbin/vc-init")


@pytest.mark.parametrize(
    ("device", "field"),
    [
        (BlockDrive(file="/a,b.img", id="x"), "BlockDrive.file"),
        (BlockDrive(file="/var/nodisk.img", id="x"), "BlockDrive.file"),
        (BlockDrive(file="", id="x"), "BlockDrive.file"),
        (NetDevice(id="n", tap_name="tap0", mac=""), "NetDevice.mac"),
        (NetDevice(id="n", tap_name="", mac="02:00:00:00:00:01"), "NetDevice.tap_name"),
        (SerialPort(id="s", name="a,b", host_path="/s"), "SerialPort.name"),
        (VSock(context_id=2, port=1024), "VSock.context_id"),
    ],
)
def test_argv_rejects_options_acrn_dm_would_misparse(device: BlockDrive, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_argv(_cfg(), binary="b", name="n", uuid=U0, paths=PATHS, cold=[device])
    assert exc.value.field == field


def test_argv_refuses_more_devices_than_pci_slots() -> None:
    cold = [BlockDrive(file=f"/d{i}", id=str(i)) for i in range(18)]
    argv = build_argv(_cfg(), binary="b", name="n", uuid=U0, paths=PATHS, cold=cold).argv
    assert "31,virtio-blk,/d17" in argv
    with pytest.raises(ConfigError, match="PCI slots"):
        build_argv(_cfg(), binary="b", name="n", uuid=U0, paths=PATHS, cold=[*cold, cold[0]])


def test_agent_port_name_matches_the_qemu_driver() -> None:
    from virtcontainers.drivers.qemu.argv import AGENT_PORT_NAME

    assert acrn.AGENT_PORT_NAME == AGENT_PORT_NAME


def test_registry_builds_the_acrn_driver() -> None:
    hv = new_hypervisor("acrn")
    assert isinstance(hv, AcrnHypervisor)
    assert hv.driver is HypervisorType.ACRN


# -- UUID pool -----------------------------------------------------------------------------


def _no_scan() -> dict[str, int]:
    return {}


def test_uuid_pool_allocates_the_eight_in_order_then_refuses(tmp_path: Path) -> None:
    pool = UuidPool(tmp_path, scan=_no_scan)
    got = [pool.allocate(f"sb{i}") for i in range(8)]
    assert got == list(ACRN_UUIDS)
    with pytest.raises(HypervisorError, match="all 8 ACRN VM UUIDs are in use"):
        pool.allocate("sb8")
    assert pool.in_use()[ACRN_UUIDS[3]] == "sb3"
    assert (tmp_path / UuidPool.FILE).stat().st_mode & 0o777 == 0o600


def test_uuid_pool_release_only_by_owner_and_idempotent(tmp_path: Path) -> None:
    pool = UuidPool(tmp_path, scan=_no_scan)
    assert pool.allocate("a") == U0
    assert pool.allocate("b") == U1
    pool.release(U0, "someone-else")
    assert U0 in pool.in_use()
    pool.release(U0, "a")
    pool.release(U0, "a")
    assert pool.in_use() == {U1: "b"}
    assert pool.allocate("c") == U0  # the freed one comes back first


def test_uuid_pool_is_shared_through_the_file(tmp_path: Path) -> None:
    UuidPool(tmp_path, scan=_no_scan).allocate("a")
    assert UuidPool(tmp_path, scan=_no_scan).allocate("b") == U1


def test_uuid_pool_drops_claims_of_dead_processes(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    doc = {
        "version": 1,
        "claims": {U0: {"sandbox_id": "gone", "owner_pid": dead.pid, "vmm_pid": 0}},
    }
    (tmp_path / UuidPool.FILE).write_text(json.dumps(doc))
    pool = UuidPool(tmp_path, scan=_no_scan)
    assert pool.allocate("new") == U0
    # A claim whose acrn-dm is dead is stale too, even if its owner lives.
    pool.set_vmm_pid(U0, "new", dead.pid)
    assert pool.in_use() == {}


def test_uuid_pool_counts_running_processes_it_did_not_start(tmp_path: Path) -> None:
    pool = UuidPool(tmp_path, scan=lambda: {U0: 4242, U1: 4343})
    assert pool.allocate("a") == ACRN_UUIDS[2]
    assert pool.in_use()[U0] == "pid 4242"


def test_uuid_pool_scan_finds_a_live_process_by_its_argv() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "-U", ACRN_UUIDS[7]]
    )
    try:
        deadline = time.monotonic() + 5
        while ACRN_UUIDS[7] not in acrn_uuids._running_pool_uuids():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert acrn_uuids._running_pool_uuids()[ACRN_UUIDS[7]] == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_uuid_pool_ignores_a_corrupt_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / UuidPool.FILE).write_text("{not json")
    assert UuidPool(tmp_path, scan=_no_scan).allocate("a") == U0
    assert "unreadable ACRN UUID pool" in caplog.text


# -- fixtures for the driver ---------------------------------------------------------------


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeAcrn]:
    f = write_fakes(tmp_path / "bin")
    yield f
    f.remove()


@pytest.fixture
def cfg(tmp_path: Path, fake: FakeAcrn) -> HypervisorConfig:
    return fake_config(tmp_path, fake)


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    return tmp_path / "pool"


def _new(pool_dir: Path) -> AcrnHypervisor:
    hv = AcrnHypervisor(uuid_pool_dir=pool_dir)
    hv.stop_timeout = 5.0
    return hv


@pytest.fixture
async def running(pool_dir: Path, cfg: HypervisorConfig) -> AsyncIterator[AcrnHypervisor]:
    hv = _new(pool_dir)
    await hv.create_sandbox("t1", NetworkNamespace(), cfg)
    await hv.start_sandbox(timeout=10)
    try:
        yield hv
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


async def _wait_for(path: Path, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_text() if path.exists() else ""
        if text in data:
            return data
        assert time.monotonic() < deadline, f"{text!r} not in {path}: {data!r}"
        await asyncio.sleep(0.02)


def _assert_gone(pid: int, hv: AcrnHypervisor, pool_dir: Path) -> None:
    assert not Path(f"/proc/{pid}").exists()
    assert hv.get_pids() == []
    for sock in hv.paths.sockets():
        assert not sock.exists()
    assert UuidPool(pool_dir, scan=_no_scan).in_use() == {}


# -- create: configuration checks ------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "match"),
    [
        (lambda c: setattr(c.boot, "kernel_path", ""), "boot.kernel_path", "kernel"),
        (lambda c: setattr(c.resources, "memory_size", 128), "resources.memory_size", "256"),
        (lambda c: setattr(c.boot, "kernel_path", "/nonexistent/k"), "boot.kernel_path", "exist"),
        (lambda c: setattr(c.boot, "image_path", "/nonexistent/i"), "boot.image_path", "exist"),
        (
            lambda c: setattr(c.storage, "block_device_driver", "virtio-scsi"),
            "storage.block_device_driver",
            "virtio-blk",
        ),
        (
            lambda c: c.resources.__init__(num_vcpus=9, default_max_vcpus=9, memory_size=512),
            "resources.default_max_vcpus",
            "at most 8 vCPUs",
        ),
        (
            lambda c: setattr(c.boot, "hypervisor_path", "/nonexistent/acrn-dm"),
            "boot.hypervisor_path",
            "not executable",
        ),
        (
            lambda c: setattr(c.boot, "hypervisor_ctl_path", "/nonexistent/acrnctl"),
            "boot.hypervisor_ctl_path",
            "not executable",
        ),
        (
            lambda c: setattr(c.boot, "hypervisor_path", "relative/acrn-dm"),
            "boot.hypervisor_path",
            "absolute",
        ),
    ],
)
async def test_create_refuses_bad_config_before_any_process(
    cfg: HypervisorConfig,
    pool_dir: Path,
    fake: FakeAcrn,
    change: object,
    field: str | None,
    match: str,
) -> None:
    assert callable(change)
    change(cfg)
    hv = _new(pool_dir)
    with pytest.raises(ConfigError, match=match) as exc:
        await hv.create_sandbox("bad", NetworkNamespace(), cfg)
    if field is not None:
        assert exc.value.field == field
    assert hv.state is VmState.NEW
    assert UuidPool(pool_dir, scan=_no_scan).in_use() == {}
    assert not list(fake.mngr.iterdir())  # no acrn-dm ever ran


async def test_create_requires_a_rootfs_image(cfg: HypervisorConfig, pool_dir: Path) -> None:
    cfg.boot.initrd_path = cfg.boot.image_path
    cfg.boot.image_path = ""
    with pytest.raises(ConfigError, match="rootfs image") as exc:
        await _new(pool_dir).create_sandbox("x", NetworkNamespace(), cfg)
    assert exc.value.field == "boot.image_path"


async def test_create_refuses_an_image_path_acrn_dm_would_misread(
    cfg: HypervisorConfig, tmp_path: Path, pool_dir: Path
) -> None:
    image = tmp_path / "nodisk.img"
    image.write_bytes(b"\0" * 512)
    cfg.boot.image_path = str(image)
    with pytest.raises(ConfigError, match="placeholder"):
        await _new(pool_dir).create_sandbox("x", NetworkNamespace(), cfg)


async def test_create_fails_when_all_uuids_are_taken(cfg: HypervisorConfig, pool_dir: Path) -> None:
    pool = UuidPool(pool_dir)
    for i in range(8):
        pool.allocate(f"other{i}")
    hv = _new(pool_dir)
    with pytest.raises(HypervisorError, match="all 8 ACRN VM UUIDs are in use"):
        await hv.create_sandbox("ninth", NetworkNamespace(), cfg)
    assert hv.state is VmState.NEW


async def test_create_claims_a_uuid_and_stop_from_created_releases_it(
    cfg: HypervisorConfig, pool_dir: Path
) -> None:
    # Other test runs on this host may hold pool UUIDs right now (the pool scans /proc).
    busy = acrn_uuids._running_pool_uuids()
    first, then = [u for u in ACRN_UUIDS if u not in busy][:2]
    hv = _new(pool_dir)
    await hv.create_sandbox("c1", NetworkNamespace(), cfg)
    assert hv.uuid == first
    assert hv.vm_name == "sandbox-c1"
    assert UuidPool(pool_dir, scan=_no_scan).in_use() == {first: "c1"}
    second = _new(pool_dir)
    await second.create_sandbox("c2", NetworkNamespace(), cfg)
    assert second.uuid == then
    await hv.stop_sandbox()
    await second.stop_sandbox()
    assert UuidPool(pool_dir, scan=_no_scan).in_use() == {}
    await hv.cleanup()
    await second.cleanup()
    assert not hv.paths.run_dir.exists()


async def test_create_defaults_max_vcpus_to_acrn_limit(
    cfg: HypervisorConfig, pool_dir: Path
) -> None:
    cfg.resources.default_max_vcpus = 0
    hv = _new(pool_dir)
    await hv.create_sandbox("m", NetworkNamespace(), cfg)
    assert hv.hypervisor_config().resources.default_max_vcpus == min(8, os.cpu_count() or 1)
    assert hv.hypervisor_config().storage.block_device_driver == "virtio-blk"
    await hv.stop_sandbox()
    await hv.cleanup()


# -- the Kata configuration file ---------------------------------------------------------------


async def test_kata_acrn_config_loads_and_boots_with_dummy_paths(
    shared_dir: Path, tmp_path: Path, fake: FakeAcrn, pool_dir: Path
) -> None:
    path = shared_dir / "kata-configs" / "configuration-acrn.toml"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    kata = load_kata_config(path)
    assert kata.hypervisor_type is HypervisorType.ACRN
    cfg = kata.config
    assert cfg.boot.hypervisor_path == "/usr/bin/acrn-dm"
    assert cfg.boot.hypervisor_ctl_path == "/usr/bin/acrnctl"
    assert cfg.boot.image_path == "/usr/share/kata-containers/kata-containers.img"
    assert cfg.storage.block_device_driver == "virtio-blk"
    assert cfg.resources.default_max_vcpus == 1
    assert cfg.resources.memory_size == 2048
    dummies = fake_config(tmp_path, fake)
    cfg.boot.kernel_path = dummies.boot.kernel_path
    cfg.boot.image_path = dummies.boot.image_path
    cfg.boot.hypervisor_path = str(fake.dm)
    cfg.boot.hypervisor_ctl_path = str(fake.ctl)
    hv = _new(pool_dir)
    await hv.create_sandbox("kata", NetworkNamespace(), cfg)
    await hv.start_sandbox(timeout=10)
    try:
        assert hv.argv[4:6] == ["-m", "2048M"]
        assert hv.argv[hv.argv.index("-B") + 1].endswith("panic=1 maxcpus=1")
        await hv.check()
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


# -- lifecycle against the fakes -----------------------------------------------------------------


async def test_lifecycle_start_check_pause_resume_stop(
    running: AcrnHypervisor, fake: FakeAcrn, pool_dir: Path
) -> None:
    hv = running
    assert hv.state is VmState.RUNNING
    (pid,) = hv.get_pids()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    assert cmdline[1:] == hv.argv  # [0] is the fake's interpreter (shebang)
    assert UuidPool(pool_dir, scan=_no_scan).in_use() == {U0: "t1"}
    await _wait_for(hv.paths.console_log, "vc-init: ready")
    assert (await hv.get_sandbox_console("t1")).url == str(hv.paths.console)
    await hv.check()
    await hv.pause_sandbox()
    assert hv.state is VmState.PAUSED
    await hv.check()
    await hv.resume_sandbox()
    assert hv.state is VmState.RUNNING
    assert fake.ctl_calls() == [
        ["list"],
        ["pause", "sandbox-t1"],
        ["list"],
        ["continue", "sandbox-t1"],
    ]
    await hv.stop_sandbox()
    assert hv.state is VmState.STOPPED
    _assert_gone(pid, hv, pool_dir)
    log = hv.paths.vmm_log.read_text()
    assert "got SIGINT" in log
    assert "got SIGTERM" not in log
    # Drained after acrn-dm exited: the guest's last line is there.
    assert hv.paths.console_log.read_text().endswith("reboot: Power down\n")
    await hv.stop_sandbox()  # idempotent
    await hv.cleanup()
    assert not hv.paths.run_dir.exists()


async def test_stop_wait_only_lets_the_guest_power_off(
    cfg: HypervisorConfig, pool_dir: Path
) -> None:
    cfg.boot.kernel_params.append(Param("fake.poweroff_after", "0.3"))
    hv = _new(pool_dir)
    await hv.create_sandbox("w", NetworkNamespace(), cfg)
    await hv.start_sandbox(timeout=10)
    (pid,) = hv.get_pids()
    started = time.monotonic()
    await hv.stop_sandbox(wait_only=True)
    assert time.monotonic() - started < 4
    _assert_gone(pid, hv, pool_dir)
    assert "got SIG" not in hv.paths.vmm_log.read_text()  # nobody signalled it
    assert hv.paths.console_log.read_text().endswith("reboot: Power down\n")
    await hv.cleanup()


async def test_stop_wait_only_kills_a_guest_that_does_not_power_off(
    running: AcrnHypervisor, pool_dir: Path
) -> None:
    running.stop_timeout = 0.5
    (pid,) = running.get_pids()
    await running.stop_sandbox(wait_only=True)
    assert running.state is VmState.STOPPED
    _assert_gone(pid, running, pool_dir)
    assert "got SIG" not in running.paths.vmm_log.read_text()  # SIGKILL is not catchable


async def test_stop_escalates_to_sigkill(cfg: HypervisorConfig, pool_dir: Path) -> None:
    cfg.boot.kernel_params.append(Param("fake.ignore_signals", "1"))
    hv = _new(pool_dir)
    hv.stop_timeout = 0.3
    await hv.create_sandbox("k", NetworkNamespace(), cfg)
    await hv.start_sandbox(timeout=10)
    (pid,) = hv.get_pids()
    await hv.stop_sandbox()
    _assert_gone(pid, hv, pool_dir)
    log = hv.paths.vmm_log.read_text()
    assert "got SIGINT, ignoring it" in log
    assert "got SIGTERM, ignoring it" in log
    await hv.cleanup()


async def test_crash_is_detected_and_stop_cleans_up(
    running: AcrnHypervisor, pool_dir: Path
) -> None:
    (pid,) = running.get_pids()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(HypervisorError, match=r"acrn-dm (is not running|exited)") as exc:
        await running.check()
    if not any(os.path.exists(p) for p in acrn.ACRN_DEVICE_NODES):
        assert "not an ACRN service VM" in str(exc.value)
    assert running.state is VmState.FAILED
    with pytest.raises(HypervisorError) as again:
        await running.check()
    assert type(again.value) is HypervisorError  # "the VM has failed", not a state error
    await running.stop_sandbox()
    assert running.state is VmState.STOPPED
    _assert_gone(pid, running, pool_dir)
    await running.cleanup()
    assert not running.paths.run_dir.exists()


async def test_early_exit_is_a_launch_error_with_code_argv_and_log(
    cfg: HypervisorConfig, pool_dir: Path
) -> None:
    cfg.boot.kernel_params.append(Param("fake.exit_early", "3"))
    hv = _new(pool_dir)
    await hv.create_sandbox("e", NetworkNamespace(), cfg)
    with pytest.raises(LaunchError) as exc:
        await hv.start_sandbox(timeout=10)
    err = exc.value
    assert err.exit_code == 3
    assert err.argv[0] == cfg.boot.hypervisor_path
    assert "-U" in err.argv
    assert "fake.exit_early requested" in err.log_tail
    assert hv.state is VmState.FAILED
    assert UuidPool(pool_dir, scan=_no_scan).in_use() == {}
    await hv.stop_sandbox()
    await hv.cleanup()


async def test_start_timeout_when_the_console_never_comes(
    cfg: HypervisorConfig, tmp_path: Path, pool_dir: Path
) -> None:
    from virtcontainers.errors import HypervisorTimeout

    silent = tmp_path / "silent-acrn-dm"
    silent.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    silent.chmod(0o755)
    cfg.boot.hypervisor_path = str(silent)
    hv = _new(pool_dir)
    await hv.create_sandbox("s", NetworkNamespace(), cfg)
    with pytest.raises(HypervisorTimeout):
        await hv.start_sandbox(timeout=0.5)
    assert hv.state is VmState.FAILED
    assert hv.get_pids() == []
    assert UuidPool(pool_dir, scan=_no_scan).in_use() == {}
    await hv.cleanup()


async def test_fake_refuses_a_uuid_already_running(
    running: AcrnHypervisor, cfg: HypervisorConfig, tmp_path: Path
) -> None:
    # A second pool that knows nothing still sees the running acrn-dm through /proc.
    other = _new(tmp_path / "other-pool")
    await other.create_sandbox("t2", NetworkNamespace(), cfg)
    assert other.uuid == U1
    await other.start_sandbox(timeout=10)
    await other.check()
    await other.stop_sandbox()
    await other.cleanup()


async def test_two_vms_run_side_by_side(
    running: AcrnHypervisor, cfg: HypervisorConfig, pool_dir: Path, fake: FakeAcrn
) -> None:
    other = _new(pool_dir)
    await other.create_sandbox("t2", NetworkNamespace(), cfg)
    await other.start_sandbox(timeout=10)
    try:
        await other.check()
        await running.check()
        assert set(UuidPool(pool_dir, scan=_no_scan).in_use()) == {U0, U1}
    finally:
        await other.stop_sandbox()
        await other.cleanup()
    await running.check()


async def test_check_fails_when_acrnctl_does_not_list_the_vm(
    running: AcrnHypervisor, tmp_path: Path
) -> None:
    quiet = tmp_path / "quiet-acrnctl"
    quiet.write_text("#!/bin/sh\nexit 0\n")
    quiet.chmod(0o755)
    running._ctl = str(quiet)
    with pytest.raises(HypervisorError, match="does not show sandbox-t1"):
        await running.check()
    assert running.state is VmState.RUNNING  # acrn-dm lives; only acrnctl lost it


async def test_check_message_without_hint_on_an_acrn_host(
    running: AcrnHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host, "device_nodes", lambda paths: dict.fromkeys(paths, True))
    assert acrn.acrn_host_problem() == ""
    os.kill(running.get_pids()[0], signal.SIGKILL)
    with pytest.raises(HypervisorError) as exc:
        await running.check()
    assert type(exc.value) is HypervisorError
    assert "service VM" not in str(exc.value)


# -- devices ---------------------------------------------------------------------------------


async def test_block_hotplug_fills_placeholders_through_acrnctl_blkrescan(
    running: AcrnHypervisor, fake: FakeAcrn, tmp_path: Path
) -> None:
    disks = []
    for i in range(9):
        disk = tmp_path / f"disk{i}.img"
        disk.write_bytes(b"\0" * (1 << 20))
        disks.append(disk)
    drive = await running.hotplug_add_device(BlockDrive(file=str(disks[0]), id="d0"))
    assert (drive.index, drive.pci_path, drive.virt_path) == (1, "05", "/dev/vdb")
    assert fake.ctl_calls()[-1] == ["blkrescan", "sandbox-t1", f"5,{disks[0]}"]
    await _wait_for(running.paths.console_log, "virtio_blk virtio5: new size: 2048")
    with pytest.raises(HypervisorError, match="already plugged"):
        await running.hotplug_add_device(BlockDrive(file=str(disks[1]), id="d0"))

    removed = await running.hotplug_remove_device(drive)
    assert removed.pci_path == ""
    assert fake.ctl_calls()[-1][0] == "blkrescan"  # removal runs no acrnctl command
    with pytest.raises(HypervisorError, match="no hot-plugged drive"):
        await running.hotplug_remove_device(drive)

    # Slot 5 had a backend: acrn-dm will never take another, so the next disk gets slot 6.
    again = await running.hotplug_add_device(BlockDrive(file=str(disks[0]), id="d0"))
    assert (again.index, again.pci_path) == (2, "06")
    for i in range(1, 7):
        await running.hotplug_add_device(BlockDrive(file=str(disks[i]), id=f"d{i}"))
    with pytest.raises(HypervisorError, match="placeholder disks are in use or spent"):
        await running.hotplug_add_device(BlockDrive(file=str(disks[8]), id="d8"))
    assert running.save().block_index_map == {i: 4 + i for i in range(1, 9)}


async def test_block_hotplug_errors(running: AcrnHypervisor, tmp_path: Path) -> None:
    with pytest.raises(ApiError, match="Error opening backing file") as exc:
        await running.hotplug_add_device(BlockDrive(file=str(tmp_path / "missing"), id="m"))
    assert exc.value.request.endswith(f"blkrescan sandbox-t1 5,{tmp_path / 'missing'}")
    with pytest.raises(ConfigError):
        await running.hotplug_add_device(BlockDrive(file="/x/nodisk", id="n"))
    # The failed attempt did not use up the slot.
    disk = tmp_path / "ok.img"
    disk.write_bytes(b"\0" * 4096)
    assert (await running.hotplug_add_device(BlockDrive(file=str(disk), id="ok"))).index == 1


@pytest.mark.parametrize(
    "device",
    [
        CpuDevice(1),
        MemoryDevice(size_mb=128),
        NetDevice(id="n", tap_name="tap0", mac="02:00:00:00:00:01"),
        VfioDevice(bdf="0000:00:01.0"),
        VhostUserDevice(socket_path="/s", id="v", type=VhostUserKind.BLK),
    ],
)
async def test_other_hotplug_kinds_are_unsupported(
    running: AcrnHypervisor, device: CpuDevice
) -> None:
    with pytest.raises(UnsupportedError):
        await running.hotplug_add_device(device)
    with pytest.raises(UnsupportedError):
        await running.hotplug_remove_device(device)


async def test_hotplug_state_error_comes_first(cfg: HypervisorConfig, pool_dir: Path) -> None:
    hv = _new(pool_dir)
    await hv.create_sandbox("h", NetworkNamespace(), cfg)
    with pytest.raises(StateError):
        await hv.hotplug_add_device(CpuDevice(1))
    with pytest.raises(StateError):
        await hv.hotplug_remove_device(BlockDrive(file="/x", id="x"))
    await hv.stop_sandbox()
    await hv.cleanup()


@pytest.mark.parametrize(
    "device",
    [
        ImageDevice(path="/i"),
        FsShare(host_path="/h", mount_tag="t"),
        HybridVSock(uds_path="/u", port=1024),
        VfioDevice(bdf="0000:00:01.0"),
        VhostUserDevice(socket_path="/s", id="v", type=VhostUserKind.FS),
    ],
)
async def test_cold_plug_of_kinds_acrn_lacks_is_unsupported(
    cfg: HypervisorConfig, pool_dir: Path, device: ImageDevice
) -> None:
    hv = _new(pool_dir)
    await hv.create_sandbox("c", NetworkNamespace(), cfg)
    with pytest.raises(UnsupportedError):
        await hv.add_device(device)
    await hv.stop_sandbox()
    await hv.cleanup()


async def test_cold_plugged_block_and_vsock_reach_acrn_dm(
    cfg: HypervisorConfig, pool_dir: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "data.img"
    disk.write_bytes(b"\0" * 4096)
    hv = _new(pool_dir)
    await hv.create_sandbox("cp", NetworkNamespace(), cfg)
    await hv.add_device(BlockDrive(file=str(disk), id="data"))
    vsock = VSock(context_id=9, port=1024)
    await hv.add_device(vsock)
    await hv.start_sandbox(timeout=10)
    try:
        assert f"14,virtio-blk,{disk}" in hv.argv
        assert "15,vhost-vsock,cid=9" in hv.argv
        assert await hv.generate_socket("cp") is vsock
        with pytest.raises(StateError):
            await hv.add_device(BlockDrive(file=str(disk), id="late"))
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


async def test_generate_socket_is_the_served_agent_port(running: AcrnHypervisor) -> None:
    channel = await running.generate_socket("t1")
    assert channel == SerialPort(id="agent0", name="vc.agent", host_path=str(running.paths.agent))
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(channel.host_path)  # acrn-dm serves the port's socket


async def test_resize_follows_the_reference_without_hotplug(running: AcrnHypervisor) -> None:
    assert await running.resize_vcpus(1) == (1, 1)
    with pytest.raises(UnsupportedError, match="vCPU resize"):
        await running.resize_vcpus(2)
    assert await running.resize_memory(512, 128, probe=False) == (512, MemoryDevice(0))
    assert await running.resize_memory(256, 128, probe=False) == (512, MemoryDevice(0))
    with pytest.raises(UnsupportedError, match="memory resize"):
        await running.resize_memory(1024, 128, probe=False)


async def test_unsupported_operations(running: AcrnHypervisor) -> None:
    with pytest.raises(UnsupportedError):
        await running.save_sandbox()
    with pytest.raises(UnsupportedError, match="VM cache"):
        await running.to_grpc()
    with pytest.raises(UnsupportedError, match="VM cache"):
        await AcrnHypervisor().from_grpc(HypervisorConfig(), b"{}")
    assert await running.get_thread_ids() == {}
    assert running.is_rate_limiter_builtin() is False
    await running.disconnect()
    await running.check()  # disconnect drops nothing the VM needs


async def test_capabilities_with_and_without_acrnctl(
    running: AcrnHypervisor, cfg: HypervisorConfig, tmp_path: Path
) -> None:
    caps = running.capabilities()
    assert Capability.BLOCK_DEVICE in caps
    assert Capability.BLOCK_DEVICE_HOTPLUG in caps
    assert Capability.PAUSE in caps
    assert Capability.CPU_HOTPLUG not in caps
    if os.path.exists(acrn.DEFAULT_ACRNCTL):
        pytest.skip("this host has a real acrnctl")
    cfg.boot.hypervisor_ctl_path = ""
    hv = _new(tmp_path / "pool2")
    await hv.create_sandbox("noctl", NetworkNamespace(), cfg)
    await hv.start_sandbox(timeout=10)
    try:
        assert hv.capabilities().names() == ["block_device"]
        await hv.check()  # acrn-dm alive is enough without acrnctl
        with pytest.raises(UnsupportedError, match="acrnctl"):
            await hv.pause_sandbox()
        with pytest.raises(UnsupportedError, match="acrnctl"):
            await hv.hotplug_add_device(BlockDrive(file=cfg.boot.image_path, id="d"))
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()


async def test_pause_failure_is_an_api_error(running: AcrnHypervisor, tmp_path: Path) -> None:
    broken = tmp_path / "broken-acrnctl"
    broken.write_text("#!/bin/sh\necho 'pause: VM not found' >&2\nexit 2\n")
    broken.chmod(0o755)
    running._ctl = str(broken)
    with pytest.raises(ApiError) as exc:
        await running.pause_sandbox()
    assert exc.value.status == 2
    assert "VM not found" in exc.value.reply
    assert running.state is VmState.RUNNING


# -- persisted state ---------------------------------------------------------------------------


async def test_save_load_and_reattach_from_another_driver(
    running: AcrnHypervisor, pool_dir: Path
) -> None:
    state = running.save()
    assert state.type == "acrn"
    assert state.uuid == U0
    assert state.pid == running.get_pids()[0]
    assert state.run_dir == str(running.paths.run_dir)
    assert HypervisorState.from_dict(state.to_dict()) == state
    loaded = _new(pool_dir)
    loaded.load(state)
    assert loaded.save() == state
    other = _new(pool_dir)
    await other.reattach(state, running.hypervisor_config())
    assert other.save() == state
    assert other.state is VmState.RUNNING
    await other.check()
    await other.stop_sandbox()
    _assert_gone(state.pid, other, pool_dir)
    await running.stop_sandbox()  # the original notices acrn-dm is gone
    assert running.state is VmState.STOPPED


async def test_load_refuses_another_driver_and_reattach_needs_the_process(
    pool_dir: Path,
) -> None:
    with pytest.raises(StateError):
        _new(pool_dir).load(HypervisorState(type="qemu"))
    hv = _new(pool_dir)
    mine = HypervisorState(type="acrn", uuid=U0, pid=os.getpid(), sandbox_id="x", run_dir="/r")
    with pytest.raises(HypervisorError, match="gone"):
        await hv.reattach(mine, _cfg())  # our pid is alive but it is not an acrn-dm with U0


async def test_stop_from_another_process_ends_acrn_dm(
    tmp_path: Path, cfg: HypervisorConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``vc stop`` in a new process: the Sandbox there adopts the running acrn-dm and stops
    it (it used to fail to adopt, record the sandbox stopped and leave acrn-dm running)."""
    from virtcontainers.persist import store as store_module
    from virtcontainers.persist.store import StateStore
    from virtcontainers.sandbox import Sandbox

    root = tmp_path / "vc-root"
    # The UUID pool lives in the store root; keep it private to this test.
    monkeypatch.setattr(store_module, "default_root", lambda: root)

    async def no_agent(self: Sandbox, deadline: float, timeout: float) -> None:
        return None  # the fake acrn-dm runs no guest agent

    monkeypatch.setattr(Sandbox, "_wait_for_agent", no_agent)
    starter = await Sandbox.create(cfg, id="acrn-x", hypervisor="acrn", store=StateStore(root))
    await starter.start(timeout=10, detach=True)
    pid = starter.hypervisor.get_pids()[0]
    try:
        other = await Sandbox.attach("acrn-x", store=StateStore(root))  # "another process"
        await other.stop(wait_only=False)
        assert not Path(f"/proc/{pid}").exists(), "acrn-dm survived vc stop"
        assert other.info().state == "stopped"
        assert UuidPool(root, scan=_no_scan).in_use() == {}
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
