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
    """Inverse of :func:`config_to_dict`.

    Raises:
        ConfigError: an unknown group or field, or a group, asset or param list that is not
            shaped as :func:`config_to_dict` writes it (a damaged state document).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be an object, not {type(data).__name__}", field="config")
    config = HypervisorConfig()
    for group_name, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(
                f"config group {group_name!r} must be an object, not {type(values).__name__}",
                field=str(group_name),
            )
        if group_name == "custom_assets":
            for kind, a in values.items():
                try:
                    t = AssetType(kind)
                    config.custom_assets[t] = Asset(t, str(a["path"]), str(a.get("sha512", "")))
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    raise ConfigError(
                        f"bad custom asset {kind!r}: {exc!r}", field=f"custom_assets.{kind}",
                        allowed=[t.value for t in AssetType],
                    ) from exc  # fmt: skip
            continue
        group = getattr(config, group_name, None)
        if group is None or not dataclasses.is_dataclass(group):
            raise ConfigError(f"unknown config group {group_name!r}", field=group_name)
        known = {f.name for f in dataclasses.fields(group)}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"unknown config field {group_name}.{name}", field=name)
            if name in _PARAM_LISTS:
                try:
                    value = [Param(str(k), str(v)) for k, v in value]
                except (ValueError, TypeError) as exc:
                    raise ConfigError(
                        f"{group_name}.{name} must be a list of [key, value] pairs: {exc}",
                        field=f"{group_name}.{name}",
                    ) from exc
            setattr(group, name, value)
    return config
