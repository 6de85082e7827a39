"""The mock driver: a VM without a VMM, with the real lifecycle, limits and bookkeeping.

It is a test double for the layers above (sandbox, server, factory, CLI) and the reference
point of the shared behavioural suite: every rule a real driver enforces — state guards,
vCPU caps, memory slots and host limits, which devices can be removed — it enforces too, so a
test that passes on the mock means something. ``crash()`` makes the VMM die.

Inside a sandbox (a run dir is known) its guest is real: the guest agent ``vc-agent``, built
for the host (:func:`virtcontainers.guest.host_agent.host_agent`), runs as the "VMM" process
on ``<run dir>/mock-agent.sock`` with ``--no-poweroff``, so ``Sandbox.exec`` and ``vc exec``
run real processes (on the host: the mock isolates nothing) over the real protocol, and a
guest shutdown ends the process as a power-off ends a VMM. Its pid is the VM's pid; the run
dir is in its argv, as for every VMM, so ``vc ps`` sees it die. ``mock-vmm.json`` in the run
dir holds the run state while the VM runs or is paused, so another process can
:meth:`~MockHypervisor.reattach`, and finds it gone after a crash. The guest has no kernel of
its own: ``/proc`` is the host's, and only the agent sees the guest's CPUs and memory blocks,
in a private sysfs the mock keeps as a kernel would (a hot-added vCPU or DIMM appears offline;
the agent's ``online_cpus``/``online_memory`` online it; a removed vCPU disappears). The
count of online CPUs that ``Sandbox.resize_vcpus`` then reads from
``/sys/devices/system/cpu/online`` is the host's, so the mock grows no further than the
host's CPUs.

Outside a sandbox (the behavioural suite) there is no guest and the pids are synthetic.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from virtcontainers.config import HypervisorConfig
from virtcontainers.deadline import Deadline
from virtcontainers.devices import (
    AgentSocket,
    BlockDrive,
    ColdPlugDevice,
    CpuDevice,
    HotplugDevice,
    HybridVSock,
    MemoryDevice,
    NetDevice,
    VfioDevice,
    VhostUserDevice,
)
from virtcontainers.drivers._grpc import decode_vm, encode_vm
from virtcontainers.drivers._resize import ResizeByHotplug, cpu_add_amount
from virtcontainers.drivers.mock_guest import MockGuest, agent_socket
from virtcontainers.errors import ConfigError, HypervisorError, StateError, UnsupportedError
from virtcontainers.hypervisor import (
    Capabilities,
    Capability,
    ConsoleUrl,
    D,
    HypervisorType,
    NetworkNamespace,
    VmState,
    register_driver,
)
from virtcontainers.persist.hypervisor_state import HypervisorState
from virtcontainers.process import VmmProcess, process_matches

__all__ = ["MockHypervisor"]

#: Synthetic pids start here so they can't be confused with small real pids in test output.
_FAKE_PID_BASE = 4_000_000
#: PCI slots per bridge usable for hot-plug (slot 0 is the bridge itself).
_BRIDGE_SLOTS = 30
#: The "VMM" another process reattaches to (see the module docstring).
VMM_FILE = "mock-vmm.json"


@dataclass
class _Vm:
    cold: list[ColdPlugDevice] = field(default_factory=list)
    hot: dict[str, HotplugDevice] = field(default_factory=dict)
    hot_vcpus: list[str] = field(default_factory=list)
    dimms: dict[int, int] = field(default_factory=dict)  # slot -> MiB
    next_cpu: int = 0
    pid: int = 0
    uuid: str = ""


@register_driver(HypervisorType.MOCK)
class MockHypervisor(ResizeByHotplug):
    """In-memory VM. ``host_memory_mb`` caps memory hot-plug like the host's MemTotal does."""

    def __init__(self, host_memory_mb: int = 16384) -> None:
        super().__init__()
        self._config = HypervisorConfig()
        self._vm = _Vm()
        self._host_memory_mb = host_memory_mb
        self._run_dir = Path()
        #: The guest agent (inside a sandbox): the VM's process.
        self._guest: MockGuest | None = None

    @property
    def _process(self) -> VmmProcess | None:
        """The VM's process, named as the process-backed drivers name theirs, so the sandbox
        server waits on it and learns its exit code."""
        return self._guest.process if self._guest is not None else None

    # -- lifecycle ----------------------------------------------------------------------

    def _set_state(self, new: VmState) -> None:
        super()._set_state(new)
        if self._run_dir == Path() or not self._run_dir.is_dir():
            return
        vmm = self._run_dir / VMM_FILE
        if new in (VmState.RUNNING, VmState.PAUSED):
            guest = self._guest is not None
            vmm.write_text(json.dumps({"state": new.value, "pid": self._vm.pid, "guest": guest}))
        elif new in (VmState.STOPPED, VmState.FAILED):
            vmm.unlink(missing_ok=True)

    async def create_sandbox(
        self, id: str, network_ns: NetworkNamespace, config: HypervisorConfig
    ) -> None:
        self._require("create", VmState.NEW)
        cfg = config.copy()
        cfg.valid()
        if cfg.resources.mem_slots < 0:
            raise ConfigError("mem_slots must not be negative", field="resources.mem_slots")
        self._config = cfg
        self.sandbox_id = id
        self._vm = _Vm(uuid=str(uuid.uuid4()))
        if self._sandbox is not None:
            self._run_dir = self._sandbox.run_dir
        self._set_state(VmState.CREATED)

    async def start_sandbox(self, timeout: float) -> None:
        """Start the VM; inside a sandbox, its guest agent (ready when it accepts).

        Raises:
            ConfigError: a timeout that is not positive. LaunchError: the agent cannot be
                built or started, or exited before it listened. HypervisorTimeout: it did
                not listen within ``timeout``.
        """
        self._require("start", VmState.CREATED)
        if timeout <= 0:
            raise ConfigError("start timeout must be positive", field="timeout")
        if self._has_guest():
            await self._boot_guest(timeout)
        else:
            self._vm.pid = _FAKE_PID_BASE + (hash(self.sandbox_id) % 100_000)
        self._set_state(VmState.RUNNING)

    def _has_guest(self) -> bool:
        return self._run_dir != Path() and self._run_dir.is_dir()

    async def _boot_guest(self, timeout: float) -> None:
        self._guest = await MockGuest.boot(
            self._run_dir, Deadline.after(timeout), sandbox_id=self.sandbox_id
        )
        self._vm.pid = self._guest.process.pid
        self._guest.show_cpus(self._current_vcpus(), online=True)

    async def _stop_guest(self, *, wait: float) -> None:
        guest, self._guest = self._guest, None
        if guest is not None:
            await guest.stop(wait=wait)

    async def stop_sandbox(self, wait_only: bool = False) -> None:
        """Stop the VM; ``wait_only``: give the guest up to 10 s to exit by itself first."""
        if self.state is VmState.STOPPED:
            return
        await self._stop_guest(wait=10.0 if wait_only else 0.0)
        self._vm.pid = 0
        self._vm.hot.clear()
        self._set_state(VmState.STOPPED)

    async def pause_sandbox(self) -> None:
        self._require("pause", VmState.RUNNING)
        self._set_state(VmState.PAUSED)

    async def resume_sandbox(self) -> None:
        self._require("resume", VmState.PAUSED)
        self._set_state(VmState.RUNNING)

    async def save_sandbox(self) -> None:
        """Writes the VM's device state as JSON to ``template.devices_state_path``."""
        self._require("save", VmState.PAUSED)
        path = self._config.template.devices_state_path
        if not path:
            raise ConfigError(
                "save needs template.devices_state_path", field="template.devices_state_path"
            )
        document = json.dumps(self.save().to_dict())
        await asyncio.to_thread(Path(path).write_text, document)

    async def check(self) -> None:
        if self.state in (VmState.RUNNING, VmState.PAUSED) and not self._guest_alive():
            self._vm.pid = 0
            self._set_state(VmState.FAILED)
        if self.state is VmState.FAILED:
            raise self._error("VMM is not running (crashed)")
        self._require("check", VmState.RUNNING, VmState.PAUSED)

    def _guest_alive(self) -> bool:
        return self._guest is None or self._guest.alive()

    async def disconnect(self) -> None:
        return None

    async def cleanup(self) -> None:
        await self._stop_guest(wait=0.0)
        self._vm = _Vm()

    async def get_sandbox_console(self, sandbox_id: str) -> ConsoleUrl:
        return ConsoleUrl("unix", str(self._run_dir / "console.sock"))

    def crash(self) -> None:
        """Test hook: the VMM dies under a running guest (its guest agent is SIGKILLed)."""
        self._require("crash", VmState.RUNNING, VmState.PAUSED)
        if self._guest is not None:
            self._guest.kill()
        self._vm.pid = 0
        self._set_state(VmState.FAILED)

    # -- devices ------------------------------------------------------------------------

    async def add_device(self, device: ColdPlugDevice) -> None:
        self._require("cold-plug a device", VmState.CREATED)
        self._vm.cold.append(device)

    def cold_devices(self) -> list[ColdPlugDevice]:
        return list(self._vm.cold)

    def hot_devices(self) -> dict[str, HotplugDevice]:
        return dict(self._vm.hot)

    async def hotplug_add_device(self, device: D) -> D:
        self._require("hot-plug a device", VmState.RUNNING)
        match device:
            case CpuDevice():
                n = cpu_add_amount(
                    self._current_vcpus(), device.amount, self._config.resources.default_max_vcpus
                )
                ids = []
                for _ in range(n):
                    ids.append(f"cpu-{self._vm.next_cpu}")
                    self._vm.next_cpu += 1
                self._vm.hot_vcpus.extend(ids)
                device.amount, device.ids = n, ids
                if self._guest is not None:
                    self._guest.show_cpus(self._current_vcpus(), online=False)
                return device
            case MemoryDevice():
                self._plug_memory(device)
                if self._guest is not None:
                    self._guest.add_memory(device.size_mb)
                return device
            case BlockDrive() | NetDevice() | VfioDevice() | VhostUserDevice():
                key = _device_key(device)
                if key in self._vm.hot:
                    raise self._error(f"device {key} is already plugged")
                slot = self._free_pci_slot()
                if isinstance(device, BlockDrive):
                    device.index = len(
                        [d for d in self._vm.hot.values() if isinstance(d, BlockDrive)]
                    )
                device.pci_path = f"01/{slot:02x}"
                self._vm.hot[key] = device
                return device
        raise UnsupportedError(f"hot-plug of {type(device).__name__}", driver="mock")

    async def hotplug_remove_device(self, device: D) -> D:
        self._require("hot-unplug a device", VmState.RUNNING)
        match device:
            case CpuDevice():
                hot = self._vm.hot_vcpus
                if device.amount > len(hot):
                    raise self._error(
                        f"unable to remove {device.amount} vCPUs: only {len(hot)} were hot-added"
                    )
                device.ids = hot[len(hot) - device.amount :]
                del hot[len(hot) - device.amount :]
                if self._guest is not None:
                    self._guest.show_cpus(self._current_vcpus(), online=False)
                return device
            case MemoryDevice():
                raise UnsupportedError("memory hot-unplug", driver="mock")
            case BlockDrive() | NetDevice() | VfioDevice() | VhostUserDevice():
                key = _device_key(device)
                if key not in self._vm.hot:
                    raise self._error(f"device {key} is not plugged")
                del self._vm.hot[key]
                return device
        raise UnsupportedError(f"hot-unplug of {type(device).__name__}", driver="mock")

    def _plug_memory(self, dev: MemoryDevice) -> None:
        if dev.size_mb <= 0:
            raise ConfigError("memory to hot-plug must be positive", field="size_mb")
        current = self._current_memory_mb()
        if current + dev.size_mb > self._host_memory_mb:
            raise self._error(
                f"unable to hot-plug {dev.size_mb} MiB: the VM has {current} MiB and the host "
                f"allows {self._host_memory_mb} MiB"
            )
        slots = self._config.resources.mem_slots
        free = [s for s in range(slots) if s not in self._vm.dimms]
        if not free:
            raise self._error(f"no free memory slot (mem_slots={slots})")
        slot = free[0]
        self._vm.dimms[slot] = dev.size_mb
        dev.slot = slot

    def _error(self, message: str) -> HypervisorError:
        return HypervisorError(message, driver="mock", sandbox_id=self.sandbox_id)

    def _free_pci_slot(self) -> int:
        used = {int(d.pci_path.split("/")[1], 16) for d in self._pci_devices() if d.pci_path}
        for slot in range(1, _BRIDGE_SLOTS + 1):
            if slot not in used:
                return slot
        raise self._error("no free PCI slot on the bridges")

    def _pci_devices(self) -> list[BlockDrive | NetDevice | VfioDevice | VhostUserDevice]:
        return [d for d in self._vm.hot.values() if not isinstance(d, CpuDevice | MemoryDevice)]

    def _current_vcpus(self) -> int:
        return self._config.resources.num_vcpus + len(self._vm.hot_vcpus)

    def _current_memory_mb(self) -> int:
        return self._config.resources.memory_size + sum(self._vm.dimms.values())

    async def generate_socket(self, id: str) -> AgentSocket:
        """Inside a sandbox, the guest agent's unix socket (spoken to as a virtio-serial
        port is: the host resyncs first); outside, a hybrid-vsock address nobody serves."""
        if self._has_guest():
            return agent_socket(self._run_dir)
        return HybridVSock(uds_path=str(self._run_dir / "mock-hvsock.sock"), port=1024)

    # -- utilities ----------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return Capabilities(
            Capability.BLOCK_DEVICE
            | Capability.BLOCK_DEVICE_HOTPLUG
            | Capability.MULTI_QUEUE
            | Capability.FS_SHARING
            | Capability.NET_HOTPLUG
            | Capability.CPU_HOTPLUG
            | Capability.MEMORY_HOTPLUG
            | Capability.PAUSE
            | Capability.SAVE
        )

    def hypervisor_config(self) -> HypervisorConfig:
        return self._config.copy()

    async def get_thread_ids(self) -> dict[int, int]:
        self._require("get thread ids", VmState.RUNNING, VmState.PAUSED)
        return {i: self._vm.pid + 1 + i for i in range(self._current_vcpus())}

    def get_pids(self) -> list[int]:
        """The guest agent's pid inside a sandbox, else a synthetic one; empty unless running
        or paused."""
        return [self._vm.pid] if self._vm.pid else []

    async def to_grpc(self) -> bytes:
        self._require("serialize", VmState.RUNNING, VmState.PAUSED)
        return encode_vm(self.save(), self.state)

    async def from_grpc(self, config: HypervisorConfig, data: bytes) -> None:
        self._require("adopt a VM", VmState.NEW)
        vm = decode_vm(data, driver="mock")
        cfg = config.copy()
        cfg.valid()
        self._config = cfg
        self.load(vm.state)
        self._set_state(vm.vm_state)

    async def reattach(self, state: HypervisorState, config: HypervisorConfig) -> None:
        """Adopt the mock VM of another process from its ``mock-vmm.json``.

        Raises:
            HypervisorError: the VM is not running (stopped, or its "VMM" crashed).
        """
        self._require("adopt a VM", VmState.NEW)
        cfg = config.copy()
        cfg.valid()
        self._config = cfg
        self.load(state)
        try:
            vmm = json.loads((self._run_dir / VMM_FILE).read_text())
            run_state = VmState(vmm["state"])
        except (OSError, ValueError, KeyError, TypeError):
            raise self._error("the VM's mock VMM is gone") from None
        if vmm.get("guest"):  # its guest agent is the VM's process: it must still run
            if not (state.pid and process_matches(state.pid, str(self._run_dir))):
                raise self._error(f"the VM's mock guest (pid {state.pid}) is gone")
            self._guest = MockGuest.adopt(self._run_dir, state.pid)
        self._set_state(run_state)

    def save(self) -> HypervisorState:
        return HypervisorState(
            pid=self._vm.pid,
            type=HypervisorType.MOCK.value,
            uuid=self._vm.uuid,
            hotplugged_vcpus=tuple(self._vm.hot_vcpus),
            hotplugged_memory=sum(self._vm.dimms.values()),
            block_index_map={
                d.index: 1 for d in self._vm.hot.values() if isinstance(d, BlockDrive)
            },
            run_dir=str(self._run_dir),
            sandbox_id=self.sandbox_id,
        )

    def load(self, state: HypervisorState) -> None:
        if state.type and state.type != HypervisorType.MOCK.value:
            raise StateError("load a state", state.type, [HypervisorType.MOCK.value], driver="mock")
        self.sandbox_id = state.sandbox_id
        self._run_dir = Path(state.run_dir)
        self._vm.pid = state.pid
        self._vm.uuid = state.uuid
        self._vm.hot_vcpus = list(state.hotplugged_vcpus)
        self._vm.next_cpu = len(state.hotplugged_vcpus)
        # DIMM sizes are not kept per slot in the reference's state: restore them as one.
        self._vm.dimms = {0: state.hotplugged_memory} if state.hotplugged_memory else {}


def _device_key(dev: BlockDrive | NetDevice | VfioDevice | VhostUserDevice) -> str:
    ident = dev.bdf if isinstance(dev, VfioDevice) else dev.id
    return f"{type(dev).__name__}:{ident}"
