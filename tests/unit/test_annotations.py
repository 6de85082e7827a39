from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import pytest

from virtcontainers.config import AssetType, HypervisorConfig, Param, apply_annotations
from virtcontainers.config.annotations import (
    HYPERVISOR_ANNOTATION_PREFIX,
    known_annotations,
    path_matches_globs,
)
from virtcontainers.errors import AnnotationError, AssetError, ConfigError

P = HYPERVISOR_ANNOTATION_PREFIX


def _config(*enabled: str) -> HypervisorConfig:
    config = HypervisorConfig()
    config.boot.kernel_path = "/usr/share/kata-containers/vmlinux"
    config.boot.image_path = "/usr/share/kata-containers/rootfs.img"
    config.boot.hypervisor_path = "/usr/bin/qemu-system-x86_64"
    config.boot.kernel_params = [Param("console", "hvc0")]
    config.security.enable_annotations = list(enabled)
    config.security.hypervisor_path_list = ["/usr/bin/qemu-*", "/opt/qemu/bin/*"]
    config.security.hypervisor_ctl_path_list = ["/usr/bin/acrnctl"]
    config.security.jailer_path_list = ["/usr/bin/jailer"]
    config.security.virtio_fs_daemon_list = ["/usr/libexec/*/virtiofsd"]
    config.security.file_backed_mem_root_list = ["/dev/shm", ""]
    config.security.vhost_user_store_path_list = ["/var/run/kata-containers/vhost-user"]
    return config


# -- enabling ----------------------------------------------------------------------------


def test_not_enabled_annotation_is_rejected_and_named() -> None:
    config = _config("default_memory")
    with pytest.raises(AnnotationError, match="not enabled") as info:
        apply_annotations(config, {P + "default_vcpus": "2"})
    assert info.value.annotation == P + "default_vcpus"
    assert P + "default_vcpus" in str(info.value)
    assert config.resources.num_vcpus == 0


def test_nothing_is_enabled_by_default() -> None:
    with pytest.raises(AnnotationError, match="not enabled"):
        apply_annotations(_config(), {P + "default_memory": "4096"})


def test_enabled_entries_are_regexes() -> None:
    config = _config("default_.*", "enable_io.*")
    apply_annotations(
        config,
        {P + "default_memory": "4096", P + "default_vcpus": "1", P + "enable_iommu": "true"},
    )
    assert config.resources.memory_size == 4096
    assert config.resources.num_vcpus == 1
    assert config.devices.iommu is True


@pytest.mark.parametrize("pattern", ["default_mem", "efault_memory", "memory"])
def test_enabled_regexes_are_fully_anchored(pattern: str) -> None:
    with pytest.raises(AnnotationError, match="not enabled"):
        apply_annotations(_config(pattern), {P + "default_memory": "4096"})


def test_invalid_enable_regex_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="regular expression"):
        apply_annotations(_config("(unclosed"), {P + "default_memory": "4096"})


def test_unknown_hypervisor_annotation_is_rejected() -> None:
    with pytest.raises(AnnotationError, match="unknown") as info:
        apply_annotations(_config(".*"), {P + "turbo_mode": "on"})
    assert info.value.annotation == P + "turbo_mode"


def test_other_prefixes_are_ignored() -> None:
    config = _config()
    before = copy.deepcopy(config)
    apply_annotations(
        config,
        {
            "io.katacontainers.config.runtime.disable_guest_seccomp": "true",
            "io.katacontainers.config.agent.kernel_modules": "e1000e",
            "io.kubernetes.cri.sandbox-id": "abc",
        },
    )
    assert config == before


# -- typed values ------------------------------------------------------------------------


