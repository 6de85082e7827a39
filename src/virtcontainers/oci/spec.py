"""An OCI bundle's ``config.json`` as typed structs, and the checks before anything exists.

Decoding is msgspec's (strict types, errors that name the JSON path); on top of it
:func:`load_bundle` checks what the runtime-spec requires (``ociVersion``, ``root.path``,
``process.args``, absolute ``cwd``) and refuses what cannot run in a VM (see
:data:`UNSUPPORTED`). Unknown fields are ignored, as the spec asks of runtimes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from virtcontainers.errors import BundleError

__all__ = [
    "RLIMIT_NUMBERS",
    "Bundle",
    "Mount",
    "Process",
    "Spec",
    "User",
    "load_bundle",
    "load_process",
]

#: Linux resource numbers (``<asm-generic/resource.h>``) of the spec's ``RLIMIT_*`` names.
RLIMIT_NUMBERS = {
    "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3,
    "RLIMIT_CORE": 4, "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7,
    "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9, "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11,
    "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13, "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
}  # fmt: skip

#: Namespaces a VM gives every container anyway (it has its own kernel); joining one of the
#: host's (a ``path``) cannot be done from inside a VM.
VM_NAMESPACES = frozenset({"pid", "network", "ipc", "uts", "mount", "cgroup"})


class _Struct(msgspec.Struct, rename="camel", omit_defaults=True):
    pass


class User(_Struct):
    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: list[int] = []
    username: str = ""


class Rlimit(_Struct):
    type: str
    hard: int
    soft: int


class ConsoleSize(_Struct):
    height: int
    width: int


class Process(_Struct):
    args: list[str] = []
    env: list[str] = []
    cwd: str = "/"
    terminal: bool = False
    user: User = msgspec.field(default_factory=User)
    rlimits: list[Rlimit] = []
    console_size: ConsoleSize | None = None

    def environment(self) -> dict[str, str]:
        """``env`` as a mapping (a later ``K=`` wins, as in execve's consumers)."""
        out: dict[str, str] = {}
        for item in self.env:
            key, _, value = item.partition("=")
            out[key] = value
        return out

    def tty_size(self) -> tuple[int, int] | None:
        """``consoleSize`` as (rows, cols)."""
        box = self.console_size
        return (box.height, box.width) if box else None

    def rlimit_triples(self) -> list[tuple[int, int, int]]:
        return [(RLIMIT_NUMBERS[r.type], r.soft, r.hard) for r in self.rlimits]


class Root(_Struct):
    path: str
    readonly: bool = False


class Mount(_Struct):
    destination: str
    type: str = ""
    source: str = ""
    options: list[str] = []

    @property
    def is_bind(self) -> bool:
        return self.type == "bind" or bool({"bind", "rbind"} & set(self.options))

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


class Namespace(_Struct):
    type: str
    path: str = ""


class Linux(_Struct):
    namespaces: list[Namespace] = []
    uid_mappings: list[dict[str, Any]] = []
    gid_mappings: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []


class Spec(_Struct):
    oci_version: str
    root: Root | None = None
    process: Process | None = None
    hostname: str = ""
    mounts: list[Mount] = []
    annotations: dict[str, str] = {}
    linux: Linux | None = None
    hooks: dict[str, Any] | None = None


@dataclass(frozen=True)
class Bundle:
    """A checked bundle: its directory, the spec, the root file system's absolute path."""

    path: Path
    spec: Spec
    rootfs: Path

    @property
    def process(self) -> Process:
        assert self.spec.process is not None  # load_bundle checked it
        return self.spec.process


#: What the runtime refuses, with why (shown in the error).
UNSUPPORTED = {
    "hooks": "OCI hooks run on the host around a host container; this runtime runs the "
    "container in a VM",
    "linux.uidMappings": "user namespaces: the container already has a kernel of its own",
    "linux.devices": "host devices cannot be created inside the VM",
}


def _decode(data: bytes, what: str, into: type[Any]) -> Any:
    try:
        return msgspec.json.decode(data, type=into)
    except msgspec.ValidationError as exc:
        raise BundleError(f"{what}: {exc}", field=what) from None
    except msgspec.DecodeError as exc:
        raise BundleError(f"{what} is not valid JSON: {exc}", field=what) from None


def load_bundle(bundle: str | os.PathLike[str]) -> Bundle:
    """Read and check ``<bundle>/config.json``; nothing is created.

    Raises:
        BundleError: the bundle directory or its config.json is missing or unreadable, the
            JSON is malformed or has wrong types (the message names the JSON path), a
            required field is missing, the root file system is not a directory, or the spec
            asks for an unsupported feature (hooks, user namespaces, host devices, joining a
            host namespace, an unknown rlimit).
    """
    path = Path(bundle).absolute()
    config = path / "config.json"
    try:
        data = config.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"bundle {path}: no config.json", field="config.json") from None
    except OSError as exc:
        raise BundleError(f"{config}: cannot read: {exc.strerror}", field="config.json") from None
    spec: Spec = _decode(data, str(config), Spec)
    if spec.root is None or not spec.root.path:
        raise BundleError(f"{config}: root.path is required", field="root.path")
    rootfs = Path(spec.root.path)
    rootfs = rootfs if rootfs.is_absolute() else path / rootfs
    if not rootfs.is_dir():
        raise BundleError(
            f"{config}: the root file system {rootfs} is not a directory", field="root.path"
        )
    if spec.process is None:
        raise BundleError(f"{config}: process is required", field="process")
    check_process(spec.process, str(config))
    if spec.hooks:
        raise _unsupported(config, "hooks")
    if spec.linux is not None:
        if spec.linux.uid_mappings or spec.linux.gid_mappings:
            raise _unsupported(config, "linux.uidMappings")
        if spec.linux.devices:
            raise _unsupported(config, "linux.devices")
        for ns in spec.linux.namespaces:
            if ns.type not in VM_NAMESPACES and ns.type != "user":
                raise BundleError(
                    f"{config}: unknown namespace type {ns.type!r}",
                    field="linux.namespaces", allowed=sorted(VM_NAMESPACES),
                )  # fmt: skip
            if ns.path:
                hint = " (with podman: --network none)" if ns.type == "network" else ""
                raise BundleError(
                    f"{config}: joining the {ns.type} namespace {ns.path} is unsupported: the "
                    f"container runs in a VM, which cannot enter a host namespace{hint}",
                    field="linux.namespaces",
                )
    for i, mount in enumerate(spec.mounts):
        if not mount.destination.startswith("/"):
            raise BundleError(
                f"{config}: mounts[{i}].destination {mount.destination!r} must be absolute",
                field=f"mounts[{i}].destination",
            )
    return Bundle(path=path, spec=spec, rootfs=rootfs)


