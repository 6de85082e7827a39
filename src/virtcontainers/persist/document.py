"""The sandbox record (``state.json``): schema version 2, typed with msgspec; version 1 migrates.

Why msgspec: the record is read by every ``vc`` command and by processes that reattach to a
running VM, so a damaged or hand-edited document must fail loudly and never half-load. msgspec
decodes JSON straight into frozen Structs, checking every type (no bool for an int, no string
for a number, no NaN), refusing unknown fields, and telling which field is wrong
(``at $.hypervisor.pid``); tagged unions type the agent channel. It is one small C extension,
faster than the json module, and already the project's choice for persisted documents;
pydantic would bring a larger runtime for the same checks, and dataclasses would need the
hand-written validation this module used to carry.

Version 2 (this code writes it) differs from version 1 in that the state is a
:class:`~virtcontainers.lifecycle.VmState` value (``exited`` included), the agent channel is
a tagged object or null, and what version 1 kept as JSON strings inside ``extra`` are typed
fields: ``devices``, ``hotplugged``, ``network``, ``image``, ``owner_pid``, ``exit``.
Version 1 documents are migrated on read (and written back as version 2 on the next update);
one that cannot be migrated, or a version newer than this code, raises
:class:`~virtcontainers.errors.StoreError` naming the version.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Final

import msgspec

from virtcontainers.errors import StoreError
from virtcontainers.lifecycle import VmState
from virtcontainers.persist.hypervisor_state import HypervisorState
from virtcontainers.persist.layout import ID_PATTERN
from virtcontainers.persist.records import (
    AgentChannel,
    DeviceRecord,
    ExitRecord,
    ImageConfig,
    ImageRecord,
    NetworkRecord,
    VolumeRecord,
)

__all__ = ["SCHEMA_VERSION", "SandboxDocument"]

#: Version of the :class:`SandboxDocument` layout this code writes and the newest it reads.
SCHEMA_VERSION: Final = 2


_SandboxId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]


class SandboxDocument(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="version",
    tag=SCHEMA_VERSION,
):
    """Everything persisted about one sandbox; ``state.json`` holds :meth:`to_json`.

    Change a document with :func:`msgspec.structs.replace`, e.g. inside
    :meth:`StateStore.update`. ``config`` is the serialized HypervisorConfig (checked by
    ``config.serialize`` when it is used); everything else is checked on load.
    """

    id: _SandboxId
    hypervisor_type: str
    state: VmState
    #: Seconds since the epoch.
    created_at: float
    hypervisor: HypervisorState
    config: dict[str, Any] = {}
    annotations: dict[str, str] = {}
    #: Where the guest agent listens (None before the VM started).
    agent: AgentChannel | None = None
    #: What was cold-plugged at start, in order (image disks first).
    devices: tuple[DeviceRecord, ...] = ()
    #: Disks, NICs, ... hot-plugged since, in plug order (vCPUs and memory are in
    #: ``hypervisor``).
    hotplugged: tuple[DeviceRecord, ...] = ()
    network: NetworkRecord = NetworkRecord()
    image: ImageRecord | None = None
    #: Host directories the guest mounts at start, in order (their shares are in ``devices``).
    volumes: tuple[VolumeRecord, ...] = ()
    #: The process that owns the VM and writes its console log (its sandbox server).
    owner_pid: int = 0
    #: How the VM ended (state STOPPED, FAILED or EXITED).
    exit: ExitRecord | None = None

    def to_json(self) -> str:
        """Serialize (``"version": 2`` first), checked by decoding it back.

        Raises:
            StoreError: a value is not serializable, or would not load again (NaN, a string
                where the schema has an enum, ...): nothing unreadable is ever written.
        """
        try:
            data = msgspec.json.encode(self)
            _decoder.decode(data)
        except (TypeError, ValueError, OverflowError, msgspec.MsgspecError) as exc:
            raise StoreError(f"sandbox {self.id!r} is not serializable: {exc}") from exc
        return msgspec.json.format(data, indent=2).decode() + "\n"

    @classmethod
    def from_json(cls, data: str | bytes, *, path: str = "") -> SandboxDocument:
        """Parse and strictly check a document (migrating version 1); ``path`` is only used
        in error messages.

        Raises:
            StoreError: not JSON, wrong shape (missing, unknown or mistyped keys), a version 1
                document that cannot be migrated, or a version newer than
                :data:`SCHEMA_VERSION`.
        """
        raw_bytes = data.encode() if isinstance(data, str) else data
        try:
            raw = msgspec.json.decode(raw_bytes)
        except msgspec.DecodeError as exc:
            raise StoreError(f"corrupt state document: {exc}", path=path) from exc

        def bad(why: str) -> StoreError:
            return StoreError(f"corrupt state document: {why}", path=path)

        if not isinstance(raw, dict):
            raise bad(f"expected a JSON object, got {type(raw).__name__}")
        version = raw.get("version")
        if type(version) is not int:
            raise bad(f"'version' must be an integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"state document version {version} is newer than this virtcontainers supports "
                f"({SCHEMA_VERSION}); use a newer virtcontainers to read it",
                path=path,
            )
        if version < 1:
            raise bad(f"'version' must be >= 1, got {version}")
        if version == 1:

            def bad_v1(why: str) -> StoreError:
                return StoreError(
                    f"version 1 state document cannot be migrated to version "
                    f"{SCHEMA_VERSION}: {why}",
                    path=path,
                )

            raw_bytes = msgspec.json.encode(_migrate_v1(raw, bad_v1))
            bad = bad_v1
        try:
            return _decoder.decode(raw_bytes)
        except msgspec.ValidationError as exc:
            raise bad(str(exc)) from exc


_decoder: Final = msgspec.json.Decoder(SandboxDocument)

# -- version 1 --------------------------------------------------------------------------------

_V1_KEYS: Final = frozenset(
    {"version", "id", "hypervisor_type", "state", "created_at", "hypervisor", "config",
     "agent", "annotations", "extra"}
)  # fmt: skip


def _migrate_v1(raw: dict[str, Any], bad: Callable[[str], StoreError]) -> dict[str, Any]:
    """A version 1 document as version 2 builtins; the typed decode then checks them."""
    missing = _V1_KEYS - raw.keys()
    if missing:
        raise bad(f"missing keys {sorted(missing)}")
    unknown = raw.keys() - _V1_KEYS
    if unknown:
        raise bad(f"unknown keys {sorted(unknown)}")
    extra = raw["extra"]
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise bad("'extra' must be an object of strings")
    agent = raw["agent"]
    out: dict[str, Any] = {
        **{k: raw[k] for k in _V1_KEYS - {"agent", "extra"}},
        "version": SCHEMA_VERSION,
        "agent": agent or None,  # version 1 wrote {} before the VM started
    }

    def parsed(key: str) -> Any:
        try:
            return json.loads(extra[key])
        except ValueError as exc:
            raise bad(f"extra[{key!r}] is not JSON: {exc}") from exc

    for key in extra:
        if key == "devices":
            out["devices"] = [_v1_device(d, bad) for d in parsed(key)]
        elif key == "hotplugged":
            out["hotplugged"] = [_v1_device(_v1_json(d, bad), bad) for d in parsed(key)]
        elif key == "network":
            out["network"] = parsed(key) if extra[key] else {}
        elif key == "image":
            out["image"] = _v1_image(parsed(key), bad) if extra[key] else None
        elif key == "exit":
            out["exit"] = parsed(key)
        elif key == "owner_pid":
            if not extra[key].isdigit():
                raise bad(f"extra['owner_pid'] {extra[key]!r} is not a pid")
            out["owner_pid"] = int(extra[key])
        else:  # version 2 has no place for it: refuse rather than lose it
            raise bad(f"extra[{key!r}] is not a version 1 field")
    return out


def _v1_json(text: object, bad: Callable[[str], StoreError]) -> Any:
    try:
        return json.loads(str(text))
    except ValueError as exc:
        raise bad(f"a hot-plugged device is not JSON: {exc}") from exc


def _v1_device(data: object, bad: Callable[[str], StoreError]) -> dict[str, Any]:
    """Version 1: ``{"type": "BlockDrive", **fields}``; version 2 keeps the fields apart."""
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise bad(f"device {data!r} has no type")
    spec = dict(data)
    return {"type": spec.pop("type"), "spec": spec}


def _v1_image(data: object, bad: Callable[[str], StoreError]) -> dict[str, Any]:
    """Version 1 kept the image config in OCI spelling (``Env``, ``WorkingDir``, ...)."""
    if not isinstance(data, dict):
        raise bad("extra['image'] is not an object")
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise bad("extra['image'].config is not an object")
    record: dict[str, Any] = {**data, "config": msgspec.to_builtins(ImageConfig.from_dict(config))}
    return record
