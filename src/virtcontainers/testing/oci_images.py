"""Real OCI test images, built on this machine with the field's tools and cached.

* :func:`debian_rootfs_tar`: ``mmdebstrap --variant=essential --include=python3-minimal``
  (Debian's registry only; ~12-45 s), cached by its inputs;
* :func:`debian_python_layout` / :func:`busybox_layout`: OCI image layouts made with umoci,
  three layers each (the root file system; a layer adding ``/opt/doomed.txt``,
  ``/opt/keep.txt``, a user and a working directory; a layer whose whiteout deletes
  ``/opt/doomed.txt``) and a config with Env, WorkingDir, User, Entrypoint/Cmd.

Everything lands under ``<cache>/test-images/<name>-<key>/`` with a key over the inputs
(builder version, mmdebstrap's version, busybox's hash), built in a temporary directory and
renamed into place, so CI builds each once per machine and concurrent builders are safe.
Tests must treat the layouts as read-only (copy one before corrupting it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from virtcontainers.guest.image import default_cache_dir

__all__ = [
    "BUSYBOX_CONFIG",
    "DEBIAN_CONFIG",
    "TestImageConfig",
    "TestImageError",
    "busybox_layout",
    "busybox_tree",
    "debian_python_layout",
    "debian_rootfs_tar",
]

#: Bump to rebuild every cached test image.
BUILDER_VERSION = 2
APP_UID = 1000


@dataclass(frozen=True)
class TestImageConfig:
    """What a test image's config says (tests assert these)."""

    env: tuple[str, ...]
    workdir: str
    user: str
    cmd: tuple[str, ...]
    entrypoint: tuple[str, ...] = ()

    def key(self) -> dict[str, object]:
        return asdict(self)


DEBIAN_CONFIG = TestImageConfig(
    env=("GREETING=hello from the image", "PYTHONDONTWRITEBYTECODE=1"),
    workdir="/work",
    user="app",
    cmd=("python3", "-c", "print('python default command')"),
)
BUSYBOX_CONFIG = TestImageConfig(
    env=("GREETING=hello from busybox",),
    workdir="/srv",
    user="",
    entrypoint=("/bin/busybox",),
    cmd=("sh", "-c", "echo busybox default command"),
)
_BUSYBOX_APPLETS = (
    "sh", "true", "false", "echo", "env", "id", "pwd", "cat", "ls", "test",
    "sleep", "rm", "mkdir", "touch", "mount", "uname", "hostname", "stat",
    "dd", "date", "grep", "head", "seq", "tty",
)  # fmt: skip


class TestImageError(RuntimeError):
    """A test image could not be built (a tool is missing or failed)."""


def _root() -> Path:
    path = default_cache_dir() / "test-images"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    tool = shutil.which(argv[0]) or shutil.which(argv[0], path="/usr/sbin:/sbin")
    if tool is None:
        raise TestImageError(f"{argv[0]} is not installed (run scripts/setup)")
    proc = subprocess.run(
        [tool, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=900, check=False
    )
    if proc.returncode != 0:
        raise TestImageError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr}")
    return proc.stdout


def _cached(name: str, key_parts: dict[str, object], build: Callable[[Path], None]) -> Path:
    """``<root>/<name>-<key>``, built by ``build(tmp)`` into a temp dir renamed into place."""
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
    final = _root() / f"{name}-{key}"
    if (final / ".done").exists():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_root()))
    try:
        build(tmp)
        (tmp / ".done").write_text(json.dumps(key_parts) + "\n")
        try:
            tmp.rename(final)
        except OSError:
            if not (final / ".done").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def debian_rootfs_tar() -> Path:
    """A Debian bookworm root file system with python3 (mmdebstrap), as a tarball."""
    version = _run(["mmdebstrap", "--version"]).strip()
    inputs = {"v": BUILDER_VERSION, "mmdebstrap": version, "suite": "bookworm",
              "variant": "essential", "include": "python3-minimal"}  # fmt: skip

    def build(tmp: Path) -> None:
        _run(["mmdebstrap", "--quiet", "--variant=essential", "--include=python3-minimal",
              "bookworm", str(tmp / "rootfs.tar")])  # fmt: skip

    return _cached("debian-rootfs", inputs, build) / "rootfs.tar"


