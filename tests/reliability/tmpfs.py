"""A small real tmpfs of the test's own (root only), and filling it to ENOSPC."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextlib.contextmanager
def small_tmpfs(size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -o size=``) on a fresh directory; unmounted after."""
    where = Path(tempfile.mkdtemp(prefix="vc-rel-fs-"))
    mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "vc-rel", str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def fill(fs: Path) -> Path:
    """Write until the file system is full (ENOSPC); returns the filler file."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="No space left") as full:
        (fs / "filler2").write_bytes(b"\0" * 8192)
    assert full.value.errno == errno.ENOSPC
    return filler
