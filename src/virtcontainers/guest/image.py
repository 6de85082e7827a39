"""The guest image: a Debian kernel plus a small busybox initramfs, built and cached.

What :func:`build_image` makes, under ``<cache>/images/<key>/`` (``<cache>`` defaults to
``$XDG_CACHE_HOME/virtcontainers``, else ``~/.cache/virtcontainers``):

* ``vmlinuz`` from ``linux-image-<abi>-cloud-amd64-unsigned`` (flavour ``cloud``, the default:
  boots fastest, no 9p) or ``linux-image-<abi>-amd64-unsigned`` (flavour ``generic``: has 9p);
  the newest version apt knows, downloaded with ``apt-get download`` and unpacked with
  ``dpkg-deb -x`` (nothing is installed on the host);
* ``initrd.img``: a gzip'd newc cpio with the host's static busybox (or Debian's
  ``busybox-static``), ``/init`` (``guest/files/init``), the virtio modules *from the same kernel
  package* with their dependencies, and ``/sbin/vc-agent`` compiled from ``guest/agent/vc-agent.c``
  with the host gcc when that source exists;
* ``manifest.json``: paths, kernel release, package versions, sha512 of both files, build time.

Only the :data:`KEEP_IMAGES` newest images of each flavour are kept (see :func:`prune_images`).

The key is a sha256 over the flavour, kernel package and version, busybox, the init script, the
agent source and :data:`BUILDER_VERSION`. Without ``force``, a build whose local inputs (all but
the kernel version) match a cached one returns it without running apt at all; ``force`` asks apt
for the newest kernel again and rebuilds. Builds happen in a temporary directory renamed into
place, so concurrent builders never see or corrupt a half-written image.

The guest's ``/init`` contract (busybox sh, PID 1 for the guest's whole life):

1. mount proc, sysfs, devtmpfs on /dev, devpts on /dev/pts, tmpfs on /dev/shm, /run and /tmp;
   set the hostname (``vc.hostname=NAME`` on the kernel command line, default ``vc-guest``);
2. ``insmod`` the boot modules listed in ``/etc/vc/modules.load`` (dependencies first); the other
   shipped modules load on demand with ``modprobe`` (``modules.dep``/``modules.alias`` present);
   with ``vc.rootfs=`` on the command line (an OCI image sandbox) ``erofs`` and ``overlay``
   are loaded too, for the agent's container root (``docs/agent-protocol.md``);
3. bring ``lo`` up; write ``/etc/hosts`` (localhost and the hostname) and an empty
   ``/etc/resolv.conf`` in the initramfs root (container roots bind-mount both); with
   ``vc.net=ADDRESS/PREFIX,GATEWAY,HOST[,DNS...]`` on the kernel command line (IPv4, from
   :mod:`virtcontainers.network.guest`) bring ``eth0`` up with that address, add a default
   route via GATEWAY, add ``HOST host.vc.internal`` to ``/etc/hosts`` and one
   ``nameserver`` line per DNS address to ``/etc/resolv.conf`` (``virtio_net`` is a boot
   module, from the same kernel package); then print exactly ``vc-init: ready`` on
   ``/dev/console``;
4. run every executable file in ``/etc/vc/init.d/`` in lexical order, stdin from /dev/null
   (a non-zero exit is reported as ``vc-init: <file> exited with <code>`` and ignored);
5. if ``/sbin/vc-agent`` exists, run it in the foreground; when it exits print
   ``vc-init: agent exited with <code>`` and power off. Otherwise with ``vc.shell=1`` run
   ``setsid cttyhack sh`` on the console, else print ``vc-init: nothing to run, powering off``;
   either way ``poweroff -f`` at the end. ``vc.debug=1`` runs init with ``set -x``.

Tests and users add behaviour without rebuilding: :func:`make_overlay_cpio` writes a plain cpio
with e.g. ``/etc/vc/init.d/10-hello`` and :func:`concat_initrd` appends it to ``initrd.img``
(both gzip'd and plain overlays work; see :mod:`virtcontainers.guest.cpio`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtcontainers.errors import ConfigError
from virtcontainers.guest import debian
from virtcontainers.guest.build_error import ImageBuildError
from virtcontainers.guest.cpio import CpioEntry, CpioWriter, concat_initrd, make_overlay_cpio
from virtcontainers.guest.kmod import KernelModule, ModuleTree, modules_alias, modules_dep

__all__ = [
    "BUILDER_VERSION",
    "FLAVOURS",
    "Flavour",
    "GuestImage",
    "ImageBuildError",
    "ProgressCallback",
    "build_image",
    "concat_initrd",
    "default_cache_dir",
    "find_image",
    "list_images",
    "make_overlay_cpio",
    "prune_images",
]

log = logging.getLogger(__name__)

#: Bump when the layout of the initramfs or the manifest changes (2: softdeps resolved):
#: every cached image rebuilds.
BUILDER_VERSION = 2
MANIFEST_FORMAT = 1

#: ``progress(step, fraction)``: ``fraction`` is the whole build's progress in 0..1, or None.
ProgressCallback = Callable[[str, float | None], None]

_GUEST_DIR = Path(__file__).resolve().parent
INIT_SCRIPT = _GUEST_DIR / "files" / "init"
AGENT_DIR = _GUEST_DIR / "agent"
AGENT_SOURCE_NAME = "vc-agent.c"
HOST_BUSYBOX = Path("/bin/busybox")

KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
MANIFEST_NAME = "manifest.json"
#: Images kept per flavour after a build (older ones accumulate as the agent source changes).
KEEP_IMAGES = 3

#: Loaded by /init on every boot (with their dependencies).
_BOOT_MODULES = (
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "virtio_rng",
)
#: Shipped for ``modprobe`` when the kernel has them; not loaded at boot.
_EXTRA_MODULES = (
    "virtiofs",
    "virtio_balloon",
    "virtio_mem",
    "virtio_mmio",
    "virtio_pmem",
    # OCI image sandboxes: /init loads these when the kernel command line has vc.rootfs=.
    "erofs",
    "overlay",
)


@dataclass(frozen=True, slots=True)
class Flavour:
    """A kind of Debian kernel: which metapackage names the newest one, which modules to load."""

    name: str
    metapackage: str
    #: Matches the versioned package the metapackage depends on (``linux-image-6.1.0-57-amd64``).
    dependency: re.Pattern[str]
    boot_modules: tuple[str, ...]
    extra_modules: tuple[str, ...]
    description: str

    def unsigned(self, package: str) -> str:
        """The unsigned twin of a signed kernel package (same files, no shim/EFI dependency)."""
        return package if package.endswith("-unsigned") else f"{package}-unsigned"


FLAVOURS: Mapping[str, Flavour] = {
    "cloud": Flavour(
        name="cloud",
        metapackage="linux-image-cloud-amd64",
        dependency=re.compile(r"linux-image-\d\S*-cloud-amd64"),
        boot_modules=_BOOT_MODULES,
        extra_modules=_EXTRA_MODULES,
        description="Debian cloud kernel: smallest and fastest to boot; no 9p",
    ),
    "generic": Flavour(
        name="generic",
        metapackage="linux-image-amd64",
        dependency=re.compile(r"linux-image-\d(?!\S*-(?:cloud|rt)-amd64$)\S*-amd64"),
        boot_modules=(*_BOOT_MODULES, "9p", "9pnet_virtio"),
        extra_modules=_EXTRA_MODULES,
        description="Debian generic kernel: has 9p and most drivers; boots slower",
    ),
}


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A built guest image: pass ``kernel`` and ``initrd`` to the hypervisor."""

    kernel: Path
    initrd: Path
    flavour: str
    kernel_release: str
    manifest: Path
    kernel_sha512: str
    initrd_sha512: str


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/virtcontainers``, else ``~/.cache/virtcontainers``."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "virtcontainers"


