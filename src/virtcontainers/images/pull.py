"""Pull: fetch an image (skopeo), verify it, unpack it (umoci), build its root disk, publish.

Every step works in a private ``tmp/`` directory of the store; only a finished, verified entry
is published (see :mod:`virtcontainers.images.store`), so a failed or interrupted pull leaves
nothing an image lookup can find, and its directory is removed on the way out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from virtcontainers.errors import (
    ImageArchError,
    ImageDigestError,
    ImageError,
    ImageNotFoundError,
    ImageSpaceError,
)
from virtcontainers.images.config import ImageConfig
from virtcontainers.images.layout import read_layout, verify_blobs
from virtcontainers.images.reference import ImageRef, Transport, parse_reference
from virtcontainers.images.rootdisk import build_root_disk, tree_size
from virtcontainers.images.store import META_FORMAT, ImageStore, StoredImage
from virtcontainers.images.tools import run_tool

__all__ = ["ProgressCallback", "PullPolicy", "host_arch", "pull"]

log = logging.getLogger(__name__)

#: ``progress(step, fraction)``: the whole pull's progress in 0..1, or None when unknown.
ProgressCallback = Callable[[str, float | None], None]

_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
           "s390x": "s390x", "riscv64": "riscv64"}  # fmt: skip
_NOT_FOUND = re.compile(
    r"manifest unknown|name unknown|not found|no such host|connection refused|"
    r"no such file or directory|pinging container registry|requested access to the resource "
    r"is denied|unauthorized|server gave HTTP response to HTTPS client|i/o timeout",
    re.IGNORECASE,
)
_DIGEST = re.compile(r"[Dd]igest did not match, expected (sha256:[0-9a-f]{64}), got (sha256:\w+)")


def host_arch() -> str:
    """This host's architecture in OCI (GOARCH) spelling."""
    machine = platform.machine()
    return _GOARCH.get(machine, machine)


def _copy(ref: ImageRef, layout: Path, *, tls_verify: bool) -> None:
    argv = ["skopeo", "copy", "--quiet"]
    if ref.transport is Transport.REGISTRY and not tls_verify:
        argv.append("--src-tls-verify=false")
    argv += [ref.skopeo_source(), f"oci:{layout}:latest"]
    try:
        run_tool(argv, step="copy", ref=ref.canonical)
    except ImageError as exc:
        if match := _DIGEST.search(exc.detail):
            raise ImageDigestError(
                f"blob {match[1]} is corrupt: its content hashes to {match[2]}",
                ref=ref.canonical, digest=match[1], actual=match[2],
            ) from exc  # fmt: skip
        if _NOT_FOUND.search(exc.detail):
            hint = ""
            if "HTTP response to HTTPS client" in exc.detail:
                hint = " (a plain-HTTP registry: pull with --tls-verify=false)"
            raise ImageNotFoundError(
                f"cannot fetch it{hint}", ref=ref.canonical, detail=exc.detail
            ) from exc
        raise


def _check_platform(config: ImageConfig, ref: str) -> None:
    want = host_arch()
    if (config.os and config.os != "linux") or (
        config.architecture and config.architecture != want
    ):
        got = f"{config.os or '?'}/{config.architecture or '?'}"
        raise ImageArchError(
            f"it is built for {got}, this host runs linux/{want}",
            ref=ref, image_arch=got, host_arch=f"linux/{want}",
        )  # fmt: skip


def _check_space(where: Path, needed: int, ref: str) -> None:
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise ImageSpaceError(
            f"its root disk needs about {needed / 1e6:.0f} MB and {where} has "
            f"{free / 1e6:.0f} MB free",
            ref=ref, needed=needed, available=free,
        )  # fmt: skip


def _read_small(path: Path, limit: int = 1 << 20) -> str:
    """A regular file of the unpacked image (a symlink could point out of the tree)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > limit:
            return ""
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


class PullPolicy(StrEnum):
    """When :func:`pull` fetches from the source, as podman's ``--pull``."""

    #: Every time (an image whose config is already stored keeps its disk).
    ALWAYS = "always"
    #: Only when the store has no image for the reference (``docker run``'s default).
    MISSING = "missing"
    #: Never: the stored image, or ImageNotFoundError.
    NEVER = "never"