def test_typed_values_are_applied() -> None:
    config = _config(".*")
    apply_annotations(
        config,
        {
            P + "default_vcpus": "1",
            P + "default_memory": "1024",
            P + "memory_slots": "4",
            P + "msize_9p": "65536",
            P + "block_device_driver": "virtio-blk",
            P + "enable_iothreads": "1",
            P + "disable_vhost_net": "True",
            P + "machine_type": "pc",
            P + "entropy_source": "/dev/random",
            P + "shared_fs": "virtio-fs",
            P + "virtio_fs_cache": "always",
            P + "rx_rate_limiter_max_rate": str(2**40),
            P + "enable_swap": "true",
        },
    )
    assert config.resources.num_vcpus == 1
    assert config.resources.memory_size == 1024
    assert config.resources.mem_slots == 4
    assert config.shared_fs.msize_9p == 65536
    assert config.storage.block_device_driver == "virtio-blk"
    assert config.storage.enable_io_threads is True
    assert config.devices.disable_vhost_net is True
    assert config.boot.hypervisor_machine_type == "pc"
    assert config.boot.entropy_source == "/dev/random"
    assert config.shared_fs.shared_fs == "virtio-fs"
    assert config.shared_fs.virtio_fs_cache == "always"
    assert config.network.rx_rate_limiter_max_rate == 2**40
    assert config.resources.mlock is False


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("default_vcpus", "abc", "unsigned 32-bit integer"),
        ("default_vcpus", "-1", "unsigned 32-bit integer"),
        ("default_memory", "2.5", "unsigned 32-bit integer"),
        ("memory_slots", str(2**32), "unsigned 32-bit integer"),
        ("enable_iothreads", "yes", "boolean"),
        ("block_device_driver", "floppy", "one of"),
        ("shared_fs", "nfs", "one of"),
        ("virtio_fs_extra_args", "--foo", "JSON array of strings"),
        ("virtio_fs_extra_args", '["a", 1]', "JSON array of strings"),
        ("kernel_params", "=orphan", "key"),
        ("kernel_hash", "abc", "SHA-512"),
    ],
)
def test_wrong_typed_value_names_annotation_and_type(name: str, value: str, expected: str) -> None:
    config = _config(".*")
    with pytest.raises(AnnotationError, match=expected) as info:
        apply_annotations(config, {P + name: value, P + "kernel": "/k"})
    assert info.value.annotation == P + name
    assert P + name in str(info.value)


def test_vcpus_beyond_host_are_rejected() -> None:
    host = os.cpu_count() or 1
    with pytest.raises(AnnotationError, match="exceeds"):
        apply_annotations(_config(".*"), {P + "default_vcpus": str(host + 1)})


def test_memory_below_minimum_is_rejected() -> None:
    """Unlike a file (which falls back to the default), an annotation below 256 MiB is an
    error, as in Kata's addHypervisorMemoryOverrides."""
    with pytest.raises(AnnotationError, match="minimum") as info:
        apply_annotations(_config(".*"), {P + "default_memory": "128"})
    assert info.value.annotation == P + "default_memory"


def test_msize_9p_zero_is_rejected() -> None:
    """Kata: "please specify positive numeric value" for msize_9p."""
    with pytest.raises(AnnotationError, match="positive") as info:
        apply_annotations(_config(".*"), {P + "msize_9p": "0"})
    assert info.value.annotation == P + "msize_9p"


@pytest.mark.parametrize(
    ("name", "group", "field"),
    [
        ("memory_slots", "resources", "mem_slots"),
        ("memory_offset", "resources", "mem_offset"),
        ("pcie_root_port", "devices", "pcie_root_port"),
    ],
)
def test_zero_keeps_the_configured_value(name: str, group: str, field: str) -> None:
    """Kata applies these annotations only when they are > 0."""
    config = _config(".*")
    setattr(getattr(config, group), field, 7)
    apply_annotations(config, {P + name: "0"})
    assert getattr(getattr(config, group), field) == 7


def test_memory_offset_annotation_is_64_bit() -> None:
    config = _config(".*")
    apply_annotations(config, {P + "memory_offset": str(2**40)})
    assert config.resources.mem_offset == 2**40


def test_kata_and_toml_spelling_of_max_vcpus() -> None:
    config = _config("default_max_vcpus", "default_maxvcpus")
    apply_annotations(config, {P + "default_max_vcpus": "1"})
    assert config.resources.default_max_vcpus == 1
    with pytest.raises(AnnotationError, match="not enabled"):
        apply_annotations(_config("default_max_vcpus"), {P + "default_maxvcpus": "1"})


def test_kernel_params_are_appended() -> None:
    config = _config("kernel_params")
    apply_annotations(config, {P + "kernel_params": "quiet  agent.log=debug"})
    assert config.boot.kernel_params == [
        Param("console", "hvc0"),
        Param("quiet"),
        Param("agent.log", "debug"),
    ]


def test_virtio_fs_extra_args_are_json_and_appended() -> None:
    config = _config("virtio_fs_extra_args")
    config.shared_fs.virtio_fs_extra_args = ["--thread-pool-size=1"]
    apply_annotations(config, {P + "virtio_fs_extra_args": '["-o", "xattr"]'})
    assert config.shared_fs.virtio_fs_extra_args == ["--thread-pool-size=1", "-o", "xattr"]


