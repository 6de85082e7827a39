"""The Hypervisor interface every driver implements, and the driver registry.

Mirrors the reference's ``hypervisor`` interface method for method (snake_case, async
where it waits). Optional features are declared in :meth:`Hypervisor.capabilities`;
calling one a driver lacks raises :class:`~virtcontainers.errors.UnsupportedError`: the
optional operations (pause/resume, save, hot-plug, resize, the VM-cache serialization,
reattach) have that as their default here, so a driver implements only what it has.
"""

from __future__ import annotations

import abc
import enum
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, TypeVar

from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import AgentSocket, ColdPlugDevice, HotplugDevice, MemoryDevice
from virtcontainers.errors import ConfigError, StateError, UnsupportedError, parse_enum
from virtcontainers.lifecycle import VmState
from virtcontainers.persist.hypervisor_state import HypervisorState
from virtcontainers.telemetry.tracing import instrument_hypervisor

__all__ = [
    "Capabilities",
    "Capability",
    "D",
    "ConsoleUrl",
    "Hypervisor",
    "HypervisorType",
    "NetworkNamespace",
    "SandboxContext",
    "VmState",
    "new_hypervisor",
    "register_driver",
]

log = logging.getLogger(__name__)

D = TypeVar("D", bound=HotplugDevice)


class HypervisorType(enum.StrEnum):
    """The drivers the reference knows."""

    FIRECRACKER = "firecracker"
    QEMU = "qemu"
    ACRN = "acrn"
    CLH = "clh"
    MOCK = "mock"

    @classmethod
    def parse(cls, value: str) -> HypervisorType:
        """Raises ConfigError("Unknown hypervisor type X") for any other name."""
        return parse_enum(
            cls, value, field="hypervisor", message=f"Unknown hypervisor type {value}"
        )


class Capability(enum.Flag):
    """Optional features a driver may have (the reference's ``types.Capabilities`` bits,
    plus the operations that differ between our drivers)."""

    NONE = 0
    BLOCK_DEVICE = enum.auto()
    BLOCK_DEVICE_HOTPLUG = enum.auto()
    MULTI_QUEUE = enum.auto()
    FS_SHARING = enum.auto()
    NET_HOTPLUG = enum.auto()
    HYBRID_VSOCK = enum.auto()
    CPU_HOTPLUG = enum.auto()
    MEMORY_HOTPLUG = enum.auto()
    PAUSE = enum.auto()
    SAVE = enum.auto()


@dataclass(frozen=True)
class Capabilities:
    """What a driver supports, e.g. ``Capability.BLOCK_DEVICE_HOTPLUG in caps``."""

    flags: Capability = Capability.NONE

    def __contains__(self, item: Capability) -> bool:
        return bool(item) and (self.flags & item) == item

    def names(self) -> list[str]:
        return [c.name.lower() for c in Capability if c.name and c and c in self]


@dataclass(frozen=True)
class NetworkNamespace:
    """The network namespace the VMM runs in ("" = the caller's own)."""

    path: str = ""
    network_created: bool = False


@dataclass(frozen=True)
class ConsoleUrl:
    """Where the VM console can be read: ``protocol`` is "unix" or "pty"."""

    protocol: str
    url: str


class SandboxContext(Protocol):
    """What a driver may know of the sandbox that owns it (the reference's ``setSandbox``)."""

    @property
    def id(self) -> str: ...

    @property
    def run_dir(self) -> Path: ...


