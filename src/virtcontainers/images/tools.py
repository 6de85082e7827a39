"""Running the field's tools (skopeo, umoci, mkfs.erofs, mke2fs, tar): argv lists, captured
output, and one translation of their failures into :class:`ImageError`."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from virtcontainers.command import run_captured
from virtcontainers.errors import ImageError

__all__ = ["require", "run_tool"]

#: Debian package per tool, for the "not installed" message.
PACKAGES = {
    "skopeo": "skopeo",
    "umoci": "umoci",
    "mkfs.erofs": "erofs-utils",
    "mke2fs": "e2fsprogs",
    "tar": "tar",
}


def require(tool: str, *, ref: str = "") -> str:
    """The tool's full path.

    Raises:
        ImageError: the tool is not installed (names the Debian package).
    """
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path is None:
        package = PACKAGES.get(tool, tool)
        raise ImageError(
            f"{tool} is not installed (apt-get install {package}, or run scripts/setup)", ref=ref
        )
    return path


def run_tool(
    argv: Sequence[str], *, step: str, ref: str = "", cwd: Path | None = None, timeout: float = 1800
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (argv[0] looked up with :func:`require`) to completion.

    Raises:
        ImageError: the tool is missing, timed out or exited non-zero (``detail`` holds the
            last lines of its stderr). Callers that recognise a failure re-raise it typed.
    """
    full = [require(argv[0], ref=ref), *argv[1:]]
    try:
        proc = run_captured(full, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{step}: {argv[0]} took longer than {timeout:g} s", ref=ref) from exc
    except OSError as exc:
        raise ImageError(f"{step}: cannot run {argv[0]}", ref=ref, detail=str(exc)) from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise ImageError(f"{step}: {argv[0]} exited with {proc.returncode}", ref=ref, detail=tail)
    return proc
