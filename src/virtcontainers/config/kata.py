"""Load a Kata Containers ``configuration-<hypervisor>.toml`` into a HypervisorConfig.

For users migrating from Kata: every key of the ``[hypervisor.<type>]`` table that has a
counterpart is mapped (with Kata's load-time semantics, e.g. ``default_vcpus < 0`` meaning
"all host CPUs"); everything else is returned in :attr:`KataConfig.ignored` with the
reason, never silently dropped. Paths are not checked for existence here: a file written
for another machine still loads, and missing binaries are reported when they are used.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtcontainers.config.defaults import (
    DEFAULT_MEMORY_MIB,
    MIN_HYPERVISOR_MEMORY_MIB,
    BlockDriver,
    SharedFs,
    default_max_vcpus,
    max_qemu_vcpus,
)
from virtcontainers.config.hypervisor_config import HypervisorConfig
from virtcontainers.config.params import deserialize_params
from virtcontainers.errors import ConfigError
from virtcontainers.hypervisor import HypervisorType

__all__ = ["IgnoredKey", "KataConfig", "load_kata_config"]

log = logging.getLogger(__name__)

#: Kata's cap on cold-plugged PCI bridges; larger values are clamped, as Kata does.
MAX_PCI_BRIDGES = 5
#: Kata's default when ``memory_slots`` is unset or 0.
DEFAULT_MEM_SLOTS = 10

_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_NOT_HYPERVISOR = "not a hypervisor setting"
_FACTORY = "factory setting: see virtcontainers.factory"
#: Top-level sections of a Kata file that configure something other than the VM.
_OTHER_SECTIONS = {
    "agent": _NOT_HYPERVISOR,
    "runtime": _NOT_HYPERVISOR,
    "netmon": _NOT_HYPERVISOR,
    "proxy": _NOT_HYPERVISOR,
    "shim": _NOT_HYPERVISOR,
    "image": _NOT_HYPERVISOR,
    "factory": _FACTORY,
}
#: Hypervisor keys Kata knows (in some version) that have no counterpart here.
_NO_COUNTERPART = {
    "use_vsock": "the agent is always reached over vsock (Kata 2.0 removed the option)",
    "confidential_guest": "confidential guests are not supported",
    "valid_entropy_sources": "the entropy_source annotation is not path-restricted here",
}


@dataclass(frozen=True, slots=True)
class IgnoredKey:
    """A key of the file that did not reach the HypervisorConfig, and why."""

    #: ``section.key``, e.g. ``hypervisor.qemu.use_vsock`` or ``runtime.experimental``.
    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class KataConfig:
    """The result of :func:`load_kata_config`."""

    hypervisor_type: HypervisorType
    #: Already checked with :meth:`HypervisorConfig.valid` (defaults filled in).
    config: HypervisorConfig
    ignored: tuple[IgnoredKey, ...]


# -- typed access to raw TOML values ------------------------------------------------------


class _Section:
    """One ``[hypervisor.<type>]`` table with typed getters that name ``file:section.key``
    in their errors."""

    def __init__(self, file_name: str, section: str, table: Mapping[str, object]) -> None:
        self.file_name = file_name
        self.section = section
        self.table = table

    def where(self, key: str) -> str:
        return f"{self.file_name}:{self.section}.{key}"

    def error(self, key: str, message: str) -> ConfigError:
        where = self.where(key)
        return ConfigError(f"{where}: {message}", field=where)

    def _wrong_type(self, key: str, expected: str, value: object) -> ConfigError:
        return self.error(key, f"expected {expected}, got {_toml_type(value)} {value!r}")

    def get_str(self, key: str) -> str:
        value = self.table.get(key, "")
        if not isinstance(value, str):
            raise self._wrong_type(key, "a string", value)
        return value

    def get_bool(self, key: str) -> bool:
        value = self.table.get(key, False)
        if not isinstance(value, bool):
            raise self._wrong_type(key, "a boolean", value)
        return value

    def get_int(self, key: str, low: int, high: int) -> int:
        value = self.table.get(key, 0)
        expected = (
            f"a non-negative integer (at most {high})"
            if low == 0
            else f"an integer in [{low}, {high}]"
        )
        # bool is an int subclass in Python; TOML keeps them apart.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong_type(key, expected, value)
        if not low <= value <= high:
            raise self.error(key, f"expected {expected}, got {value}")
        return value

    def get_uint32(self, key: str) -> int:
        return self.get_int(key, 0, _UINT32_MAX)

    def get_str_list(self, key: str) -> list[str]:
        value = self.table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._wrong_type(key, "an array of strings", value)
        return [str(v) for v in value]


def _toml_type(value: object) -> str:
    for kind, name in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "float"),
        (str, "string"),
        (list, "array"),
        (dict, "table"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


# -- Kata's load-time semantics ----------------------------------------------------------


def _default_vcpus(requested: int) -> int:
    """Kata (defaultVCPUs): 0 means 1; negative or more than the host has (capped by the
    VMM's vCPU limit, getCurrentCpuNum) means that many."""
    host = min(os.cpu_count() or 1, max_qemu_vcpus())
    if requested < 0 or requested > host:
        return host
    return requested or 1


def _comma_list(value: str) -> str:
    """Kata trims each item of a comma-separated list and drops the empty ones."""
    return ",".join(item.strip() for item in value.split(",") if item.strip())


# -- mapping table -------------------------------------------------------------------------

_Apply = Callable[[_Section, str, HypervisorConfig], None]


def _to(group: str, name: str, read: Callable[[_Section, str], object]) -> _Apply:
    def apply(section: _Section, key: str, config: HypervisorConfig) -> None:
        setattr(getattr(config, group), name, read(section, key))

    return apply


def _string(s: _Section, k: str) -> object:
    return s.get_str(k)


def _boolean(s: _Section, k: str) -> object:
    return s.get_bool(k)


def _u32(s: _Section, k: str) -> object:
    return s.get_uint32(k)


def _u64(s: _Section, k: str) -> object:
    return s.get_int(k, 0, _UINT64_MAX)


def _strings(s: _Section, k: str) -> object:
    return s.get_str_list(k)


def _commas(s: _Section, k: str) -> object:
    return _comma_list(s.get_str(k))


def _kernel_params(s: _Section, k: str, c: HypervisorConfig) -> None:
    c.boot.kernel_params = deserialize_params(s.get_str(k).split())


def _vcpus(s: _Section, k: str, c: HypervisorConfig) -> None:
    c.resources.num_vcpus = _default_vcpus(s.get_int(k, _INT32_MIN, _INT32_MAX))


def _max_vcpus(s: _Section, k: str, c: HypervisorConfig) -> None:
    c.resources.default_max_vcpus = default_max_vcpus(s.get_uint32(k))


def _memory(s: _Section, k: str, c: HypervisorConfig) -> None:
    """Kata (defaultMemSz): below the 256 MiB minimum, a file gets the default. (An
    annotation below it is an error: see config/annotations.py.)"""
    mib = s.get_uint32(k)
    if 0 < mib < MIN_HYPERVISOR_MEMORY_MIB:
        log.warning(
            "%s = %d MiB is below the minimum of %d MiB: using the default of %d MiB, as Kata does",
            s.where(k), mib, MIN_HYPERVISOR_MEMORY_MIB, DEFAULT_MEMORY_MIB,
        )  # fmt: skip
        mib = 0
    c.resources.memory_size = mib or DEFAULT_MEMORY_MIB


def _mem_slots(s: _Section, k: str, c: HypervisorConfig) -> None:
    c.resources.mem_slots = s.get_uint32(k) or DEFAULT_MEM_SLOTS


def _bridges(s: _Section, k: str, c: HypervisorConfig) -> None:
    bridges = s.get_uint32(k)
    if bridges > MAX_PCI_BRIDGES:
        log.warning("%s = %d: clamped to %d PCI bridges", s.where(k), bridges, MAX_PCI_BRIDGES)
        bridges = MAX_PCI_BRIDGES
    c.devices.default_bridges = bridges


def _swap(s: _Section, k: str, c: HypervisorConfig) -> None:
    # Kata: allowing VM memory to be swapped out means not locking it.
    c.resources.mlock = not s.get_bool(k)


def _choice(group: str, name: str, choices: list[str]) -> _Apply:
    def apply(section: _Section, key: str, config: HypervisorConfig) -> None:
        value = section.get_str(key)
        if value and value not in choices:
            where = section.where(key)
            raise ConfigError(f"{where}: unknown value {value!r}", field=where, allowed=choices)
        setattr(getattr(config, group), name, value)

    return apply


def _enable_annotations(s: _Section, k: str, c: HypervisorConfig) -> None:
    patterns = s.get_str_list(k)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise s.error(k, f"{pattern!r} is not a valid regular expression: {exc}") from exc
    c.security.enable_annotations = patterns


def _sgx_epc_size(s: _Section, k: str, c: HypervisorConfig) -> None:
    c.resources.sgx_epc_size = s.get_int(k, 0, _INT64_MAX)


_KEYS: dict[str, _Apply] = {
    # boot assets and command lines
    "path": _to("boot", "hypervisor_path", _string),
    "ctlpath": _to("boot", "hypervisor_ctl_path", _string),
    "jailer_path": _to("boot", "jailer_path", _string),
    "kernel": _to("boot", "kernel_path", _string),
    "image": _to("boot", "image_path", _string),
    "initrd": _to("boot", "initrd_path", _string),
    "firmware": _to("boot", "firmware_path", _string),
    "pflashes": _to("boot", "pflash", _strings),
    "kernel_params": _kernel_params,
    "machine_type": _to("boot", "hypervisor_machine_type", _string),
    "machine_accelerators": _to("boot", "machine_accelerators", _commas),
    "cpu_features": _to("boot", "cpu_features", _commas),
    "entropy_source": _to("boot", "entropy_source", _string),
    "guest_hook_path": _to("boot", "guest_hook_path", _string),
    "disable_image_nvdimm": _to("boot", "disable_image_nvdimm", _boolean),
    # cpu and memory
    "default_vcpus": _vcpus,
    "default_maxvcpus": _max_vcpus,
    "default_memory": _memory,
    "memory_slots": _mem_slots,
    "memory_offset": _to("resources", "mem_offset", _u64),  # Kata: uint64
    "enable_mem_prealloc": _to("resources", "mem_prealloc", _boolean),
    "enable_hugepages": _to("resources", "huge_pages", _boolean),
    "enable_virtio_mem": _to("resources", "virtio_mem", _boolean),
    "enable_swap": _swap,
    "file_mem_backend": _to("resources", "file_backed_mem_root_dir", _string),
    "sgx_epc_size": _sgx_epc_size,
    # devices
    "default_bridges": _bridges,
    "pcie_root_port": _to("devices", "pcie_root_port", _u32),
    "hotplug_vfio_on_root_bus": _to("devices", "hotplug_vfio_on_root_bus", _boolean),
    "enable_iommu": _to("devices", "iommu", _boolean),
    "enable_iommu_platform": _to("devices", "iommu_platform", _boolean),
    "disable_vhost_net": _to("devices", "disable_vhost_net", _boolean),
    "enable_vhost_user_store": _to("devices", "enable_vhost_user_store", _boolean),
    "vhost_user_store_path": _to("devices", "vhost_user_store_path", _string),
    # storage
    "block_device_driver": _choice(
        "storage", "block_device_driver", [d.value for d in BlockDriver]
    ),
    "block_device_cache_set": _to("storage", "block_device_cache_set", _boolean),
    "block_device_cache_direct": _to("storage", "block_device_cache_direct", _boolean),
    "block_device_cache_noflush": _to("storage", "block_device_cache_noflush", _boolean),
    "disable_block_device_use": _to("storage", "disable_block_device_use", _boolean),
    "enable_iothreads": _to("storage", "enable_io_threads", _boolean),
    # shared file system
    "shared_fs": _choice("shared_fs", "shared_fs", [f.value for f in SharedFs]),
    "msize_9p": _to("shared_fs", "msize_9p", _u32),
    "virtio_fs_daemon": _to("shared_fs", "virtio_fs_daemon", _string),
    "virtio_fs_cache": _to("shared_fs", "virtio_fs_cache", _string),
    "virtio_fs_cache_size": _to("shared_fs", "virtio_fs_cache_size", _u32),
    "virtio_fs_extra_args": _to("shared_fs", "virtio_fs_extra_args", _strings),
    # network
    "rx_rate_limiter_max_rate": _to("network", "rx_rate_limiter_max_rate", _u64),
    "tx_rate_limiter_max_rate": _to("network", "tx_rate_limiter_max_rate", _u64),
    # what annotations may change
    "enable_annotations": _enable_annotations,
    "valid_hypervisor_paths": _to("security", "hypervisor_path_list", _strings),
    "valid_ctlpaths": _to("security", "hypervisor_ctl_path_list", _strings),
    "valid_jailer_paths": _to("security", "jailer_path_list", _strings),
    "valid_virtio_fs_daemon_paths": _to("security", "virtio_fs_daemon_list", _strings),
    "valid_file_mem_backends": _to("security", "file_backed_mem_root_list", _strings),
    "valid_vhost_user_store_paths": _to("security", "vhost_user_store_path_list", _strings),
    "disable_nesting_checks": _to("security", "disable_nesting_checks", _boolean),
    # debugging
    "enable_debug": _to("debugging", "debug", _boolean),
    "guest_memory_dump_path": _to("debugging", "guest_memory_dump_path", _string),
    "guest_memory_dump_paging": _to("debugging", "guest_memory_dump_paging", _boolean),
}


def mapped_keys() -> frozenset[str]:
    """The ``[hypervisor.<type>]`` keys that reach the HypervisorConfig."""
    return frozenset(_KEYS)


# -- loading ---------------------------------------------------------------------------------


def load_kata_config(path: str | Path) -> KataConfig:
    """Read a Kata ``configuration-*.toml`` and build a checked HypervisorConfig.

    The file must have exactly one ``[hypervisor.<type>]`` table (qemu, firecracker, clh,
    acrn). Unknown keys and the other sections (agent, runtime, netmon, factory, ...) are
    listed in :attr:`KataConfig.ignored`. Kata's per-hypervisor rules are kept: Firecracker
    and Cloud Hypervisor have no vhost-net; Cloud Hypervisor always shares with virtio-fs;
    virtio-fs needs ``virtio_fs_daemon``; ``image`` and ``initrd`` are exclusive; the QEMU
    ``microvm`` machine has no NVDIMM.

    Raises:
        ConfigError: the file cannot be read or is not TOML; no or several hypervisor
            tables, or an unknown hypervisor type; a value of the wrong type or range
            (the message and ``field`` name ``<file name>:<section>.<key>`` and the
            expected type); or the result fails :meth:`HypervisorConfig.valid`.
    """
    path = Path(path)
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}", field=str(path)) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML file: {exc}", field=path.name) from exc

    ignored: list[IgnoredKey] = []
    hypervisors: dict[str, object] = {}
    for name, value in raw.items():
        if name == "hypervisor" and isinstance(value, dict):
            hypervisors = value
        elif name in _OTHER_SECTIONS:
            ignored.extend(_flatten(name, value, _OTHER_SECTIONS[name]))
        else:
            ignored.extend(_flatten(name, value, "unknown section"))

    if len(hypervisors) != 1:
        found = ", ".join(f"[hypervisor.{h}]" for h in hypervisors) or "none"
        raise ConfigError(
            f"{path.name}: expected exactly one [hypervisor.<type>] table, found {found}",
            field=f"{path.name}:hypervisor",
            allowed=[t.value for t in HypervisorType if t is not HypervisorType.MOCK],
        )
    ((type_name, table),) = hypervisors.items()
    where = f"{path.name}:hypervisor.{type_name}"
    try:
        hypervisor_type = HypervisorType.parse(type_name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}", field=where) from exc
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {_toml_type(table)}", field=where)

    section = _Section(path.name, f"hypervisor.{type_name}", table)
    config = HypervisorConfig()
    # Kata's loader defaults for keys that may be absent.
    config.resources.mem_slots = DEFAULT_MEM_SLOTS
    config.resources.mlock = True
    for key in table:
        apply = _KEYS.get(key)
        if apply is not None:
            apply(section, key, config)
        else:
            reason = _NO_COUNTERPART.get(key, "unknown key")
            ignored.append(IgnoredKey(f"{section.section}.{key}", reason))

    _apply_hypervisor_rules(hypervisor_type, section, config)
    try:
        config.valid()
    except ConfigError as exc:
        raise ConfigError(f"{path.name}: {exc}", field=exc.field) from exc
    return KataConfig(hypervisor_type, config, tuple(ignored))


