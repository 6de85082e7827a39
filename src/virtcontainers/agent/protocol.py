"""Wire format of the guest agent protocol (see ``docs/agent-protocol.md``).

Every message is a frame::

    0      4      5     6       8     12       16            20            24
    +------+------+-----+-------+-----+--------+-------------+-------------+---------+
    | VCAG | ver  | typ | flags | id  | length | payload crc | header crc  | payload |
    +------+------+-----+-------+-----+--------+-------------+-------------+---------+

big-endian integers, CRC-32 as ``zlib.crc32``. Control payloads are TLV lists
(``tag:u16 length:u32 value``); data and window frames carry raw bytes.

This module is pure (no I/O) so the codec can be tested byte by byte.
"""

from __future__ import annotations

import errno as errno_mod
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from virtcontainers.errors import AgentError, ConfigError

__all__ = [
    "AgentRequestError",
    "CHUNK",
    "HEADER_SIZE",
    "INITIAL_WINDOW",
    "MAGIC",
    "MAX_PAYLOAD",
    "PROTOCOL_MAJOR",
    "PROTOCOL_MINOR",
    "SYNC_PREAMBLE",
    "ErrorCode",
    "ExecSpec",
    "ExitStatus",
    "Fields",
    "Flag",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "MountFlag",
    "Tag",
    "encode_frame",
    "error_reply",
    "exit_status",
    "incompatible",
    "path_item",
    "text_item",
    "tlv",
    "tlv_decode",
    "tlv_encode",
    "uint_item",
]

MAGIC = b"VCAG"
PROTOCOL_MAJOR = 1
"""Frames carry this in their version byte; a different major version is incompatible."""
PROTOCOL_MINOR = 3
"""Additive changes (new optional tags, new request types) bump the minor version only."""

_HEADER = struct.Struct(">4sBBHIIII")
HEADER_SIZE = _HEADER.size  # 24
MAX_PAYLOAD = 65536
INITIAL_WINDOW = 256 * 1024
"""Credit each side starts with per exec: stdin bytes (host→agent) and stdout+stderr bytes
(agent→host) that may be in flight before the receiver sends WINDOW frames."""
CHUNK = 32768
"""Size of the data chunks the host sends (stdin, file contents)."""
SYNC_PREAMBLE = bytes(HEADER_SIZE + MAX_PAYLOAD)
"""Zero bytes a (re)attaching host sends first: they complete any frame a previous host left
half-written on a virtio-serial port (which then fails its CRC) and are skipped as garbage."""


class FrameType(IntEnum):
    PING = 0x01
    EXEC = 0x02
    SIGNAL = 0x03
    WRITE_FILE = 0x04
    READ_FILE = 0x05
    ONLINE_CPUS = 0x06
    ONLINE_MEMORY = 0x07
    SHUTDOWN = 0x08
    ATTACH = 0x09
    """Sent once after :data:`SYNC_PREAMBLE` (id 0, no reply): a new host's session begins."""
    RESIZE = 0x0A
    """Set the window size of an exec's pty (since 1.2)."""
    MOUNT = 0x0B
    """Mount in the container root (since 1.3; the OCI runtime's mounts, read-only root)."""
    SERVER = 0x20
    """A request to the sandbox server (:mod:`virtcontainers.server`); never sent to the agent."""
    OK = 0x40
    ERROR = 0x41
    STDIN = 0x80
    STDOUT = 0x81
    STDERR = 0x82
    EXIT = 0x83
    WINDOW = 0x84


class MountFlag(IntFlag):
    """MOUNT's MOUNT_FLAGS bits (since 1.3)."""

    NONE = 0
    RDONLY = 0x1
    BIND = 0x2
    REMOUNT = 0x4
    FILE = 0x8
    """Create the target as an empty file (a file bind), not a directory."""
    NOSUID = 0x10
    NODEV = 0x20
    NOEXEC = 0x40


class Flag(IntFlag):
    NONE = 0
    EOF = 0x0001
    """STDIN: no more input after this frame's payload."""