class Hypervisor(abc.ABC):
    """One VM, driven through a VMM. Create, then start; stop is idempotent.

    All methods raise :class:`~virtcontainers.errors.HypervisorError` subclasses:
    ``StateError`` when called in the wrong state, ``UnsupportedError`` for a capability the
    driver lacks, ``ApiError`` when the VMM refuses, ``HypervisorTimeout`` when a deadline
    passes, ``LaunchError`` when the VMM dies or never becomes ready.
    """

    driver: ClassVar[HypervisorType]

    def __init_subclass__(cls, **kwargs: object) -> None:
        # Every driver's operations are spans (CreateVM, StartVM, ...: telemetry.tracing),
        # added here once instead of in each driver.
        super().__init_subclass__(**kwargs)
        instrument_hypervisor(cls)

    def __init__(self) -> None:
        self._state = VmState.NEW
        self._sandbox: SandboxContext | None = None
        self.sandbox_id = ""

    # -- lifecycle bookkeeping ----------------------------------------------------------

    @property
    def state(self) -> VmState:
        return self._state

    def _set_state(self, new: VmState) -> None:
        old = self._state
        if old is not new:
            log.debug("%s %s: %s -> %s", self.driver, self.sandbox_id, old, new)
            self._state = new

    def _require(self, operation: str, *allowed: VmState) -> None:
        """Raise StateError unless the VM is in one of ``allowed``."""
        if self._state not in allowed:
            raise StateError(
                operation,
                self._state.value,
                [s.value for s in allowed],
                driver=self.driver.value,
                sandbox_id=self.sandbox_id,
            )

    # -- VM manager ---------------------------------------------------------------------

    @abc.abstractmethod
    async def create_sandbox(
        self, id: str, network_ns: NetworkNamespace, config: HypervisorConfig
    ) -> None:
        """Validate ``config`` and prepare the VM (no guest runs yet). Raises ConfigError."""

    @abc.abstractmethod
    async def start_sandbox(self, timeout: float) -> None:
        """Launch the VMM and wait, up to ``timeout`` seconds, until its control API answers."""

    @abc.abstractmethod
    async def stop_sandbox(self, wait_only: bool = False) -> None:
        """Stop the VM and clean up. With ``wait_only`` the guest is powering itself off:
        wait (bounded) for the VMM to exit instead of ending it. Idempotent."""

    async def pause_sandbox(self) -> None:
        """Freeze the vCPUs. Optional (``Capability.PAUSE``): UnsupportedError by default."""
        raise self._unsupported_op("pause")

    async def resume_sandbox(self) -> None:
        """Unfreeze the vCPUs. Optional (``Capability.PAUSE``)."""
        raise self._unsupported_op("resume")

    async def save_sandbox(self) -> None:
        """Save the device state to ``template.devices_state_path`` (for VM templating).
        Optional (``Capability.SAVE``)."""
        raise self._unsupported_op("saving the VM state (VM templating)")

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise HypervisorError unless the VMM is alive and the guest is not in error."""

    @abc.abstractmethod
    async def disconnect(self) -> None:
        """Drop the control connection without stopping the VM."""

    @abc.abstractmethod
    async def cleanup(self) -> None:
        """Remove what the driver left on the host (sockets, files). Idempotent."""

    @abc.abstractmethod
    async def get_sandbox_console(self, sandbox_id: str) -> ConsoleUrl:
        """Where the guest console can be read."""

    # -- device manager -----------------------------------------------------------------

    @abc.abstractmethod
    async def add_device(self, device: ColdPlugDevice) -> None:
        """Cold-plug ``device``: allowed only before start."""

    async def hotplug_add_device(self, device: D) -> D:
        """Plug ``device`` into the running VM.

        Returns the same object, updated with what the driver did: PCI path, slot, and for
        CPU/memory the amount really added (vCPU growth is capped at max vCPUs). Optional
        (the ``*_HOTPLUG`` capabilities): UnsupportedError by default.
        """
        self._require("hot-plug a device", VmState.RUNNING)
        raise self._unsupported_op(f"hot-plug of {type(device).__name__}")

    async def hotplug_remove_device(self, device: D) -> D:
        """Unplug ``device`` from the running VM; returns the same object, updated.
        Optional: UnsupportedError by default."""
        self._require("hot-unplug a device", VmState.RUNNING)
        raise self._unsupported_op(f"hot-unplug of {type(device).__name__}")

    async def resize_memory(
        self, mem_mb: int, memory_block_size_mb: int, probe: bool
    ) -> tuple[int, MemoryDevice]:
        """Grow the VM to ``mem_mb`` MiB in blocks; returns (new size MiB, the added DIMM).
        Optional (``Capability.MEMORY_HOTPLUG``): UnsupportedError by default."""
        raise self._unsupported_op(f"memory resize to {mem_mb} MiB")

    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        """Hot-add or remove vCPUs until there are ``vcpus``; returns (old, new) counts.
        Optional (``Capability.CPU_HOTPLUG``): UnsupportedError by default."""
        raise self._unsupported_op(f"vCPU resize to {vcpus}")

    @abc.abstractmethod
    async def generate_socket(self, id: str) -> AgentSocket:
        """The channel the guest agent will listen on (vsock, hybrid vsock or serial)."""

    # -- utilities ----------------------------------------------------------------------

    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abc.abstractmethod
    def hypervisor_config(self) -> HypervisorConfig: ...

    async def get_thread_ids(self) -> dict[int, int]:
        """vCPU index -> host thread id ({} when the VMM has no host thread per vCPU)."""
        self._require("get thread ids", VmState.RUNNING, VmState.PAUSED)
        return {}

    @abc.abstractmethod
    def get_pids(self) -> list[int]:
        """Host pids of the VM's processes, the VMM first; empty when not running."""

    async def to_grpc(self) -> bytes:
        """Serialize this running VM so another process can adopt it (VM cache).
        Optional: UnsupportedError by default."""
        raise self._unsupported_op("serializing the VM for a VM cache")

    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        """Adopt a running VM serialized by :meth:`to_grpc`. Optional."""
        raise self._unsupported_op("adopting a VM from a VM cache")

    async def reattach(self, state: HypervisorState, config: HypervisorConfig) -> None:
        """Take over a VM another process started on this host, from what that process
        persisted (:meth:`save`) and the sandbox's config. Afterwards the VM is RUNNING or
        PAUSED here and every operation works as in the starting process.

        Raises:
            HypervisorError: the VMM is gone; UnsupportedError: the driver cannot adopt.
        """
        raise self._unsupported_op("adopting a VM started by another process")

    @abc.abstractmethod
    def save(self) -> HypervisorState: ...

    @abc.abstractmethod
    def load(self, state: HypervisorState) -> None: ...

    #: The VMM enforces network rate limits itself (Firecracker, Cloud Hypervisor).
    rate_limiter_builtin: ClassVar[bool] = False

    def is_rate_limiter_builtin(self) -> bool:
        """True when the VMM enforces network rate limits itself."""
        return self.rate_limiter_builtin

    def set_sandbox(self, sandbox: SandboxContext) -> None:
        self._sandbox = sandbox

    def _unsupported_op(self, operation: str) -> UnsupportedError:
        return UnsupportedError(operation, driver=self.driver.value, sandbox_id=self.sandbox_id)


