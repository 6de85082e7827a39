from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from virtcontainers.config import Asset, AssetType, HypervisorConfig, Param
from virtcontainers.config.defaults import max_qemu_vcpus
from virtcontainers.errors import AssetError, ConfigError


def _file(tmp_path: Path, name: str = "vmlinuz", data: bytes = b"kernel bytes") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _minimal() -> HypervisorConfig:
    config = HypervisorConfig()
    config.boot.kernel_path = "/boot/vmlinuz"
    config.boot.image_path = "/boot/rootfs.img"
    return config


# -- Asset.validate ----------------------------------------------------------------------


def test_relative_path_is_rejected() -> None:
    with pytest.raises(AssetError, match="must be absolute") as info:
        Asset(AssetType.KERNEL, "boot/vmlinuz").validate()
    assert info.value.asset == AssetType.KERNEL
    assert info.value.path == "boot/vmlinuz"


def test_empty_path_is_rejected() -> None:
    with pytest.raises(AssetError, match="empty path"):
        Asset(AssetType.IMAGE, "").validate()


def test_missing_file_with_hash_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="cannot read"):
        Asset(AssetType.KERNEL, str(tmp_path / "absent"), "ab" * 64).validate()


def test_matching_sha512_passes_in_any_case(tmp_path: Path) -> None:
    path = _file(tmp_path)
    digest = hashlib.sha512(b"kernel bytes").hexdigest()
    Asset(AssetType.KERNEL, str(path), digest).validate()
    Asset(AssetType.KERNEL, str(path), digest.upper()).validate()


def test_sha512_mismatch_is_rejected(tmp_path: Path) -> None:
    path = _file(tmp_path)
    wrong = hashlib.sha512(b"other bytes").hexdigest()
    with pytest.raises(AssetError, match="mismatch") as info:
        Asset(AssetType.KERNEL, str(path), wrong).validate()
    assert info.value.path == str(path)


def test_absolute_path_without_hash_needs_no_file(tmp_path: Path) -> None:
    Asset(AssetType.FIRMWARE, str(tmp_path / "not-yet-there")).validate()


# -- custom assets -----------------------------------------------------------------------


def test_custom_asset_overrides_configured_path(tmp_path: Path) -> None:
    config = _minimal()
    kernel = _file(tmp_path)
    config.add_custom_asset(
        Asset(AssetType.KERNEL, str(kernel), hashlib.sha512(b"kernel bytes").hexdigest())
    )
    assert config.kernel_asset_path() == str(kernel)
    assert config.custom_kernel_asset()
    # Other assets keep their configured paths.
    assert config.image_asset_path() == "/boot/rootfs.img"
    assert not config.custom_image_asset()


@pytest.mark.parametrize(
    ("kind", "getter"),
    [
        (AssetType.IMAGE, HypervisorConfig.image_asset_path),
        (AssetType.INITRD, HypervisorConfig.initrd_asset_path),
        (AssetType.HYPERVISOR, HypervisorConfig.hypervisor_asset_path),
        (AssetType.HYPERVISOR_CTL, HypervisorConfig.hypervisor_ctl_asset_path),
        (AssetType.JAILER, HypervisorConfig.jailer_asset_path),
        (AssetType.FIRMWARE, HypervisorConfig.firmware_asset_path),
    ],
)
def test_every_asset_kind_can_be_overridden(kind: AssetType, getter: object) -> None:
    config = _minimal()
    config.add_custom_asset(Asset(kind, f"/custom/{kind.value}"))
    assert callable(getter)
    assert getter(config) == f"/custom/{kind.value}"
    assert config.is_custom_asset(kind)


def test_none_or_empty_custom_asset_keeps_configured_path() -> None:
    config = _minimal()
    config.add_custom_asset(None)
    config.add_custom_asset(Asset(AssetType.KERNEL, ""))
    assert config.kernel_asset_path() == "/boot/vmlinuz"
    assert not config.custom_kernel_asset()


def test_invalid_custom_asset_is_not_recorded(tmp_path: Path) -> None:
    config = _minimal()
    with pytest.raises(AssetError):
        config.add_custom_asset(Asset(AssetType.KERNEL, str(_file(tmp_path)), "00" * 64))
    assert config.kernel_asset_path() == "/boot/vmlinuz"


