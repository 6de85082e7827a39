"""One sandbox's network: planned before the VMM starts, torn down after it stopped.

The sandbox asks for an :class:`Attachment` from its :class:`NetworkSpec`; the attachment
gives it driver-neutral pieces (a NIC from :mod:`virtcontainers.devices`, a kernel parameter
for the guest, the netns the VMM must run in) and owns the host-side resources: the tap
network (:mod:`.tap`) and, for published ports in tap mode, a keeper process (:mod:`.keeper`)
that forwards them and tears the network down if the VMM dies. Its :meth:`to_dict` is
persisted in the sandbox's record, so any process can tear it down later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import msgspec

from virtcontainers.config import Param
from virtcontainers.devices import ColdPlugDevice, NetDevice
from virtcontainers.errors import ConfigError, NetworkError, StoreError
from virtcontainers.network import ports
from virtcontainers.network import tap as tapnet
from virtcontainers.network.guest import GuestAddressing, mac_for
from virtcontainers.network.spec import NetworkMode, NetworkSpec
from virtcontainers.network.tap import TapNetwork
from virtcontainers.network.user import GUEST as USER_GUEST
from virtcontainers.network.user import user_device
from virtcontainers.persist.records import NetworkRecord, json_object
from virtcontainers.procfs import process_matches

__all__ = ["USER_MODE_DRIVERS", "Attachment", "tap_device"]

log = logging.getLogger(__name__)

#: Drivers whose VMM has user-mode NAT built in (slirp); the others need tap.
USER_MODE_DRIVERS = ("qemu", "mock")
KEEPER_READY_TIMEOUT = 15.0


@dataclass
class Attachment:
    """The network of one sandbox: its spec plus what was created for it."""

    spec: NetworkSpec
    sandbox_id: str
    run_dir: str
    guest: GuestAddressing | None = None
    tap: TapNetwork | None = None
    keeper_pid: int = 0
    _devices: list[ColdPlugDevice] = field(default_factory=list, repr=False)

    # -- before anything exists ---------------------------------------------------------

    @staticmethod
    def check(spec: NetworkSpec, driver: str) -> None:
        """Everything that can be refused before the sandbox is recorded.

        Raises:
            ConfigError: a mode the driver lacks, tap without root or tools, egress policy
                in user mode, a published host port already in use.
        """
        spec.check()
        if spec.mode is NetworkMode.USER:
            if driver not in USER_MODE_DRIVERS:
                raise ConfigError(
                    f"the {driver} driver has no user-mode networking: use --network tap",
                    field="network",
                    allowed=["none", "tap"],
                )
            user_device(spec, "check")  # refuses --allow-egress
        if spec.mode is NetworkMode.TAP:
            tapnet.require_tools()
        ports.check_free(spec.publish)

    # -- set up / tear down -------------------------------------------------------------

    async def setup(self) -> None:
        """Create the host side (tap mode) and the NIC; nothing to create in user mode.

        Raises:
            ConfigError: as :meth:`check` (re-checked: time passed since create).
            NetworkError: an ``ip``/``nft`` step failed (everything made so far is undone).
        """
        spec = self.spec
        if spec.mode is NetworkMode.NONE:
            return
        ports.check_free(spec.publish)
        if spec.mode is NetworkMode.USER:
            self.guest = USER_GUEST
            self._devices = [user_device(spec, self.sandbox_id)]
            return
        tapnet.require_tools()
        dns = tapnet.host_dns()
        net = await asyncio.to_thread(self._create_tap, dns)
        self.tap = net
        self.guest = net.guest(dns)
        self._devices = [tap_device(self.sandbox_id, net)]

    def _create_tap(self, dns: tuple[str, ...]) -> TapNetwork:
        with tapnet.locked():
            net = tapnet.allocate(self.spec, self.run_dir)
            net.setup(self.spec, dns)
        return net

    async def started(self, vmm_pid: int) -> None:
        """The VMM runs: in tap mode start the keeper (forwards published ports, and tears
        the network down when the VMM exits, whoever else is gone by then).

        Raises:
            NetworkError: the keeper did not come up (e.g. it could not bind a port).
        """
        if self.tap is None:
            return
        self.keeper_pid = await asyncio.to_thread(self._spawn_keeper, vmm_pid)

    def _state_path(self) -> str:
        return str(Path(self.run_dir) / "network.json")

    def _spawn_keeper(self, vmm_pid: int) -> int:
        state = Path(self._state_path())
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({**self.to_dict(), "sandbox_id": self.sandbox_id}, f)
        log_path = Path(self.run_dir) / "network.log"
        argv = [sys.executable, "-m", "virtcontainers.network.keeper", str(state),
                "--vmm-pid", str(vmm_pid)]  # fmt: skip
        with open(log_path, "ab") as log_file:
            os.chmod(log_path, 0o600)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                start_new_session=True,
            )
        assert proc.stdout is not None  # stdout=PIPE
        # The keeper prints "ready" once every published port is bound (or exits).
        line = proc.stdout.readline()
        proc.stdout.close()
        if line.strip() != b"ready":
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(KEEPER_READY_TIMEOUT)
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            raise NetworkError(
                f"sandbox {self.sandbox_id}: the network keeper did not start",
                argv=argv,
                stderr="\n".join(tail),
            )
        # Reap it if it exits while we live (no zombie); it is detached otherwise.
        threading.Thread(target=proc.wait, name=f"keeper-{proc.pid}", daemon=True).start()
        return proc.pid

    async def teardown(self) -> None:
        """Stop the keeper and remove every host-side resource. Idempotent; never raises for
        what is already gone."""
        if self.keeper_pid:
            await _stop_keeper(self.keeper_pid, self._state_path())
            self.keeper_pid = 0
        if self.tap is not None:
            await asyncio.to_thread(self.tap.teardown)
        (Path(self.run_dir) / "network.json").unlink(missing_ok=True)

    def leftovers(self) -> list[str]:
        """Host-side resources of this sandbox that still exist."""
        found = self.tap.leftovers() if self.tap is not None else []
        if self.keeper_pid and process_matches(self.keeper_pid, self._state_path()):
            found.append(f"keeper pid {self.keeper_pid}")
        return found

    # -- what the sandbox hands its driver ----------------------------------------------

    def devices(self) -> list[ColdPlugDevice]:
        """The NIC to cold-plug (after :meth:`setup`); none for mode ``none``."""
        return list(self._devices)

    def kernel_params(self) -> list[Param]:
        """What the guest's /init reads to configure eth0, /etc/hosts and resolv.conf."""
        if self.guest is None:
            return []
        key, _, value = self.guest.kernel_param().partition("=")
        return [Param(key, value)]

    @property
    def netns_path(self) -> str:
        """The network namespace the VMM must run in ("" = the caller's)."""
        return self.tap.netns_path if self.tap is not None else ""

    # -- persistence --------------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        """Persisted in the sandbox record, and shown by ``vc ps --json``."""
        out: dict[str, object] = dict(self.spec.to_dict())
        if self.guest is not None:
            out["guest"] = self.guest.to_dict()
        if self.tap is not None:
            out["tap"] = self.tap.to_dict()
        if self.keeper_pid:
            out["keeper_pid"] = self.keeper_pid
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object], sandbox_id: str, run_dir: str) -> Attachment:
        guest = data.get("guest")
        tap_state = data.get("tap")
        return cls(
            spec=NetworkSpec.from_dict(data),
            sandbox_id=sandbox_id,
            run_dir=run_dir,
            guest=GuestAddressing.from_dict(guest) if isinstance(guest, dict) else None,
            tap=TapNetwork.from_dict(tap_state) if isinstance(tap_state, dict) else None,
            keeper_pid=int(str(data.get("keeper_pid", 0))),
        )

    def to_record(self) -> NetworkRecord:
        """What the sandbox document keeps.

        Raises:
            StoreError: a value does not fit the record (a bug: this module wrote it).
        """
        data = self.to_dict()
        if self.tap is not None:  # the names and addresses are derived again on load
            data["tap"] = {"key": self.tap.key, "subnet": self.tap.subnet}
        try:
            return msgspec.convert(data, NetworkRecord, strict=True)
        except msgspec.ValidationError as exc:
            raise StoreError(f"sandbox {self.sandbox_id}: network record: {exc}") from exc

    @classmethod
    def from_record(cls, record: NetworkRecord, sandbox_id: str, run_dir: str) -> Attachment:
        return cls.from_dict(json_object(record), sandbox_id, run_dir)

    def forgotten(self) -> Attachment:
        """The same spec with nothing created (what a stopped sandbox keeps)."""
        return replace(self, guest=None, tap=None, keeper_pid=0, _devices=[])

    def sweep(self) -> bool:
        """Synchronous teardown for a sandbox whose VMM is gone (``vc ps`` after a crash
        or a host reboot): True if something had to be removed. Needs root for tap."""
        found = self.leftovers()
        if not found:
            return False
        log.info("sandbox %s: removing stale network resources: %s", self.sandbox_id, found)
        if self.keeper_pid and process_matches(self.keeper_pid, self._state_path()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.keeper_pid, signal.SIGTERM)
        if self.tap is not None and os.geteuid() == 0:
            self.tap.teardown()
        return True


def tap_device(sandbox_id: str, net: TapNetwork) -> NetDevice:
    """The NIC of a tap-mode sandbox: the netns's tap, opened by name by a VMM running there."""
    return NetDevice(
        id="net0", tap_name=tapnet.TAP_NAME, mac=mac_for(sandbox_id), netns_path=net.netns_path
    )


async def _stop_keeper(pid: int, needle: str, timeout: float = 10.0) -> None:
    # A recycled pid must not be signalled: only a process running our keeper on this
    # sandbox's state file counts (a zombie has no cmdline, so it counts as gone).
    if not process_matches(pid, needle):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_matches(pid, needle):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        await asyncio.sleep(0.02)
