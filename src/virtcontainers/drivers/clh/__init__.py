"""The Cloud Hypervisor driver (``drivers/clh``): REST client, VmConfig builder, the driver."""

from virtcontainers.drivers.clh.driver import CloudHypervisor

__all__ = ["CloudHypervisor"]
