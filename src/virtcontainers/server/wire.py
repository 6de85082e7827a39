"""The server's own requests on top of the agent framing: JSON in a SERVER frame.

A client sends ``SERVER`` frames (type 0x20) whose payload is a UTF-8 JSON object
``{"op": NAME, "args": {...}}``, plus ``"traceparent"`` (W3C trace context) when the
client's operation is traced, so the server's spans join the client's trace. The server
answers with an ``OK`` frame of the same id whose TLV ``DATA`` item holds
``{"result": VALUE}`` or ``{"error": {"kind", "message", "attrs"}}``.
Errors are rebuilt on the client as the same public class from :mod:`virtcontainers.errors`,
with the same message and data attributes, so a ``StateError`` raised in the server is a
``StateError`` in the client.

Pure (no I/O), like :mod:`virtcontainers.agent.protocol`.
"""

from __future__ import annotations

import json

from virtcontainers import errors
from virtcontainers.agent.protocol import Tag, tlv
from virtcontainers.errors import AgentError, VirtContainersError

__all__ = [
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_request",
    "encode_result",
]

JsonObject = dict[str, object]

#: The EXEC item (for the server, never sent on to the agent) that keeps the process, and
#: its output for a later ``attach``, after its client goes: ``vc exec -d``.
KEEP = tlv(Tag.KEEP, 1, 1)


def encode_request(op: str, args: JsonObject, traceparent: str | None = None) -> bytes:
    body: JsonObject = {"op": op, "args": args}
    if traceparent:
        body["traceparent"] = traceparent
    return json.dumps(body, separators=(",", ":")).encode()


def decode_request(payload: bytes) -> tuple[str, JsonObject, str | None]:
    """``(op, args, traceparent)``. Raises ``AgentError`` for a payload that is not
    ``{"op": str, "args": object}``."""
    try:
        raw = json.loads(payload)
    except ValueError as exc:
        raise AgentError(f"server request is not JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("op"), str):
        raise AgentError("server request must be an object with a string 'op'")
    args = raw.get("args", {})
    if not isinstance(args, dict):
        raise AgentError("server request 'args' must be an object")
    parent = raw.get("traceparent")
    return raw["op"], args, parent if isinstance(parent, str) else None


def encode_result(value: object) -> bytes:
    return json.dumps({"result": value}, separators=(",", ":")).encode()


def encode_error(exc: VirtContainersError) -> bytes:
    # The nearest public class: a private subclass (e.g. AgentRequestError) travels as its
    # public parent, whose attributes are a subset.
    kind = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in errors.__all__)
    attrs = {k: v for k, v in vars(exc).items() if _jsonable(v)}
    body = {"error": {"kind": kind, "message": str(exc), "attrs": attrs}}
    return json.dumps(body, separators=(",", ":")).encode()


def decode_reply(payload: bytes) -> object:
    """The result of a reply, or raise the error it carries.

    Raises:
        VirtContainersError: the server's error, rebuilt as its public class.
        AgentError: the reply is malformed.
    """
    try:
        raw = json.loads(payload)
    except ValueError as exc:
        raise AgentError(f"server reply is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise AgentError("server reply must be a JSON object")
    if "error" in raw:
        raise _rebuild(raw["error"])
    return raw.get("result")


def _rebuild(data: object) -> VirtContainersError:
    if not isinstance(data, dict):
        return AgentError(f"malformed server error: {data!r}")
    kind, message, attrs = data.get("kind"), str(data.get("message", "")), data.get("attrs")
    cls = getattr(errors, str(kind), None) if kind in errors.__all__ else None
    if not (isinstance(cls, type) and issubclass(cls, VirtContainersError)):
        return AgentError(f"server error {kind}: {message}")
    # The constructors differ per class (and format their messages); the message is already
    # formatted, so build the instance without them and restore its data attributes.
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    if isinstance(attrs, dict):
        for key, value in attrs.items():
            setattr(exc, str(key), tuple(value) if isinstance(value, list) else value)
    return exc


def _jsonable(value: object) -> bool:
    if value is None or isinstance(value, str | int | float | bool):
        return True
    if isinstance(value, list | tuple):
        return all(_jsonable(v) for v in value)
    return False
