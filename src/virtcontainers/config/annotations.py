"""Per-sandbox overrides from Kata annotations (``io.katacontainers.config.hypervisor.*``).

Annotations come from the pod spec, i.e. from whoever may create pods, so each one is
checked twice before it touches the config:

* its name (the part after the prefix) must fully match one of the regular expressions
  in ``config.security.enable_annotations``;
* annotations that make the runtime execute or open host files (hypervisor, ctl and
  jailer binaries, virtiofsd, the memory backend and the vhost-user store) must match one
  of the glob patterns of the matching ``*_path_list`` in ``config.security``.

Boot assets (``kernel``, ``image``, ``initrd``, ``firmware``, ``path``, ``ctlpath``,
``jailer_path``), each with an optional ``<asset>_hash`` (SHA-512 hex), become custom
:class:`~virtcontainers.config.assets.Asset` entries through
:meth:`HypervisorConfig.add_custom_asset`. The names are those of Kata 2.x (2021).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, is_dataclass

from virtcontainers.config.assets import Asset, AssetType
from virtcontainers.config.defaults import MIN_HYPERVISOR_MEMORY_MIB, BlockDriver, SharedFs
from virtcontainers.config.hypervisor_config import HypervisorConfig, SecurityConfig
from virtcontainers.config.params import deserialize_params
from virtcontainers.errors import AnnotationError, ConfigError

__all__ = [
    "ASSET_HASH_TYPE_ANNOTATION",
    "HYPERVISOR_ANNOTATION_PREFIX",
    "apply_annotations",
    "known_annotations",
    "path_matches_globs",
]

HYPERVISOR_ANNOTATION_PREFIX = "io.katacontainers.config.hypervisor."
#: Kata keeps the hash algorithm outside the hypervisor prefix; only sha512 exists.
ASSET_HASH_TYPE_ANNOTATION = "io.katacontainers.asset_hash_type"

_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
_SHA512_HEX = re.compile(r"[0-9a-fA-F]{128}")
# Go's strconv.ParseBool, which Kata uses for boolean annotations.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_VIRTIO_FS_CACHE_MODES = ("none", "auto", "always", "never")

_Change = Callable[[HypervisorConfig], None]
#: Turns (full annotation name, raw value, current config) into a change, or raises.
_Handler = Callable[[str, str, HypervisorConfig], _Change]


# -- value parsing ----------------------------------------------------------------------


def _bad_value(annotation: str, expected: str, raw: str) -> AnnotationError:
    return AnnotationError(
        f"annotation {annotation}: expected {expected}, got {raw!r}", annotation=annotation
    )


def _parse_bool(annotation: str, raw: str) -> bool:
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise _bad_value(annotation, "a boolean (true/false)", raw)


def _parse_uint(annotation: str, raw: str, maximum: int) -> int:
    bits = maximum.bit_length()
    expected = f"an unsigned {bits}-bit integer"
    if not raw.isascii() or not raw.isdigit():
        raise _bad_value(annotation, expected, raw)
    value = int(raw)
    if value > maximum:
        raise _bad_value(annotation, expected, raw)
    return value


def _setter(group: str, name: str, value: object) -> _Change:
    def change(config: HypervisorConfig) -> None:
        setattr(getattr(config, group), name, value)

    return change


# -- handler factories --------------------------------------------------------------------


def _bool(group: str, name: str, *, invert: bool = False) -> _Handler:
    def handle(annotation: str, raw: str, _config: HypervisorConfig) -> _Change:
        value = _parse_bool(annotation, raw)
        return _setter(group, name, not value if invert else value)

    return handle


def _uint(
    group: str,
    name: str,
    *,
    maximum: int = _UINT32_MAX,
    check: Callable[[str, int], None] | None = None,
    zero_keeps: bool = False,
) -> _Handler:
    """``zero_keeps``: "0" leaves the configured value (Kata applies these only when > 0)."""

    def handle(annotation: str, raw: str, config: HypervisorConfig) -> _Change:
        value = _parse_uint(annotation, raw, maximum)
        if check is not None:
            check(annotation, value)
        if zero_keeps and value == 0:
            value = getattr(getattr(config, group), name)
        return _setter(group, name, value)

    return handle


def _text(group: str, name: str, *, choices: Sequence[str] = ()) -> _Handler:
    def handle(annotation: str, raw: str, _config: HypervisorConfig) -> _Change:
        if choices and raw not in choices:
            raise _bad_value(annotation, "one of " + ", ".join(choices), raw)
        return _setter(group, name, raw)

    return handle


def _restricted_path(
    group: str, name: str, globs: Callable[[SecurityConfig], list[str]], list_name: str
) -> _Handler:
    def handle(annotation: str, raw: str, config: HypervisorConfig) -> _Change:
        _check_globs(annotation, raw, globs(config.security), list_name)
        return _setter(group, name, raw)

    return handle


def _check_globs(annotation: str, value: str, globs: Sequence[str], list_name: str) -> None:
    if path_matches_globs(value, globs):
        return
    allowed = ", ".join(repr(g) for g in globs) if globs else "none (every value is rejected)"
    raise AnnotationError(
        f"annotation {annotation}: {value!r} is not allowed by security.{list_name}; "
        f"allowed globs: {allowed}",
        annotation=annotation,
    )


def path_matches_globs(path: str, globs: Sequence[str]) -> bool:
    """True when ``path`` matches one of ``globs`` with glob(3) pathname rules.

    Like Kata's ``filepath.Match``: ``*``, ``?`` and ``[...]`` never match a ``/``, so
    ``/usr/bin/*`` admits ``/usr/bin/qemu`` but not ``/usr/bin/x/qemu``. The file need not
    exist (Kata resolved the globs on disk; a pattern check is enough and race-free).
    """
    parts = path.split("/")
    for glob in globs:
        pattern = glob.split("/")
        if len(pattern) == len(parts) and all(
            fnmatch.fnmatchcase(p, g) for p, g in zip(parts, pattern, strict=True)
        ):
            return True
    return False


# -- annotations with more than a plain setter ------------------------------------------


def _check_vcpus(annotation: str, value: int) -> None:
    host = os.cpu_count() or 1
    if value > host:
        raise AnnotationError(
            f"annotation {annotation}: {value} vCPUs exceeds the {host} CPUs of this host",
            annotation=annotation,
        )


def _check_memory(annotation: str, value: int) -> None:
    if value < MIN_HYPERVISOR_MEMORY_MIB:
        raise AnnotationError(
            f"annotation {annotation}: {value} MiB is below the minimum of "
            f"{MIN_HYPERVISOR_MEMORY_MIB} MiB",
            annotation=annotation,
        )


def _check_positive(annotation: str, value: int) -> None:
    if value == 0:
        raise AnnotationError(
            f"annotation {annotation}: expected a positive integer, got 0", annotation=annotation
        )


def _kernel_params(annotation: str, raw: str, _config: HypervisorConfig) -> _Change:
    params = deserialize_params(raw.split())
    if any(not p.key for p in params):
        raise _bad_value(annotation, "space-separated key[=value] parameters", raw)

    def change(config: HypervisorConfig) -> None:
        # Appended after the configured ones so that, as in Kata, they win in the guest.
        for p in params:
            config.add_kernel_param(p)

    return change


def _virtio_fs_extra_args(annotation: str, raw: str, _config: HypervisorConfig) -> _Change:
    try:
        parsed: object = json.loads(raw)
    except ValueError:
        raise _bad_value(annotation, "a JSON array of strings", raw) from None
    if not isinstance(parsed, list) or not all(isinstance(a, str) for a in parsed):
        raise _bad_value(annotation, "a JSON array of strings", raw)
    extra = [str(a) for a in parsed]

    def change(config: HypervisorConfig) -> None:
        config.shared_fs.virtio_fs_extra_args.extend(extra)

    return change


_HANDLERS: dict[str, _Handler] = {
    # boot
    "kernel_params": _kernel_params,
    "machine_type": _text("boot", "hypervisor_machine_type"),
    "machine_accelerators": _text("boot", "machine_accelerators"),
    "cpu_features": _text("boot", "cpu_features"),
    "entropy_source": _text("boot", "entropy_source"),
    "guest_hook_path": _text("boot", "guest_hook_path"),
    "disable_image_nvdimm": _bool("boot", "disable_image_nvdimm"),
    # cpu and memory
    "default_vcpus": _uint("resources", "num_vcpus", check=_check_vcpus),
    "default_max_vcpus": _uint("resources", "default_max_vcpus", check=_check_vcpus),
    "default_memory": _uint("resources", "memory_size", check=_check_memory),
    "memory_slots": _uint("resources", "mem_slots", zero_keeps=True),
    "memory_offset": _uint("resources", "mem_offset", maximum=_UINT64_MAX, zero_keeps=True),
    "enable_virtio_mem": _bool("resources", "virtio_mem"),
    "enable_mem_prealloc": _bool("resources", "mem_prealloc"),
    "enable_hugepages": _bool("resources", "huge_pages"),
    # Kata: swapping VM memory out means not locking it.
    "enable_swap": _bool("resources", "mlock", invert=True),
    "file_mem_backend": _restricted_path(
        "resources",
        "file_backed_mem_root_dir",
        lambda s: s.file_backed_mem_root_list,
        "file_backed_mem_root_list",
    ),
    # devices
    "enable_iommu": _bool("devices", "iommu"),
    "enable_iommu_platform": _bool("devices", "iommu_platform"),
    "hotplug_vfio_on_root_bus": _bool("devices", "hotplug_vfio_on_root_bus"),
    "pcie_root_port": _uint("devices", "pcie_root_port", zero_keeps=True),
    "disable_vhost_net": _bool("devices", "disable_vhost_net"),
    "enable_vhost_user_store": _bool("devices", "enable_vhost_user_store"),
    "vhost_user_store_path": _restricted_path(
        "devices",
        "vhost_user_store_path",
        lambda s: s.vhost_user_store_path_list,
        "vhost_user_store_path_list",
    ),
    # storage
    "block_device_driver": _text(
        "storage", "block_device_driver", choices=[d.value for d in BlockDriver]
    ),
    "disable_block_device_use": _bool("storage", "disable_block_device_use"),
    "enable_iothreads": _bool("storage", "enable_io_threads"),
    "block_device_cache_set": _bool("storage", "block_device_cache_set"),
    "block_device_cache_direct": _bool("storage", "block_device_cache_direct"),
    "block_device_cache_noflush": _bool("storage", "block_device_cache_noflush"),
    # shared fs
    "shared_fs": _text("shared_fs", "shared_fs", choices=[f.value for f in SharedFs]),
    "msize_9p": _uint("shared_fs", "msize_9p", check=_check_positive),
    "virtio_fs_daemon": _restricted_path(
        "shared_fs", "virtio_fs_daemon", lambda s: s.virtio_fs_daemon_list, "virtio_fs_daemon_list"
    ),
    "virtio_fs_cache": _text("shared_fs", "virtio_fs_cache", choices=_VIRTIO_FS_CACHE_MODES),
    "virtio_fs_cache_size": _uint("shared_fs", "virtio_fs_cache_size"),
    "virtio_fs_extra_args": _virtio_fs_extra_args,
    # network
    "rx_rate_limiter_max_rate": _uint("network", "rx_rate_limiter_max_rate", maximum=_UINT64_MAX),
    "tx_rate_limiter_max_rate": _uint("network", "tx_rate_limiter_max_rate", maximum=_UINT64_MAX),
}
# Our spelling of the TOML key, accepted next to Kata's annotation name.
_HANDLERS["default_maxvcpus"] = _HANDLERS["default_max_vcpus"]

#: Annotation suffix naming an asset's path.
_ASSET_PATHS: dict[str, AssetType] = {
    "kernel": AssetType.KERNEL,
    "image": AssetType.IMAGE,
    "initrd": AssetType.INITRD,
    "firmware": AssetType.FIRMWARE,
    "path": AssetType.HYPERVISOR,
    "ctlpath": AssetType.HYPERVISOR_CTL,
    "jailer_path": AssetType.JAILER,
}
#: Annotation suffix carrying an asset's SHA-512. ``hypervisorctl_hash`` is Kata's name.
_ASSET_HASHES: dict[str, AssetType] = {f"{t.value}_hash": t for t in AssetType}
_ASSET_HASHES["hypervisorctl_hash"] = AssetType.HYPERVISOR_CTL
#: Binaries the runtime will execute: their paths must match the allowed globs.
_ASSET_GLOBS: dict[AssetType, tuple[Callable[[SecurityConfig], list[str]], str]] = {
    AssetType.HYPERVISOR: (lambda s: s.hypervisor_path_list, "hypervisor_path_list"),
    AssetType.HYPERVISOR_CTL: (lambda s: s.hypervisor_ctl_path_list, "hypervisor_ctl_path_list"),
    AssetType.JAILER: (lambda s: s.jailer_path_list, "jailer_path_list"),
}


def known_annotations() -> frozenset[str]:
    """Every accepted name after :data:`HYPERVISOR_ANNOTATION_PREFIX`."""
    return frozenset(_HANDLERS) | frozenset(_ASSET_PATHS) | frozenset(_ASSET_HASHES)


# -- the public entry point -------------------------------------------------------------


def apply_annotations(config: HypervisorConfig, annotations: Mapping[str, str]) -> None:
    """Apply the hypervisor annotations among ``annotations`` to ``config``.

    Annotations outside ``io.katacontainers.config.hypervisor.`` are ignored (they belong
    to the runtime or agent), except ``io.katacontainers.asset_hash_type``, which must be
    ``sha512`` when present. Scalar annotations replace the configured value;
    ``kernel_params`` and ``virtio_fs_extra_args`` are appended to it, as in Kata.

    All or nothing: every annotation is checked, and assets are verified, on a copy of the
    config; ``config`` changes only when all of them succeed.

    Raises:
        AnnotationError: an unknown hypervisor annotation; one whose name matches no
            pattern of ``security.enable_annotations``; a value of the wrong type or out of
            range; a path outside the globs allowed by ``config.security``; a hash without
            its asset path, or not a SHA-512 hex digest; a hash type other than sha512.
        ConfigError: an entry of ``security.enable_annotations`` is not a valid regex.
        AssetError: an asset path is relative, or the file does not match its hash.
    """
    hash_type = annotations.get(ASSET_HASH_TYPE_ANNOTATION)
    if hash_type is not None and hash_type != "sha512":
        raise AnnotationError(
            f"annotation {ASSET_HASH_TYPE_ANNOTATION}: unsupported hash type {hash_type!r}; "
            "only sha512 is supported",
            annotation=ASSET_HASH_TYPE_ANNOTATION,
        )
    enabled = _compile_enabled(config.security.enable_annotations)

    changes: list[_Change] = []
    asset_paths: dict[AssetType, str] = {}
    asset_hashes: dict[AssetType, tuple[str, str]] = {}
    for annotation, value in annotations.items():
        if not annotation.startswith(HYPERVISOR_ANNOTATION_PREFIX):
            continue
        name = annotation.removeprefix(HYPERVISOR_ANNOTATION_PREFIX)
        handler = _HANDLERS.get(name)
        if handler is None and name not in _ASSET_PATHS and name not in _ASSET_HASHES:
            raise AnnotationError(
                f"unknown hypervisor annotation {annotation}", annotation=annotation
            )
        if not any(p.fullmatch(name) for p in enabled):
            raise AnnotationError(
                f"annotation {annotation} is not enabled: no entry of "
                f"security.enable_annotations matches {name!r}",
                annotation=annotation,
            )
        if handler is not None:
            changes.append(handler(annotation, value, config))
        elif name in _ASSET_PATHS:
            kind = _ASSET_PATHS[name]
            if kind in _ASSET_GLOBS and value:
                globs, list_name = _ASSET_GLOBS[kind]
                _check_globs(annotation, value, globs(config.security), list_name)
            asset_paths[kind] = value
        else:
            if not _SHA512_HEX.fullmatch(value):
                raise _bad_value(annotation, "a SHA-512 hex digest (128 hex digits)", value)
            asset_hashes[_ASSET_HASHES[name]] = (annotation, value.lower())

    for kind, (annotation, _digest) in asset_hashes.items():
        if not asset_paths.get(kind):
            raise AnnotationError(
                f"annotation {annotation} pins a {kind} asset but no {kind} path "
                "annotation gives one",
                annotation=annotation,
            )

    trial = config.copy()
    for change in changes:
        change(trial)
    for kind, path in asset_paths.items():
        digest = asset_hashes[kind][1] if kind in asset_hashes else ""
        trial.add_custom_asset(Asset(kind, path, digest))
    _commit(trial, config)


def _compile_enabled(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    compiled: list[re.Pattern[str]] = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ConfigError(
                f"security.enable_annotations: {pattern!r} is not a valid regular "
                f"expression: {exc}",
                field="security.enable_annotations",
            ) from exc
    return compiled


def _commit(source: HypervisorConfig, target: HypervisorConfig) -> None:
    """Copy ``source`` into ``target`` in place, keeping ``target``'s group objects, so
    references a caller holds (``cfg = config.boot``) see the new values."""
    for f in fields(target):
        new: object = getattr(source, f.name)
        old: object = getattr(target, f.name)
        if is_dataclass(old) and not isinstance(old, type):
            for sub in fields(old):
                setattr(old, sub.name, getattr(new, sub.name))
        elif isinstance(old, dict) and isinstance(new, dict):
            old.clear()
            old.update(new)
        else:
            setattr(target, f.name, new)