def _apply_hypervisor_rules(
    kind: HypervisorType, section: _Section, config: HypervisorConfig
) -> None:
    """What Kata's ``new<Type>HypervisorConfig`` functions enforce beyond the raw keys."""
    boot = config.boot
    if boot.image_path and boot.initrd_path:
        raise section.error("initrd", "image and initrd are exclusive: set only one")
    if kind in (HypervisorType.FIRECRACKER, HypervisorType.CLH):
        # Neither VMM has a vhost-net backend.
        config.devices.disable_vhost_net = True
    if kind is HypervisorType.CLH:
        config.shared_fs.shared_fs = SharedFs.VIRTIO_FS.value
    if kind is HypervisorType.QEMU and boot.hypervisor_machine_type == "microvm":
        boot.disable_image_nvdimm = True
    if config.shared_fs.shared_fs == SharedFs.VIRTIO_FS and not config.shared_fs.virtio_fs_daemon:
        raise section.error("virtio_fs_daemon", "virtio-fs needs the virtiofsd path")


def _flatten(prefix: str, value: object, reason: str) -> list[IgnoredKey]:
    if isinstance(value, dict):
        out: list[IgnoredKey] = []
        for key, sub in value.items():
            out.extend(_flatten(f"{prefix}.{key}", sub, reason))
        return out
    return [IgnoredKey(prefix, reason)]
