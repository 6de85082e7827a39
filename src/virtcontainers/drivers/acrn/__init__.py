"""The ACRN driver (``drivers/acrn``): the acrn-dm argv, the UUID pool, the driver."""

from virtcontainers.drivers.acrn.argv import (
    AGENT_PORT_NAME,
    BLK_POOL_SIZE,
    DUMMY_SLOTS,
    NODISK,
    AcrnArgv,
    AcrnPaths,
    build_argv,
    kernel_parameters,
)
from virtcontainers.drivers.acrn.driver import (
    ACRN_DEVICE_NODES,
    DEFAULT_ACRN_DM,
    DEFAULT_ACRNCTL,
    AcrnHypervisor,
    acrn_host_problem,
)
from virtcontainers.drivers.acrn.uuids import ACRN_UUIDS, UuidPool

__all__ = [
    "ACRN_DEVICE_NODES",
    "ACRN_UUIDS",
    "AGENT_PORT_NAME",
    "BLK_POOL_SIZE",
    "DEFAULT_ACRNCTL",
    "DEFAULT_ACRN_DM",
    "DUMMY_SLOTS",
    "NODISK",
    "AcrnArgv",
    "AcrnHypervisor",
    "AcrnPaths",
    "UuidPool",
    "acrn_host_problem",
    "build_argv",
    "kernel_parameters",
]