def _flavour(name: str) -> Flavour:
    try:
        return FLAVOURS[name]
    except KeyError:
        raise ConfigError(
            f"unknown guest image flavour {name!r}", field="flavour", allowed=sorted(FLAVOURS)
        ) from None


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha512_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha512").hexdigest()


def _agent_files() -> list[Path]:
    """The agent's source files (``vc-agent.c`` and headers beside it); empty when absent."""
    main = AGENT_DIR / AGENT_SOURCE_NAME
    if not main.is_file():
        return []
    return [main, *sorted(AGENT_DIR.glob("*.h"))]


def agent_digest() -> str:
    """SHA-256 over the agent's source files (names and contents): what a build depends on."""
    agent = hashlib.sha256()
    for path in _agent_files():
        agent.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return agent.hexdigest()


def _local_inputs(flavour: Flavour) -> dict[str, Any]:
    """Everything the key depends on that is known without asking apt."""
    files = _agent_files()
    host_bb = HOST_BUSYBOX.is_file() and debian.is_static_elf(HOST_BUSYBOX)
    return {
        "builder_version": BUILDER_VERSION,
        "flavour": flavour.name,
        "boot_modules": list(flavour.boot_modules),
        "extra_modules": list(flavour.extra_modules),
        "init_sha256": _sha256_file(INIT_SCRIPT),
        "agent_sha256": agent_digest() if files else None,
        "busybox": f"host:{_sha256_file(HOST_BUSYBOX)}" if host_bb else "deb:busybox-static",
    }


