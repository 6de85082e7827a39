from __future__ import annotations

import json

import pytest

from virtcontainers.config import Asset, AssetType, HypervisorConfig, Param
from virtcontainers.config.serialize import config_from_dict, config_to_dict
from virtcontainers.errors import ConfigError


def test_round_trip_through_json_keeps_every_group() -> None:
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = "/k"
    cfg.boot.kernel_params = [Param("quiet"), Param("a", "b=c")]
    cfg.resources.memory_size = 768
    cfg.security.enable_annotations = ["kernel"]
    cfg.template.boot_from_template = True
    cfg.custom_assets[AssetType.INITRD] = Asset(AssetType.INITRD, "/i", "ab" * 64)
    back = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert back == cfg


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"boot\.colour"):
        config_from_dict({"boot": {"colour": "red"}})
    with pytest.raises(ConfigError, match="unknown config group"):
        config_from_dict({"flavour": {}})
