from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from virtcontainers.config import Param
from virtcontainers.config.defaults import max_qemu_vcpus
from virtcontainers.config.kata import IgnoredKey, KataConfig, load_kata_config, mapped_keys
from virtcontainers.errors import ConfigError
from virtcontainers.hypervisor import HypervisorType

HOST_CPUS = os.cpu_count() or 1

BASE = """
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
kernel = "/usr/share/kata-containers/vmlinuz.container"
image = "/usr/share/kata-containers/kata-containers.img"
"""


def _load(tmp_path: Path, text: str, name: str = "configuration-test.toml") -> KataConfig:
    path = tmp_path / name
    path.write_text(text)
    return load_kata_config(path)


# -- the shipped Kata files --------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "kind"),
    [
        ("configuration-qemu.toml", HypervisorType.QEMU),
        ("configuration-fc.toml", HypervisorType.FIRECRACKER),
        ("configuration-clh.toml", HypervisorType.CLH),
        ("configuration-acrn.toml", HypervisorType.ACRN),
    ],
)
def test_kata_files_load_into_valid_configs(
    shared_dir: Path, file: str, kind: HypervisorType
) -> None:
    path = shared_dir / "kata-configs" / file
    loaded = load_kata_config(path)
    assert loaded.hypervisor_type is kind
    config = loaded.config
    assert config.boot.kernel_path.startswith("/usr/share/kata-containers/vmlinu")
    assert config.boot.image_path == "/usr/share/kata-containers/kata-containers.img"
    assert config.resources.memory_size == 2048
    assert config.resources.num_vcpus == 1
    config.valid()  # still valid, idempotently

    # Every hypervisor key of the file is either mapped or reported.
    raw = tomllib.loads(path.read_text())
    (section,) = raw["hypervisor"]
    ignored = {i.key for i in loaded.ignored}
    for key in raw["hypervisor"][section]:
        assert key in mapped_keys() or f"hypervisor.{section}.{key}" in ignored
    # Non-hypervisor sections are reported, with a reason.
    assert "runtime.internetworking_model" in ignored
    assert all(i.reason for i in loaded.ignored)


def test_qemu_file_maps_its_keys(shared_dir: Path) -> None:
    config = load_kata_config(shared_dir / "kata-configs" / "configuration-qemu.toml").config
    assert config.boot.hypervisor_path == "/usr/bin/qemu-system-x86_64"
    assert config.boot.hypervisor_machine_type == "q35"
    assert config.boot.cpu_features == "pmu=off"
    assert config.shared_fs.shared_fs == "virtio-fs"
    assert config.shared_fs.virtio_fs_daemon == "/usr/libexec/kata-qemu/virtiofsd"
    assert config.shared_fs.virtio_fs_extra_args == ["--thread-pool-size=1"]
    assert config.shared_fs.virtio_fs_cache == "auto"
    assert config.shared_fs.msize_9p == 0  # virtio-fs: no 9p default
    assert config.storage.block_device_driver == "virtio-scsi"
    assert config.devices.vhost_user_store_path == "/var/run/kata-containers/vhost-user"
    assert config.security.hypervisor_path_list == ["/usr/bin/qemu-system-x86_64"]
    assert config.security.virtio_fs_daemon_list == ["/usr/libexec/kata-qemu/virtiofsd"]
    assert config.security.file_backed_mem_root_list == [""]
    assert config.security.enable_annotations == []
    assert config.resources.default_max_vcpus == max_qemu_vcpus()
    assert config.resources.mem_slots == 10
    assert config.resources.mlock is True


def test_firecracker_file_specifics(shared_dir: Path) -> None:
    loaded = load_kata_config(shared_dir / "kata-configs" / "configuration-fc.toml")
    config = loaded.config
    assert config.storage.block_device_driver == "virtio-mmio"
    assert config.security.jailer_path_list == ["/usr/bin/jailer"]
    assert config.devices.disable_vhost_net is True
    assert config.shared_fs.msize_9p == 8192
    assert IgnoredKey("agent.kata.kernel_modules", "not a hypervisor setting") in loaded.ignored


def test_clh_file_specifics(shared_dir: Path) -> None:
    config = load_kata_config(shared_dir / "kata-configs" / "configuration-clh.toml").config
    assert config.shared_fs.shared_fs == "virtio-fs"
    assert config.devices.disable_vhost_net is True
    assert config.storage.block_device_driver == "virtio-blk"


def test_acrn_file_specifics(shared_dir: Path) -> None:
    config = load_kata_config(shared_dir / "kata-configs" / "configuration-acrn.toml").config
    assert config.boot.hypervisor_ctl_path == "/usr/bin/acrnctl"
    assert config.security.hypervisor_ctl_path_list == ["/usr/bin/acrnctl"]
    assert config.resources.default_max_vcpus == 1