# --- reading the cache ------------------------------------------------------------------------


def _load_manifest(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        return None
    folder = path.parent
    if not ((folder / KERNEL_NAME).is_file() and (folder / INITRD_NAME).is_file()):
        return None
    return doc


def _image_from(manifest: Path, doc: Mapping[str, Any]) -> GuestImage:
    folder = manifest.parent
    return GuestImage(
        kernel=folder / KERNEL_NAME,
        initrd=folder / INITRD_NAME,
        flavour=str(doc["flavour"]),
        kernel_release=str(doc["kernel_release"]),
        manifest=manifest,
        kernel_sha512=str(doc["kernel_sha512"]),
        initrd_sha512=str(doc["initrd_sha512"]),
    )


def list_images(cache_dir: Path | None = None) -> list[tuple[GuestImage, dict[str, Any]]]:
    """Every valid cached image with its manifest document, newest first. Never runs apt."""
    images = (cache_dir or default_cache_dir()) / "images"
    found = []
    if images.is_dir():
        for manifest in images.glob(f"*/{MANIFEST_NAME}"):
            if manifest.parent.name.startswith("."):
                continue  # a build in progress
            doc = _load_manifest(manifest)
            if doc is None:
                log.debug("ignoring invalid image %s", manifest.parent)
                continue
            try:
                found.append((_image_from(manifest, doc), doc))
            except KeyError:
                continue
    found.sort(key=lambda item: str(item[1].get("built_at", "")), reverse=True)
    return found


def find_image(flavour: str = "cloud", cache_dir: Path | None = None) -> GuestImage | None:
    """The newest cached image of ``flavour`` whose files exist, or None. Never runs apt.

    Raises :class:`ConfigError` for an unknown flavour.
    """
    _flavour(flavour)
    for image, _doc in list_images(cache_dir):
        if image.flavour == flavour:
            return image
    return None


def prune_images(
    cache_dir: Path | None = None, *, keep: int = KEEP_IMAGES, flavour: str | None = None
) -> list[Path]:
    """Delete all but the ``keep`` newest images of each flavour; return the removed folders.

    A folder is renamed away before it is deleted, so readers see a whole image or none. A VM
    already booted from a removed image is unaffected (QEMU has read the kernel and initrd).
    """
    root = cache_dir or default_cache_dir()
    seen: dict[str, int] = {}
    removed = []
    for img, _doc in list_images(root):
        if flavour is not None and img.flavour != flavour:
            continue
        seen[img.flavour] = seen.get(img.flavour, 0) + 1
        if seen[img.flavour] <= max(keep, 1):
            continue
        folder = img.manifest.parent
        doomed = folder.with_name(f".old-{folder.name}-{os.getpid()}")
        try:
            folder.rename(doomed)
        except OSError:
            continue  # a concurrent pruner got it
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(folder)
    return removed


# --- building ---------------------------------------------------------------------------------


def _resolve_kernel(flavour: Flavour, debs: Path) -> debian.DebPackage:
    """The newest kernel package apt offers; offline, the newest one already downloaded."""
    try:
        signed = debian.resolve_dependency(flavour.metapackage, flavour.dependency)
        name = flavour.unsigned(signed)
        return debian.DebPackage(name, debian.candidate_version(name))
    except ImageBuildError as exc:
        cached = []
        for path in debs.glob(f"linux-image-*-unsigned_*_{debian.ARCH}.deb"):
            name, _, _ = path.name.partition("_")
            if flavour.dependency.fullmatch(name.removesuffix("-unsigned")):
                cached += debian.cached_versions(debs, name)
        if not cached:
            raise
        best = max(cached, key=lambda p: _version_key(p.version))
        log.warning("%s; using the cached %s %s", exc.detail, best.name, best.version)
        return best


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    # Good enough to order Debian kernel versions we downloaded ourselves (6.1.192-3 > 6.1.76-1).
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.+~:-]", version))


