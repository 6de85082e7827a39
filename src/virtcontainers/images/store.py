"""The local image store: content-addressed entries under the cache root.

Layout (``<cache>`` is :func:`virtcontainers.guest.image.default_cache_dir`)::

    <cache>/oci/refs.json           {"format": 1, "refs": {canonical ref: image id}}
    <cache>/oci/images/<hex>/       one image, <hex> = its config digest (docker's image id)
        meta.json                   what `vc image inspect` shows; written last
        layout/                     the OCI image layout skopeo wrote (manifest, config, layers)
        root.erofs | root.ext4      the read-only root disk the sandboxes attach
    <cache>/oci/tmp/pull-<pid>-*/   pulls in progress; never read; prune removes dead ones
    <cache>/oci/.lock               flock held while refs.json or images/ change

Why this is safe with concurrent pulls: each pull works in its own ``tmp/`` directory and
publishes the finished entry with one ``rename`` under the lock. An entry is valid only when
its ``meta.json`` and disk exist, so a half-pulled image is never used. Two pulls of one image
both succeed: the second finds the entry published and drops its own copy. ``rm`` and
``prune`` rename an entry into ``tmp/`` before deleting it, so readers see all or nothing.
A VM that already opened a removed disk keeps working (the file lives on until closed).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from virtcontainers import fsutil
from virtcontainers.errors import ConfigError, ImageNotFoundError, StoreError
from virtcontainers.guest.image import default_cache_dir
from virtcontainers.images.config import ImageConfig
from virtcontainers.images.reference import parse_reference

__all__ = ["ImageStore", "StoredImage"]

META_FORMAT = 1
REFS_FORMAT = 1


@dataclass(frozen=True, slots=True)
class StoredImage:
    """A pulled image and its root disk."""

    id: str
    path: Path
    refs: tuple[str, ...]
    manifest_digest: str
    config: ImageConfig
    disk: Path
    disk_format: str
    disk_size: int
    layers: int
    compressed_size: int
    pulled_at: str
    build_seconds: float
    passwd: str
    group: str

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("sha256:")[:12]

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "refs": list(self.refs),
            "manifest_digest": self.manifest_digest,
            "config": self.config.to_dict(),
            "architecture": self.config.architecture,
            "os": self.config.os,
            "layers": self.layers,
            "compressed_size": self.compressed_size,
            "disk": str(self.disk),
            "disk_format": self.disk_format,
            "disk_size": self.disk_size,
            "pulled_at": self.pulled_at,
            "build_seconds": self.build_seconds,
            "path": str(self.path),
        }


class ImageStore:
    """Images under ``root`` (default ``$VC_IMAGE_STORE``, else ``<cache>/oci``). Every
    method is process-safe."""

    def __init__(self, root: Path | None = None) -> None:
        env = os.environ.get("VC_IMAGE_STORE", "")
        self.root = root or (Path(env) if env else default_cache_dir() / "oci")
        self.images_dir = self.root / "images"
        self.tmp_dir = self.root / "tmp"

    # -- paths and locking ---------------------------------------------------------------

    def _ensure(self) -> None:
        for path in (self.root, self.images_dir, self.tmp_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (refs.json and images/ change only under it)."""
        self._ensure()
        with fsutil.locked(self.root / ".lock"):
            yield

    def staging(self) -> Path:
        """A fresh private directory for one pull; the caller removes it when done."""
        self._ensure()
        path = self.tmp_dir / f"pull-{os.getpid()}-{secrets.token_hex(4)}"
        path.mkdir(mode=0o700)
        return path

    # -- refs ------------------------------------------------------------------------------

    def _read_refs(self) -> dict[str, str]:
        path = self.root / "refs.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise StoreError(f"corrupt image refs: {exc}", path=str(path)) from exc
        refs = doc.get("refs") if isinstance(doc, dict) else None
        if not isinstance(refs, dict):
            raise StoreError("image refs document has no 'refs' object", path=str(path))
        return {str(k): str(v) for k, v in refs.items()}

    def _write_refs(self, refs: Mapping[str, str]) -> None:
        path = self.root / "refs.json"
        tmp = path.with_name(f".refs-{os.getpid()}-{secrets.token_hex(3)}")
        with open(tmp, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            json.dump({"format": REFS_FORMAT, "refs": dict(sorted(refs.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- reading -----------------------------------------------------------------------------

    def _load(self, folder: Path, refs: Mapping[str, str]) -> StoredImage | None:
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
            return None
        disk = folder / str(meta.get("disk", ""))
        if not disk.is_file():
            return None
        image_id = str(meta["id"])
        config = meta.get("config")
        return StoredImage(
            id=image_id,
            path=folder,
            refs=tuple(sorted(r for r, i in refs.items() if i == image_id)),
            manifest_digest=str(meta.get("manifest_digest", "")),
            config=ImageConfig.from_dict(config if isinstance(config, dict) else {}),
            disk=disk,
            disk_format=str(meta.get("disk_format", "")),
            disk_size=disk.stat().st_size,
            layers=int(meta.get("layers", 0)),
            compressed_size=int(meta.get("compressed_size", 0)),
            pulled_at=str(meta.get("pulled_at", "")),
            build_seconds=float(meta.get("build_seconds", 0.0)),
            passwd=str(meta.get("passwd", "")),
            group=str(meta.get("group", "")),
        )

    def folder(self, image_id: str) -> Path:
        return self.images_dir / image_id.removeprefix("sha256:")

    def images(self) -> list[StoredImage]:
        """Every valid image, newest pull first."""
        if not self.images_dir.is_dir():
            return []
        refs = self._read_refs()
        found = [
            image
            for folder in self.images_dir.iterdir()
            if (image := self._load(folder, refs)) is not None
        ]
        found.sort(key=lambda i: i.pulled_at, reverse=True)
        return found

    def get(self, ref: str) -> StoredImage | None:
        """The image a reference names, or an image id (``sha256:HEX``, or 12+ hex digits)."""
        refs = self._read_refs()
        image_id = self._lookup(ref, refs)
        if image_id is None:
            return None
        return self._load(self.folder(image_id), refs)

    def require(self, ref: str) -> StoredImage:
        """Like :meth:`get`, raising :class:`ImageNotFoundError` when absent."""
        image = self.get(ref)
        if image is None:
            raise ImageNotFoundError(
                "not in the local image store (pull it with `vc image pull`)", ref=ref
            )
        return image

    def _lookup(self, ref: str, refs: Mapping[str, str]) -> str | None:
        hex_ = ref.removeprefix("sha256:")
        if len(hex_) >= 12 and all(c in "0123456789abcdef" for c in hex_):
            matches = {i for i in refs.values() if i.removeprefix("sha256:").startswith(hex_)}
            if not matches and self.images_dir.is_dir():
                matches = {
                    f"sha256:{p.name}" for p in self.images_dir.iterdir() if p.name.startswith(hex_)
                }
            if len(matches) == 1:
                return matches.pop()
        try:
            canonical = parse_reference(ref).canonical
        except ConfigError:  # an id that matched nothing, and not a reference either
            return None
        return refs.get(canonical)

    # -- writing -------------------------------------------------------------------------------

    def publish(self, staged: Path, image_id: str, refs: list[str]) -> StoredImage:
        """Move a finished entry (``staged``, with meta.json written last) into the store and
        point ``refs`` at it. If the image is already there (a concurrent pull), ``staged``
        is discarded and the existing entry is used.

        Raises:
            StoreError: the entry could not be published.
        """
        final = self.folder(image_id)
        with self.locked():
            current = self._read_refs()
            if self._load(final, current) is None:
                if final.exists():  # a broken leftover (crash mid-removal): replace it
                    self._discard(final)
                try:
                    staged.rename(final)
                except OSError as exc:
                    raise StoreError(f"cannot publish image {image_id}: {exc}") from exc
            for ref in refs:
                current[ref] = image_id
            self._write_refs(current)
            image = self._load(final, current)
        shutil.rmtree(staged, ignore_errors=True)
        if image is None:
            raise StoreError(f"image {image_id} vanished after publishing", path=str(final))
        return image

    def tag(self, image_id: str, refs: list[str]) -> StoredImage:
        """Point ``refs`` at the stored image ``image_id``.

        Raises:
            ImageNotFoundError: no such image (e.g. removed meanwhile).
        """
        with self.locked():
            current = self._read_refs()
            if self._load(self.folder(image_id), current) is None:
                raise ImageNotFoundError("not in the local image store", ref=image_id)
            for ref in refs:
                current[ref] = image_id
            self._write_refs(current)
            image = self._load(self.folder(image_id), current)
        if image is None:
            raise ImageNotFoundError("not in the local image store", ref=image_id)
        return image

    def _discard(self, folder: Path) -> None:
        doomed = self.tmp_dir / f"rm-{os.getpid()}-{secrets.token_hex(4)}"
        with contextlib.suppress(FileNotFoundError):
            folder.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def remove(self, ref: str) -> list[str]:
        """Untag ``ref`` (or every ref of an image id); delete the image when no ref is left.
        Returns the refs removed.

        Raises:
            ImageNotFoundError: nothing matches ``ref``.
        """
        with self.locked():
            refs = self._read_refs()
            image_id = self._lookup(ref, refs)
            if image_id is None:
                raise ImageNotFoundError("not in the local image store", ref=ref)
            by_id = ref.removeprefix("sha256:") in image_id or not any(
                i == image_id and r == _canonical(ref) for r, i in refs.items()
            )
            gone = [r for r, i in refs.items() if i == image_id and (by_id or r == _canonical(ref))]
            for r in gone:
                del refs[r]
            self._write_refs(refs)
            if image_id not in refs.values():
                self._discard(self.folder(image_id))
        return gone

    def prune(self, *, max_age: float = 3600.0) -> list[str]:
        """Delete images no ref points to, and pulls whose process died (or older than
        ``max_age`` seconds). Returns what was removed (image ids and tmp names)."""
        removed: list[str] = []
        with self.locked():
            refs = self._read_refs()
            live = set(refs.values())
            if self.images_dir.is_dir():
                for folder in self.images_dir.iterdir():
                    if f"sha256:{folder.name}" not in live:
                        self._discard(folder)
                        removed.append(f"sha256:{folder.name}")
            if self.tmp_dir.is_dir():
                for tmp in self.tmp_dir.iterdir():
                    if _stale(tmp, max_age):
                        shutil.rmtree(tmp, ignore_errors=True)
                        removed.append(tmp.name)
        return removed


def _canonical(ref: str) -> str:
    try:
        return parse_reference(ref).canonical
    except ConfigError:  # an image id, not a reference
        return ref


def _stale(tmp: Path, max_age: float) -> bool:
    parts = tmp.name.split("-")
    if parts[0] == "pull" and len(parts) >= 2 and parts[1].isdigit():
        pid = int(parts[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        else:
            try:
                return time.time() - tmp.stat().st_mtime > max_age and pid != os.getpid()
            except FileNotFoundError:
                return False
    return parts[0] == "rm"
