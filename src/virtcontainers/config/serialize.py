"""HypervisorConfig to and from plain JSON-ready dicts (for the state store)."""

from __future__ import annotations

import dataclasses
from typing import Any

from virtcontainers.config.assets import Asset, AssetType
from virtcontainers.config.hypervisor_config import HypervisorConfig
from virtcontainers.config.params import Param
from virtcontainers.errors import ConfigError

__all__ = ["config_from_dict", "config_to_dict"]

_PARAM_LISTS = ("kernel_params", "hypervisor_params")


def config_to_dict(config: HypervisorConfig) -> dict[str, object]:
    """Every group as a dict; params as ``[key, value]`` pairs; custom assets by type."""
    out: dict[str, object] = {}
    for group in dataclasses.fields(config):
        value = getattr(config, group.name)
        if group.name == "custom_assets":
            out[group.name] = {
                kind.value: {"path": a.path, "sha512": a.sha512} for kind, a in value.items()
            }
            continue
        d = dataclasses.asdict(value)
        for name in _PARAM_LISTS:
            if name in d:
                d[name] = [[p.key, p.value] for p in getattr(value, name)]
        out[group.name] = d
    return out


def config_from_dict(data: dict[str, Any]) -> HypervisorConfig:
    """Inverse of :func:`config_to_dict`. Unknown groups or fields raise ConfigError."""
    config = HypervisorConfig()
    for group_name, values in data.items():
        if group_name == "custom_assets":
            for kind, a in dict(values).items():
                t = AssetType(kind)
                config.custom_assets[t] = Asset(t, str(a["path"]), str(a.get("sha512", "")))
            continue
        group = getattr(config, group_name, None)
        if group is None or not dataclasses.is_dataclass(group):
            raise ConfigError(f"unknown config group {group_name!r}", field=group_name)
        known = {f.name for f in dataclasses.fields(group)}
        for name, value in dict(values).items():
            if name not in known:
                raise ConfigError(f"unknown config field {group_name}.{name}", field=name)
            if name in _PARAM_LISTS:
                value = [Param(str(k), str(v)) for k, v in value]
            setattr(group, name, value)
    return config
