"""HypervisorConfig: every field of the reference, grouped by concern.

The reference keeps ~80 loose fields in one struct. Here they live in small groups
(``boot``, ``resources``, ``devices``, ``storage``, ``shared_fs``, ``network``,
``security``, ``template``, ``debugging``) under their reference names in snake_case, so a
Kata engineer finds ``config.resources.memory_size`` where Go had ``MemorySize``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from virtcontainers.config.assets import Asset, AssetType
from virtcontainers.config.defaults import (
    DEFAULT_BLOCK_DRIVER,
    DEFAULT_BRIDGES,
    DEFAULT_MEMORY_MIB,
    DEFAULT_MSIZE_9P,
    DEFAULT_VCPUS,
    MIN_HYPERVISOR_MEMORY_MIB,
    BlockDriver,
    SharedFs,
    max_qemu_vcpus,
)
from virtcontainers.config.params import Param
from virtcontainers.errors import ConfigError

__all__ = [
    "BootConfig",
    "DebugConfig",
    "DeviceConfig",
    "HypervisorConfig",
    "NetworkConfig",
    "ResourceConfig",
    "SecurityConfig",
    "SharedFsConfig",
    "StorageConfig",
    "TemplateConfig",
]


@dataclass
class BootConfig:
    """What the VM boots: assets, command lines, machine."""

    kernel_path: str = ""
    image_path: str = ""
    #: ``image_path`` and ``initrd_path`` are alternatives (the reference's rule).
    initrd_path: str = ""
    firmware_path: str = ""
    pflash: list[str] = field(default_factory=list)
    hypervisor_path: str = ""
    hypervisor_ctl_path: str = ""
    jailer_path: str = ""
    kernel_params: list[Param] = field(default_factory=list)
    hypervisor_params: list[Param] = field(default_factory=list)
    hypervisor_machine_type: str = ""
    machine_accelerators: str = ""
    cpu_features: str = ""
    entropy_source: str = ""
    guest_hook_path: str = ""
    disable_image_nvdimm: bool = False


@dataclass
class ResourceConfig:
    """vCPUs and memory."""

    num_vcpus: int = 0
    default_max_vcpus: int = 0
    #: MiB.
    memory_size: int = 0
    mem_slots: int = 0
    #: MiB of address space reserved for NVDIMM devices.
    mem_offset: int = 0
    mem_prealloc: bool = False
    huge_pages: bool = False
    virtio_mem: bool = False
    file_backed_mem_root_dir: str = ""
    realtime: bool = False
    #: Only meaningful with ``realtime``; False lets VM memory be swapped out.
    mlock: bool = False
    #: Bytes of SGX EPC; 0 disables SGX.
    sgx_epc_size: int = 0


@dataclass
class DeviceConfig:
    """Buses and device plumbing."""

    default_bridges: int = 0
    pcie_root_port: int = 0
    hotplug_vfio_on_root_bus: bool = False
    iommu: bool = False
    iommu_platform: bool = False
    disable_vhost_net: bool = False
    enable_vhost_user_store: bool = False
    vhost_user_store_path: str = ""


@dataclass
class StorageConfig:
    """Block devices."""

    block_device_driver: str = ""
    block_device_cache_set: bool = False
    block_device_cache_direct: bool = False
    block_device_cache_noflush: bool = False
    disable_block_device_use: bool = False
    enable_io_threads: bool = False


@dataclass
class SharedFsConfig:
    """Host directories shared into the guest."""

    shared_fs: str = ""
    msize_9p: int = 0
    virtio_fs_daemon: str = ""
    virtio_fs_cache: str = ""
    #: DAX window in MiB.
    virtio_fs_cache_size: int = 0
    virtio_fs_extra_args: list[str] = field(default_factory=list)


@dataclass
class NetworkConfig:
    """VM-level network rate limits, bits per second (0 = unlimited)."""

    rx_rate_limiter_max_rate: int = 0
    tx_rate_limiter_max_rate: int = 0


@dataclass
class SecurityConfig:
    """What annotations may change, and process confinement."""

    #: Annotation names (without the ``io.katacontainers.config.hypervisor.`` prefix) or
    #: regular expressions that are allowed to override this config.
    enable_annotations: list[str] = field(default_factory=list)
    hypervisor_path_list: list[str] = field(default_factory=list)
    hypervisor_ctl_path_list: list[str] = field(default_factory=list)
    jailer_path_list: list[str] = field(default_factory=list)
    virtio_fs_daemon_list: list[str] = field(default_factory=list)
    file_backed_mem_root_list: list[str] = field(default_factory=list)
    vhost_user_store_path_list: list[str] = field(default_factory=list)
    selinux_process_label: str = ""
    disable_nesting_checks: bool = False


@dataclass
class TemplateConfig:
    """VM templating (factory)."""

    boot_to_be_template: bool = False
    boot_from_template: bool = False
    memory_path: str = ""
    devices_state_path: str = ""
    #: Id of the factory VM this hypervisor was created for; "" when not from a factory.
    vm_id: str = ""


@dataclass
class DebugConfig:
    """Debug output and guest memory dumps."""

    debug: bool = False
    guest_memory_dump_path: str = ""
    guest_memory_dump_paging: bool = False


@dataclass
class HypervisorConfig:
    """The configuration of one VM, shared by every driver.

    Call :meth:`valid` before use: it fills the reference's defaults and rejects
    inconsistent settings.
    """

    boot: BootConfig = field(default_factory=BootConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    devices: DeviceConfig = field(default_factory=DeviceConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    shared_fs: SharedFsConfig = field(default_factory=SharedFsConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    debugging: DebugConfig = field(default_factory=DebugConfig)
    #: Assets that take precedence over the configured paths (from annotations or callers).
    custom_assets: dict[AssetType, Asset] = field(default_factory=dict)

    # -- validation ---------------------------------------------------------------------

    def check_template_config(self) -> None:
        """Raises ConfigError when the templating fields contradict each other."""
        t = self.template
        if t.boot_to_be_template and t.boot_from_template:
            raise ConfigError(
                "cannot set both 'to be' and 'from' VM template",
                field="template.boot_to_be_template",
            )
        if (t.boot_to_be_template or t.boot_from_template) and not t.memory_path:
            raise ConfigError("missing memory_path for VM template", field="template.memory_path")
        if t.boot_from_template and not t.devices_state_path:
            raise ConfigError(
                "missing devices_state_path to load from VM template",
                field="template.devices_state_path",
            )

    def valid(self) -> None:
        """Check the config and fill the reference's defaults in place.

        Raises:
            ConfigError: no kernel; neither image nor initrd; contradictory template settings;
                memory below the 256 MiB minimum; unknown block driver or shared fs.
        """
        if not self.kernel_asset_path():
            raise ConfigError("missing kernel path", field="boot.kernel_path")
        if not self.image_asset_path() and not self.initrd_asset_path():
            raise ConfigError(
                "missing image and initrd path: set one of them",
                field="boot.image_path",
            )
        self.check_template_config()
        r = self.resources
        if r.num_vcpus <= 0:
            r.num_vcpus = DEFAULT_VCPUS
        if r.memory_size <= 0:
            r.memory_size = DEFAULT_MEMORY_MIB
        if r.memory_size < MIN_HYPERVISOR_MEMORY_MIB:
            raise ConfigError(
                f"memory_size {r.memory_size} MiB is below the minimum of "
                f"{MIN_HYPERVISOR_MEMORY_MIB} MiB",
                field="resources.memory_size",
            )
        if self.devices.default_bridges <= 0:
            self.devices.default_bridges = DEFAULT_BRIDGES
        if not self.storage.block_device_driver:
            self.storage.block_device_driver = DEFAULT_BLOCK_DRIVER
        _check_choice(self.storage.block_device_driver, BlockDriver, "storage.block_device_driver")
        if r.default_max_vcpus <= 0:
            r.default_max_vcpus = max_qemu_vcpus()
        if r.num_vcpus > r.default_max_vcpus:
            raise ConfigError(
                f"num_vcpus {r.num_vcpus} exceeds default_max_vcpus {r.default_max_vcpus}",
                field="resources.num_vcpus",
            )
        if self.shared_fs.shared_fs:
            _check_choice(self.shared_fs.shared_fs, SharedFs, "shared_fs.shared_fs")
        if self.shared_fs.msize_9p <= 0 and self.shared_fs.shared_fs != SharedFs.VIRTIO_FS:
            self.shared_fs.msize_9p = DEFAULT_MSIZE_9P

    def add_kernel_param(self, param: Param) -> None:
        """Append a guest kernel parameter. Raises ConfigError for an empty key."""
        if not param.key:
            raise ConfigError("empty kernel parameter key", field="boot.kernel_params")
        self.boot.kernel_params.append(param)

    # -- assets -------------------------------------------------------------------------

    def add_custom_asset(self, asset: Asset | None) -> None:
        """Let ``asset`` override the configured path of its type.

        ``None`` or an empty path means "keep the configured one".

        Raises:
            AssetError: the asset's path is relative or missing, or its hash does not match.
        """
        if asset is None or not asset.path:
            return
        asset.validate()
        self.custom_assets[asset.type] = asset

    def asset_path(self, kind: AssetType) -> str:
        """The path for ``kind``: the custom asset if any, else the configured path."""
        custom = self.custom_assets.get(kind)
        if custom is not None:
            return custom.path
        b = self.boot
        configured = {
            AssetType.KERNEL: b.kernel_path,
            AssetType.IMAGE: b.image_path,
            AssetType.INITRD: b.initrd_path,
            AssetType.HYPERVISOR: b.hypervisor_path,
            AssetType.HYPERVISOR_CTL: b.hypervisor_ctl_path,
            AssetType.JAILER: b.jailer_path,
            AssetType.FIRMWARE: b.firmware_path,
        }
        return configured[kind]

    def is_custom_asset(self, kind: AssetType) -> bool:
        return kind in self.custom_assets

    def kernel_asset_path(self) -> str:
        return self.asset_path(AssetType.KERNEL)

    def image_asset_path(self) -> str:
        return self.asset_path(AssetType.IMAGE)

    def initrd_asset_path(self) -> str:
        return self.asset_path(AssetType.INITRD)

    def hypervisor_asset_path(self) -> str:
        return self.asset_path(AssetType.HYPERVISOR)

    def hypervisor_ctl_asset_path(self) -> str:
        return self.asset_path(AssetType.HYPERVISOR_CTL)

    def jailer_asset_path(self) -> str:
        return self.asset_path(AssetType.JAILER)

    def firmware_asset_path(self) -> str:
        return self.asset_path(AssetType.FIRMWARE)

    def custom_kernel_asset(self) -> bool:
        return self.is_custom_asset(AssetType.KERNEL)

    def custom_image_asset(self) -> bool:
        return self.is_custom_asset(AssetType.IMAGE)

    def custom_initrd_asset(self) -> bool:
        return self.is_custom_asset(AssetType.INITRD)

    def custom_hypervisor_asset(self) -> bool:
        return self.is_custom_asset(AssetType.HYPERVISOR)

    def if_pv_panic_enabled(self) -> bool:
        """A guest memory dump path turns on the pvpanic device."""
        return bool(self.debugging.guest_memory_dump_path)

    def copy(self) -> HypervisorConfig:
        """A deep copy, so drivers never alias the caller's lists."""
        return copy.deepcopy(self)


def _check_choice(value: str, choices: type[BlockDriver] | type[SharedFs], name: str) -> None:
    allowed = [c.value for c in choices]
    if value not in allowed:
        raise ConfigError(f"unknown value {value!r} for {name}", field=name, allowed=allowed)
