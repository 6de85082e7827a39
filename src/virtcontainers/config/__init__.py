"""Configuration: HypervisorConfig, parameters, assets, annotations and the Kata TOML loader."""

from virtcontainers.config.assets import Asset, AssetType
from virtcontainers.config.defaults import BlockDriver, SharedFs
from virtcontainers.config.hypervisor_config import (
    BootConfig,
    DebugConfig,
    DeviceConfig,
    HypervisorConfig,
    NetworkConfig,
    ResourceConfig,
    SecurityConfig,
    SharedFsConfig,
    StorageConfig,
    TemplateConfig,
)
from virtcontainers.config.params import Param, deserialize_params, serialize_params

__all__ = [
    "Asset",
    "AssetType",
    "BlockDriver",
    "BootConfig",
    "DebugConfig",
    "DeviceConfig",
    "HypervisorConfig",
    "NetworkConfig",
    "Param",
    "ResourceConfig",
    "SecurityConfig",
    "SharedFs",
    "SharedFsConfig",
    "StorageConfig",
    "TemplateConfig",
    "deserialize_params",
    "serialize_params",
]