# -- mapping -------------------------------------------------------------------------------


def test_full_mapping(tmp_path: Path) -> None:
    loaded = _load(
        tmp_path,
        BASE
        + """
kernel_params = "quiet  agent.log=debug systemd.unit=kata.target"
machine_accelerators = " nosmm , ,nofw "
firmware = "/usr/share/ovmf.fd"
pflashes = ["/a.img", "/b.img"]
entropy_source = "/dev/random"
guest_hook_path = "/usr/share/oci/hooks"
disable_image_nvdimm = true
default_memory = 4096
memory_slots = 4
memory_offset = 1024
enable_virtio_mem = true
enable_mem_prealloc = true
enable_hugepages = true
enable_swap = true
file_mem_backend = "/dev/shm"
valid_file_mem_backends = ["/dev/shm"]
default_bridges = 2
pcie_root_port = 2
hotplug_vfio_on_root_bus = true
enable_iommu = true
enable_iommu_platform = true
disable_vhost_net = true
enable_vhost_user_store = true
block_device_driver = "nvdimm"
block_device_cache_set = true
block_device_cache_direct = true
block_device_cache_noflush = true
disable_block_device_use = true
enable_iothreads = true
msize_9p = 16384
rx_rate_limiter_max_rate = 10000000000
tx_rate_limiter_max_rate = 20000
enable_annotations = ["kernel_params", "default_.*"]
valid_jailer_paths = ["/usr/bin/jailer"]
valid_ctlpaths = ["/usr/bin/acrnctl"]
valid_vhost_user_store_paths = ["/var/run/vhost"]
disable_nesting_checks = true
enable_debug = true
guest_memory_dump_path = "/var/crash/kata"
guest_memory_dump_paging = true
sgx_epc_size = 4096
""",
    )
    c = loaded.config
    assert loaded.ignored == ()
    assert c.boot.kernel_params == [
        Param("quiet"),
        Param("agent.log", "debug"),
        Param("systemd.unit", "kata.target"),
    ]
    assert c.boot.machine_accelerators == "nosmm,nofw"
    assert c.boot.firmware_path == "/usr/share/ovmf.fd"
    assert c.boot.pflash == ["/a.img", "/b.img"]
    assert c.boot.entropy_source == "/dev/random"
    assert c.boot.guest_hook_path == "/usr/share/oci/hooks"
    assert c.boot.disable_image_nvdimm is True
    r = c.resources
    assert (r.memory_size, r.mem_slots, r.mem_offset) == (4096, 4, 1024)
    assert (r.virtio_mem, r.mem_prealloc, r.huge_pages, r.mlock) == (True, True, True, False)
    assert r.file_backed_mem_root_dir == "/dev/shm"
    assert r.sgx_epc_size == 4096
    d = c.devices
    assert (d.default_bridges, d.pcie_root_port) == (2, 2)
    assert (d.hotplug_vfio_on_root_bus, d.iommu, d.iommu_platform) == (True, True, True)
    assert (d.disable_vhost_net, d.enable_vhost_user_store) == (True, True)
    s = c.storage
    assert s.block_device_driver == "nvdimm"
    assert (s.block_device_cache_set, s.block_device_cache_direct) == (True, True)
    assert (s.block_device_cache_noflush, s.disable_block_device_use) == (True, True)
    assert s.enable_io_threads is True
    assert c.shared_fs.msize_9p == 16384
    assert c.network.rx_rate_limiter_max_rate == 10_000_000_000
    assert c.network.tx_rate_limiter_max_rate == 20000
    sec = c.security
    assert sec.enable_annotations == ["kernel_params", "default_.*"]
    assert sec.file_backed_mem_root_list == ["/dev/shm"]
    assert sec.jailer_path_list == ["/usr/bin/jailer"]
    assert sec.hypervisor_ctl_path_list == ["/usr/bin/acrnctl"]
    assert sec.vhost_user_store_path_list == ["/var/run/vhost"]
    assert sec.disable_nesting_checks is True
    assert c.debugging.debug is True
    assert c.debugging.guest_memory_dump_path == "/var/crash/kata"
    assert c.debugging.guest_memory_dump_paging is True


def test_initrd_instead_of_image(tmp_path: Path) -> None:
    text = BASE.replace('image = "/usr/share/kata-containers/kata-containers.img"', "")
    loaded = _load(tmp_path, text + 'initrd = "/usr/share/kata-containers/initrd.img"\n')
    assert loaded.config.boot.initrd_path == "/usr/share/kata-containers/initrd.img"
    assert loaded.config.boot.image_path == ""


