"""Initramfs archives: a pure-Python newc cpio writer and initrd concatenation.

Linux unpacks an initrd that is several archives back to back, in order, each one plain or
compressed on its own (``init/initramfs.c``), and a later archive overwrites files of an earlier
one. That is how tests inject behaviour without rebuilding the image: a small plain overlay
appended to the gzip'd base. Two kernel rules shape this module:

* a plain (uncompressed) archive must start at an offset that is a multiple of 4 from the start
  of the initrd, and zero bytes between archives are skipped, so :func:`concat_initrd` pads
  every part with zeros to a 4-byte boundary;
* the kernel does not create missing parent directories, so every archive lists its parents
  before their children (re-listing a directory that exists is harmless).

Every entry has ``nlink`` 1 for files (no hard links), uid/gid 0 and a fixed mtime, so the same
input always gives the same bytes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

__all__ = ["CpioEntry", "CpioWriter", "concat_initrd", "make_overlay_cpio"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
#: Fixed mtime of every entry (2000-01-01) so archives are reproducible.
MTIME = 946684800


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One archive member. ``mode`` includes the file type bits (``stat.S_IFREG | 0o755``)."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0

    @staticmethod
    def directory(name: str, perm: int = 0o755) -> CpioEntry:
        return CpioEntry(name, stat.S_IFDIR | perm)

    @staticmethod
    def file(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return CpioEntry(name, stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(name: str, target: str) -> CpioEntry:
        return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return CpioEntry(name, stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    """Streams newc ("070701") entries to a binary file; :meth:`close` writes the trailer.

    Parent directories of every entry are emitted automatically (mode 0755) unless the caller
    added them first, because the kernel's unpacker does not create them.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 300000  # away from 0 and from anything a tool might special-case
        self._dirs: set[str] = {""}
        self._closed = False

    def add(self, entry: CpioEntry) -> None:
        name = _normalise(entry.name)
        parent = str(PurePosixPath(name).parent)
        if parent != "." and parent not in self._dirs:
            self.add(CpioEntry.directory(parent))
        if stat.S_ISDIR(entry.mode):
            if name in self._dirs:
                return
            self._dirs.add(name)
        self._write(name, entry.mode, entry.data, entry.rdev_major, entry.rdev_minor)

    def add_all(self, entries: Iterable[CpioEntry]) -> None:
        for entry in entries:
            self.add(entry)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write(_TRAILER, 0, b"", 0, 0, ino=0, nlink=1)

    def _write(
        self,
        name: str,
        mode: int,
        data: bytes,
        rdev_major: int,
        rdev_minor: int,
        *,
        ino: int | None = None,
        nlink: int | None = None,
    ) -> None:
        if self._closed and name != _TRAILER:
            raise ValueError("cpio archive already closed")
        if ino is None:
            self._ino += 1
            ino = self._ino
        if nlink is None:
            nlink = 2 if stat.S_ISDIR(mode) else 1
        encoded = name.encode() + b"\0"
        fields = (
            ino,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            MTIME if name != _TRAILER else 0,
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev_major,
            rdev_minor,
            len(encoded),
            0,  # check (only for "070702")
        )
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + b"\0" * _pad4(len(header) + len(encoded)))
        self._out.write(data + b"\0" * _pad4(len(data)))


def _normalise(name: str) -> str:
    path = PurePosixPath("/" + name.lstrip("/"))
    if ".." in path.parts:
        raise ValueError(f"cpio member name may not contain '..': {name!r}")
    rel = str(path)[1:]
    if not rel:
        raise ValueError("cpio member name is empty")
    return rel


def make_overlay_cpio(files: Mapping[str, tuple[bytes, int]], dest: Path) -> Path:
    """Write an uncompressed newc archive holding ``files`` and return ``dest``.

    ``files`` maps a path in the guest (``/etc/vc/init.d/10-hello``) to ``(content, mode)``.
    ``mode`` is the permission bits (``0o755``); add ``stat.S_IFLNK`` to make a symlink whose
    content is the target, or ``stat.S_IFDIR`` for an empty directory. Parent directories are
    added with mode 0755. Append the result to an initrd with :func:`concat_initrd`.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        writer = CpioWriter(out)
        for name, (content, mode) in files.items():
            kind = stat.S_IFMT(mode) or stat.S_IFREG
            if kind not in (stat.S_IFREG, stat.S_IFLNK, stat.S_IFDIR):
                raise ValueError(f"{name}: only files, symlinks and directories are supported")
            if kind == stat.S_IFDIR and content:
                raise ValueError(f"{name}: a directory has no content")
            writer.add(CpioEntry(name, kind | stat.S_IMODE(mode), content))
        writer.close()
    os.replace(tmp, dest)
    return dest


def concat_initrd(base: Path, overlays: Sequence[Path], dest: Path) -> Path:
    """Write ``base`` followed by every overlay to ``dest`` (the kernel unpacks them in order).

    Each part may be plain or compressed with any method the kernel was built for (gzip, xz,
    zstd on Debian). Parts are zero-padded to 4 bytes, which the kernel requires before a plain
    archive and skips otherwise. ``dest`` may not be one of the inputs.
    """
    dest = Path(dest)
    parts = [Path(base), *(Path(p) for p in overlays)]
    if any(p.resolve() == dest.resolve() for p in parts if p.exists()):
        raise ValueError(f"{dest} is also an input of concat_initrd")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            out.write(b"\0" * _pad4(out.tell()))
    os.replace(tmp, dest)
    return dest
