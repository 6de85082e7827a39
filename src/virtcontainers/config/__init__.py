"""Configuration: HypervisorConfig, parameters, assets, annotations and the Kata TOML loader.

The Kata loader lives in :mod:`virtcontainers.config.kata` (``load_kata_config``); it is not
re-exported here because it needs :mod:`virtcontainers.hypervisor`, which imports this package.
"""

from virtcontainers.config.annotations import apply_annotations
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
    "apply_annotations",
    "deserialize_params",
    "serialize_params",
]