def test_image_and_initrd_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exclusive") as info:
        _load(tmp_path, BASE + 'initrd = "/i.img"\n')
    assert info.value.field == "configuration-test.toml:hypervisor.qemu.initrd"


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (0, 1),
        (1, 1),
        (HOST_CPUS, HOST_CPUS),
        (HOST_CPUS + 1, HOST_CPUS),
        (-1, HOST_CPUS),
        (-100, HOST_CPUS),
    ],
)
def test_default_vcpus_kata_semantics(tmp_path: Path, requested: int, expected: int) -> None:
    loaded = _load(tmp_path, BASE + f"default_vcpus = {requested}\n")
    assert loaded.config.resources.num_vcpus == expected


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(0, max_qemu_vcpus()), (1, 1), (HOST_CPUS + 5, max_qemu_vcpus())],
)
def test_default_maxvcpus_kata_semantics(tmp_path: Path, requested: int, expected: int) -> None:
    loaded = _load(tmp_path, BASE + f"default_maxvcpus = {requested}\n")
    assert loaded.config.resources.default_max_vcpus == expected


# -- katautils' range rules: a file gets the default where Kata gives it, with a warning ----


@pytest.mark.parametrize("mib", [1, 128, 255])
def test_memory_below_minimum_in_a_file_falls_back_to_the_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mib: int
) -> None:
    """katautils' defaultMemSz: a file's default_memory under 256 MiB means 2048 MiB."""
    with caplog.at_level("WARNING", logger="virtcontainers.config.kata"):
        loaded = _load(tmp_path, BASE + f"default_memory = {mib}\n")
    assert loaded.config.resources.memory_size == 2048
    (record,) = [r for r in caplog.records if "default_memory" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert f"{mib} MiB" in record.getMessage()
    assert "2048" in record.getMessage()


def test_memory_at_the_minimum_in_a_file_is_kept(tmp_path: Path) -> None:
    assert _load(tmp_path, BASE + "default_memory = 256\n").config.resources.memory_size == 256


def test_memory_offset_is_a_64_bit_value_as_in_kata(tmp_path: Path) -> None:
    loaded = _load(tmp_path, BASE + f"memory_offset = {2**40}\n")
    assert loaded.config.resources.mem_offset == 2**40


@pytest.mark.parametrize(
    ("line", "group", "name", "expected"),
    [
        ("memory_slots = 0", "resources", "mem_slots", 10),
        ("default_bridges = 0", "devices", "default_bridges", 1),
        ("msize_9p = 0", "shared_fs", "msize_9p", 8192),
        ('block_device_driver = ""', "storage", "block_device_driver", "virtio-scsi"),
        ("default_maxvcpus = 0", "resources", "default_max_vcpus", max_qemu_vcpus()),
        ("default_vcpus = 0", "resources", "num_vcpus", 1),
    ],
)
def test_zero_or_empty_in_a_file_means_katas_default(
    tmp_path: Path, line: str, group: str, name: str, expected: object
) -> None:
    config = _load(tmp_path, BASE + line + "\n").config
    assert getattr(getattr(config, group), name) == expected


def test_vcpus_above_the_max_are_clamped_to_it(tmp_path: Path) -> None:
    """defaultVCPUs: more than the host's CPUs (capped by the VMM's limit) means that many."""
    loaded = _load(tmp_path, BASE + f"default_vcpus = {HOST_CPUS + 3}\n")
    assert loaded.config.resources.num_vcpus == min(HOST_CPUS, max_qemu_vcpus())


def test_bridges_are_clamped_to_five(tmp_path: Path) -> None:
    assert _load(tmp_path, BASE + "default_bridges = 9\n").config.devices.default_bridges == 5


def test_absent_keys_get_defaults(tmp_path: Path) -> None:
    c = _load(tmp_path, BASE).config
    assert c.resources.num_vcpus == 1
    assert c.resources.memory_size == 2048
    assert c.resources.mem_slots == 10
    assert c.devices.default_bridges == 1
    assert c.storage.block_device_driver == "virtio-scsi"
    assert c.shared_fs.msize_9p == 8192


def test_missing_paths_are_not_a_load_error(tmp_path: Path) -> None:
    text = BASE.replace("/usr/share/kata-containers/", "/nonexistent/dir/")
    loaded = _load(tmp_path, text + 'virtio_fs_daemon = "/nonexistent/virtiofsd"\n')
    assert loaded.config.boot.kernel_path == "/nonexistent/dir/vmlinuz.container"


# -- ignored keys --------------------------------------------------------------------------


def test_unknown_and_foreign_keys_are_reported(tmp_path: Path) -> None:
    loaded = _load(
        tmp_path,
        BASE
        + """
turbo = true
use_vsock = true

[factory]
enable_template = true
template_path = "/run/vc/vm/template"

[agent.kata]
enable_debug = true

[proxy.kata]
path = "/usr/libexec/kata-proxy"

[runtime]
enable_debug = true

[mystery]
x = 1
""",
    )
    reasons = {i.key: i.reason for i in loaded.ignored}
    assert reasons["hypervisor.qemu.turbo"] == "unknown key"
    assert "vsock" in reasons["hypervisor.qemu.use_vsock"]
    assert reasons["factory.enable_template"] == "factory setting: see virtcontainers.factory"
    assert reasons["factory.template_path"].startswith("factory setting")
    assert reasons["agent.kata.enable_debug"] == "not a hypervisor setting"
    assert reasons["proxy.kata.path"] == "not a hypervisor setting"
    assert reasons["runtime.enable_debug"] == "not a hypervisor setting"
    assert reasons["mystery.x"] == "unknown section"
    # Ignored keys never leak into the config.
    assert loaded.config.debugging.debug is False
    assert loaded.config.template.boot_to_be_template is False


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        ('default_memory = "lots"', "default_memory", "non-negative integer"),
        ("default_memory = -1", "default_memory", "non-negative integer"),
        ("default_memory = true", "default_memory", "non-negative integer"),
        ("default_vcpus = 1.5", "default_vcpus", "integer"),
        ("enable_iothreads = 1", "enable_iothreads", "boolean"),
        ("firmware = 42", "firmware", "string"),
        ('pflashes = "/a.img"', "pflashes", "array of strings"),
        ("virtio_fs_extra_args = [1, 2]", "virtio_fs_extra_args", "array of strings"),
        ("memory_slots = 4294967296", "memory_slots", "at most 4294967295"),
        ('enable_annotations = ["(oops"]', "enable_annotations", "regular expression"),
        ("memory_offset = 18446744073709551616", "memory_offset", "at most 18446744073709551615"),
    ],
)
def test_wrong_values_name_file_section_key(
    tmp_path: Path, line: str, key: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        _load(tmp_path, BASE + line + "\n")
    where = f"configuration-test.toml:hypervisor.qemu.{key}"
    assert where in str(info.value)
    assert info.value.field == where


def test_unknown_block_driver_lists_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="floppy") as info:
        _load(tmp_path, BASE + 'block_device_driver = "floppy"\n')
    assert "virtio-scsi" in info.value.allowed
    assert info.value.field == "configuration-test.toml:hypervisor.qemu.block_device_driver"


