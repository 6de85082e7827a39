"""Firecracker's REST API over its unix socket, on the shared client of ``drivers/_rest.py``.

Every request goes through :meth:`RestClient.send`, the driver's single boundary to httpx:
a refused connection becomes :class:`ApiUnreachable` (nothing answers on the socket yet),
a broken one or a reply that is not JSON :class:`HypervisorError`, a timeout
:class:`HypervisorTimeout`, and a non-2xx reply :class:`ApiError` carrying the request
("PUT /drives/drive_0"), the HTTP status, the raw reply and Firecracker's ``fault_message``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import ClassVar

import httpx

from virtcontainers.drivers._rest import ApiUnreachable, RestClient

__all__ = [
    "API_TIMEOUT",
    "ApiUnreachable",
    "FirecrackerApi",
    "RequestHook",
    "ResponseHook",
]

#: Per-request deadline. Firecracker answers configuration requests in microseconds; a
#: snapshot of a large guest takes longer and passes its own timeout.
API_TIMEOUT = 10.0

#: Observers of every request / reply (contract tests record them; diagnostics log them).
RequestHook = Callable[[httpx.Request], Awaitable[None]]
ResponseHook = Callable[[httpx.Response], Awaitable[None]]

JsonBody = Mapping[str, object]


class FirecrackerApi(RestClient):
    """An httpx client bound to one Firecracker API socket (``timeout`` defaults to
    :data:`API_TIMEOUT`; ``event_hooks`` take :data:`RequestHook` / :data:`ResponseHook`)."""

    driver: ClassVar[str] = "firecracker"
    api_name: ClassVar[str] = "Firecracker API"
    timeout_prefix: ClassVar[str] = "Firecracker API "
    default_request_timeout: ClassVar[float] = API_TIMEOUT

    def _refusal(self, reply: httpx.Response) -> str:
        return _fault_message(reply.text) or reply.reason_phrase

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
            ApiUnreachable, HypervisorError, HypervisorTimeout, ApiError: see the module.
        """
        json_body = dict(body) if body is not None else None
        return self.decode(await self.send(method, path, json_body, timeout=timeout))

    async def get(self, path: str, *, timeout: float | None = None) -> dict[str, object]:
        """GET a JSON object."""
        return self.json_object(await self.send("GET", path, timeout=timeout))

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
