"""Reading an OCI image layout (``index.json``, ``blobs/sha256/…``) and verifying its blobs.

skopeo already checks digests of what it downloads, but not every source is a registry
(``oci:`` and ``docker-archive:`` inputs are the user's files), so every blob the image needs
is hashed again here before anything is unpacked: a corrupt or truncated layer is refused
with its digest named, whatever the source.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from virtcontainers.errors import ImageDigestError, ImageError

__all__ = ["Descriptor", "LayoutImage", "read_layout", "verify_blobs"]

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    @classmethod
    def parse(cls, doc: object, what: str, ref: str) -> Descriptor:
        if not isinstance(doc, Mapping):
            raise ImageError(f"{what} is not a descriptor", ref=ref)
        digest = str(doc.get("digest", ""))
        if not digest.startswith("sha256:") or len(digest) != 71:
            raise ImageError(f"{what} has an unsupported digest {digest!r}", ref=ref)
        size = doc.get("size", -1)
        return cls(str(doc.get("mediaType", "")), digest, size if isinstance(size, int) else -1)


@dataclass(frozen=True, slots=True)
class LayoutImage:
    """One image of a layout: its manifest, config and layers (lowest first)."""

    root: Path
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]

    def blob(self, digest: str) -> Path:
        algo, _, hex_ = digest.partition(":")
        return self.root / "blobs" / algo / hex_

    def config_doc(self) -> dict[str, object]:
        doc = json.loads(self.blob(self.config.digest).read_bytes())
        if not isinstance(doc, dict):
            raise ImageError(f"config {self.config.digest} is not a JSON object")
        return doc

    @property
    def compressed_size(self) -> int:
        return sum(max(d.size, 0) for d in (self.config, *self.layers))


def _json(path: Path, what: str, ref: str) -> dict[str, object]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise ImageError(f"{what} is missing ({path})", ref=ref) from exc
    except ValueError as exc:
        raise ImageError(f"{what} is not JSON ({path})", ref=ref, detail=str(exc)) from exc
    if not isinstance(doc, dict):
        raise ImageError(f"{what} is not a JSON object ({path})", ref=ref)
    return doc


def _check(path: Path, desc: Descriptor, ref: str) -> None:
    try:
        with open(path, "rb") as f:
            actual = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ImageDigestError(
            f"blob {desc.digest} is missing", ref=ref, digest=desc.digest
        ) from exc
    if actual != desc.digest:
        raise ImageDigestError(
            f"blob {desc.digest} is corrupt: its content hashes to {actual}",
            ref=ref, digest=desc.digest, actual=actual,
        )  # fmt: skip
    if desc.size >= 0 and size != desc.size:
        raise ImageDigestError(
            f"blob {desc.digest} is {size} bytes, its descriptor says {desc.size}",
            ref=ref, digest=desc.digest, actual=actual,
        )  # fmt: skip


def read_layout(root: Path, *, ref: str = "", tag: str | None = None) -> LayoutImage:
    """The image in layout ``root`` (the one tagged ``tag``, else the only one).

    The manifest blob is verified before it is parsed.

    Raises:
        ImageError: not a layout, no such tag, an index where a manifest was expected.
        ImageDigestError: the manifest blob does not match its digest.
    """
    index = _json(root / "index.json", "index.json", ref)
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise ImageError("the layout's index.json lists no image", ref=ref)
    chosen: object = manifests[0]
    if tag is not None or len(manifests) > 1:
        want = tag or "latest"
        named = [
            m for m in manifests
            if isinstance(m, Mapping)
            and isinstance(m.get("annotations"), Mapping)
            and m["annotations"].get("org.opencontainers.image.ref.name") == want
        ]  # fmt: skip
        if not named:
            raise ImageError(f"the layout has no image tagged {want!r}", ref=ref)
        chosen = named[0]
    desc = Descriptor.parse(chosen, "index.json's manifest", ref)
    if desc.media_type in INDEX_TYPES:
        raise ImageError("expected one image manifest, found an index (multi-platform)", ref=ref)
    image = LayoutImage(root, desc, desc, ())
    _check(image.blob(desc.digest), desc, ref)
    manifest = _json(image.blob(desc.digest), f"manifest {desc.digest}", ref)
    config = Descriptor.parse(manifest.get("config"), "the manifest's config", ref)
    raw_layers = manifest.get("layers")
    layers = tuple(
        Descriptor.parse(d, f"layer {i}", ref)
        for i, d in enumerate(raw_layers if isinstance(raw_layers, list) else [])
    )
    return LayoutImage(root, desc, config, layers)


def verify_blobs(
    image: LayoutImage, *, ref: str = "", progress: Callable[[int], None] | None = None
) -> None:
    """Hash the config and every layer against its digest and size.

    Raises:
        ImageDigestError: a blob is missing, or its content or size is wrong (names the digest).
    """
    for desc in (image.config, *image.layers):
        _check(image.blob(desc.digest), desc, ref)
        if progress is not None:
            progress(max(desc.size, 0))
