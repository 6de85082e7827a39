"""One sandbox: a VM (through a Hypervisor driver), its guest agent, its persisted state.

A sandbox's record lives in the state store (``<root>/sandboxes/<id>/state.json``), whose
directory is also the VM's run dir (sockets, console.log). So any process can list a sandbox,
exec into it and stop it, including after the process that started it has died:
:meth:`Sandbox.attach` rebuilds the driver from the record and reconnects.

A sandbox runs either in this process (``start()``: this process holds the VMM, its
control socket, the agent channel and the console) or in its own sandbox server
(``start(server=True)``, see :mod:`virtcontainers.server`): then this object, and every
``Sandbox.attach`` of it in any process, is a client of that server, which serializes control
operations and multiplexes execs from all clients. When a server's socket answers, ``attach``
uses it; when none does (no server, or it died), the record is used directly (reattach:
the recovery path).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from virtcontainers.agent.client import AgentClient, ExecProcess, ExecResult
from virtcontainers.agent.protocol import ExecSpec
from virtcontainers.config import HypervisorConfig
from virtcontainers.config.serialize import config_from_dict, config_to_dict
from virtcontainers.deadline import Deadline, poll_until
from virtcontainers.devices import (
    AgentSocket,
    ColdPlugDevice,
    CpuDevice,
    HotplugDevice,
    HybridVSock,
    MemoryDevice,
    SerialPort,
    VSock,
)
from virtcontainers.errors import (
    AgentError,
    ConfigError,
    HypervisorError,
    LaunchError,
    StateError,
    StoreError,
)
from virtcontainers.hypervisor import Hypervisor, HypervisorType, NetworkNamespace, VmState
from virtcontainers.hypervisor import new_hypervisor as _new_hypervisor
from virtcontainers.images.pull import PullPolicy, pull
from virtcontainers.images.sandbox_image import SandboxImage, exec_defaults
from virtcontainers.images.store import ImageStore, StoredImage
from virtcontainers.listing import SandboxInfo, _info, list_sandboxes
from virtcontainers.network import Attachment, NetworkSpec
from virtcontainers.persist.document import SandboxDocument
from virtcontainers.persist.hypervisor_state import HypervisorState
from virtcontainers.persist.layout import CONSOLE_LOG
from virtcontainers.persist.records import (
    AgentChannel,
    DeviceRecord,
    ExitRecord,
    HybridVsockChannel,
    SerialChannel,
    VsockChannel,
)
from virtcontainers.persist.store import StateStore
from virtcontainers.process import VmmProcess, process_matches
from virtcontainers.telemetry.tracing import traced
from virtcontainers.volumes import Volume, mount_volumes, volume_shares

if TYPE_CHECKING:
    from virtcontainers.server.client import ServerClient
    from virtcontainers.server.spawn import ServerProcess

__all__ = ["Sandbox", "SandboxInfo"]

log = logging.getLogger(__name__)

#: How long the guest may take from VMM start to an answering agent (TCG boots in ~3 s).
AGENT_READY_TIMEOUT = 60.0
#: Linux's memory block size on x86_64: hot-plugged memory is added in these units.
MEMORY_BLOCK_MB = 128


def _ids(sb: Sandbox, *_args: object, **_kwargs: object) -> dict[str, str]:
    """Every sandbox span's attributes (telemetry.tracing; docs/observability.md)."""
    return {"vc.sandbox.id": sb.id, "vc.driver": sb._doc.hypervisor_type}


def _sized(sb: Sandbox, *_args: object, **kwargs: object) -> dict[str, object]:
    info = sb.info()
    return {**_ids(sb), "vc.vcpus": info.vcpus, "vc.memory_mib": info.memory_mb,
            "vc.server": bool(kwargs.get("server", False))}  # fmt: skip


def _command(
    sb: Sandbox, argv: Sequence[str], *_args: object, **kwargs: object
) -> dict[str, object]:
    command = argv[0] if argv else ""
    return {**_ids(sb), "vc.exec.command": command, "vc.exec.tty": bool(kwargs.get("tty"))}


def _exited(result: ExecResult) -> dict[str, object]:
    code = -1 if result.exit_code is None else result.exit_code
    return {"vc.exec.exit_code": code, "vc.exec.signal": result.signal or 0,
            "vc.exec.timed_out": result.timed_out}  # fmt: skip


def _file(
    sb: Sandbox, path: str, data: bytes = b"", *_args: object, **_kw: object
) -> dict[str, object]:
    return {**_ids(sb), "vc.file.path": path, "vc.file.bytes": len(data)}