def pull(
    text: str,
    *,
    policy: PullPolicy = PullPolicy.ALWAYS,
    store: ImageStore | None = None,
    tls_verify: bool = True,
    progress: ProgressCallback | None = None,
) -> StoredImage:
    """Fetch ``text`` (any form of :func:`parse_reference`) into the store and build its root
    disk, or with ``policy`` take the stored image for it. A pull of an image already stored
    (same config digest) reuses the stored disk.

    ``tls_verify=False`` lets skopeo talk plain HTTP / unverified TLS to the registry (for a
    local test registry); it is ignored for local transports.

    Raises:
        ConfigError: a malformed reference. ImageNotFoundError: unknown reference, unreachable
        registry, missing file; with ``PullPolicy.NEVER`` an image not in the store.
        ImageDigestError: a blob does not match its digest (its digest is named).
        ImageArchError: an image for another platform. ImageSpaceError: the root disk would
        not fit. ImageError: a tool is missing or failed. Nothing is left in the store after
        any of these.
    """
    store = store or ImageStore()
    ref = parse_reference(text)
    if policy is not PullPolicy.ALWAYS:
        found = store.get(text)
        if found is not None:
            return found
        if policy is PullPolicy.NEVER:
            raise ImageNotFoundError(
                "not in the local image store, and the pull policy is never (pull it with "
                "`vc image pull`, or use --pull missing)",
                ref=text,
            )

    def report(step: str, fraction: float | None) -> None:
        log.debug("pull %s: %s", ref.canonical, step)
        if progress is not None:
            progress(step, fraction)

    started = time.monotonic()
    staged = store.staging()
    try:
        entry = staged / "entry"
        entry.mkdir(mode=0o700)
        rootfs = staged / "rootfs"
        manifest_digest = ""
        layers = 0
        compressed = 0
        if ref.transport in (Transport.DIR, Transport.TAR):
            config = ImageConfig(os="linux", architecture=host_arch())
            rootfs = _plain_rootfs(ref, rootfs, report)
        else:
            if ref.transport is not Transport.REGISTRY and not Path(ref.name).exists():
                raise ImageNotFoundError(f"{ref.name} does not exist", ref=ref.canonical)
            report(f"copy {ref.canonical}", 0.0)
            layout = entry / "layout"
            _copy(ref, layout, tls_verify=tls_verify)
            report("verify digests", 0.4)
            image = read_layout(layout, ref=ref.canonical, tag="latest")
            verify_blobs(image, ref=ref.canonical)
            config = ImageConfig.from_oci(image.config_doc())
            _check_platform(config, ref.canonical)
            manifest_digest, layers = image.manifest.digest, len(image.layers)
            compressed = image.compressed_size
            existing = store.get(image.config.digest)
            if existing is not None:
                # Same content already stored: keep its disk, just point this ref at it.
                report("cached", 1.0)
                return store.tag(existing.id, [ref.canonical])
            _check_space(store.root, compressed * 3, ref.canonical)
            report(f"unpack {layers} layers", 0.5)
            unpack = ["umoci", "raw", "unpack"]
            if os.geteuid() != 0:
                unpack.append("--rootless")
            run_tool([*unpack, "--image", f"{layout}:latest", str(rootfs)],
                     step="unpack", ref=ref.canonical)  # fmt: skip
        size = tree_size(rootfs)
        _check_space(store.root, size + size // 4, ref.canonical)
        report("build the root disk", 0.75)
        disk_tmp = entry / "root.disk"
        fmt = build_root_disk(rootfs, disk_tmp, ref=ref.canonical)
        disk = entry / f"root.{fmt.value}"
        disk_tmp.rename(disk)
        disk.chmod(0o644)  # read by the VMM, which may run as another user (jailer)
        image_id = _config_id(ref, config, disk, staged)
        meta = {
            "format": META_FORMAT,
            "id": image_id,
            "source": ref.canonical,
            "manifest_digest": manifest_digest,
            "config": config.to_dict(),
            "disk": disk.name,
            "disk_format": fmt.value,
            "layers": layers,
            "compressed_size": compressed,
            "rootfs_size": size,
            "pulled_at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "build_seconds": 0.0,
            "passwd": _read_small(rootfs / "etc" / "passwd"),
            "group": _read_small(rootfs / "etc" / "group"),
        }
        if rootfs.parent == staged:
            shutil.rmtree(rootfs, ignore_errors=True)
        meta["build_seconds"] = round(time.monotonic() - started, 3)
        (entry / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        report("publish", 0.98)
        stored = store.publish(entry, image_id, [ref.canonical])
        report("done", 1.0)
        return stored
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _config_id(ref: ImageRef, config: ImageConfig, disk: Path, staged: Path) -> str:
    layout = staged / "entry" / "layout"
    if layout.is_dir():
        return read_layout(layout, ref=ref.canonical, tag="latest").config.digest
    # A plain rootfs has no config blob: its id is the digest of its disk's content.
    return _sha256(disk)


def _plain_rootfs(ref: ImageRef, dest: Path, report: ProgressCallback) -> Path:
    source = Path(ref.name)
    if ref.transport is Transport.DIR:
        if not source.is_dir():
            raise ImageNotFoundError(f"{source} is not a directory", ref=ref.canonical)
        return source
    if not source.is_file():
        raise ImageNotFoundError(f"{source} is not a file", ref=ref.canonical)
    report(f"extract {source.name}", 0.1)
    dest.mkdir(mode=0o755)
    argv = ["tar", "-x", "-f", str(source), "-C", str(dest), "--numeric-owner"]
    if os.geteuid() != 0:
        argv.append("--no-same-owner")
    run_tool(argv, step="extract the root filesystem tarball", ref=ref.canonical)
    return dest
