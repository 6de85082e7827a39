"""QMP through the QEMU project's ``qemu.qmp``: connect by deadline, translate errors once.

Every QMP failure leaves this module as an ``ApiError`` carrying the command and QEMU's own
error text (hidden QMP errors were a Kata complaint, kata-containers#5234).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from virtcontainers.deadline import Deadline, poll_until
from virtcontainers.errors import ApiError, HypervisorError, HypervisorTimeout

__all__ = ["Qmp", "as_dict", "as_list"]

log = logging.getLogger(__name__)

#: The reference retries the QMP connection every 50 ms until the start timeout.
_CONNECT_RETRY = 0.05
#: How long to wait for DEVICE_DELETED before repeating a device_del.
_UNPLUG_RETRY = 3.0


def as_dict(value: object) -> dict[str, object]:
    """A QMP reply narrowed to an object ({} when it is something else)."""
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def as_list(value: object) -> list[object]:
    """A QMP reply narrowed to an array ([] when it is something else)."""
    return list(value) if isinstance(value, list) else []


class Qmp:
    """One QMP connection to one VM."""

    def __init__(self, path: Path, *, sandbox_id: str) -> None:
        self.path = path
        self.sandbox_id = sandbox_id
        self._client: QMPClient | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def connect(
        self, deadline: Deadline, *, abort: asyncio.Future[None] | None = None
    ) -> None:
        """Connect and negotiate capabilities, retrying until ``deadline``.

        QEMU serves one QMP client at a time: while another holds the socket, a new
        connection is accepted but gets no greeting. That wait is bounded by the same
        deadline (``qemu.qmp`` itself would wait forever).

        Raises:
            HypervisorTimeout: QMP never answered, or no greeting came by the deadline
                (named with the limit and the likely cause).
        """
        last: list[BaseException] = []

        async def attempt() -> QMPClient | None:
            client = QMPClient(f"qmp-{self.sandbox_id}")
            # Poll for the socket first: qemu.qmp logs every refused attempt as an error.
            if not self.path.exists():
                last[:] = [FileNotFoundError(str(self.path))]
                return None
            try:
                async with asyncio.timeout(deadline.remaining()):
                    await client.connect(str(self.path))
            except ConnectError as exc:
                last[:] = [exc]
                return None
            except TimeoutError as exc:
                with contextlib.suppress(QMPError, OSError, EOFError):
                    await client.disconnect()
                raise deadline.missed(
                    f"the QMP greeting on {self.path} (is another client connected?)",
                    driver="qemu",
                    sandbox_id=self.sandbox_id,
                ) from exc
            return client

        self._client = await poll_until(
            deadline,
            attempt,
            abort=abort,
            interval=_CONNECT_RETRY,
            on_timeout=lambda: deadline.missed(
                f"connecting QMP at {self.path} ({last[0] if last else 'no attempt'})",
                driver="qemu",
                sandbox_id=self.sandbox_id,
            ),
        )

    async def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, *, timeout: float = 30.0
    ) -> object:
        """Run one QMP command and return its result.

        Raises:
            ApiError: QEMU answered with an error (its class and description are kept).
            HypervisorError: not connected, or the connection broke.
            HypervisorTimeout: no answer within ``timeout`` seconds.
        """
        client = self._require()
        request = f"{cmd} {json.dumps(dict(args))}" if args else cmd
        try:
            async with asyncio.timeout(timeout):
                result = await client.execute(cmd, dict(args) if args else None)
        except ExecuteError as exc:
            raise ApiError(
                f"{exc.error_class}: {exc.error.error.desc}",
                request=request,
                reply=str(exc),
                driver="qemu",
                sandbox_id=self.sandbox_id,
            ) from exc
        except TimeoutError as exc:
            raise HypervisorTimeout(
                f"QMP {cmd}", timeout, driver="qemu", sandbox_id=self.sandbox_id
            ) from exc
        except QMPError as exc:
            raise HypervisorError(
                f"QMP {cmd} failed: {exc}", driver="qemu", sandbox_id=self.sandbox_id
            ) from exc
        log.debug("qmp %s -> %s", request, result)
        return result

    def send_fd(self, fd: int) -> None:
        """Pass ``fd`` to QEMU (follow with ``getfd``)."""
        self._require().send_fd_scm(fd)

    async def device_del(self, dev_id: str, *, timeout: float) -> bool:
        """``device_del`` and wait until the guest has released the device.

        The listener is registered before the command, so the event can't be missed. QEMU
        may announce the deletion only through a child (a CPU's ``.../lapic``), so any
        ``DEVICE_DELETED`` under ``/machine/peripheral/<id>`` counts, and the device's
        absence is then confirmed with ``qom-list``. False when the guest did not let go
        within ``timeout``.
        """
        path = f"/machine/peripheral/{dev_id}"
        listener = EventListener("DEVICE_DELETED")
        try:
            async with asyncio.timeout(timeout):
                with self._require().listen(listener):
                    while True:
                        await self._request_unplug(dev_id)
                        if await self._deleted(listener, dev_id, path, _UNPLUG_RETRY):
                            break
                # Polled by deadline: QEMU sends no event when the parent finally goes.
                while await self._peripheral_exists(dev_id):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
        except TimeoutError:
            return False
        return True

    async def _request_unplug(self, dev_id: str) -> None:
        # A guest still busy with an earlier ACPI hot-plug event can miss an eject request
        # (seen with CPUs under TCG), so the request is repeated until the device goes.
        # QEMU refuses a repeat for devices whose unplug is already under way: harmless.
        try:
            await self.execute("device_del", {"id": dev_id})
        except ApiError as exc:
            if "in progress" not in str(exc) and "already" not in str(exc):
                raise

    @staticmethod
    async def _deleted(listener: EventListener, dev_id: str, path: str, wait: float) -> bool:
        try:
            async with asyncio.timeout(wait):
                while True:
                    data = as_dict((await listener.get()).get("data"))
                    event_path = str(data.get("path", ""))
                    if data.get("device") == dev_id or event_path.startswith(path):
                        return True
        except TimeoutError:
            return False

    async def _peripheral_exists(self, dev_id: str) -> bool:
        children = as_list(await self.execute("qom-list", {"path": "/machine/peripheral"}))
        return any(as_dict(c).get("name") == dev_id for c in children)

    async def disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.disconnect()
            except (QMPError, OSError, EOFError) as exc:
                # QEMU closing the socket as it exits (after ``quit``) is the normal case.
                log.debug("QMP disconnect: %r", exc)

    def _require(self) -> QMPClient:
        if self._client is None:
            raise HypervisorError("QMP is not connected", driver="qemu", sandbox_id=self.sandbox_id)
        return self._client
