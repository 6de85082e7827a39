"""Image references: what the user wrote, parsed into a transport and a canonical name.

Accepted forms (the first that matches wins)::

    oci:DIR[:TAG]            an OCI image layout directory (TAG defaults to ``latest``)
    docker-archive:FILE      a ``docker save`` tarball
    dir:PATH                 a plain root filesystem directory (no image config)
    tar:FILE                 a plain root filesystem tarball (no image config)
    docker://REF or REF      a registry reference: ``[HOST[:PORT]/]PATH[:TAG][@sha256:HEX]``

Registry references follow the Distribution reference grammar: a first component with a
``.`` or ``:`` or equal to ``localhost`` is the registry host, otherwise the registry is
``docker.io`` and a one-component name gets ``library/`` (``python:3.12-slim`` is
``docker.io/library/python:3.12-slim``); without tag or digest the tag is ``latest``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from virtcontainers.errors import ConfigError

__all__ = ["ImageRef", "Transport", "parse_reference"]

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_HOST = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9-]+)*(?::\d+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

_FORMS = (
    "NAME[:TAG][@sha256:HEX]",
    "HOST[:PORT]/PATH[:TAG]",
    "oci:DIR[:TAG]",
    "docker-archive:FILE",
    "dir:PATH",
    "tar:FILE",
)


class Transport(StrEnum):
    REGISTRY = "docker"
    OCI = "oci"
    DOCKER_ARCHIVE = "docker-archive"
    DIR = "dir"
    TAR = "tar"


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A parsed reference. ``canonical`` is the store's key for it (``vc image ls`` shows it)."""

    transport: Transport
    #: Registry: ``HOST/PATH``; local transports: the absolute path.
    name: str
    tag: str = ""
    digest: str = ""

    @property
    def canonical(self) -> str:
        match self.transport:
            case Transport.REGISTRY:
                if self.digest:
                    tag = f":{self.tag}" if self.tag else ""
                    return f"{self.name}{tag}@{self.digest}"
                return f"{self.name}:{self.tag}"
            case Transport.OCI:
                return f"oci:{self.name}:{self.tag}"
            case _:
                return f"{self.transport.value}:{self.name}"

    @property
    def registry(self) -> str:
        """The registry host (``HOST[:PORT]``), or "" for local transports."""
        return self.name.split("/", 1)[0] if self.transport is Transport.REGISTRY else ""

    @property
    def is_local(self) -> bool:
        return self.transport is not Transport.REGISTRY

    def skopeo_source(self) -> str:
        """The source argument for ``skopeo copy`` (not for ``dir:``/``tar:`` rootfs refs)."""
        match self.transport:
            case Transport.REGISTRY:
                if self.digest:
                    return f"docker://{self.name}@{self.digest}"
                return f"docker://{self.name}:{self.tag}"
            case Transport.OCI:
                return f"oci:{self.name}:{self.tag}"
            case Transport.DOCKER_ARCHIVE:
                return f"docker-archive:{self.name}"
            case _:
                raise ConfigError(f"{self.canonical} is a plain root filesystem, not an image")

    def __str__(self) -> str:
        return self.canonical


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"image reference {text!r}: {why}", field="image", allowed=_FORMS)


def _local_path(text: str, rest: str) -> str:
    if not rest:
        raise _bad(text, "the path is empty")
    return str(Path(rest).expanduser().absolute())


def parse_reference(text: str) -> ImageRef:
    """Parse ``text`` (see the module docstring for the forms).

    Raises:
        ConfigError: not a valid reference (the message lists the accepted forms).
    """
    text = text.strip()
    if not text:
        raise _bad(text, "it is empty")
    if text.startswith("oci:"):
        rest = text[4:]
        path, tag = rest, DEFAULT_TAG
        head, sep, tail = rest.rpartition(":")
        if sep and head and "/" not in tail:
            if not _TAG.fullmatch(tail):
                raise _bad(text, f"{tail!r} is not a valid tag")
            path, tag = head, tail
        return ImageRef(Transport.OCI, _local_path(text, path), tag)
    for prefix, transport in (
        ("docker-archive:", Transport.DOCKER_ARCHIVE),
        ("dir:", Transport.DIR),
        ("tar:", Transport.TAR),
    ):
        if text.startswith(prefix):
            return ImageRef(transport, _local_path(text, text[len(prefix) :]))
    return _parse_registry(text, text.removeprefix("docker://"))


def _parse_registry(text: str, ref: str) -> ImageRef:
    rest, _, digest = ref.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
        raise _bad(text, f"{digest!r} is not a sha256 digest (sha256: and 64 hex digits)")
    tag = ""
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise _bad(text, f"{tag!r} is not a valid tag")
    first, sep, path = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.fullmatch(first):
            raise _bad(text, f"{first!r} is not a valid registry host")
        host = first
    else:
        host, path = DEFAULT_REGISTRY, rest
        if "/" not in path:
            path = f"library/{path}"
    if not _NAME.fullmatch(path):
        raise _bad(text, f"{path!r} is not a valid repository name (lowercase, digits, ._-/)")
    if not tag and not digest:
        tag = DEFAULT_TAG
    return ImageRef(Transport.REGISTRY, f"{host}/{path}", tag, digest)