@contextlib.contextmanager
def _staging(images: Path, key: str) -> Iterator[Path]:
    images.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=images))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _busybox(tmp: Path, debs: Path, report: ProgressCallback) -> tuple[Path, dict[str, str]]:
    if HOST_BUSYBOX.is_file() and debian.is_static_elf(HOST_BUSYBOX):
        return HOST_BUSYBOX, {
            "name": "host",
            "path": str(HOST_BUSYBOX),
            "version": debian.busybox_version(HOST_BUSYBOX),
            "sha256": _sha256_file(HOST_BUSYBOX),
        }
    report("download busybox-static", None)
    pkg = debian.DebPackage("busybox-static", debian.candidate_version("busybox-static"))
    deb = debian.fetch_deb(pkg, debs)
    dest = tmp / "busybox-static"
    debian.extract_deb(deb, dest)
    binary = dest / "bin" / "busybox"
    if not debian.is_static_elf(binary):
        raise ImageBuildError("use busybox-static", f"{binary} is not a static executable")
    return binary, {
        "name": pkg.name,
        "version": pkg.version,
        "sha256": _sha256_file(binary),
    }


def _compile_agent(out: Path) -> dict[str, Any]:
    files = _agent_files()
    if not files:
        return {"included": False}
    step = f"compile the guest agent {files[0]}"
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ImageBuildError(step, "gcc is not installed (apt-get install gcc libc6-dev)")
    argv = [gcc, "-static", "-O2", "-Wall", "-o", str(out), AGENT_SOURCE_NAME]
    try:
        proc = subprocess.run(
            argv, cwd=AGENT_DIR, capture_output=True, text=True, timeout=300, check=False
        )
        version = subprocess.run(
            [gcc, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(step, str(exc)) from exc
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-20:])
        raise ImageBuildError(step, f"gcc exited with {proc.returncode}:\n{tail}")
    if proc.stderr.strip():
        log.debug("gcc warnings for %s:\n%s", files[0], proc.stderr.strip())
    return {
        "included": True,
        "source": str(files[0]),
        "compiler": version[0] if version else "gcc",
        "sha256": _sha256_file(out),
    }


def _kernel_files(root: Path, package: str) -> tuple[Path, ModuleTree]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError(
            f"use {package}", f"expected one boot/vmlinuz-*, found {len(kernels)}"
        )
    release = kernels[0].name.removeprefix("vmlinuz-")
    for lib in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):  # merged /usr
        if (lib / release).is_dir():
            return kernels[0], ModuleTree(lib / release, release)
    raise ImageBuildError(f"use {package}", f"no lib/modules/{release} in the package")


