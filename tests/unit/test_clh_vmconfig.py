"""The Cloud Hypervisor driver's pure parts: VmConfig, device bodies, argv, config checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.behaviour.harness_clh import sim_config
from virtcontainers.config import Param
from virtcontainers.devices import (
    BlockDrive,
    FsShare,
    HybridVSock,
    NetDevice,
    SerialPort,
    VfioDevice,
    VhostUserDevice,
    VhostUserKind,
    VSock,
)
from virtcontainers.drivers.clh import CloudHypervisor
from virtcontainers.drivers.clh import vmconfig as vc
from virtcontainers.errors import ConfigError, HypervisorError, UnsupportedError
from virtcontainers.hypervisor import (
    Capability,
    HypervisorType,
    NetworkNamespace,
    VmState,
    new_hypervisor,
)


def test_registered_for_clh() -> None:
    assert isinstance(new_hypervisor("clh"), CloudHypervisor)
    assert CloudHypervisor.driver is HypervisorType.CLH


def test_kernel_cmdline(tmp_path: Path) -> None:
    cfg = sim_config(tmp_path)
    cfg.boot.kernel_params.append(Param("foo", "bar"))
    line = vc.kernel_cmdline(cfg)
    assert line.startswith("console=ttyS0 ")
    assert "vc.agent=vsock" in line.split()
    assert line.endswith("foo=bar")  # the user's parameters win by coming last
    assert "root=/dev/vda1" not in line
    cfg.boot.initrd_path = ""
    cfg.boot.image_path = str(tmp_path / "vmlinuz")
    assert "root=/dev/vda1" in vc.kernel_cmdline(cfg).split()


@pytest.mark.parametrize(
    ("bdf", "path"), [("0000:00:0a.0", "0a"), ("0000:00:01.0", "01"), ("0000:00:1f.0", "1f")]
)
def test_pci_path_from_bdf(bdf: str, path: str) -> None:
    assert vc.pci_path_from_bdf(bdf) == path


@pytest.mark.parametrize("bdf", ["", "0000:01:0a.0", "0000:00:0a.1", "0001:00:0a.0", "00:0a.0"])
def test_unexpected_bdf_is_an_error(bdf: str) -> None:
    with pytest.raises(HypervisorError, match="unexpected PCI address"):
        vc.pci_path_from_bdf(bdf)


def test_hotplug_size_is_the_rest_of_the_host_in_blocks() -> None:
    assert vc.hotplug_size_mib(512, 4096) == 3584
    assert vc.hotplug_size_mib(512, 4100) == 3584
    assert vc.hotplug_size_mib(4096, 2048) == 0


def test_rate_limiter_counts_bytes_per_second() -> None:
    assert vc.rate_limiter(0) is None
    assert vc.rate_limiter(8000) == {"bandwidth": {"size": 1000, "refill_time": 1000}}


def test_net_config_takes_the_stricter_limit_device_before_vm(tmp_path: Path) -> None:
    cfg = sim_config(tmp_path)
    cfg.network.tx_rate_limiter_max_rate = 800
    dev = NetDevice(id="e", tap_name="tap0", mac="02:00:00:00:00:01", queues=1)
    assert vc.net_config(dev, cfg)["rate_limiter_config"]["bandwidth"]["size"] == 100
    dev.rx_rate_limiter_max_rate, dev.tx_rate_limiter_max_rate = 16000, 8000
    body = vc.net_config(dev, cfg)
    assert body["rate_limiter_config"]["bandwidth"]["size"] == 1000
    assert body["num_queues"] == 2
    assert body["id"] == "net-e"
    cfg.network.tx_rate_limiter_max_rate = 0
    assert "rate_limiter_config" not in vc.net_config(NetDevice("x", "t", "m"), cfg)


def test_device_ids_are_deterministic() -> None:
    assert vc.device_id(BlockDrive(file="/f", id="d0")) == "disk-d0"
    assert vc.device_id(VfioDevice(bdf="0000:01:00.0")) == "vfio-0000:01:00.0"
    assert vc.vfio_config(VfioDevice(bdf="0000:01:00.0", id="g"))["path"] == (
        "/sys/bus/pci/devices/0000:01:00.0/"
    )


async def test_create_then_argv_and_vm_config(tmp_path: Path) -> None:
    cfg = sim_config(tmp_path)
    cfg.debugging.debug = True
    cfg.resources.virtio_mem = True
    hv = CloudHypervisor()
    await hv.create_sandbox("argv", NetworkNamespace(), cfg)
    try:
        argv = hv.build_argv()
        assert argv == [
            cfg.boot.hypervisor_path,
            "--api-socket",
            f"path={hv.paths.run_dir / 'clh-api.sock'}",
            "-v",
        ]
        body = hv.build_vm_config()
        assert body["memory"]["hotplug_method"] == "VirtioMem"
        assert body["payload"]["initramfs"] == cfg.boot.initrd_path
        assert body["rng"] == {"src": "/dev/urandom"}
        assert "disks" not in body
        assert hv.get_pids() == []
        assert hv.state is VmState.CREATED
    finally:
        await hv.stop_sandbox()
        await hv.cleanup()
    assert not hv.paths.run_dir.exists()


async def test_network_namespace_runs_the_vmm_through_nsenter(tmp_path: Path) -> None:
    hv = CloudHypervisor()
    await hv.create_sandbox("ns", NetworkNamespace("/run/netns/x"), sim_config(tmp_path))
    assert hv.build_argv()[:3] == ["nsenter", "--net=/run/netns/x", "--"]
    await hv.cleanup()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("shared_fs", "virtio-9p", "virtio-fs"),
        ("block_device_driver", "nvdimm", "block devices"),
        ("hypervisor_path", "/nonexistent/cloud-hypervisor", "not an executable"),
        ("kernel_path", "/nonexistent/vmlinuz", "does not exist"),
    ],
)
async def test_config_errors_before_any_process(
    tmp_path: Path, field: str, value: str, match: str
) -> None:
    cfg = sim_config(tmp_path)
    group = {
        "shared_fs": cfg.shared_fs,
        "block_device_driver": cfg.storage,
        "hypervisor_path": cfg.boot,
        "kernel_path": cfg.boot,
    }[field]
    setattr(group, field, value)
    hv = CloudHypervisor()
    with pytest.raises(ConfigError, match=match):
        await hv.create_sandbox("bad", NetworkNamespace(), cfg)
    assert hv.state is VmState.NEW


async def test_cold_plug_rules(tmp_path: Path) -> None:
    hv = CloudHypervisor()
    await hv.create_sandbox("cold", NetworkNamespace(), sim_config(tmp_path))
    with pytest.raises(UnsupportedError):
        await hv.add_device(SerialPort(id="s", name="n", host_path="/p"))
    with pytest.raises(UnsupportedError):
        await hv.add_device(VSock(context_id=3, port=1024))
    with pytest.raises(UnsupportedError):
        await hv.add_device(VhostUserDevice(socket_path="/s", id="v", type=VhostUserKind.SCSI))
    with pytest.raises(ConfigError, match="virtio_fs_daemon"):
        await hv.add_device(FsShare(host_path=str(tmp_path), mount_tag="t"))
    await hv.add_device(HybridVSock(uds_path=str(tmp_path / "v.sock"), port=1024, context_id=7))
    sock = await hv.generate_socket("cold")
    assert sock == HybridVSock(uds_path=str(tmp_path / "v.sock"), port=1024, context_id=7)
    assert hv.build_vm_config()["vsock"] == {"cid": 7, "socket": str(tmp_path / "v.sock")}
    await hv.cleanup()


def test_capabilities() -> None:
    caps = CloudHypervisor().capabilities()
    for cap in (
        Capability.BLOCK_DEVICE,
        Capability.BLOCK_DEVICE_HOTPLUG,
        Capability.NET_HOTPLUG,
        Capability.FS_SHARING,
        Capability.HYBRID_VSOCK,
        Capability.CPU_HOTPLUG,
        Capability.MEMORY_HOTPLUG,
        Capability.PAUSE,
        Capability.SAVE,
    ):
        assert cap in caps
    assert Capability.MULTI_QUEUE not in caps
    assert CloudHypervisor().is_rate_limiter_builtin()
