"""Firecracker's REST API over its unix socket, with errors translated in one place.

Every request goes through :meth:`FirecrackerApi.request`, the driver's single boundary to
httpx: a refused connection or a broken reply becomes :class:`HypervisorError`
(:class:`ApiUnreachable` when nothing answers on the socket yet), a timeout
:class:`HypervisorTimeout`, and a non-2xx reply :class:`ApiError` carrying the request
("PUT /drives/drive_0"), the HTTP status, the raw reply and Firecracker's ``fault_message``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import httpx

from virtcontainers.errors import ApiError, HypervisorError, HypervisorTimeout

__all__ = [
    "API_TIMEOUT",
    "ApiUnreachable",
    "FirecrackerApi",
    "RequestHook",
    "ResponseHook",
]

log = logging.getLogger(__name__)

#: Per-request deadline. Firecracker answers configuration requests in microseconds; a
#: snapshot of a large guest takes longer and passes its own timeout.
API_TIMEOUT = 10.0
_DRIVER = "firecracker"

#: Observers of every request / reply (contract tests record them; diagnostics log them).
RequestHook = Callable[[httpx.Request], Awaitable[None]]
ResponseHook = Callable[[httpx.Response], Awaitable[None]]

JsonBody = Mapping[str, object]


class ApiUnreachable(HypervisorError):
    """Nothing accepted a connection on the API socket (not up yet, or the VMM is gone)."""


class FirecrackerApi:
    """An httpx client bound to one Firecracker API socket."""

    def __init__(
        self,
        socket_path: Path,
        *,
        sandbox_id: str = "",
        timeout: float = API_TIMEOUT,
        request_hooks: Sequence[RequestHook] = (),
        response_hooks: Sequence[ResponseHook] = (),
    ) -> None:
        self.socket_path = socket_path
        self.sandbox_id = sandbox_id
        self.timeout = timeout
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            # The host name is never resolved: the transport dials the unix socket.
            base_url="http://localhost",
            timeout=timeout,
            event_hooks={"request": list(request_hooks), "response": list(response_hooks)},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        body: JsonBody | None = None,
        *,
        timeout: float | None = None,
    ) -> object:
        """Send one request; returns the decoded JSON reply, or None for 204.

        Raises:
            ApiUnreachable: the socket refused the connection or does not exist.
            HypervisorError: the connection broke or the reply is not JSON.
            HypervisorTimeout: no reply within ``timeout`` (default: the client's).
            ApiError: Firecracker answered with an error status.
        """
        what = f"{method} {path}"
        limit = self.timeout if timeout is None else timeout
        try:
            reply = await self._client.request(
                method,
                path,
                json=dict(body) if body is not None else None,
                timeout=limit,
            )
        except httpx.TimeoutException as exc:
            raise HypervisorTimeout(
                f"Firecracker API {what}", limit, driver=_DRIVER, sandbox_id=self.sandbox_id
            ) from exc
        except httpx.ConnectError as exc:
            raise ApiUnreachable(
                f"{what}: cannot connect to the Firecracker API at {self.socket_path}: {exc}",
                driver=_DRIVER,
                sandbox_id=self.sandbox_id,
            ) from exc
        except httpx.TransportError as exc:
            raise HypervisorError(
                f"{what}: the Firecracker API connection failed: {exc!r}",
                driver=_DRIVER,
                sandbox_id=self.sandbox_id,
            ) from exc
        text = reply.text
        if not reply.is_success:
            raise ApiError(
                _fault_message(text) or reply.reason_phrase,
                request=what,
                reply=text,
                status=reply.status_code,
                driver=_DRIVER,
                sandbox_id=self.sandbox_id,
            )
        if reply.status_code == 204 or not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise HypervisorError(
                f"{what}: Firecracker answered with invalid JSON: {text[:200]!r}",
                driver=_DRIVER,
                sandbox_id=self.sandbox_id,
            ) from exc

    async def get(self, path: str, *, timeout: float | None = None) -> dict[str, object]:
        """GET a JSON object."""
        data = await self.request("GET", path, timeout=timeout)
        if not isinstance(data, dict):
            raise HypervisorError(
                f"GET {path}: expected a JSON object, got {data!r}",
                driver=_DRIVER,
                sandbox_id=self.sandbox_id,
            )
        return data

    async def put(self, path: str, body: JsonBody, *, timeout: float | None = None) -> None:
        await self.request("PUT", path, body, timeout=timeout)

    async def patch(self, path: str, body: JsonBody, *, timeout: float | None = None) -> None:
        await self.request("PATCH", path, body, timeout=timeout)

    async def instance_state(self, *, timeout: float | None = None) -> str:
        """``GET /``: the instance state ("Not started", "Running" or "Paused")."""
        info = await self.get("/", timeout=timeout)
        return str(info.get("state", ""))


def _fault_message(text: str) -> str:
    """Firecracker's error replies are ``{"fault_message": "..."}``."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text.strip()
    if isinstance(doc, dict):
        return str(doc.get("fault_message", "")) or text.strip()
    return text.strip()
