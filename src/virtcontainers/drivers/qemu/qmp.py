"""QMP through the QEMU project's ``qemu.qmp``: connect by deadline, translate errors once.

Every QMP failure leaves this module as an ``ApiError`` carrying the command and QEMU's own
error text (hidden QMP errors were a Kata complaint, kata-containers#5234).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from virtcontainers.errors import ApiError, HypervisorError, HypervisorTimeout

__all__ = ["Qmp", "as_dict", "as_list"]

log = logging.getLogger(__name__)

#: The reference retries the QMP connection every 50 ms until the start timeout.
_CONNECT_RETRY = 0.05


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

    async def connect(self, deadline: float, *, abort: asyncio.Future[None] | None = None) -> None:
        """Connect and negotiate capabilities, retrying until the monotonic ``deadline``.

        Raises:
            HypervisorTimeout: QMP never answered.
        """
        while True:
            client = QMPClient(f"qmp-{self.sandbox_id}")
            try:
                await client.connect(str(self.path))
                self._client = client
                return
            except ConnectError as exc:
                if abort is not None and abort.done():
                    abort.result()
                if time.monotonic() >= deadline:
                    raise HypervisorTimeout(
                        f"connecting QMP at {self.path} ({exc})",
                        0,
                        driver="qemu",
                        sandbox_id=self.sandbox_id,
                    ) from exc
                await asyncio.sleep(_CONNECT_RETRY)

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

    async def execute_until_event(
        self,
        cmd: str,
        args: Mapping[str, object],
        *,
        event: str,
        match: Mapping[str, str],
        timeout: float,
    ) -> bool:
        """Run ``cmd`` and wait for ``event`` whose data contains ``match`` (e.g. device_del
        then DEVICE_DELETED). The listener is registered first, so the event can't be missed.
        Returns False when the event did not come within ``timeout``."""
        listener = EventListener(event)
        with self._require().listen(listener):
            await self.execute(cmd, args)
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        msg = await listener.get()
                        data = as_dict(msg.get("data"))
                        if all(data.get(k) == v for k, v in match.items()):
                            return True
            except TimeoutError:
                return False

    async def disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.disconnect()
            except (QMPError, OSError) as exc:
                log.debug("QMP disconnect: %s", exc)

    def _require(self) -> QMPClient:
        if self._client is None:
            raise HypervisorError("QMP is not connected", driver="qemu", sandbox_id=self.sandbox_id)
        return self._client