class Tag(IntEnum):
    ARG = 1
    ENV = 2
    CWD = 3
    UID = 4
    GID = 5
    TTY = 6
    TIMEOUT_MS = 7
    EXEC_ID = 8
    SIGNAL = 9
    PATH = 10
    MODE = 11
    OFFSET = 12
    DATA = 13
    FINAL = 14
    LENGTH = 15
    SIZE = 16
    EOF = 17
    COUNT = 18
    PROTO_MAJOR = 19
    PROTO_MINOR = 20
    AGENT_VERSION = 21
    EXIT_CODE = 22
    TIMED_OUT = 23
    ERR_CODE = 24
    ERRNO = 25
    MESSAGE = 26
    GROUP = 27
    FAILED = 28
    ROWS = 29
    COLS = 30
    PID = 31
    CLEAR_ENV = 32
    NO_STDIN = 33
    DIRECT = 34
    # since 1.3 (the OCI runtime, ``virtcontainers.oci``)
    SOURCE = 35
    FSTYPE = 36
    MOUNT_FLAGS = 37
    MOUNT_DATA = 38
    GROUPS = 39
    """EXEC with GID: more groups, ``"1000,1234"`` (setgroups: GID first, then these)."""
    RLIMITS = 40
    """EXEC: ``"RESOURCE:SOFT:HARD[,...]"`` with Linux resource numbers, set before setuid."""
    UMASK = 41
    PARENTS = 42
    """WRITE_FILE: create missing parent directories (0755)."""
    KEEP = 64
    """EXEC through the sandbox server: the process outlives its client (``vc exec -d``).
    The server strips it; an agent would ignore it (not critical)."""


CRITICAL = 0x8000
"""Tag bit: a receiver that does not know this tag must reject the request."""


class ErrorCode(IntEnum):
    BAD_TYPE = 1
    TOO_LARGE = 2
    BAD_PAYLOAD = 3
    BAD_VERSION = 4
    NOT_FOUND = 5
    OS = 6
    EXEC = 7
    LIMIT = 8


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame of the channel: its type, request id, payload, flags and version."""

    type: int
    id: int
    payload: bytes = b""
    flags: int = 0
    version: int = PROTOCOL_MAJOR


def encode_frame(
    ftype: int,
    fid: int,
    payload: bytes = b"",
    flags: int = 0,
    *,
    version: int = PROTOCOL_MAJOR,
) -> bytes:
    """One frame as bytes. Raises ``ValueError`` for a payload over ``MAX_PAYLOAD``."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = _HEADER.pack(MAGIC, version, ftype, flags, fid, len(payload), zlib.crc32(payload), 0)[
        :20
    ]
    return head + zlib.crc32(head).to_bytes(4, "big") + payload


