"""Every field and method of the reference has a counterpart, by its snake_case name.

Names are read from the reference itself (../shared/seed), so nothing is forgotten.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from virtcontainers.config import HypervisorConfig
from virtcontainers.hypervisor import Hypervisor

SEED = "seed/000_de454d00ddf4eefe.txt"
# Acronym-heavy names whose mechanical split is wrong.
RENAMED = {
    "NumVCPUs": "num_vcpus",
    "DefaultMaxVCPUs": "default_max_vcpus",
    "Msize9p": "msize_9p",
    "VirtioFSCacheSize": "virtio_fs_cache_size",
    "VMid": "vm_id",
    "PFlash": "pflash",
    "SGXEPCSize": "sgx_epc_size",
    "SELinuxProcessLabel": "selinux_process_label",
    "HotplugVFIOOnRootBus": "hotplug_vfio_on_root_bus",
    "PCIeRootPort": "pcie_root_port",
    "IOMMUPlatform": "iommu_platform",
    "IOMMU": "iommu",
    "EnableIOThreads": "enable_io_threads",
    "resizeVCPUs": "resize_vcpus",
    "getThreadIDs": "get_thread_ids",
    "fromGrpc": "from_grpc",
    "toGrpc": "to_grpc",
}


def snake(name: str) -> str:
    if name in RENAMED:
        return RENAMED[name]
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return name.replace("F_S", "FS").lower().replace("virtio_f_s", "virtio_fs")


def _block(text: str, start: str) -> str:
    body = text[text.index(start) :] + "\n"
    return body[: body.index("\n}\n")]


def reference_config_fields(seed: str) -> list[str]:
    block = _block(seed, "type HypervisorConfig struct {")
    return re.findall(r"^([A-Za-z]\w*)\s+[\[\]\w.*]+", block, re.M)[1:]  # drop "type"


def reference_methods(seed: str) -> list[str]:
    block = _block(seed, "type hypervisor interface {")
    return re.findall(r"^(\w+)\(", block, re.M)


def config_field_names() -> set[str]:
    cfg = HypervisorConfig()
    names = {f.name for f in dataclasses.fields(cfg)}
    for group in dataclasses.fields(cfg):
        value = getattr(cfg, group.name)
        if dataclasses.is_dataclass(value):
            names |= {f.name for f in dataclasses.fields(value)}
    return names


def test_every_reference_config_field_exists(shared_dir: Path) -> None:
    fields = reference_config_fields((shared_dir / SEED).read_text())
    assert len(fields) == 68, fields
    ours = config_field_names()
    missing = [f"{f} -> {snake(f)}" for f in fields if snake(f) not in ours]
    assert not missing


def test_every_reference_interface_method_exists(shared_dir: Path) -> None:
    methods = reference_methods((shared_dir / SEED).read_text())
    assert len(methods) == 26, methods
    missing = [m for m in methods if not callable(getattr(Hypervisor, snake(m), None))]
    assert not missing


def test_every_reference_config_method_exists(shared_dir: Path) -> None:
    seed = (shared_dir / SEED).read_text()
    methods = re.findall(r"^func \(conf \*HypervisorConfig\) (\w+)\(", seed, re.M)
    ours = {snake(m).removeprefix("_") for m in methods}
    # valid/add_kernel_param/add_custom_asset/asset_path/... all public here.
    missing = [m for m in ours if not callable(getattr(HypervisorConfig, m, None))]
    assert not missing
