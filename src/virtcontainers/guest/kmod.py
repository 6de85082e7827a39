"""Kernel modules of an unpacked Debian kernel package: metadata, dependencies, depmod files.

Debian's ``linux-image-*`` packages ship no ``modules.dep`` (``depmod`` runs in the postinst,
which ``dpkg-deb -x`` never runs), and the host may not have kmod. So this module reads the
``.modinfo`` ELF section of each ``.ko`` itself (``depends=``, ``alias=``), resolves the
dependency closure, and writes the small ``modules.dep``/``modules.alias`` that busybox
``modprobe`` needs inside the guest.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from virtcontainers.guest.build_error import ImageBuildError

__all__ = ["KernelModule", "ModuleTree", "module_name", "read_modinfo"]

_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def module_name(path: str | Path) -> str:
    """``.../virtio-rng.ko.xz`` -> ``virtio_rng`` (the kernel treats '-' and '_' alike)."""
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def _decompress(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ImageBuildError(
                "decompress kernel modules", f"{path.name} is zstd-compressed and zstd is absent"
            )
        return subprocess.run(
            [zstd, "-dc", str(path)], check=True, capture_output=True, timeout=60
        ).stdout
    return raw


def read_modinfo(elf: bytes) -> list[tuple[str, str]]:
    """The ``key=value`` pairs of a module's ``.modinfo`` section (ELF64 little-endian)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not an ELF64 little-endian object")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize
        )
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = elf.index(b"\0", strtab + name_off)
        if elf[strtab + name_off : end] == b".modinfo":
            pairs = []
            for item in elf[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    pairs.append((key, value))
            return pairs
    return []


def _soft_pre(info: Sequence[tuple[str, str]]) -> list[str]:
    """The ``pre:`` names of a module's ``softdep`` entries (``pre: a b post: c``)."""
    names: list[str] = []
    for key, value in info:
        if key != "softdep":
            continue
        words, part = value.split(), ""
        for word in words:
            if word.endswith(":"):
                part = word[:-1]
            elif part == "pre":
                names.append(word)
    return names


@dataclass(frozen=True, slots=True)
class KernelModule:
    """A loadable module; ``relpath`` is below ``/lib/modules/<release>/``, uncompressed."""

    name: str
    relpath: str
    data: bytes
    depends: tuple[str, ...]
    aliases: tuple[str, ...]


@dataclass
class ModuleTree:
    """``lib/modules/<release>/`` of an unpacked kernel package."""

    root: Path
    release: str
    builtin: frozenset[str] = field(init=False)
    _paths: dict[str, Path] = field(init=False, repr=False)
    _cache: dict[str, KernelModule] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        builtin = self.root / "modules.builtin"
        lines = builtin.read_text().split() if builtin.is_file() else []
        self.builtin = frozenset(module_name(line) for line in lines)
        self._paths = {}
        for path in sorted((self.root / "kernel").rglob("*.ko*")):
            if path.name.endswith(_SUFFIXES):
                self._paths.setdefault(module_name(path), path)

    def has(self, name: str) -> bool:
        """True when ``name`` is built in or shipped as a module."""
        name = name.replace("-", "_")
        return name in self.builtin or name in self._paths

    def module(self, name: str) -> KernelModule:
        name = name.replace("-", "_")
        if name in self._cache:
            return self._cache[name]
        path = self._paths.get(name)
        if path is None:
            raise ImageBuildError(
                "resolve kernel modules",
                f"module {name!r} is neither built into kernel {self.release} nor shipped with it",
            )
        data = _decompress(path)
        try:
            info = read_modinfo(data)
        except (ValueError, struct.error, IndexError) as exc:
            raise ImageBuildError("read kernel module", f"{path}: {exc}") from exc
        depends = [d for d in next((v for k, v in info if k == "depends"), "").split(",") if d]
        # A "softdep=pre: crc32c" is needed at init (libcrc32c fails with ENOENT without a
        # crc32c algorithm, and erofs needs libcrc32c), but busybox modprobe ignores
        # softdeps: make the module that provides it a dependency.
        for soft in _soft_pre(info):
            provider = self.provider(soft, besides=name)
            if provider is not None:
                depends.append(provider)
        rel = str(path.relative_to(self.root))
        for suffix in (".xz", ".gz", ".zst"):
            rel = rel.removesuffix(suffix)
        mod = KernelModule(
            name=name,
            relpath=rel,
            data=data,
            depends=tuple(d.replace("-", "_") for d in depends),
            aliases=tuple(v for k, v in info if k == "alias"),
        )
        self._cache[name] = mod
        return mod

    def provider(self, name: str, *, besides: str = "") -> str | None:
        """The module to load for ``name``: itself when built in or shipped, else the shipped
        module (its name containing ``name``, ``*_generic`` first) that declares it as an
        alias, as ``crc32c_generic`` does for ``crc32c``; ``None`` when there is none.
        ``besides``: a module not to consider (the one asking: it is being read)."""
        name = name.replace("-", "_")
        if self.has(name):
            return name if name != besides else None
        candidates = sorted(
            (m for m in self._paths if name in m and m != besides),
            key=lambda m: (not m.endswith("_generic"), m),
        )
        for candidate in candidates:
            aliases = self.module(candidate).aliases
            if name in aliases or f"crypto-{name}" in aliases:
                return candidate
        return None

    def closure(self, names: Iterable[str]) -> list[KernelModule]:
        """The loadable modules ``names`` need, dependencies before dependants.

        Built-in names are dropped (nothing to load); a name that is neither built in nor
        shipped raises :class:`ImageBuildError`.
        """
        order: list[KernelModule] = []
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(name: str) -> None:
            name = name.replace("-", "_")
            if name in done or name in self.builtin:
                return
            if name in visiting:
                raise ImageBuildError("resolve kernel modules", f"dependency cycle at {name}")
            visiting.add(name)
            mod = self.module(name)
            for dep in mod.depends:
                visit(dep)
            visiting.discard(name)
            done.add(name)
            order.append(mod)

        for name in names:
            visit(name)
        return order


def modules_dep(modules: Sequence[KernelModule]) -> str:
    """``modules.dep`` for ``modules``, given dependencies first (as :meth:`ModuleTree.closure`).

    Like depmod, each line lists the full transitive closure, dependants before their own
    dependencies, which is the order busybox and kmod ``modprobe`` unwind in reverse.
    """
    by_name = {m.name: m for m in modules}
    position = {m.name: i for i, m in enumerate(modules)}
    lines = []
    for mod in modules:
        needed: set[str] = set()
        stack = list(mod.depends)
        while stack:
            name = stack.pop()
            if name in by_name and name not in needed:  # absent from by_name: built in
                needed.add(name)
                stack.extend(by_name[name].depends)
        deps = sorted(needed, key=position.__getitem__, reverse=True)
        lines.append(f"{mod.relpath}: {' '.join(by_name[d].relpath for d in deps)}".rstrip())
    return "\n".join(lines) + "\n"


def modules_alias(modules: Sequence[KernelModule]) -> str:
    """``modules.alias`` (``alias <pattern> <module>``), so ``mount -t 9p`` can autoload."""
    return "".join(f"alias {alias} {m.name}\n" for m in modules for alias in m.aliases)