@dataclass(frozen=True)
class _Context:
    id: str
    run_dir: Path


class Sandbox:
    """A VM sandbox. Create with :meth:`create` (new) or :meth:`attach` (existing)::

    async with await Sandbox.create(config) as sb:
        result = await sb.exec(["uname", "-r"])
    """

    def __init__(self, document: SandboxDocument, store: StateStore) -> None:
        self._doc = document
        self._store = store
        self._hv: Hypervisor | None = None
        self._agent: AgentClient | None = None
        self._devices: list[ColdPlugDevice] = []
        # -- the sandbox server (virtcontainers.server) --
        self._remote: ServerClient | None = None
        self._server_proc: ServerProcess | None = None
        #: False inside the server itself (it *is* the server) and for in-process use.
        self.use_server = True
        #: The server's own agent connections come from its relay, not the channel.
        self.agent_source: Callable[[], Awaitable[AgentClient]] | None = None
        self._image: SandboxImage | None = None

    # -- construction -----------------------------------------------------------------

    @classmethod
    @traced(
        "sandbox.create",
        lambda _cls, config, **kw: {
            "vc.driver": str(kw.get("hypervisor", HypervisorType.QEMU)),
            "vc.vcpus": config.resources.num_vcpus,
            "vc.memory_mib": config.resources.memory_size,
        },
        lambda sb: {"vc.sandbox.id": sb.id},
    )
    async def create(
        cls,
        config: HypervisorConfig,
        *,
        id: str | None = None,
        hypervisor: HypervisorType | str = HypervisorType.QEMU,
        devices: Sequence[ColdPlugDevice] = (),
        store: StateStore | None = None,
        network: NetworkSpec | None = None,
        image: str | StoredImage | None = None,
        disk_size_mb: int = 0,
        image_store: ImageStore | None = None,
        tls_verify: bool = True,
        volumes: Sequence[Volume] = (),
    ) -> Sandbox:
        """Record a new sandbox (nothing runs until :meth:`start`).

        ``network``: none by default (only ``lo``); see :class:`virtcontainers.network.NetworkSpec`.

        ``image``: an OCI image reference (pulled first when it is not in ``image_store``)
        or a stored image. Its root disk is attached read-only, the guest runs every process
        in it (overlay with a tmpfs upper, or a scratch disk of ``disk_size_mb`` MiB), and
        its Env, WorkingDir and User are the defaults of :meth:`exec`.

        ``volumes``: host directories the guest mounts at start, live (virtio-9p; see
        :mod:`virtcontainers.volumes`): QEMU only, with a guest kernel that has 9p.

        Raises:
            ConfigError: invalid config, hypervisor type, scratch size, volumes (not a
                directory, a relative guest path, a driver without 9p) or network (a mode
                the driver lacks, tap without root, a malformed or busy published port, an
                egress policy the mode cannot enforce). StoreError: the id is taken or invalid, or
                the store is unusable. ImageError (and subclasses): the image cannot be
                pulled (see :func:`virtcontainers.images.pull`).
        """
        store = store or StateStore()
        # What is cheap to check goes before a pull, which can take minutes.
        kind = (
            hypervisor
            if isinstance(hypervisor, HypervisorType)
            else HypervisorType.parse(hypervisor)
        )
        for volume in volumes:
            volume.check()
        if volumes and kind is not HypervisorType.QEMU:
            raise ConfigError(
                f"volumes need virtio-9p, which the {kind.value} driver does not have here "
                "(use the qemu driver)",
                field="--volume",
            )
        sandbox_image: SandboxImage | None = None
        if image is not None:
            if isinstance(image, StoredImage):
                stored = image
            else:
                missing = PullPolicy.MISSING
                stored = await asyncio.to_thread(
                    pull, image, policy=missing, store=image_store, tls_verify=tls_verify
                )
            ref = image if isinstance(image, str) else (stored.refs[0] if stored.refs else "")
            sandbox_image = SandboxImage.from_stored(stored, ref, scratch_mb=disk_size_mb)
            config = sandbox_image.configure(config)
        checked = config.copy()
        checked.valid()
        # Recorded as given, but with the vCPUs and memory the VM boots with (a default or
        # a clamp applied): `vc ps` shows them, and it loads no config module to work them out.
        config = config.copy()
        config.resources.num_vcpus = checked.resources.num_vcpus
        config.resources.memory_size = checked.resources.memory_size
        spec = network or NetworkSpec()
        Attachment.check(spec, kind.value)
        sandbox_id = id or secrets.token_hex(6)
        run_dir = store.create_sandbox_dir(sandbox_id)
        all_devices = [*devices, *volume_shares(volumes)]
        if sandbox_image is not None:
            try:
                all_devices = [*sandbox_image.devices(run_dir), *all_devices]
            except BaseException:
                store.delete(sandbox_id)
                raise
        doc = SandboxDocument(
            id=sandbox_id,
            hypervisor_type=kind.value,
            state=VmState.CREATED,
            created_at=time.time(),
            hypervisor=HypervisorState(
                type=kind.value, run_dir=str(run_dir), sandbox_id=sandbox_id
            ),
            config=config_to_dict(config),
            devices=tuple(DeviceRecord.of(d) for d in all_devices),
            network=Attachment(spec=spec, sandbox_id=sandbox_id, run_dir=str(run_dir)).to_record(),
            image=sandbox_image,
            volumes=tuple(volumes),
        )
        store.save(sandbox_id, doc)
        sandbox = cls(doc, store)
        sandbox._devices = all_devices
        sandbox._image = sandbox_image
        return sandbox

    @classmethod
    async def attach(cls, id: str, *, store: StateStore | None = None) -> Sandbox:
        """An existing sandbox, from its record. Connections are made when first needed.

        Raises:
            StoreError: no such sandbox, or its record is unreadable (named with its path).
        """
        store = store or StateStore()
        doc = store.load(id)
        sandbox = cls(doc, store)
        try:
            sandbox._devices = [record.cold_plug() for record in doc.devices]
        except ValueError as exc:  # a hot-plug-only device in the cold-plug list
            path = str(store.state_path(id))
            raise StoreError(f"corrupt state document: {exc}", path=path) from exc
        if doc.image is not None:
            sandbox._image = SandboxImage.from_record(doc.image)
        return sandbox

    @staticmethod
    def list(store: StateStore | None = None) -> list[SandboxInfo]:
        """Every recorded sandbox, with its state checked against the live VMM process."""
        return list_sandboxes(store)

    # -- properties -------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._doc.id

    @property
    def run_dir(self) -> Path:
        return Path(self._doc.hypervisor.run_dir)

    @property
    def config(self) -> HypervisorConfig:
        return config_from_dict(self._doc.config)

    def info(self) -> SandboxInfo:
        return _info(self._doc)

    @property
    def agent_channel(self) -> AgentChannel | None:
        """The recorded agent channel (None before the VM started)."""
        return self._doc.agent

    @property
    def image(self) -> SandboxImage | None:
        """The OCI image this sandbox runs in (None: the plain busybox guest)."""
        return self._image

    @property
    def hypervisor(self) -> Hypervisor:
        """The driver, once the sandbox was started or reattached in this process."""
        if self._hv is None:
            raise StateError("use the hypervisor", self._doc.state, ["started in this process"])
        return self._hv

    # -- lifecycle --------------------------------------------------------------------

    @traced("sandbox.start", _sized)
    async def start(
        self,
        timeout: float = AGENT_READY_TIMEOUT,
        *,
        detach: bool = False,
        server: bool = False,
        ephemeral: bool = False,
    ) -> None:
        """Boot the VM and wait until the guest agent answers.

        ``server``: boot it in its own sandbox server process, which then owns the VM for its
        whole life and serves this and every other client; ``ephemeral`` ties the sandbox to
        this process: when it exits (even killed), the server stops and removes the sandbox.
        Without ``server`` the VM is this process's. ``detach`` (in-process only): afterwards
        give back the VMM control socket and the agent channel.

        Raises:
            StateError: not in the created state. ConfigError / LaunchError /
            HypervisorTimeout: the VM could not boot. AgentError: no agent answer in time.
        """
        if server and self.info().server == "dead":
            # The VM outlived its server: a new server adopts it (the recovery path).
            from virtcontainers.server.spawn import start_server

            self._server_proc = await start_server(
                self.id, self._store, timeout=timeout, ephemeral=ephemeral, adopt=True
            )
            self.reload()
            return
        if self._doc.state is not VmState.CREATED:
            raise StateError("start", self._doc.state, [VmState.CREATED])
        if server:
            from virtcontainers.server.spawn import start_server

            self._server_proc = await start_server(
                self.id, self._store, timeout=timeout, ephemeral=ephemeral
            )
            self.reload()
            return
        deadline = time.monotonic() + timeout
        hv = _new_hypervisor(self._doc.hypervisor_type)
        hv.set_sandbox(_Context(self.id, self.run_dir))
        self._hv = hv
        net = self._network()
        try:
            # The host side of the network exists before the VMM, which runs inside it.
            await net.setup()
            self._save_network(net)
            config = self.config
            config.boot.kernel_params += net.kernel_params()
            netns = NetworkNamespace(path=net.netns_path, network_created=bool(net.netns_path))
            await hv.create_sandbox(self.id, netns, config)
            for device in [*self._devices, *net.devices()]:
                await hv.add_device(device)
            await hv.start_sandbox(timeout)
            await net.started(hv.save().pid)
            self._save_network(net)
            channel = await hv.generate_socket(self.id)
            self._save(VmState.RUNNING, agent=_channel_record(channel))
            await self._wait_for_agent(deadline, timeout)
            if self._doc.volumes:
                await mount_volumes(await self._connect_agent(), self._doc.volumes)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await hv.stop_sandbox()
            with contextlib.suppress(Exception):
                await self._teardown_network()
            # The first line: a LaunchError goes on with the VMM's log tail (in the log file).
            why = f"the boot failed: {(str(exc) or type(exc).__name__).splitlines()[0]}"
            code = exc.exit_code if isinstance(exc, LaunchError) else None
            self._save(
                VmState.FAILED, exit=ExitRecord(reason=why, time=time.time(), exit_code=code)
            )
            raise
        if detach:
            await self._release()

    @traced("sandbox.adopt", _ids)
    async def adopt(self, timeout: float = 10.0) -> None:
        """Take over a running VM whose owner (a sandbox server) died: reattach to its VMM
        (control socket and console) and its agent, which then answers this process.

        Raises:
            StateError: the VM is not running or paused. HypervisorError: the VMM is gone.
            AgentError: the agent does not answer within ``timeout``.
        """
        await self._control()
        agent = await self._connect_agent(timeout=timeout)
        await agent.ping(timeout=timeout)

    @traced("sandbox.wait_for_agent", _ids)  # the guest's boot, seen from the host
    async def _wait_for_agent(self, deadline: float, timeout: float) -> None:
        while True:
            try:
                agent = await self._connect_agent()
                await agent.ping(timeout=1.0)
                return
            except AgentError:
                await self._drop_agent()
                if self._hv is not None and not self._vmm_alive():
                    await self._hv.check()  # raises HypervisorError with the VMM's exit code
                if time.monotonic() >= deadline:
                    raise AgentError(
                        f"sandbox {self.id}: the guest agent did not answer within {timeout:g} s"
                    ) from None
                await asyncio.sleep(0.05)

    @traced("sandbox.stop", lambda sb, wait_only=True: {**_ids(sb), "vc.wait_only": wait_only})
    async def stop(self, wait_only: bool = True) -> None:
        """Stop the VM. Idempotent.

        ``wait_only`` (default): ask the guest agent to sync and power off, then wait for the
        VMM to exit, so disks are flushed and the console log is complete; if the agent does
        not answer, the VMM is stopped. ``wait_only=False``: stop the VMM directly.

        Raises:
            HypervisorError: the VMM still runs but could not be controlled (e.g. its record
                does not fit the driver): it is left running and the state unchanged. Only a
                VMM that is gone is treated as gone.
        """
        if (remote := await self._server()) is not None:
            await remote.call("stop", timeout=120.0, wait_only=wait_only)
            await self._server_gone()
            return
        if not self._doc.state.live:
            if self._doc.state is VmState.CREATED:
                await _kill_unrecorded_vmm(self.run_dir)
            await self._teardown_network()
            # An ended VM keeps its state and how it ended: stopping it again changes nothing.
            self._save(self._doc.state if self._doc.state.ended else VmState.STOPPED)
            return
        try:
            # Reattach first: that also connects this process to the console (when nobody
            # else holds it), so the guest's shutdown lines reach console.log.
            hv: Hypervisor | None = await self._control()
        except HypervisorError as exc:
            if self._vmm_alive():
                raise  # not gone: e.g. a record the driver refuses, a busy control socket
            log.debug("sandbox %s: VMM already gone (%s)", self.id, exc)
            hv = None
        powered_off = False
        if wait_only and hv is not None:
            # StateError: the VMM died meanwhile; it is stopped (cleaned up) below.
            with contextlib.suppress(AgentError, StateError, OSError):
                agent = await self._connect_agent(timeout=2.0)
                await agent.shutdown(timeout=5.0)
                powered_off = True
        await self._drop_agent()
        if hv is not None:
            await hv.stop_sandbox(wait_only=powered_off)
        else:
            _remove_sockets(self.run_dir)
        await self._wait_for_owner()
        # After the VMM is gone (it runs inside the netns): remove the host-side network.
        await self._teardown_network()
        self._save(VmState.STOPPED, pid=0)

    def _vmm_alive(self) -> bool:
        """Whether the recorded VMM process still runs (the pid is checked against the run
        dir in its argv, so a recycled pid does not count)."""
        pid = self._doc.hypervisor.pid
        return bool(pid) and process_matches(pid, self._doc.hypervisor.run_dir)

    @traced("sandbox.remove", _ids)
    async def remove(self) -> None:
        """Stop if needed, then delete the sandbox's record, logs and run dir."""
        if (remote := await self._server()) is not None:
            await remote.call("remove", timeout=120.0)
            await self._server_gone(removed=True)
            return
        if self._doc.state.live:
            await self.stop()
        elif self._doc.state is VmState.CREATED:
            await _kill_unrecorded_vmm(self.run_dir)
        await self._teardown_network()
        self._store.delete(self.id)

    # -- network ----------------------------------------------------------------------

    def _network(self) -> Attachment:
        return _attachment(self._doc)

    def _save_network(self, net: Attachment) -> None:
        record = net.to_record()
        self._doc = self._store.update(
            self.id, lambda d: msgspec.structs.replace(d, network=record)
        )

    async def _teardown_network(self) -> None:
        """Remove the host side of the network (keeper, netns, tap, veth, nft tables).
        Idempotent: the record then keeps only the spec."""
        net = self._network()
        if net.tap is None and not net.keeper_pid and net.guest is None:
            return
        await net.teardown()
        self._save_network(net.forgotten())

    @traced("sandbox.pause", _ids)
    async def pause(self) -> None:
        """Freeze the guest's vCPUs.

        Raises:
            StateError: not running. HypervisorError: the VMM refused or is gone.
        """
        await self._pause_or_resume("pause", VmState.PAUSED)

    @traced("sandbox.resume", _ids)
    async def resume(self) -> None:
        """Let a paused guest run again.

        Raises:
            StateError: not paused. HypervisorError: the VMM refused or is gone.
        """
        await self._pause_or_resume("resume", VmState.RUNNING)

    async def _pause_or_resume(self, op: str, after: VmState) -> None:
        if (remote := await self._server()) is not None:
            await remote.call(op)
            self.reload()
            return
        hv = await self._control()
        await (hv.pause_sandbox() if op == "pause" else hv.resume_sandbox())
        self._save(after)

    # -- work in the guest ------------------------------------------------------------

    @traced("sandbox.exec", _command, _exited)
    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        user: str | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the guest to completion: stdout, stderr, exit code or signal.

        ``timeout`` kills the command's process group after that many seconds
        (``result.timed_out``). In an image sandbox the image's Env (under ``env``),
        WorkingDir (unless ``cwd``) and User (unless ``user`` or ``uid``/``gid``) apply.

        Raises:
            StateError: the sandbox is not running (created, stopped, exited: its VMM is
                gone). AgentError: the agent is unreachable or refused (e.g. no such program).
            ConfigError: ``user`` is not in the image's /etc/passwd or /etc/group.
        """
        env, cwd, uid, gid = exec_defaults(self._image, env, cwd, uid, gid, user)
        spec = ExecSpec(list(argv), env, cwd, uid, gid, timeout=timeout)
        return await (await self._connect_agent()).exec(spec, stdin=stdin)

    @traced("sandbox.exec_stream", _command)
    async def exec_stream(
        self,
        argv: Sequence[str],
        *,
        tty: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        timeout: float | None = None,
        tty_size: tuple[int, int] | None = None,
        detach: bool = False,
        user: str | None = None,
    ) -> ExecProcess:
        """Start ``argv``; iterate the result for ``(stream, bytes)`` as output comes, write
        its stdin with ``write_stdin``, and ``wait()`` for its exit status. Image defaults
        apply as in :meth:`exec`.

        ``tty_size``: (rows, cols) of the pty. ``detach``: the process outlives this client
        (needs a sandbox server, which keeps its output for a later ``attach``).

        Raises:
            AgentError: the agent is unreachable or refused. StateError: the sandbox is not
                running (see :meth:`exec`), or ``detach`` without a sandbox server.
        """
        env, cwd, uid, gid = exec_defaults(self._image, env, cwd, uid, gid, user)
        agent = await self._connect_agent()
        extra: list[tuple[int, bytes]] = []
        if detach:
            if agent is not self._remote:
                raise StateError("start a detached process", self._doc.state,
                                 ["running in a sandbox server (vc start, vc run)"])  # fmt: skip
            from virtcontainers.agent.protocol import Tag, tlv

            extra.append(tlv(Tag.KEEP, 1, 1))
        spec = ExecSpec(list(argv), env, cwd, uid, gid, tty=tty, tty_size=tty_size, timeout=timeout)
        return await agent.exec_stream(spec, extra_items=extra)

    @traced("sandbox.write_file", _file)
    async def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        await (await self._connect_agent()).write_file(path, data, mode)

    @traced("sandbox.read_file", _file)
    async def read_file(self, path: str) -> bytes:
        return await (await self._connect_agent()).read_file(path)

    def logs(self) -> bytes:
        """The guest console so far (kernel messages, init, agent)."""
        try:
            return (self.run_dir / CONSOLE_LOG).read_bytes()
        except FileNotFoundError:
            return b""

    # -- resources --------------------------------------------------------------------

    @traced("sandbox.hotplug", lambda sb, device: {**_ids(sb), "vc.device.kind": device.kind.value})
    async def hotplug(self, device: HotplugDevice) -> HotplugDevice:
        """Plug a device into the running VM; CPUs and memory are onlined in the guest."""
        if (remote := await self._server()) is not None:
            data = await remote.call("hotplug", timeout=120.0, device=_device_to_dict(device))
            self.reload()
            if not isinstance(data, dict):
                raise AgentError(f"malformed hotplug reply {data!r}")
            return _hotplug_from_dict(data)
        hv = await self._control()
        before = await self._guest_cpus() if isinstance(device, CpuDevice) else 0
        plugged = await hv.hotplug_add_device(device)
        if isinstance(plugged, CpuDevice) and plugged.amount:
            await self._online_cpus(before + plugged.amount)
        if isinstance(plugged, MemoryDevice) and plugged.size_mb:
            await self._online_memory(plugged.size_mb // MEMORY_BLOCK_MB)
        self._save(self._doc.state)
        if not isinstance(plugged, CpuDevice | MemoryDevice):
            record = DeviceRecord.of(plugged)
            self._doc = self._store.update(
                self.id,
                lambda d: msgspec.structs.replace(d, hotplugged=(*d.hotplugged, record)),
            )
        return plugged

    @traced("sandbox.resize_vcpus", lambda sb, vcpus: {**_ids(sb), "vc.vcpus": vcpus})
    async def resize_vcpus(self, vcpus: int) -> tuple[int, int]:
        """Returns (before, after); new vCPUs are onlined in the guest."""
        if (remote := await self._server()) is not None:
            pair = await remote.call("resize_vcpus", timeout=120.0, vcpus=vcpus)
            self.reload()
            if not (isinstance(pair, list) and len(pair) == 2):
                raise AgentError(f"malformed resize reply {pair!r}")
            return int(pair[0]), int(pair[1])
        old, new = await (await self._control()).resize_vcpus(vcpus)
        if new > old:
            await self._online_cpus(new)
        self._save(self._doc.state)
        return old, new

    @traced("sandbox.resize_memory", lambda sb, mem_mb: {**_ids(sb), "vc.memory_mib": mem_mb})
    async def resize_memory(self, mem_mb: int) -> int:
        """Grow the guest to ``mem_mb`` MiB (in 128 MiB blocks, onlined); returns the size."""
        if (remote := await self._server()) is not None:
            size = await remote.call("resize_memory", timeout=120.0, mem_mb=mem_mb)
            self.reload()
            return int(str(size))
        new, dimm = await (await self._control()).resize_memory(mem_mb, MEMORY_BLOCK_MB, False)
        if dimm.size_mb:
            await self._online_memory(dimm.size_mb // MEMORY_BLOCK_MB)
        self._save(self._doc.state)
        return new

    # The guest learns of a new CPU or DIMM from an ACPI event it handles asynchronously:
    # its sysfs entries appear some time after QEMU's reply, so onlining is retried until the
    # guest shows what was plugged (kata#1880: CPUs hot-plugged but never onlined).

    async def _guest_cpus(self) -> int:
        agent = await self._connect_agent()
        return _count_cpu_list((await agent.read_file("/sys/devices/system/cpu/online")).decode())

    async def _online_cpus(self, want: int, timeout: float = 20.0) -> None:
        agent = await self._connect_agent()
        online = 0

        async def enough() -> bool | None:
            nonlocal online
            await agent.online_cpus()
            online = await self._guest_cpus()
            return True if online >= want else None

        def late() -> AgentError:
            return AgentError(f"the guest shows {online} of {want} vCPUs online after {timeout} s")

        await poll_until(Deadline.after(timeout), enough, on_timeout=late, interval=0.05)

    async def _online_memory(self, blocks: int, timeout: float = 20.0) -> None:
        agent = await self._connect_agent()
        onlined = 0

        async def enough() -> bool | None:
            nonlocal onlined
            onlined += await agent.online_memory()
            return True if onlined >= blocks else None

        def late() -> AgentError:
            return AgentError(
                f"the guest onlined {onlined} of {blocks} memory blocks after {timeout} s"
            )

        await poll_until(Deadline.after(timeout), enough, on_timeout=late, interval=0.05)

    # -- connections ------------------------------------------------------------------

    async def _control(self) -> Hypervisor:
        """The driver, reattached to the running VMM when another process started it."""
        if self._hv is not None:
            return self._hv
        if not self._doc.state.live:
            raise StateError("control the VM", self._doc.state, [VmState.RUNNING, VmState.PAUSED])
        hv = _new_hypervisor(self._doc.hypervisor_type)
        hv.set_sandbox(_Context(self.id, self.run_dir))
        await hv.reattach(self._doc.hypervisor, self.config)
        self._hv = hv
        return hv

    async def _connect_agent(self, timeout: float = 30.0) -> AgentClient:
        if self._agent is not None:
            return self._agent
        if self.agent_source is not None:
            self._agent = await self.agent_source()
            return self._agent
        if (remote := await self._server()) is not None:
            return remote
        operation = "talk to the guest agent"
        if not self._doc.state.live:
            raise StateError(operation, self._doc.state, [VmState.RUNNING], sandbox_id=self.id)
        if self._doc.agent is None:
            raise AgentError(f"sandbox {self.id} has no agent channel (state {self._doc.state})")
        from virtcontainers.agent.transport import connect_channel

        try:
            (reader, writer), resync = await connect_channel(self._doc.agent, timeout=timeout)
        except AgentError as exc:
            if self._vmm_alive():
                raise
            # Not an agent problem: the VM is gone (it died between two commands).
            raise StateError(operation, f"{VmState.EXITED} (its VMM is gone)", [VmState.RUNNING],
                             sandbox_id=self.id) from exc  # fmt: skip
        agent = AgentClient(reader, writer, timeout=timeout, resync=resync)
        await agent.__aenter__()
        self._agent = agent
        return agent

    async def _server(self) -> ServerClient | None:
        """A connection to this sandbox's server when one answers (None: use the VM directly,
        in this process, or as the recovery path after the server died)."""
        if self._remote is not None:
            if self._remote.usable:
                return self._remote
            # The server hung up: it exits once its VM has ended. Wait, then look again.
            await self._server_gone()
        if not self.use_server:
            return None
        from virtcontainers.server.client import ServerClient, socket_path

        if not socket_path(self.run_dir).exists():
            return None
        try:
            self._remote = await ServerClient.connect(self.run_dir)
        except AgentError:
            return None  # a socket left by a dead server
        return self._remote

    async def server_client(self) -> ServerClient:
        """The connection to this sandbox's server, for its own ops (``processes``,
        ``attach``, ``kill``, ``resize_tty``).

        Raises:
            StateError: no server runs this sandbox.
        """
        remote = await self._server()
        if remote is None:
            state = self.info().state
            raise StateError("talk to the sandbox server", f"{state} without a server",
                             ["running in a sandbox server (vc start, vc run)"])  # fmt: skip
        return remote

    async def _server_gone(self, *, removed: bool = False) -> None:
        """After a stop/remove through the server: wait until it has exited (so the console
        log is complete and no process remains), then drop the connection."""
        remote, self._remote = self._remote, None
        if remote is not None:
            await remote.close()
        proc, self._server_proc = self._server_proc, None
        if proc is not None:
            await proc.wait(30.0)
        else:
            await self._wait_for_owner(30.0)
        if not removed:
            self.reload()

    def reload(self) -> None:
        """Re-read the record (a server or another process changed it)."""
        with contextlib.suppress(StoreError):
            self._doc = self._store.load(self.id)

    async def _drop_agent(self) -> None:
        agent, self._agent = self._agent, None
        if agent is not None:
            await agent.close()

    async def _release(self) -> None:
        """Give back the agent channel and the VMM control socket (the VM keeps running)."""
        await self._drop_agent()
        if self._hv is not None:
            await self._hv.disconnect()

    async def close(self) -> None:
        """Release this process's connections; the sandbox keeps running (unless it is
        ephemeral: then it ends with this process)."""
        await self._release()
        self._hv = None
        remote, self._remote = self._remote, None
        if remote is not None:
            await remote.close()

    async def _wait_for_owner(self, timeout: float = 10.0) -> None:
        """Wait for a detached owner (the shim logging the console) to finish writing."""
        pid = self._doc.owner_pid
        if not pid or pid == os.getpid() or not process_matches(pid, self.id):
            return
        owner = VmmProcess.adopt(pid)
        try:
            await owner.wait(timeout)
        finally:
            owner.close()

    def set_owner(self, pid: int) -> None:
        """Record the process that logs this sandbox's console (see ``virtcontainers.shim``)."""
        self._doc = self._store.update(self.id, lambda d: msgspec.structs.replace(d, owner_pid=pid))

    def _save(
        self,
        state: VmState,
        *,
        agent: AgentChannel | None = None,
        pid: int | None = None,
        exit: ExitRecord | None = None,
    ) -> None:
        hv_state = self._hv.save() if self._hv is not None else self._doc.hypervisor
        if pid is not None:
            hv_state = msgspec.structs.replace(hv_state, pid=pid)

        def change(d: SandboxDocument) -> SandboxDocument:
            return msgspec.structs.replace(
                d,
                state=state,
                hypervisor=hv_state,
                agent=agent if agent is not None else d.agent,
                exit=exit if exit is not None else d.exit,
            )

        self._doc = self._store.update(self.id, change)

    # -- context manager --------------------------------------------------------------

    async def __aenter__(self) -> Sandbox:
        if self._doc.state is VmState.CREATED:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.remove()