def _select_modules(tree: ModuleTree, flavour: Flavour) -> tuple[list[KernelModule], list[str]]:
    """(all modules to ship, dependencies first; names of those loaded at boot, in order)."""
    boot = tree.closure(flavour.boot_modules)
    extra = tree.closure(m for m in flavour.extra_modules if tree.has(m))
    shipped = list(boot)
    names = {m.name for m in boot}
    shipped += [m for m in extra if m.name not in names]
    return shipped, [m.name for m in boot]


def _write_initrd(
    dest: Path,
    *,
    busybox: Path,
    agent: Path | None,
    tree: ModuleTree,
    modules: list[KernelModule],
    boot: list[str],
    info: Mapping[str, Any],
) -> None:
    applets = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    moddir = f"lib/modules/{tree.release}"
    by_name = {m.name: m for m in modules}
    # Level 6: level 9 is slower to build for a few KB; the guest decompresses either equally fast.
    with (
        open(dest, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz,
    ):
        w = CpioWriter(gz)  # type: ignore[arg-type]  # GzipFile is a BinaryIO in practice
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/vc/init.d", "proc", "sys", "run"):
            w.add(CpioEntry.directory(d))
        w.add(CpioEntry.directory("dev"))
        w.add(CpioEntry.char_device("dev/console", 5, 1))
        w.add(CpioEntry.directory("tmp", 0o1777))
        w.add(CpioEntry.directory("root", 0o700))
        w.add(CpioEntry.directory("mnt"))
        w.add(CpioEntry.directory("var"))
        w.add(CpioEntry.symlink("var/run", "../run"))
        w.add(CpioEntry.file("init", INIT_SCRIPT.read_bytes(), 0o755))
        w.add(CpioEntry.file("bin/busybox", busybox.read_bytes(), 0o755))
        for applet in applets:
            # No sbin/init or linuxrc: if /init failed the kernel must not fall back to them.
            if applet in ("bin/busybox", "sbin/init", "linuxrc"):
                continue
            w.add(CpioEntry.symlink(applet, "/bin/busybox"))
        if agent is not None:
            w.add(CpioEntry.file("sbin/vc-agent", agent.read_bytes(), 0o755))
        w.add(CpioEntry.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"))
        w.add(CpioEntry.file("etc/group", b"root:x:0:\ntty:x:5:\n"))
        w.add(CpioEntry.file("etc/vc/image.json", json.dumps(info, indent=1).encode() + b"\n"))
        load = "".join(f"/{moddir}/{by_name[n].relpath}\n" for n in boot)
        w.add(CpioEntry.file("etc/vc/modules.load", load.encode()))
        for mod in modules:
            w.add(CpioEntry.file(f"{moddir}/{mod.relpath}", mod.data))
        w.add(CpioEntry.file(f"{moddir}/modules.dep", modules_dep(modules).encode()))
        w.add(CpioEntry.file(f"{moddir}/modules.alias", modules_alias(modules).encode()))
        for name in ("modules.builtin", "modules.order"):
            if (tree.root / name).is_file():
                w.add(CpioEntry.file(f"{moddir}/{name}", (tree.root / name).read_bytes()))
        w.close()


def _key(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _publish(out: Path, final: Path, force: bool) -> bool:
    """Rename ``out`` to ``final``; False when another builder got there first."""
    for path in out.iterdir():
        path.chmod(0o600)
    out.chmod(0o700)
    if force and final.exists():
        # Not atomic across the two renames, but readers only ever see a whole image or none.
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
    try:
        out.rename(final)
    except OSError:  # ENOTEMPTY/EEXIST: a concurrent builder published the same key
        if _load_manifest(final / MANIFEST_NAME) is None:
            raise
        return False
    return True


def build_image(
    flavour: str = "cloud",
    *,
    cache_dir: Path | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> GuestImage:
    """Build (or find in the cache) the guest image of ``flavour``.

    ``cache_dir`` is the virtcontainers cache root (default :func:`default_cache_dir`); images
    go to ``images/<key>/`` and downloaded packages to ``debs/`` below it. ``force`` asks apt
    for the newest kernel and rebuilds even if a matching image is cached. ``progress`` is
    called with a step description and the overall fraction done (None when unknown).

    Raises :class:`ConfigError` for an unknown flavour and :class:`ImageBuildError` when a
    package cannot be found, downloaded or unpacked, a module is missing, or gcc fails.
    """
    spec = _flavour(flavour)
    root = cache_dir or default_cache_dir()
    images, debs = root / "images", root / "debs"

    def report(step: str, fraction: float | None) -> None:
        log.debug("image build: %s", step)
        if progress is not None:
            progress(step, fraction)

    local = _local_inputs(spec)
    if not force:
        for image, doc in list_images(root):
            if image.flavour == spec.name and doc.get("inputs") == local:
                report("cached", 1.0)
                return image

    started = time.monotonic()
    report(f"resolve the newest {spec.metapackage}", 0.0)
    kernel_pkg = _resolve_kernel(spec, debs)
    key = _key({**local, "kernel_package": kernel_pkg.name, "kernel_version": kernel_pkg.version})
    final = images / key
    if not force and (cached := _load_manifest(final / MANIFEST_NAME)) is not None:
        report("cached", 1.0)
        return _image_from(final / MANIFEST_NAME, cached)

    for path in (root, images, debs):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _staging(images, key) as tmp:
        report(f"download {kernel_pkg.name} {kernel_pkg.version}", 0.05)
        deb = debian.fetch_deb(kernel_pkg, debs)
        report(f"unpack {deb.name}", 0.3)
        unpacked = tmp / "kernel"
        debian.extract_deb(deb, unpacked)
        vmlinuz, tree = _kernel_files(unpacked, kernel_pkg.name)

        report("busybox", 0.55)
        busybox, busybox_info = _busybox(tmp, debs, report)

        report("resolve kernel modules", 0.6)
        modules, boot = _select_modules(tree, spec)

        out = tmp / "out"
        out.mkdir(mode=0o700)
        report("compile the guest agent", 0.65)
        agent_bin = tmp / "vc-agent"
        agent_info = _compile_agent(agent_bin)

        report("write the initramfs", 0.75)
        guest_info = {
            "flavour": spec.name,
            "kernel_release": tree.release,
            "kernel_package": f"{kernel_pkg.name} {kernel_pkg.version}",
            "builder_version": BUILDER_VERSION,
            "key": key,
        }
        _write_initrd(
            out / INITRD_NAME,
            busybox=busybox,
            agent=agent_bin if agent_info["included"] else None,
            tree=tree,
            modules=modules,
            boot=boot,
            info=guest_info,
        )
        os.replace(vmlinuz, out / KERNEL_NAME)

        report("checksums and manifest", 0.95)
        manifest = {
            "format": MANIFEST_FORMAT,
            "key": key,
            "flavour": spec.name,
            "kernel": str(final / KERNEL_NAME),
            "initrd": str(final / INITRD_NAME),
            "kernel_release": tree.release,
            "kernel_sha512": _sha512_file(out / KERNEL_NAME),
            "initrd_sha512": _sha512_file(out / INITRD_NAME),
            "kernel_size": (out / KERNEL_NAME).stat().st_size,
            "initrd_size": (out / INITRD_NAME).stat().st_size,
            "packages": {
                "kernel": {"name": kernel_pkg.name, "version": kernel_pkg.version},
                "busybox": busybox_info,
            },
            "modules": {
                "boot": boot,
                "shipped": [m.name for m in modules],
                "builtin_requested": sorted(
                    n
                    for n in (*spec.boot_modules, *spec.extra_modules)
                    if n.replace("-", "_") in tree.builtin
                ),
            },
            "agent": agent_info,
            "builder_version": BUILDER_VERSION,
            "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "build_seconds": 0.0,
            "inputs": local,
        }
        manifest["build_seconds"] = round(time.monotonic() - started, 3)
        (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if not _publish(out, final, force):
            log.info("another builder published %s first; using it", final)
    prune_images(root, flavour=spec.name)
    published = _load_manifest(final / MANIFEST_NAME)
    if published is None:
        raise ImageBuildError("publish the image", f"{final} vanished after the build")
    report("done", 1.0)
    return _image_from(final / MANIFEST_NAME, published)
