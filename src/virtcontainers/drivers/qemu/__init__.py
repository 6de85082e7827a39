"""The QEMU driver (``drivers/qemu``): argv builder, QMP client, hot-plug, the driver."""

from virtcontainers.drivers.qemu.driver import QemuHypervisor

__all__ = ["QemuHypervisor"]