def _attachment(doc: SandboxDocument) -> Attachment:
    return Attachment.from_record(doc.network, doc.id, doc.hypervisor.run_dir)


def _count_cpu_list(text: str) -> int:
    """How many CPUs a sysfs list like ``0-2,4`` names."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def _channel_record(channel: AgentSocket) -> AgentChannel:
    match channel:
        case SerialPort():
            return SerialChannel(path=channel.host_path)
        case HybridVSock():
            return HybridVsockChannel(path=channel.uds_path, port=channel.port)
        case VSock():
            return VsockChannel(cid=channel.context_id, port=channel.port)


def _device_to_dict(device: ColdPlugDevice | HotplugDevice) -> dict[str, object]:
    return {"type": type(device).__name__, **dataclasses.asdict(device)}


def _hotplug_from_dict(data: dict[str, object]) -> HotplugDevice:
    from virtcontainers import devices
    from virtcontainers.errors import ConfigError

    fields = dict(data)
    cls = getattr(devices, str(fields.pop("type")), None)
    allowed = (devices.BlockDrive, devices.NetDevice, devices.CpuDevice, devices.MemoryDevice,
               devices.VfioDevice, devices.VhostUserDevice)  # fmt: skip
    if cls not in allowed:
        raise ConfigError(f"{data.get('type')!r} cannot be hot-plugged",
                          field="device.type", allowed=[c.__name__ for c in allowed])  # fmt: skip
    device: HotplugDevice = cls(**fields)
    return device


async def _kill_unrecorded_vmm(run_dir: Path, timeout: float = 10.0) -> None:
    """Kill a VMM of a sandbox still recorded as created: its starter (a sandbox server) was
    killed after launching it but before recording it, so nothing else would ever stop it.
    Only the VMM has the sandbox's own run dir in its argv."""
    from virtcontainers.procfs import processes_mentioning

    for pid in processes_mentioning(str(run_dir)):
        if pid == os.getpid():
            continue
        log.warning("sandbox run dir %s: killing unrecorded VMM pid %d", run_dir, pid)
        vmm = VmmProcess.adopt(pid)
        try:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await vmm.wait(timeout)
        finally:
            vmm.close()


def _remove_sockets(run_dir: Path) -> None:
    for path in run_dir.glob("*.sock"):
        path.unlink(missing_ok=True)
    (run_dir / "qemu.pid").unlink(missing_ok=True)