# -- restricted paths --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "group", "field"),
    [
        ("virtio_fs_daemon", "/usr/libexec/kata-qemu/virtiofsd", "shared_fs", "virtio_fs_daemon"),
        ("file_mem_backend", "/dev/shm", "resources", "file_backed_mem_root_dir"),
        ("file_mem_backend", "", "resources", "file_backed_mem_root_dir"),
        (
            "vhost_user_store_path",
            "/var/run/kata-containers/vhost-user",
            "devices",
            "vhost_user_store_path",
        ),
    ],
)
def test_restricted_paths_inside_globs_are_accepted(
    name: str, value: str, group: str, field: str
) -> None:
    config = _config(name)
    apply_annotations(config, {P + name: value})
    assert getattr(getattr(config, group), field) == value


@pytest.mark.parametrize(
    ("name", "value", "list_name"),
    [
        ("path", "/tmp/evil-qemu", "hypervisor_path_list"),
        ("path", "/usr/bin/sub/qemu-x", "hypervisor_path_list"),
        ("ctlpath", "/usr/bin/acrnctl2", "hypervisor_ctl_path_list"),
        ("jailer_path", "/usr/local/bin/jailer", "jailer_path_list"),
        ("virtio_fs_daemon", "/tmp/virtiofsd", "virtio_fs_daemon_list"),
        ("file_mem_backend", "/tmp", "file_backed_mem_root_list"),
        ("vhost_user_store_path", "/tmp/vhost", "vhost_user_store_path_list"),
    ],
)
def test_restricted_paths_outside_globs_are_rejected(name: str, value: str, list_name: str) -> None:
    config = _config(".*")
    with pytest.raises(AnnotationError, match="not allowed") as info:
        apply_annotations(config, {P + name: value})
    message = str(info.value)
    assert list_name in message
    assert info.value.annotation == P + name


def test_rejection_lists_the_allowed_globs() -> None:
    with pytest.raises(AnnotationError, match=r"'/usr/bin/qemu-\*', '/opt/qemu/bin/\*'"):
        apply_annotations(_config("path"), {P + "path": "/bin/sh"})


def test_empty_glob_list_rejects_every_path() -> None:
    config = _config("jailer_path")
    config.security.jailer_path_list = []
    with pytest.raises(AnnotationError, match="every value is rejected"):
        apply_annotations(config, {P + "jailer_path": "/usr/bin/jailer"})


def test_glob_star_does_not_cross_directories() -> None:
    assert path_matches_globs("/usr/bin/qemu-kvm", ["/usr/bin/qemu-*"])
    assert path_matches_globs("/usr/bin/qemu-kvm", ["/usr/bin/qemu-[kx]vm"])
    assert not path_matches_globs("/usr/bin/qemu-/../../tmp/x", ["/usr/bin/qemu-*"])
    assert not path_matches_globs("/usr/bin/x/qemu", ["/usr/bin/*"])
    assert not path_matches_globs("/usr/bin/qemu", [])


def test_hypervisor_path_becomes_custom_asset() -> None:
    config = _config("path")
    apply_annotations(config, {P + "path": "/opt/qemu/bin/qemu-system-x86_64"})
    assert config.hypervisor_asset_path() == "/opt/qemu/bin/qemu-system-x86_64"
    assert config.custom_hypervisor_asset()
    # The configured path is kept; the custom asset takes precedence.
    assert config.boot.hypervisor_path == "/usr/bin/qemu-system-x86_64"


# -- assets ------------------------------------------------------------------------------


def test_asset_with_matching_hash(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"custom kernel")
    digest = hashlib.sha512(b"custom kernel").hexdigest()
    config = _config("kernel", "kernel_hash")
    apply_annotations(config, {P + "kernel": str(kernel), P + "kernel_hash": digest})
    assert config.kernel_asset_path() == str(kernel)
    assert config.custom_assets[AssetType.KERNEL].sha512 == digest


def test_asset_with_wrong_hash_is_rejected(tmp_path: Path) -> None:
    image = tmp_path / "rootfs.img"
    image.write_bytes(b"image")
    config = _config("image", "image_hash")
    with pytest.raises(AssetError, match="mismatch"):
        apply_annotations(config, {P + "image": str(image), P + "image_hash": "0" * 128})
    assert config.image_asset_path() == "/usr/share/kata-containers/rootfs.img"
    assert not config.custom_assets


def test_relative_asset_path_is_rejected() -> None:
    with pytest.raises(AssetError, match="absolute"):
        apply_annotations(_config("initrd"), {P + "initrd": "initrd.img"})


def test_hash_needs_enabling_too(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="not enabled"):
        apply_annotations(_config("kernel"), {P + "kernel": "/k", P + "kernel_hash": "a" * 128})


def test_hash_without_path_is_rejected() -> None:
    with pytest.raises(AnnotationError, match="no kernel path"):
        apply_annotations(_config(".*"), {P + "kernel_hash": "a" * 128})


