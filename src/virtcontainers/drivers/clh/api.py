"""The Cloud Hypervisor REST API over its unix socket, on the shared client of
``drivers/_rest.py`` (its table says which error each httpx or HTTP outcome becomes;
every call goes through :meth:`ClhApi.request`).

Timeouts follow the reference (1 s per request, 5 s for hot-plug, 10 s for ping and boot)
with one change, for kata-containers#6240: the short per-request timeout only applies
once the VMM has answered a ping. Before that (a VMM still starting on a loaded host) every
request gets the long timeout, so a slow start is not mistaken for a dead API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar

import httpx

from virtcontainers.deadline import Deadline, poll_until
from virtcontainers.drivers._rest import RestClient
from virtcontainers.errors import ApiError, HypervisorError, HypervisorTimeout

__all__ = [
    "API_TIMEOUT",
    "BOOT_TIMEOUT",
    "HOTPLUG_TIMEOUT",
    "PING_TIMEOUT",
    "ClhApi",
    "EventHooks",
    "Json",
]

log = logging.getLogger(__name__)

#: The reference's ``clhAPITimeout``: one ordinary request, once the VMM has answered.
API_TIMEOUT = 1.0
#: The reference's ``clhHotPlugAPITimeout``.
HOTPLUG_TIMEOUT = 5.0
#: The reference's ``clhTimeout``: the VMM answering ``vmm.ping`` after launch, and boot.
PING_TIMEOUT = 10.0
BOOT_TIMEOUT = 10.0
#: Poll interval while waiting for the API socket to answer.
_PING_RETRY = 0.01

_BASE_PATH = "/api/v1"

#: A JSON document as the API exchanges it.
Json = dict[str, Any]
#: httpx event hooks ("request" / "response"): the contract tests record traffic with them.
EventHooks = Mapping[str, Sequence[Callable[..., Awaitable[None]]]]


class ClhApi(RestClient):
    """One Cloud Hypervisor API socket. The httpx client is opened lazily and can be closed
    and reopened (``disconnect`` then another call)."""

    driver: ClassVar[str] = "clh"
    api_name: ClassVar[str] = "Cloud Hypervisor API"

    #: True once ``vmm.ping`` answered: from then on the short per-request timeout holds.
    answered = False

    def default_timeout(self) -> float:
        """1 s once the VMM has answered a ping, the ping timeout before (kata #6240)."""
        return API_TIMEOUT if self.answered else PING_TIMEOUT

    def _refusal(self, reply: httpx.Response) -> str:
        text = reply.text.strip()
        return f"HTTP {reply.status_code} {reply.reason_phrase}: {text or '(empty reply)'}"

    async def request(
        self, method: str, endpoint: str, body: Json | None = None, *, timeout: float | None = None
    ) -> httpx.Response:
        """Send one request to ``/api/v1/<endpoint>`` and return the (2xx) reply.

        Raises:
            ApiError: the VMM answered with a status >= 300 (status, request, reply body kept).
            HypervisorTimeout: no answer within ``timeout`` (default :meth:`default_timeout`).
            HypervisorError: the socket is gone (ApiUnreachable) or the connection broke.
        """
        return await self.send(method, f"{_BASE_PATH}/{endpoint}", body, timeout=timeout)

    def _json(self, reply: httpx.Response) -> Json:
        return self.json_object(reply)

    # -- readiness ----------------------------------------------------------------------

    async def wait_ready(
        self, deadline: Deadline, *, abort: asyncio.Future[None] | None = None
    ) -> Json:
        """Ping until the VMM answers or ``deadline`` passes.

        ``abort`` (e.g. "the VMM exited") ends the wait early with that future's exception.

        Raises:
            HypervisorTimeout: no answer by the deadline.
        """
        last: list[HypervisorError] = []

        async def ping() -> Json | None:
            if not self.socket_path.exists():
                return None
            try:
                info = await self.ping(timeout=min(deadline.remaining(0.01), PING_TIMEOUT))
            except (HypervisorTimeout, ApiError):
                raise
            except HypervisorError as exc:
                last[:] = [exc]  # refused: the VMM has not started listening yet
                return None
            self.answered = True
            return info

        def late() -> HypervisorTimeout:
            why = last[0] if last else "no socket"
            what = f"vmm.ping on {self.socket_path} ({why!r})"
            return deadline.missed(what, driver="clh", sandbox_id=self.sandbox_id)

        return await poll_until(deadline, ping, abort=abort, interval=_PING_RETRY, on_timeout=late)

    # -- endpoints ----------------------------------------------------------------------

    async def ping(self, *, timeout: float | None = None) -> Json:
        """``GET /vmm.ping`` -> VmmPingResponse."""
        return self._json(await self.request("GET", "vmm.ping", timeout=timeout))

    async def shutdown_vmm(self, *, timeout: float | None = None) -> None:
        """``PUT /vmm.shutdown``: the VMM process exits."""
        await self.request("PUT", "vmm.shutdown", timeout=timeout)

    async def create_vm(self, config: Json, *, timeout: float = BOOT_TIMEOUT) -> None:
        await self.request("PUT", "vm.create", config, timeout=timeout)

    async def boot_vm(self, *, timeout: float = BOOT_TIMEOUT) -> None:
        await self.request("PUT", "vm.boot", timeout=timeout)

    async def vm_info(self, *, timeout: float | None = None) -> Json:
        """``GET /vm.info`` -> VmInfo (``config``, ``state``, ``memory_actual_size``)."""
        return self._json(await self.request("GET", "vm.info", timeout=timeout))

    async def pause_vm(self) -> None:
        await self.request("PUT", "vm.pause")

    async def resume_vm(self) -> None:
        await self.request("PUT", "vm.resume")

    async def snapshot_vm(self, destination_url: str, *, timeout: float) -> None:
        await self.request(
            "PUT", "vm.snapshot", {"destination_url": destination_url}, timeout=timeout
        )

    async def resize_vm(
        self, *, desired_vcpus: int | None = None, desired_ram: int | None = None
    ) -> None:
        """``PUT /vm.resize``; ``desired_ram`` is bytes."""
        body: Json = {}
        if desired_vcpus is not None:
            body["desired_vcpus"] = desired_vcpus
        if desired_ram is not None:
            body["desired_ram"] = desired_ram
        await self.request("PUT", "vm.resize", body, timeout=HOTPLUG_TIMEOUT)

    async def add(self, kind: str, config: Json) -> Json:
        """``PUT /vm.add-<kind>`` (disk, net, device, fs) -> PciDeviceInfo."""
        reply = await self.request("PUT", f"vm.add-{kind}", config, timeout=HOTPLUG_TIMEOUT)
        if reply.status_code == 204:
            raise self._error(f"vm.add-{kind}: the VM took the device cold (it is not running)")
        return self._json(reply)

    async def remove_device(self, device_id: str) -> None:
        await self.request("PUT", "vm.remove-device", {"id": device_id}, timeout=HOTPLUG_TIMEOUT)