instrument_hypervisor(Hypervisor)  # the base's defaults (UnsupportedError) are spans too


# -- registry ---------------------------------------------------------------------------

_DRIVER_MODULES: dict[HypervisorType, str] = {
    HypervisorType.QEMU: "virtcontainers.drivers.qemu",
    HypervisorType.FIRECRACKER: "virtcontainers.drivers.firecracker",
    HypervisorType.CLH: "virtcontainers.drivers.clh",
    HypervisorType.ACRN: "virtcontainers.drivers.acrn",
    HypervisorType.MOCK: "virtcontainers.drivers.mock",
}
_FACTORIES: dict[HypervisorType, Callable[[], Hypervisor]] = {}


def register_driver(
    kind: HypervisorType | str,
) -> Callable[[type[Hypervisor]], type[Hypervisor]]:
    """Class decorator: make ``new_hypervisor(kind)`` build this driver."""
    htype = HypervisorType(kind)

    def decorate(cls: type[Hypervisor]) -> type[Hypervisor]:
        cls.driver = htype
        _FACTORIES[htype] = cls
        return cls

    return decorate


def new_hypervisor(kind: HypervisorType | str) -> Hypervisor:
    """A fresh driver instance for ``kind``.

    Raises:
        ConfigError: unknown hypervisor type, or the driver is not available in this build.
    """
    htype = kind if isinstance(kind, HypervisorType) else HypervisorType.parse(kind)
    if htype not in _FACTORIES:
        try:
            importlib.import_module(_DRIVER_MODULES[htype])
        except ImportError as exc:
            raise ConfigError(
                f"the {htype} driver is not available: {exc}", field="hypervisor"
            ) from exc
    return _FACTORIES[htype]()