@pytest.mark.parametrize("name", ["hypervisorctl_hash", "hypervisor_ctl_hash"])
def test_ctl_hash_spellings(tmp_path: Path, name: str) -> None:
    ctl = tmp_path / "acrnctl"
    ctl.write_bytes(b"ctl")
    config = _config(".*")
    config.security.hypervisor_ctl_path_list = [str(tmp_path / "*")]
    apply_annotations(
        config, {P + "ctlpath": str(ctl), P + name: hashlib.sha512(b"ctl").hexdigest()}
    )
    assert config.hypervisor_ctl_asset_path() == str(ctl)


def test_only_sha512_hash_type_is_accepted() -> None:
    with pytest.raises(AnnotationError, match="sha512"):
        apply_annotations(_config(), {"io.katacontainers.asset_hash_type": "sha256"})
    apply_annotations(_config(), {"io.katacontainers.asset_hash_type": "sha512"})


# -- all or nothing ----------------------------------------------------------------------


def test_failure_changes_nothing() -> None:
    config = _config(".*")
    before = copy.deepcopy(config)
    with pytest.raises(AnnotationError):
        apply_annotations(
            config,
            {
                P + "default_memory": "4096",
                P + "kernel_params": "quiet",
                P + "kernel": "/custom/vmlinux",
                P + "path": "/tmp/evil",
            },
        )
    assert config == before


def test_asset_failure_after_valid_scalars_changes_nothing(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    config = _config(".*")
    before = copy.deepcopy(config)
    with pytest.raises(AssetError):
        apply_annotations(
            config,
            {
                P + "default_memory": "4096",
                P + "kernel_params": "quiet",
                P + "kernel": str(kernel),
                P + "kernel_hash": "f" * 128,
            },
        )
    assert config == before


def test_success_updates_groups_in_place() -> None:
    config = _config(".*")
    resources = config.resources
    apply_annotations(config, {P + "default_memory": "4096"})
    assert resources is config.resources
    assert resources.memory_size == 4096


# -- the table itself --------------------------------------------------------------------


def test_known_annotations_cover_kata_2021_names() -> None:
    kata_names = {
        "kernel", "image", "initrd", "path", "ctlpath", "jailer_path", "firmware",
        "kernel_hash", "image_hash", "initrd_hash", "hypervisor_hash", "hypervisorctl_hash",
        "jailer_hash", "firmware_hash", "kernel_params", "machine_type",
        "machine_accelerators", "cpu_features", "disable_vhost_net",
        "enable_vhost_user_store", "vhost_user_store_path", "guest_hook_path",
        "disable_image_nvdimm", "hotplug_vfio_on_root_bus", "pcie_root_port",
        "entropy_source", "default_vcpus", "default_max_vcpus", "default_memory",
        "memory_slots", "memory_offset", "enable_virtio_mem", "enable_mem_prealloc",
        "enable_swap", "enable_hugepages", "enable_iommu", "enable_iommu_platform",
        "file_mem_backend", "msize_9p", "shared_fs", "virtio_fs_daemon", "virtio_fs_cache",
        "virtio_fs_cache_size", "virtio_fs_extra_args", "block_device_driver",
        "disable_block_device_use", "enable_iothreads", "block_device_cache_set",
        "block_device_cache_direct", "block_device_cache_noflush",
        "rx_rate_limiter_max_rate", "tx_rate_limiter_max_rate",
    }  # fmt: skip
    assert kata_names <= known_annotations()


_SAMPLE_VALUES = {
    "kernel_params": "quiet",
    "virtio_fs_extra_args": '["-o", "xattr"]',
    "enable_swap": "false",  # locks memory: mlock defaults to False
    "block_device_driver": "virtio-blk",
    "shared_fs": "virtio-9p",
    "virtio_fs_cache": "auto",
    "default_memory": "512",
    "virtio_fs_daemon": "/usr/libexec/kata-qemu/virtiofsd",
    "file_mem_backend": "/dev/shm",
    "vhost_user_store_path": "/var/run/kata-containers/vhost-user",
    "path": "/usr/bin/qemu-kvm",
    "ctlpath": "/usr/bin/acrnctl",
    "jailer_path": "/usr/bin/jailer",
}


@pytest.mark.parametrize("name", sorted(n for n in known_annotations() if not n.endswith("_hash")))
def test_every_annotation_changes_the_config(name: str) -> None:
    config = _config(".*")
    before = copy.deepcopy(config)
    value = _SAMPLE_VALUES.get(name)
    if value is None:
        value = "/custom/asset" if name in {"kernel", "image", "initrd", "firmware"} else "1"
    apply_annotations(config, {P + name: value})
    assert config != before