def test_custom_kernel_satisfies_valid() -> None:
    config = HypervisorConfig()
    config.boot.initrd_path = "/boot/initrd"
    config.add_custom_asset(Asset(AssetType.KERNEL, "/custom/vmlinuz"))
    config.valid()


# -- HypervisorConfig.valid --------------------------------------------------------------


def test_valid_fills_reference_defaults() -> None:
    config = _minimal()
    config.valid()
    assert config.resources.num_vcpus == 1
    assert config.resources.memory_size == 2048
    assert config.devices.default_bridges == 1
    assert config.storage.block_device_driver == "virtio-scsi"
    assert config.shared_fs.msize_9p == 8192
    assert config.resources.default_max_vcpus == max_qemu_vcpus()


def test_valid_keeps_explicit_values() -> None:
    config = _minimal()
    config.resources.memory_size = 512
    config.devices.default_bridges = 3
    config.storage.block_device_driver = "virtio-blk"
    config.shared_fs.msize_9p = 1024
    config.valid()
    assert config.resources.memory_size == 512
    assert config.devices.default_bridges == 3
    assert config.storage.block_device_driver == "virtio-blk"
    assert config.shared_fs.msize_9p == 1024


def test_no_msize_default_with_virtio_fs() -> None:
    config = _minimal()
    config.shared_fs.shared_fs = "virtio-fs"
    config.valid()
    assert config.shared_fs.msize_9p == 0


def test_missing_kernel_is_an_error() -> None:
    config = HypervisorConfig()
    config.boot.image_path = "/boot/rootfs.img"
    with pytest.raises(ConfigError, match="kernel") as info:
        config.valid()
    assert info.value.field == "boot.kernel_path"


def test_missing_image_and_initrd_is_an_error() -> None:
    config = HypervisorConfig()
    config.boot.kernel_path = "/boot/vmlinuz"
    with pytest.raises(ConfigError, match="image and initrd"):
        config.valid()


def test_initrd_alone_is_enough() -> None:
    config = HypervisorConfig()
    config.boot.kernel_path = "/boot/vmlinuz"
    config.boot.initrd_path = "/boot/initrd"
    config.valid()


@pytest.mark.parametrize("mib", [1, 128, 255])
def test_memory_below_minimum_is_an_error(mib: int) -> None:
    config = _minimal()
    config.resources.memory_size = mib
    with pytest.raises(ConfigError, match="minimum") as info:
        config.valid()
    assert info.value.field == "resources.memory_size"


def test_memory_at_minimum_is_accepted() -> None:
    config = _minimal()
    config.resources.memory_size = 256
    config.valid()


def test_template_to_be_and_from_are_exclusive() -> None:
    config = _minimal()
    config.template.boot_to_be_template = True
    config.template.boot_from_template = True
    config.template.memory_path = "/run/template/memory"
    config.template.devices_state_path = "/run/template/state"
    with pytest.raises(ConfigError, match="both"):
        config.valid()


@pytest.mark.parametrize("flag", ["boot_to_be_template", "boot_from_template"])
def test_template_needs_memory_path(flag: str) -> None:
    config = _minimal()
    setattr(config.template, flag, True)
    config.template.devices_state_path = "/run/template/state"
    with pytest.raises(ConfigError, match="memory_path"):
        config.valid()


def test_from_template_needs_devices_state_path() -> None:
    config = _minimal()
    config.template.boot_from_template = True
    config.template.memory_path = "/run/template/memory"
    with pytest.raises(ConfigError, match="devices_state_path"):
        config.valid()


def test_to_be_template_with_memory_path_is_valid() -> None:
    config = _minimal()
    config.template.boot_to_be_template = True
    config.template.memory_path = "/run/template/memory"
    config.valid()


def test_unknown_block_driver_is_an_error() -> None:
    config = _minimal()
    config.storage.block_device_driver = "floppy"
    with pytest.raises(ConfigError, match="floppy") as info:
        config.valid()
    assert "virtio-blk" in info.value.allowed


def test_add_kernel_param_rejects_empty_key() -> None:
    config = _minimal()
    with pytest.raises(ConfigError):
        config.add_kernel_param(Param("", "x"))
    config.add_kernel_param(Param("quiet"))
    assert config.boot.kernel_params == [Param("quiet")]
