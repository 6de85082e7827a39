"""The boot configuration of a Firecracker VM: its kernel command line and the ordered API
requests (logger, metrics, machine, boot source, drives, NICs, vsock) sent before
``InstanceStart``. Pure: builds bodies, sends nothing."""

from __future__ import annotations

from collections.abc import Sequence

from virtcontainers.config import HypervisorConfig, Param, serialize_params
from virtcontainers.config.defaults import VIRTIO_BLK_KERNEL_ROOT_PARAMS
from virtcontainers.devices import BlockDrive, HybridVSock, NetDevice
from virtcontainers.drivers.firecracker.drives import DISK_POOL_SIZE, ROOT_DRIVE_ID
from virtcontainers.drivers.firecracker.paths import FcPaths, placeholder_id

__all__ = [
    "Request",
    "boot_requests",
    "cold_drive_body",
    "kernel_params",
    "net_body",
    "rate_limiter",
    "revert_bytes",
]

#: One API request: path and JSON body (all ``PUT`` before boot).
Request = tuple[str, dict[str, object]]

#: Refill time of the network token buckets, in ms (the reference's value).
_REFILL_TIME_MS = 1000

# The reference's Firecracker kernel parameters (virtio-mmio devices, no PCI, no ACPI).
_KERNEL_PARAMS = (
    Param("pci", "off"),
    Param("reboot", "k"),
    Param("panic", "1"),
    Param("iommu", "off"),
    Param("net.ifnames", "0"),
    Param("random.trust_cpu", "on"),
    # Firecracker's x86 guests had no ACPI tables in the reference's era
    # ("ACPI BIOS Error (bug)" otherwise).
    Param("acpi", "off"),
)


def kernel_params(cfg: HypervisorConfig) -> str:
    """The guest kernel command line.

    Like the reference: the serial console only when debugging (``console=ttyS0``),
    otherwise no UART at all (``8250.nr_uarts=0``, faster boots). ``vc.agent=vsock`` tells
    our guest agent to listen on vsock port 1024. The user's parameters come last so they
    override ours.
    """
    params = list(_KERNEL_PARAMS)
    if cfg.image_asset_path():
        params += VIRTIO_BLK_KERNEL_ROOT_PARAMS
    if cfg.debugging.debug:
        params += [Param("console", "ttyS0"), Param("debug")]
    else:
        params += [Param("8250.nr_uarts", "0"), Param("quiet")]
    params.append(Param("vc.agent", "vsock"))
    params += cfg.boot.kernel_params
    return " ".join(serialize_params(params, "="))


def revert_bytes(num: int) -> int:
    """The reference's conversion of a 1000-scaled quantity into a 1024-scaled one."""
    high, low = divmod(num, 1000)
    if high == 0:
        return num
    return 1024 * revert_bytes(high) + low


def rate_limiter(bits_per_second: int) -> dict[str, object] | None:
    """A Firecracker RateLimiter for a limit in bits/s (0 = none).

    Kata's limits are bits with a 1000 scale; Firecracker's token bucket holds bytes with a
    1024 scale and refills every second.
    """
    if bits_per_second <= 0:
        return None
    size = revert_bytes(bits_per_second // 8)
    return {"bandwidth": {"size": size, "refill_time": _REFILL_TIME_MS}}


def cold_drive_body(drive: BlockDrive, *, jailed: bool) -> dict[str, object]:
    path = f"/cold-{drive.id}" if jailed else drive.file
    return {
        "drive_id": drive.id,
        "path_on_host": path,
        "is_root_device": False,
        "is_read_only": drive.read_only,
    }


def net_body(dev: NetDevice, cfg: HypervisorConfig) -> dict[str, object]:
    net = cfg.network
    body: dict[str, object] = {"iface_id": dev.id, "host_dev_name": dev.tap_name}
    if dev.mac:
        body["guest_mac"] = dev.mac
    # The device's own limit wins over the VM-wide one.
    for key, device_rate, vm_rate in (
        ("rx_rate_limiter", dev.rx_rate_limiter_max_rate, net.rx_rate_limiter_max_rate),
        ("tx_rate_limiter", dev.tx_rate_limiter_max_rate, net.tx_rate_limiter_max_rate),
    ):
        limiter = rate_limiter(device_rate or vm_rate)
        if limiter is not None:
            body[key] = limiter
    return body


def boot_requests(
    cfg: HypervisorConfig,
    paths: FcPaths,
    boot: dict[str, str],
    cold: Sequence[BlockDrive | NetDevice],
    vsock: HybridVSock,
) -> list[Request]:
    """The reference's configuration order: logger and metrics first (so the rest is
    logged), machine, boot source, root drive, placeholder pool, cold devices, vsock.

    ``boot`` holds the API paths of ``kernel``, ``initrd`` and ``image`` ("" when absent).
    """
    requests: list[Request] = [
        (
            "/logger",
            {
                "log_path": paths.api(paths.log_fifo.name),
                "level": "Debug" if cfg.debugging.debug else "Warning",
                "show_level": True,
                "show_log_origin": True,
            },
        ),
        ("/metrics", {"metrics_path": paths.api(paths.metrics_fifo.name)}),
        (
            "/machine-config",
            {
                "vcpu_count": cfg.resources.num_vcpus,
                "mem_size_mib": cfg.resources.memory_size,
                "smt": False,
            },
        ),
    ]
    source: dict[str, object] = {
        "kernel_image_path": boot["kernel"],
        "boot_args": kernel_params(cfg),
    }
    if boot["initrd"]:
        source["initrd_path"] = boot["initrd"]
    requests.append(("/boot-source", source))
    if boot["image"]:
        # A regular, read-only drive; the kernel mounts it by root=/dev/vda1, which
        # allows a partitioned image (the reference's choice over is_root_device).
        requests.append(
            (
                f"/drives/{ROOT_DRIVE_ID}",
                {
                    "drive_id": ROOT_DRIVE_ID,
                    "path_on_host": boot["image"],
                    "is_root_device": False,
                    "is_read_only": True,
                },
            )
        )
    for slot in range(DISK_POOL_SIZE):
        requests.append(
            (
                f"/drives/{placeholder_id(slot)}",
                {
                    "drive_id": placeholder_id(slot),
                    "path_on_host": paths.api(paths.placeholder_name(slot)),
                    "is_root_device": False,
                    "is_read_only": False,
                },
            )
        )
    for device in cold:
        if isinstance(device, BlockDrive):
            requests.append(
                (f"/drives/{device.id}", cold_drive_body(device, jailed=paths.jail is not None))
            )
        else:
            requests.append((f"/network-interfaces/{device.id}", net_body(device, cfg)))
    requests.append(
        ("/vsock", {"guest_cid": vsock.context_id, "uds_path": paths.api("vsock.sock")})
    )
    return requests