def check_process(process: Process, what: str) -> None:
    """The checks every process gets (the container's and an exec's).

    Raises:
        BundleError: no args, a relative cwd, an unknown rlimit type, an env item without '='.
    """
    if not process.args:
        raise BundleError(f"{what}: process.args must name the program to run",
                          field="process.args")  # fmt: skip
    if not process.cwd.startswith("/"):
        raise BundleError(f"{what}: process.cwd {process.cwd!r} must be absolute",
                          field="process.cwd")  # fmt: skip
    for item in process.env:
        if "=" not in item or item.startswith("="):
            raise BundleError(f"{what}: process.env item {item!r} is not KEY=VALUE",
                              field="process.env")  # fmt: skip
    for rlimit in process.rlimits:
        if rlimit.type not in RLIMIT_NUMBERS:
            raise BundleError(
                f"{what}: unknown rlimit {rlimit.type!r}",
                field="process.rlimits", allowed=list(RLIMIT_NUMBERS),
            )  # fmt: skip


def find_program(rootfs: Path, process: Process, mounted: Sequence[str] = ()) -> Path | str | None:
    """Where ``process.args[0]`` is in ``rootfs`` (looked up in the process's PATH, symlinks
    resolved inside the root as the guest will), or None: runc's check at create. A
    candidate at or under one of the ``mounted`` destinations (``podman run --init``'s
    ``/run/podman-init``, a volume) is taken as found, as a string: its content arrives in
    the guest only."""
    program = process.args[0]
    if "/" in program:
        candidates = [program if program.startswith("/") else f"{process.cwd}/{program}"]
    else:
        path = process.environment().get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                         "/usr/bin:/sbin:/bin")  # fmt: skip
        candidates = [f"{d or '.'}/{program}" for d in path.split(":")]
    for candidate in candidates:
        if any(candidate == m or candidate.startswith(m.rstrip("/") + "/") for m in mounted):
            return candidate
        found = _resolve_in(rootfs, candidate)
        if found is not None and found.is_file() and os.access(found, os.X_OK):
            return found
    return None


def _resolve_in(root: Path, path: str, hops: int = 40) -> Path | None:
    """``path`` inside ``root`` with its symlinks resolved as if ``root`` were ``/``."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    current = root
    while parts and hops > 0:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops -= 1
            target = os.readlink(candidate)
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            current = root if target.startswith("/") else current
            continue
        current = candidate
    return current if hops > 0 else None


def load_process(path: str | os.PathLike[str]) -> Process:
    """An exec's process (``exec --process P.json``).

    Raises:
        BundleError: the file is missing, not JSON, or not a valid process.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read: {exc.strerror}", field="--process") from None
    process: Process = _decode(data, str(path), Process)
    check_process(process, str(path))
    return process


def _unsupported(config: Path, field: str) -> BundleError:
    return BundleError(f"{config}: {field} is unsupported: {UNSUPPORTED[field]}", field=field)


def spec_json(spec: Spec) -> str:
    """The spec back as JSON (for the state record's annotations and tests)."""
    return json.dumps(msgspec.to_builtins(spec))
