"""The Firecracker driver (``drivers/firecracker``): REST client, jailer layout, the driver."""

from virtcontainers.drivers.firecracker.driver import FirecrackerHypervisor

__all__ = ["FirecrackerHypervisor"]
