"""One httpx client on a VMM's REST API unix socket (Firecracker, Cloud Hypervisor), and the
one place where transport and HTTP failures become virtcontainers errors.

=============================  ============================================================
httpx / HTTP outcome           raised
=============================  ============================================================
timeout (connect/read/write)   ``HypervisorTimeout("<prefix>PUT /path", seconds)``
nothing accepts on the socket  :class:`ApiUnreachable` (not up yet, or the VMM is gone)
connection broke otherwise     ``HypervisorError`` naming the request
status >= 300                  ``ApiError`` (status, request "PUT /path", the raw reply, and
                               the VMM's own message from :meth:`RestClient._refusal`)
a reply that is not JSON       ``HypervisorError``
=============================  ============================================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import httpx

from virtcontainers.errors import ApiError, HypervisorError, HypervisorTimeout

__all__ = ["ApiUnreachable", "EventHook", "RestClient"]

log = logging.getLogger(__name__)

#: An httpx event hook: observes every request or reply (the contract tests record them).
EventHook = Callable[[Any], Awaitable[None]]


class ApiUnreachable(HypervisorError):
    """Nothing accepted a connection on the API socket (not up yet, or the VMM is gone)."""


class RestClient:
    """An httpx client bound to one API socket, opened lazily, closable and reopenable."""

    #: The driver name errors carry, and the API's name in messages.
    driver: ClassVar[str] = ""
    api_name: ClassVar[str] = "VMM API"
    #: Put in front of the request in timeout messages ("Firecracker API PUT /x").
    timeout_prefix: ClassVar[str] = ""
    #: Seconds per request when neither the call nor the constructor says.
    default_request_timeout: ClassVar[float] = 10.0

    def __init__(
        self,
        socket_path: Path,
        *,
        sandbox_id: str = "",
        timeout: float | None = None,
        event_hooks: Mapping[str, Sequence[EventHook]] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.sandbox_id = sandbox_id
        self.timeout = self.default_request_timeout if timeout is None else timeout
        self._event_hooks = {k: list(v) for k, v in (event_hooks or {}).items()}
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(self.socket_path)),
                # The host name is never resolved: the transport dials the unix socket.
                base_url="http://localhost",
                event_hooks=self._event_hooks,
            )
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def default_timeout(self) -> float:
        """The per-request timeout when the caller gives none."""
        return self.timeout

    def _error(self, message: str) -> HypervisorError:
        return HypervisorError(message, driver=self.driver, sandbox_id=self.sandbox_id)

    def _refusal(self, reply: httpx.Response) -> str:
        """The VMM's own account of an error reply (the ``ApiError`` message)."""
        return reply.text.strip() or reply.reason_phrase

    async def send(
        self, method: str, path: str, body: object = None, *, timeout: float | None = None
    ) -> httpx.Response:
        """Send one request and return the (2xx) reply. The driver's error boundary.

        Raises:
            ApiUnreachable: the socket refused the connection or does not exist.
            HypervisorError: the connection broke.
            HypervisorTimeout: no reply within ``timeout`` (default :meth:`default_timeout`).
            ApiError: the VMM answered with a status >= 300.
        """
        what = f"{method} {path}"
        limit = self.default_timeout() if timeout is None else timeout
        try:
            reply = await self._http().request(
                method, path, json=body, timeout=httpx.Timeout(limit)
            )
        except httpx.TimeoutException as exc:
            raise HypervisorTimeout(
                f"{self.timeout_prefix}{what}",
                limit,
                driver=self.driver,
                sandbox_id=self.sandbox_id,
            ) from exc
        except httpx.ConnectError as exc:
            raise ApiUnreachable(
                f"{what}: cannot connect to the {self.api_name} at {self.socket_path}: {exc}",
                driver=self.driver,
                sandbox_id=self.sandbox_id,
            ) from exc
        except (httpx.TransportError, OSError) as exc:
            raise self._error(f"{what}: the {self.api_name} connection failed: {exc!r}") from exc
        if reply.status_code >= 300:
            raise ApiError(
                self._refusal(reply),
                request=what,
                reply=reply.text,
                status=reply.status_code,
                driver=self.driver,
                sandbox_id=self.sandbox_id,
            )
        log.debug("%s %s %s -> %d", self.driver, what, json.dumps(body) if body else "",
                  reply.status_code)  # fmt: skip
        return reply

    def decode(self, reply: httpx.Response) -> object:
        """The reply's JSON, or None for an empty reply (204).

        Raises:
            HypervisorError: the body is not JSON.
        """
        text = reply.text
        if reply.status_code == 204 or not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise self._error(
                f"{reply.request.method} {reply.request.url.path}: the {self.api_name} "
                f"answered with invalid JSON: {text[:200]!r}"
            ) from exc

    def json_object(self, reply: httpx.Response) -> dict[str, Any]:
        """The reply as a JSON object. Raises HypervisorError for anything else."""
        data = self.decode(reply)
        if not isinstance(data, dict):
            raise self._error(
                f"{reply.request.method} {reply.request.url.path}: expected a JSON object, "
                f"got {data!r}"
            )
        return data
