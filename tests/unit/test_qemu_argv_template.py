"""QEMU argv for VM templating, and the template config rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtcontainers.config import HypervisorConfig
from virtcontainers.drivers.qemu.argv import QemuPaths, build_argv
from virtcontainers.errors import ConfigError


def _config(tmp_path: Path) -> HypervisorConfig:
    cfg = HypervisorConfig()
    cfg.boot.kernel_path = str(tmp_path / "vmlinuz")
    cfg.boot.initrd_path = str(tmp_path / "initrd")
    cfg.resources.memory_size = 256
    return cfg


def _argv(cfg: HypervisorConfig, tmp_path: Path) -> list[str]:
    cfg.valid()
    return build_argv(
        cfg,
        binary="qemu-system-x86_64",
        sandbox_id="t",
        uuid="00000000-0000-0000-0000-000000000000",
        paths=QemuPaths(tmp_path),
        accel="tcg",
        host_memory_mb=4096,
    )


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def _sandbox_on(argv: list[str]) -> bool:
    return any(v.startswith("on,") for v in _values(argv, "-sandbox"))


def test_plain_vm_has_no_memory_backend_nor_incoming(tmp_path: Path) -> None:
    argv = _argv(_config(tmp_path), tmp_path)
    assert "-incoming" not in argv
    assert not any("memory-backend" in a for a in argv)
    assert _sandbox_on(argv)


def test_template_vm_shares_its_ram_with_the_file(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.template.boot_to_be_template = True
    cfg.template.memory_path = "/dev/shm/t/memory"
    argv = _argv(cfg, tmp_path)
    objects = _values(argv, "-object")
    assert "memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/t/memory,share=on" in objects
    machine = _values(argv, "-machine")[0].split(",")
    assert "memory-backend=ram0" in machine
    assert machine[0] == "q35"
    assert _values(argv, "-m")[0].startswith("256M,")
    assert "-incoming" not in argv
    assert _sandbox_on(argv)


def test_clone_maps_the_file_privately_and_waits_for_incoming(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.template.boot_from_template = True
    cfg.template.memory_path = "/dev/shm/t/memory"
    cfg.template.devices_state_path = "/dev/shm/t/state"
    argv = _argv(cfg, tmp_path)
    objects = _values(argv, "-object")
    assert "memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/t/memory,share=off" in objects
    assert "memory-backend=ram0" in _values(argv, "-machine")[0].split(",")
    assert _values(argv, "-incoming") == ["defer"]
    # The state path never reaches the command line: it goes in as a descriptor over QMP.
    assert not any("/dev/shm/t/state" in a for a in argv)
    assert _sandbox_on(argv)


def test_template_and_clone_differ_only_in_share_and_incoming(tmp_path: Path) -> None:
    template = _config(tmp_path)
    template.template.boot_to_be_template = True
    template.template.memory_path = "/m"
    clone = _config(tmp_path)
    clone.template.boot_from_template = True
    clone.template.memory_path = "/m"
    clone.template.devices_state_path = "/s"
    a, b = _argv(template, tmp_path), _argv(clone, tmp_path)
    b_without_incoming = [x for x in b if x not in ("-incoming", "defer")]
    assert [x.replace("share=on", "share=off") for x in a] == b_without_incoming


@pytest.mark.parametrize(
    ("to_be", "from_", "memory", "state", "field"),
    [
        (True, True, "/m", "/s", "template.boot_to_be_template"),
        (True, False, "", "", "template.memory_path"),
        (False, True, "", "/s", "template.memory_path"),
        (False, True, "/m", "", "template.devices_state_path"),
    ],
)
def test_check_template_config_errors(
    to_be: bool, from_: bool, memory: str, state: str, field: str
) -> None:
    cfg = HypervisorConfig()
    cfg.template.boot_to_be_template = to_be
    cfg.template.boot_from_template = from_
    cfg.template.memory_path = memory
    cfg.template.devices_state_path = state
    with pytest.raises(ConfigError) as err:
        cfg.check_template_config()
    assert err.value.field == field


@pytest.mark.parametrize(
    ("to_be", "from_", "memory", "state"),
    [(False, False, "", ""), (True, False, "/m", ""), (False, True, "/m", "/s")],
)
def test_check_template_config_accepts(to_be: bool, from_: bool, memory: str, state: str) -> None:
    cfg = HypervisorConfig()
    cfg.template.boot_to_be_template = to_be
    cfg.template.boot_from_template = from_
    cfg.template.memory_path = memory
    cfg.template.devices_state_path = state
    cfg.check_template_config()