class FrameDecoder:
    """Incremental decoder with resynchronisation.

    Bytes that cannot start a valid frame (no magic, header CRC mismatch, payload CRC
    mismatch, length over the maximum) are skipped and counted in ``garbage``.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.garbage = 0

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        return list(self._frames())

    def _frames(self) -> Iterator[Frame]:
        buf = self._buf
        pos = 0
        try:
            while True:
                start = buf.find(MAGIC, pos)
                if start < 0:
                    # keep a possible magic prefix at the very end
                    keep = next(
                        (k for k in (3, 2, 1) if buf.endswith(MAGIC[:k]) and len(buf) - k >= pos),
                        0,
                    )
                    self.garbage += len(buf) - keep - pos
                    pos = len(buf) - keep
                    return
                self.garbage += start - pos
                pos = start
                if len(buf) - pos < HEADER_SIZE:
                    return
                (_, version, ftype, flags, fid, length, pcrc, hcrc) = _HEADER.unpack_from(buf, pos)
                if zlib.crc32(buf[pos : pos + 20]) != hcrc:
                    self.garbage += 1
                    pos += 1
                    continue
                if length > MAX_PAYLOAD:
                    self.garbage += HEADER_SIZE
                    pos += HEADER_SIZE
                    continue
                end = pos + HEADER_SIZE + length
                if len(buf) < end:
                    return
                payload = bytes(buf[pos + HEADER_SIZE : end])
                if zlib.crc32(payload) != pcrc:
                    self.garbage += 1
                    pos += 1
                    continue
                pos = end
                yield Frame(ftype, fid, payload, flags, version)
        finally:
            del buf[:pos]


def tlv(tag: int, value: bytes | str | int, width: int = 0) -> tuple[int, bytes]:
    """One TLV item: ``str`` is UTF-8, ``int`` needs ``width`` (1, 4 or 8 bytes, unsigned)."""
    if isinstance(value, str):
        return tag, value.encode()
    if isinstance(value, int):
        if width not in (1, 4, 8):
            raise ValueError(f"integer tag {tag} needs a width of 1, 4 or 8")
        return tag, value.to_bytes(width, "big")
    return tag, value


def tlv_encode(items: Iterable[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for tag, value in items:
        out += tag.to_bytes(2, "big") + len(value).to_bytes(4, "big") + value
    return bytes(out)


def tlv_decode(payload: bytes) -> list[tuple[int, bytes]]:
    """Split a TLV payload. Raises ``AgentError`` when an item overruns the payload."""
    items: list[tuple[int, bytes]] = []
    off = 0
    while off < len(payload):
        if len(payload) - off < 6:
            raise AgentError(f"malformed agent reply: truncated TLV header at offset {off}")
        tag = int.from_bytes(payload[off : off + 2], "big")
        length = int.from_bytes(payload[off + 2 : off + 6], "big")
        if length > len(payload) - off - 6:
            raise AgentError(f"malformed agent reply: TLV tag {tag} overruns the payload")
        items.append((tag, payload[off + 6 : off + 6 + length]))
        off += 6 + length
    return items


class Fields:
    """Typed read access to a decoded TLV payload (last occurrence wins for scalars)."""

    def __init__(self, payload: bytes) -> None:
        self.items = tlv_decode(payload)
        self._last = dict(self.items)

    def has(self, tag: Tag) -> bool:
        return tag in self._last

    def raw(self, tag: Tag, default: bytes = b"") -> bytes:
        return self._last.get(tag, default)

    def uint(self, tag: Tag, default: int | None = None) -> int:
        value = self._last.get(tag)
        if value is None:
            if default is None:
                raise AgentError(f"malformed agent reply: {tag.name} is missing")
            return default
        if len(value) not in (1, 4, 8):
            raise AgentError(f"malformed agent reply: {tag.name} has {len(value)} bytes")
        return int.from_bytes(value, "big")

    def opt_uint(self, tag: Tag) -> int | None:
        return self.uint(tag) if tag in self._last else None

    def text(self, tag: Tag, default: str = "") -> str:
        value = self._last.get(tag)
        return default if value is None else value.decode(errors="replace")


# -- requests and replies both clients (async and blocking) build and read ----------------


def text_item(tag: Tag, field: str, value: str) -> tuple[int, bytes]:
    """A string TLV, or ConfigError naming ``field``: the agent takes C strings (no NUL) in
    UTF-8, so such input is refused here instead of failing (or being cut) in the guest."""
    if "\0" in value:
        raise ConfigError(f"{field} must not contain NUL characters: {value!r}", field=field)
    try:
        return tag, value.encode()
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{field} is not encodable as UTF-8: {value!r}", field=field) from exc


def path_item(path: str) -> tuple[int, bytes]:
    """A PATH TLV; ConfigError for an empty path (see :func:`text_item`)."""
    if not path:
        raise ConfigError("path must not be empty", field="path")
    return text_item(Tag.PATH, "path", path)


def uint_item(tag: Tag, field: str, value: int, width: int) -> tuple[int, bytes]:
    """An unsigned TLV of ``width`` bytes, or ConfigError naming ``field`` and the range."""
    high = (1 << (8 * width)) - 1
    if isinstance(value, bool) or not 0 <= int(value) <= high:
        raise ConfigError(f"{field} must be an integer in [0, {high}], got {value!r}", field=field)
    return tlv(tag, int(value), width)


@dataclass(frozen=True, slots=True)
class ExecSpec:
    """What an EXEC request runs and how: the OCI ``process`` as the agent takes it. Every
    exec goes through one (the async and blocking clients, the sandbox, the OCI runtime), so
    a new option is added here once, and ``request`` checks it once.

    ``env`` replaces the whole environment (``None``: the agent's own). ``timeout``: the
    agent SIGKILLs the process group after that many seconds. ``tty_size`` is ``(rows,
    cols)`` of the pty (with ``tty``). Since protocol 1.3: ``groups`` (supplementary groups,
    with ``gid``), ``rlimits`` (``(resource number, soft, hard)``, set in the guest before
    setuid), ``umask``.
    """

    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    uid: int | None = None
    gid: int | None = None
    groups: Sequence[int] = ()
    rlimits: Sequence[tuple[int, int, int]] = ()
    umask: int | None = None
    tty: bool = False
    tty_size: tuple[int, int] | None = None
    timeout: float | None = None

    @classmethod
    def of(cls, command: ExecSpec | Sequence[str]) -> ExecSpec:
        """``command`` itself, or a bare argv run with the agent's defaults."""
        return command if isinstance(command, ExecSpec) else cls(command)

    @property
    def what(self) -> str:
        """How errors name the request: ``exec 'PROGRAM'``."""
        return f"exec {self.argv[0]!r}" if self.argv else "exec"

    def request(
        self, *, no_stdin: bool = False, extra_items: Sequence[tuple[int, bytes]] = ()
    ) -> bytes:
        """The payload of the EXEC request. ``no_stdin`` starts the process with stdin
        already closed; ``extra_items`` are more TLV items (the sandbox server's KEEP).

        Raises:
            ConfigError: input the wire cannot carry (an empty argv, NUL or non-UTF-8 text,
                integers out of range, a non-positive timeout), naming the field.
        """
        if not self.argv:
            raise ConfigError("argv must not be empty: name the program to run", field="argv")
        items = [text_item(Tag.ARG, "argv", a) for a in self.argv]
        items += self._environment()
        if self.cwd is not None:
            items.append(text_item(Tag.CWD, "cwd", self.cwd))
        if self.uid is not None:
            items.append(uint_item(Tag.UID, "uid", self.uid, 4))
        if self.gid is not None:
            items.append(uint_item(Tag.GID, "gid", self.gid, 4))
        if self.tty:
            items.append(tlv(Tag.TTY, 1, 1))
            if self.tty_size is not None:
                items.append(uint_item(Tag.ROWS, "tty_size", self.tty_size[0], 4))
                items.append(uint_item(Tag.COLS, "tty_size", self.tty_size[1], 4))
        if self.timeout is not None:
            if not self.timeout > 0:
                raise ConfigError(
                    f"timeout must be positive, got {self.timeout!r}", field="timeout"
                )
            items.append(
                uint_item(Tag.TIMEOUT_MS, "timeout", max(1, round(self.timeout * 1000)), 4)
            )
        if no_stdin:
            items.append(tlv(Tag.NO_STDIN, 1, 1))
        items += self._credentials()
        if self.umask is not None:
            items.append(uint_item(Tag.UMASK, "umask", self.umask, 4))
        return tlv_encode([*items, *extra_items])

    def _environment(self) -> list[tuple[int, bytes]]:
        if self.env is None:
            return []
        items = [tlv(Tag.CLEAR_ENV, 1, 1)]
        for key, value in self.env.items():
            if not key or "=" in key:
                raise ConfigError(
                    f"environment variable name {key!r} must be non-empty and without '='",
                    field="env",
                )
            items.append(text_item(Tag.ENV, "env", f"{key}={value}"))
        return items

    def _credentials(self) -> list[tuple[int, bytes]]:
        """The 1.3 items: supplementary groups and rlimits, range-checked."""
        items: list[tuple[int, bytes]] = []
        if self.groups:
            if self.gid is None:
                raise ConfigError("supplementary groups need a gid", field="groups")
            for g in self.groups:
                uint_item(Tag.GID, "groups", g, 4)  # range check
            text = ",".join(str(int(g)) for g in self.groups)
            items.append(text_item(Tag.GROUPS, "groups", text))
        if self.rlimits:
            for res, soft, hard in self.rlimits:
                for number in (res, soft, hard):
                    uint_item(Tag.OFFSET, "rlimits", number, 8)  # range check
            text = ",".join(f"{r}:{s}:{h}" for r, s, h in self.rlimits)
            items.append(text_item(Tag.RLIMITS, "rlimits", text))
        return items


def write_file_requests(
    path: str, data: bytes, mode: int, *, atomic: bool = True, parents: bool = False
) -> list[bytes]:
    """The WRITE_FILE payloads that write ``data`` to ``path``, one per CHUNK, in order; the
    last carries FINAL (with ``atomic``, the agent renames the file into place then, so it
    must be sent only once every earlier chunk was acknowledged).

    Raises:
        ConfigError: an empty path, NUL or non-UTF-8 text, a mode out of range.
    """
    head = [path_item(path), uint_item(Tag.MODE, "mode", mode, 4)]
    if not atomic:
        head.append(tlv(Tag.DIRECT, 1, 1))
    if parents:
        head.append(tlv(Tag.PARENTS, 1, 1))
    offsets = list(range(0, len(data), CHUNK)) or [0]
    final = [tlv(Tag.FINAL, 1, 1)]
    return [
        tlv_encode([*head, tlv(Tag.OFFSET, off, 8), tlv(Tag.DATA, data[off : off + CHUNK]),
                    *(final if off == offsets[-1] else [])])
        for off in offsets
    ]  # fmt: skip


def read_file_request(path: str, offset: int) -> bytes:
    """The READ_FILE payload for the CHUNK of ``path`` at ``offset``.

    Raises:
        ConfigError: an empty path, NUL or non-UTF-8 text.
    """
    return tlv_encode([path_item(path), tlv(Tag.OFFSET, offset, 8), tlv(Tag.LENGTH, CHUNK, 4)])


def read_file_chunk(fields: Fields) -> tuple[bytes, bool]:
    """A READ_FILE reply's data, and whether it is the file's last chunk (EOF, or short:
    procfs files say st_size 0 and end with a short read)."""
    data = fields.raw(Tag.DATA)
    return data, bool(fields.uint(Tag.EOF, 0)) or len(data) < CHUNK


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How an exec ended: ``exit_code`` for a normal exit, ``signal`` when killed."""

    exit_code: int | None
    signal: int | None
    timed_out: bool = False

    @property
    def shell_code(self) -> int:
        """A shell-style exit code: 128 + the signal when killed."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 1


def exit_status(payload: bytes) -> ExitStatus:
    """The status an EXIT frame carries. Raises ``AgentError`` for a malformed payload."""
    fields = Fields(payload)
    return ExitStatus(
        exit_code=fields.opt_uint(Tag.EXIT_CODE),
        signal=fields.opt_uint(Tag.SIGNAL),
        timed_out=bool(fields.uint(Tag.TIMED_OUT, 0)),
    )


class AgentRequestError(AgentError):
    """The agent answered a request with an error reply."""

    def __init__(self, operation: str, code: int, message: str, errno: int | None) -> None:
        self.operation = operation
        self.code = code
        self.message = message
        self.errno = errno
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = str(code)
        errname = f" [{errno_mod.errorcode.get(errno, errno)}]" if errno else ""
        # The agent names the request itself in most messages ("read_file /x: No such
        # file"): said once.
        text = message if message.startswith(f"{operation}:") else f"{operation}: {message}"
        super().__init__(f"{text} ({name}{errname})")


def incompatible(major: int, minor: int | None) -> AgentError:
    """The error for an agent speaking another protocol major version."""
    theirs = f"{major}" if minor is None else f"{major}.{minor}"
    return AgentError(
        f"incompatible agent protocol: agent speaks version {theirs}, "
        f"client speaks {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"
    )


def error_reply(op: str, frame: Frame) -> AgentError:
    """An ERROR reply to request ``op`` as the error to raise."""
    fields = Fields(frame.payload)
    code = fields.uint(Tag.ERR_CODE, 0)
    if code == ErrorCode.BAD_VERSION:
        return incompatible(fields.uint(Tag.PROTO_MAJOR, 0), fields.opt_uint(Tag.PROTO_MINOR))
    return AgentRequestError(op, code, fields.text(Tag.MESSAGE), fields.opt_uint(Tag.ERRNO))