def _passwd_layer(base: Path, layer: Path, workdir: str) -> None:
    """Layer 2's tree: a user ``app`` appended to the base's passwd/group, a working
    directory owned by it, and two files in /opt (one is deleted again by layer 3)."""
    (layer / "etc").mkdir(parents=True)
    passwd = (
        (base / "etc/passwd").read_text()
        if (base / "etc/passwd").exists()
        else ("root:x:0:0:root:/root:/bin/sh\n")
    )
    group = (base / "etc/group").read_text() if (base / "etc/group").exists() else ("root:x:0:\n")
    (layer / "etc/passwd").write_text(passwd + f"app:x:{APP_UID}:{APP_UID}:app:/home/app:/bin/sh\n")
    (layer / "etc/group").write_text(group + f"app:x:{APP_UID}:\nstaff2:x:1234:\n")
    for d in (workdir.lstrip("/"), "home/app"):
        (layer / d).mkdir(parents=True)
        if os.geteuid() == 0:
            os.chown(layer / d, APP_UID, APP_UID)
    (layer / workdir.lstrip("/") / "README").write_text("the working directory\n")
    (layer / "opt").mkdir()
    (layer / "opt/doomed.txt").write_text("deleted by the next layer\n")
    (layer / "opt/keep.txt").write_text("kept\n")


def _layout(tmp: Path, base: Path, config: TestImageConfig) -> None:
    """Three layers (base tree, the passwd layer, a whiteout of /opt/doomed.txt), config."""
    layout, image = tmp / "layout", f"{tmp / 'layout'}:latest"
    _run(["umoci", "init", "--layout", str(layout)])
    _run(["umoci", "new", "--image", image])
    _run(["umoci", "insert", "--image", image, str(base), "/"])
    layer = tmp / "layer2"
    _passwd_layer(base, layer, config.workdir)
    _run(["umoci", "insert", "--image", image, str(layer), "/"])
    _run(["umoci", "insert", "--image", image, "--whiteout", "/opt/doomed.txt"])
    argv = ["umoci", "config", "--image", image, "--config.workingdir", config.workdir]
    argv += ["--config.user", config.user]
    for item in config.env:
        argv += ["--config.env", item]
    for item in config.entrypoint:
        argv += ["--config.entrypoint", item]
    for item in config.cmd:
        argv += ["--config.cmd", item]
    _run(argv)
    shutil.rmtree(layer)
    for extra in ("arm64",):
        # The same image claiming another architecture, for the platform check.
        _run(["umoci", "config", "--image", image, "--tag", extra, "--architecture", extra])


def debian_python_layout() -> Path:
    """An OCI layout (tags ``latest`` and ``arm64``) of Debian + python3; see the module doc."""
    tar = debian_rootfs_tar()
    inputs = {"v": BUILDER_VERSION, "tar": _sha256(tar), "config": DEBIAN_CONFIG.key()}

    def build(tmp: Path) -> None:
        base = tmp / "base"
        base.mkdir()
        _run(["tar", "-x", "-f", str(tar), "-C", str(base), "--numeric-owner"])
        _layout(tmp, base, DEBIAN_CONFIG)
        shutil.rmtree(base)

    return _cached("debian-python", inputs, build) / "layout"


def busybox_tree(base: Path) -> None:
    """A minimal root file system at ``base``: the host's static busybox, its applets as
    symlinks in /bin, root in /etc/passwd and /etc/group (a bundle rootfs, a layer).

    Raises:
        TestImageError: /bin/busybox is missing.
    """
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise TestImageError("/bin/busybox is missing (apt-get install busybox-static)")
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "srv", "root"):
        (base / d).mkdir(parents=True)
    shutil.copy2(busybox, base / "bin/busybox")
    for applet in _BUSYBOX_APPLETS:
        (base / "bin" / applet).symlink_to("busybox")
    (base / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (base / "etc/group").write_text("root:x:0:\n")


def busybox_layout() -> Path:
    """A small OCI layout of the host's static busybox; see the module doc."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise TestImageError("/bin/busybox is missing (apt-get install busybox-static)")
    inputs = {
        "v": BUILDER_VERSION,
        "busybox": _sha256(busybox),
        "config": BUSYBOX_CONFIG.key(),
        "applets": _BUSYBOX_APPLETS,
    }

    def build(tmp: Path) -> None:
        base = tmp / "base"
        busybox_tree(base)
        _layout(tmp, base, BUSYBOX_CONFIG)
        shutil.rmtree(base)

    return _cached("busybox", inputs, build) / "layout"
