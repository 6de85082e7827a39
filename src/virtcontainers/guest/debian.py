"""Debian packages without installing them: resolve with apt-cache, fetch with
``apt-get download`` into a cache, unpack with ``dpkg-deb -x``.

``apt-cache`` only reads the local package lists (no network); ``apt-get update`` runs only
when those lists know nothing about the package asked for. Fetched ``.deb`` files are kept in
``<cache>/debs/`` so a rebuild (new init, new agent) needs no network.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from virtcontainers.command import run_captured
from virtcontainers.guest.build_error import ImageBuildError

__all__ = [
    "DebPackage",
    "busybox_version",
    "candidate_version",
    "extract_deb",
    "fetch_deb",
    "is_static_elf",
    "resolve_dependency",
]

ARCH = "amd64"
_APT_TIMEOUT = 600.0
_ENV = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
# As root, apt-get download warns that the sandbox user `_apt` cannot write the target directory.
_HARMLESS = re.compile(r"^W: Download is performed unsandboxed as root")


@dataclass(frozen=True, slots=True)
class DebPackage:
    name: str
    version: str

    @property
    def filename(self) -> str:
        """The name ``apt-get download`` gives the file (an epoch's ':' becomes '%3a')."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{ARCH}.deb"


def _tool(name: str, step: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ImageBuildError(step, f"{name} is not installed (Debian/Ubuntu hosts have it)")
    return path


def _run(argv: list[str], step: str, *, cwd: Path | None = None) -> str:
    try:
        proc = run_captured(argv, cwd=cwd, env=_ENV, timeout=_APT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError(step, f"{argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        err = "\n".join(ln for ln in proc.stderr.splitlines() if not _HARMLESS.match(ln))
        tail = "\n".join(err.strip().splitlines()[-10:]) or proc.stdout.strip()[-2000:]
        raise ImageBuildError(step, f"`{' '.join(argv)}` exited with {proc.returncode}: {tail}")
    return proc.stdout


def _apt_cache(args: list[str], step: str) -> str | None:
    """``apt-cache`` output, or None when apt knows no such package."""
    argv = [_tool("apt-cache", step), *args]
    try:
        return _run(argv, step)
    except ImageBuildError as exc:
        if "No packages found" in exc.detail or "Unable to locate" in exc.detail:
            return None
        raise


def _apt_update() -> None:
    _run([_tool("apt-get", "update the package lists"), "update", "-q"], "run apt-get update")


def resolve_dependency(metapackage: str, pattern: re.Pattern[str]) -> str:
    """The package ``metapackage``'s candidate depends on that matches ``pattern``.

    ``linux-image-cloud-amd64`` -> ``linux-image-6.1.0-57-cloud-amd64``. Runs ``apt-get update``
    once if the local lists do not know the metapackage.
    """
    step = f"find the newest {metapackage}"
    args = ["depends", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks"]
    args += ["--no-replaces", "--no-enhances", metapackage]
    for attempt in range(2):
        out = _apt_cache(args, step)
        if out is not None:
            for line in out.splitlines():
                key, _, value = line.strip().partition(":")
                value = value.strip().lstrip("|").strip()
                if key.strip() in ("Depends", "|Depends") and pattern.fullmatch(value):
                    return value
        if attempt == 0:
            _apt_update()
    raise ImageBuildError(step, f"apt-cache knows no dependency of {metapackage} like {pattern}")


def candidate_version(package: str) -> str:
    """The version apt would install of ``package`` (``apt-cache policy``'s Candidate)."""
    step = f"find a version of {package}"
    for attempt in range(2):
        out = _apt_cache(["policy", package], step)
        match = re.search(r"^\s*Candidate:\s*(\S+)", out or "", re.MULTILINE)
        if match and match.group(1) != "(none)":
            return match.group(1)
        if attempt == 0:
            _apt_update()
    raise ImageBuildError(step, f"apt has no installable version of {package}")


def cached_versions(debs: Path, name: str) -> list[DebPackage]:
    """Cached packages called ``name``, any version (unsorted: compare with dpkg if needed)."""
    found = []
    for path in debs.glob(f"{name}_*_{ARCH}.deb"):
        version = path.name[len(name) + 1 : -len(f"_{ARCH}.deb")].replace("%3a", ":")
        if "_" not in version:
            found.append(DebPackage(name, version))
    return found


def fetch_deb(package: DebPackage, debs: Path) -> Path:
    """``debs/<file>.deb`` for ``package``, downloading it with ``apt-get download`` if absent.

    Downloads go to a private temporary directory and are renamed into place, so concurrent
    builders never see a partial file.
    """
    dest = debs / package.filename
    if dest.is_file():
        return dest
    step = f"download {package.name}={package.version}"
    apt_get = _tool("apt-get", step)
    debs.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=debs) as tmp:
        # The directory stays 0700: apt's sandbox user `_apt` cannot enter it, so apt (as
        # root) downloads unsandboxed and warns; _run hides that warning.
        _run([apt_get, "download", "-q", f"{package.name}={package.version}"], step, cwd=Path(tmp))
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise ImageBuildError(step, f"expected one .deb, apt-get left {len(got)}")
        os.chmod(got[0], 0o600)
        os.replace(got[0], dest)
    return dest


def extract_deb(deb: Path, dest: Path) -> None:
    """Unpack ``deb``'s files under ``dest`` (no maintainer scripts, nothing installed)."""
    step = f"unpack {deb.name}"
    _run([_tool("dpkg-deb", step), "-x", str(deb), str(dest)], step)


def is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a program interpreter (statically linked)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return False
            (phoff,) = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    pt_interp = 3
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != pt_interp for i in range(phnum))


def busybox_version(busybox: Path) -> str:
    """``v1.35.0 (Debian 1:1.35.0-4+deb12u1+b1)`` from the binary's banner."""
    try:
        proc = subprocess.run(
            [str(busybox)], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageBuildError("run busybox", str(exc)) from exc
    first = (proc.stdout or proc.stderr).splitlines()[:1]
    match = re.match(r"BusyBox (\S+(?: \([^)]*\))?)", first[0] if first else "")
    if match is None:
        raise ImageBuildError("run busybox", f"{busybox} printed no BusyBox banner")
    return match.group(1)