def test_virtio_fs_needs_daemon(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="virtiofsd"):
        _load(tmp_path, BASE + 'shared_fs = "virtio-fs"\n')


def test_unknown_hypervisor_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Unknown hypervisor type bochs") as info:
        _load(tmp_path, BASE.replace("hypervisor.qemu", "hypervisor.bochs"))
    assert info.value.field == "configuration-test.toml:hypervisor.bochs"


def test_no_hypervisor_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        _load(tmp_path, "[runtime]\nenable_debug = true\n")


def test_two_hypervisor_sections(tmp_path: Path) -> None:
    text = BASE + BASE.replace("hypervisor.qemu", "hypervisor.clh")
    with pytest.raises(ConfigError, match=r"\[hypervisor.qemu\], \[hypervisor.clh\]"):
        _load(tmp_path, text)


def test_missing_kernel_fails_validation(tmp_path: Path) -> None:
    text = BASE.replace('kernel = "/usr/share/kata-containers/vmlinuz.container"', "")
    with pytest.raises(ConfigError, match=r"configuration-test\.toml: missing kernel"):
        _load(tmp_path, text)


def test_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a valid TOML"):
        _load(tmp_path, "[hypervisor.qemu\n")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_kata_config(tmp_path / "absent.toml")


def test_clh_forces_virtio_fs_and_no_vhost_net(tmp_path: Path) -> None:
    text = BASE.replace("hypervisor.qemu", "hypervisor.clh")
    loaded = _load(
        tmp_path, text + 'virtio_fs_daemon = "/usr/libexec/virtiofsd"\ndisable_vhost_net = false\n'
    )
    assert loaded.hypervisor_type is HypervisorType.CLH
    assert loaded.config.shared_fs.shared_fs == "virtio-fs"
    assert loaded.config.devices.disable_vhost_net is True


def test_microvm_disables_nvdimm(tmp_path: Path) -> None:
    loaded = _load(tmp_path, BASE + 'machine_type = "microvm"\n')
    assert loaded.config.boot.disable_image_nvdimm is True
