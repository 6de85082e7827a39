"""The pure-Python cpio writer, initrd concatenation, module metadata and the image cache logic."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import subprocess
import zlib
from pathlib import Path

import pytest

from virtcontainers.errors import ConfigError, VirtContainersError
from virtcontainers.guest import debian, image
from virtcontainers.guest.cpio import CpioEntry, CpioWriter, concat_initrd, make_overlay_cpio
from virtcontainers.guest.image import ImageBuildError, build_image, find_image
from virtcontainers.guest.kmod import KernelModule, ModuleTree, modules_dep, read_modinfo

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")

HELLO = b"#!/bin/sh\necho hello\n"


def _cpio_list(archive: Path) -> list[str]:
    out = subprocess.run(
        ["cpio", "-it", "--quiet"], stdin=archive.open("rb"), capture_output=True, check=True
    )
    return out.stdout.decode().split()


def _cpio_extract(archive: Path, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        stdin=archive.open("rb"),
        cwd=dest,
        check=True,
    )


@needs_cpio
def test_overlay_round_trips_through_gnu_cpio(tmp_path: Path) -> None:
    archive = make_overlay_cpio(
        {
            "/etc/vc/init.d/10-hello": (HELLO, 0o755),
            "/etc/secret": (b"s3cret", 0o600),
            "etc/vc/link": (b"init.d/10-hello", stat.S_IFLNK | 0o777),
            "/srv/empty": (b"", stat.S_IFDIR | 0o750),
        },
        tmp_path / "overlay.cpio",
    )
    names = _cpio_list(archive)
    # Parents come before their children: the kernel's unpacker does not create them.
    assert names.index("etc") < names.index("etc/vc") < names.index("etc/vc/init.d")
    assert names.index("etc/vc/init.d") < names.index("etc/vc/init.d/10-hello")
    assert len(names) == len(set(names))

    root = tmp_path / "root"
    _cpio_extract(archive, root)
    hello = root / "etc/vc/init.d/10-hello"
    assert hello.read_bytes() == HELLO
    assert stat.S_IMODE(hello.stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "etc/secret").stat().st_mode) == 0o600
    assert os.readlink(root / "etc/vc/link") == "init.d/10-hello"
    assert (root / "srv/empty").is_dir()
    assert stat.S_IMODE((root / "srv/empty").stat().st_mode) == 0o750


def test_overlay_is_reproducible_and_aligned(tmp_path: Path) -> None:
    files = {"/a/b": (b"x" * 5, 0o644), "/c": (b"", 0o600)}
    one = make_overlay_cpio(files, tmp_path / "one").read_bytes()
    two = make_overlay_cpio(files, tmp_path / "two").read_bytes()
    assert one == two
    assert one.startswith(b"070701")
    assert len(one) % 4 == 0
    assert b"TRAILER!!!" in one


def test_overlay_rejects_unsafe_names_and_types(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.\."):
        make_overlay_cpio({"/etc/../../x": (b"", 0o644)}, tmp_path / "o")
    with pytest.raises(ValueError, match="only files"):
        make_overlay_cpio({"/dev/x": (b"", stat.S_IFCHR | 0o600)}, tmp_path / "o")
    with pytest.raises(ValueError, match="no content"):
        make_overlay_cpio({"/d": (b"x", stat.S_IFDIR | 0o755)}, tmp_path / "o")


@needs_cpio
def test_writer_device_nodes(tmp_path: Path) -> None:
    path = tmp_path / "dev.cpio"
    with path.open("wb") as out:
        w = CpioWriter(out)
        w.add(CpioEntry.char_device("dev/console", 5, 1))
        w.add(CpioEntry.directory("dev"))  # already emitted as a parent: not repeated
        w.close()
        w.close()  # idempotent
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], stdin=path.open("rb"), capture_output=True, check=True
    ).stdout.decode()
    lines = listing.splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("crw-------")
    assert "5,   1" in lines[1] or "5, 1" in lines[1]


def _split_gzip(data: bytes) -> tuple[bytes, bytes]:
    d = zlib.decompressobj(wbits=31)
    plain = d.decompress(data)
    return plain, d.unused_data


@needs_cpio
def test_concat_gzip_base_and_plain_overlay(tmp_path: Path) -> None:
    base_cpio = make_overlay_cpio({"/init": (b"#!/bin/sh\n", 0o755)}, tmp_path / "base.cpio")
    base = tmp_path / "base.img"
    base.write_bytes(gzip.compress(base_cpio.read_bytes(), mtime=0))
    overlay = make_overlay_cpio({"/etc/vc/init.d/10-hello": (HELLO, 0o755)}, tmp_path / "ov")
    gz_overlay = tmp_path / "ov.gz"
    gz_overlay.write_bytes(gzip.compress(overlay.read_bytes(), mtime=0))

    out = concat_initrd(base, [overlay, gz_overlay], tmp_path / "initrd")
    data = out.read_bytes()
    first, rest = _split_gzip(data)
    assert first == base_cpio.read_bytes()
    # The plain archive starts 4-byte aligned after zero padding (the kernel insists on it).
    start = len(data) - len(rest) + (len(rest) - len(rest.lstrip(b"\0")))
    assert start % 4 == 0
    rest = rest.lstrip(b"\0")
    assert rest.startswith(overlay.read_bytes())
    tail = rest[len(overlay.read_bytes()) :].lstrip(b"\0")
    assert gzip.decompress(tail) == overlay.read_bytes()

    plain = tmp_path / "plain.cpio"
    plain.write_bytes(rest[: len(overlay.read_bytes())])
    root = tmp_path / "root"
    _cpio_extract(plain, root)
    assert (root / "etc/vc/init.d/10-hello").read_bytes() == HELLO


def test_concat_refuses_to_overwrite_an_input(tmp_path: Path) -> None:
    base = make_overlay_cpio({"/x": (b"", 0o644)}, tmp_path / "base")
    with pytest.raises(ValueError, match="also an input"):
        concat_initrd(base, [], base)


def test_unknown_flavour_is_a_config_error_listing_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_image("bogus", cache_dir=tmp_path)
    assert info.value.field == "flavour"
    assert info.value.allowed == ("cloud", "generic")
    assert "cloud, generic" in str(info.value)
    with pytest.raises(ConfigError):
        find_image("bogus", cache_dir=tmp_path)


def test_image_build_error_says_what_failed_and_what_to_do_instead() -> None:
    err = ImageBuildError("download linux-image-x", "apt-get exited with 100: 404 Not Found")
    assert isinstance(err, VirtContainersError)
    assert err.step == "download linux-image-x"
    text = str(err)
    assert "cannot download linux-image-x" in text
    assert "--kernel" in text
    assert "--initrd" in text
    assert "--guest-disk" in text


def test_missing_apt_is_an_image_build_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-cache, no apt-get
    with pytest.raises(ImageBuildError, match="apt-cache is not installed"):
        build_image("cloud", cache_dir=tmp_path / "cache")


def _fake_cached_image(root: Path, flavour: str, built_at: str, inputs: object) -> Path:
    folder = root / "images" / f"key-{flavour}-{built_at}"
    folder.mkdir(parents=True)
    (folder / "vmlinuz").write_bytes(b"kernel")
    (folder / "initrd.img").write_bytes(b"initrd")
    doc = {
        "format": image.MANIFEST_FORMAT,
        "flavour": flavour,
        "kernel_release": "6.1.0-1-cloud-amd64",
        "kernel_sha512": "k",
        "initrd_sha512": "i",
        "built_at": built_at,
        "inputs": inputs,
    }
    (folder / "manifest.json").write_text(json.dumps(doc))
    return folder


def test_cache_hit_never_runs_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_apt(*args: object, **kwargs: object) -> str:
        raise AssertionError("apt was consulted on a cache hit")

    monkeypatch.setattr(debian, "_run", no_apt)
    inputs = image._local_inputs(image.FLAVOURS["cloud"])
    _fake_cached_image(tmp_path, "cloud", "2024-01-01T00:00:00", inputs)
    newer = _fake_cached_image(tmp_path, "cloud", "2025-01-01T00:00:00", inputs)
    _fake_cached_image(tmp_path, "cloud", "2026-01-01T00:00:00", {**inputs, "init_sha256": "x"})
    steps: list[tuple[str, float | None]] = []
    got = build_image("cloud", cache_dir=tmp_path, progress=lambda s, f: steps.append((s, f)))
    assert got.kernel == newer / "vmlinuz"
    assert steps == [("cached", 1.0)]


def test_find_image_picks_the_newest_valid_build(tmp_path: Path) -> None:
    assert find_image("cloud", cache_dir=tmp_path) is None
    old = _fake_cached_image(tmp_path, "cloud", "2024-01-01T00:00:00", {})
    broken = _fake_cached_image(tmp_path, "cloud", "2025-01-01T00:00:00", {})
    (broken / "initrd.img").unlink()
    _fake_cached_image(tmp_path, "generic", "2026-01-01T00:00:00", {})
    (tmp_path / "images" / ".build-partial").mkdir()
    found = find_image("cloud", cache_dir=tmp_path)
    assert found is not None
    assert found.manifest == old / "manifest.json"
    assert found.initrd == old / "initrd.img"
    generic = find_image("generic", cache_dir=tmp_path)
    assert generic is not None
    assert generic.flavour == "generic"


def test_publish_loses_the_race_gracefully(tmp_path: Path) -> None:
    winner = _fake_cached_image(tmp_path, "cloud", "2024", {})
    loser = tmp_path / "out"
    loser.mkdir()
    (loser / "vmlinuz").write_bytes(b"other")
    assert image._publish(loser, winner, force=False) is False
    assert (winner / "vmlinuz").read_bytes() == b"kernel"
    fresh = tmp_path / "images" / "fresh"
    assert image._publish(loser, fresh, force=False) is True
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE((fresh / "vmlinuz").stat().st_mode) == 0o600


def _module(name: str, *deps: str) -> KernelModule:
    return KernelModule(name, f"kernel/{name}.ko", b"", deps, ())


def test_modules_dep_lists_the_closure_in_reverse_load_order() -> None:
    # a needs c and b; b needs c: load order c, b, a; modprobe reads the list back to front.
    mods = [_module("c"), _module("b", "c"), _module("a", "c", "b", "builtin_thing")]
    lines = modules_dep(mods).splitlines()
    assert lines == [
        "kernel/c.ko:",
        "kernel/b.ko: kernel/c.ko",
        "kernel/a.ko: kernel/b.ko kernel/c.ko",
    ]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_read_modinfo_from_a_real_elf_object(tmp_path: Path) -> None:
    src = tmp_path / "m.c"
    src.write_text(
        'static const char a[] __attribute__((used, section(".modinfo"))) = '
        '"depends=virtio,virtio_ring";\n'
        'static const char b[] __attribute__((used, section(".modinfo"))) = '
        '"alias=virtio:d00000003v*";\n'
    )
    subprocess.run(["gcc", "-c", "-o", str(tmp_path / "m.o"), str(src)], check=True)
    info = read_modinfo((tmp_path / "m.o").read_bytes())
    assert ("depends", "virtio,virtio_ring") in info
    assert ("alias", "virtio:d00000003v*") in info
    with pytest.raises(ValueError, match="ELF64"):
        read_modinfo(b"not an elf")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_a_softdep_pre_becomes_a_dependency_on_the_module_providing_it(tmp_path: Path) -> None:
    """erofs needs libcrc32c, whose init fails (ENOENT) without a crc32c algorithm; it says
    so only as `softdep=pre: crc32c`, which busybox modprobe ignores. Before, the generic
    kernel's initramfs lacked crc32c_generic and image sandboxes could not mount erofs."""
    root = tmp_path / "lib" / "modules" / "6.1.0-test"

    def ko(relpath: str, *modinfo: str) -> None:
        src = tmp_path / "m.c"
        src.write_text("".join(
            f'static const char m{i}[] __attribute__((used, section(".modinfo"))) = "{item}";\n'
            for i, item in enumerate(modinfo)
        ))  # fmt: skip
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-c", "-o", str(root / relpath), str(src)], check=True)

    ko("kernel/fs/erofs/erofs.ko", "depends=libcrc32c")
    ko("kernel/lib/libcrc32c.ko", "depends=", "softdep=pre: crc32c")
    ko("kernel/crypto/crc32c_unrelated.ko", "alias=something-else")
    # No provider yet: the softdep is dropped (libcrc32c, whose name has crc32c in it, is
    # not its own provider).
    assert ModuleTree(root, "6.1.0-test").module("libcrc32c").depends == ()
    ko("kernel/arch/x86/crypto/crc32c-intel.ko", "alias=crypto-crc32c", "alias=crc32c")
    ko("kernel/crypto/crc32c_generic.ko", "alias=crypto-crc32c", "alias=crc32c")
    tree = ModuleTree(root, "6.1.0-test")
    closure = tree.closure(["erofs"])
    assert [m.name for m in closure] == ["crc32c_generic", "libcrc32c", "erofs"]
    assert "kernel/lib/libcrc32c.ko: kernel/crypto/crc32c_generic.ko" in modules_dep(closure)
    assert tree.provider("no_such_thing") is None


def test_static_elf_detection() -> None:
    if Path("/bin/busybox").is_file() and shutil.which("file"):
        out = subprocess.run(["file", "-L", "/bin/busybox"], capture_output=True, text=True)
        assert debian.is_static_elf(Path("/bin/busybox")) == ("statically linked" in out.stdout)
    assert not debian.is_static_elf(Path("/bin/sh"))
    assert not debian.is_static_elf(Path("/nonexistent"))


def test_deb_filenames_encode_the_epoch() -> None:
    pkg = debian.DebPackage("busybox-static", "1:1.35.0-4")
    assert pkg.filename == "busybox-static_1%3a1.35.0-4_amd64.deb"


def test_prune_keeps_the_newest_per_flavour(tmp_path: Path) -> None:
    for year in ("2021", "2022", "2023"):
        _fake_cached_image(tmp_path, "cloud", year, {})
    generic = _fake_cached_image(tmp_path, "generic", "2020", {})
    removed = image.prune_images(tmp_path, keep=1)
    assert sorted(p.name for p in removed) == ["key-cloud-2021", "key-cloud-2022"]
    left = [img.manifest.parent.name for img, _ in image.list_images(tmp_path)]
    assert left == ["key-cloud-2023", generic.name]
    assert not any(p.name.startswith(".old-") for p in (tmp_path / "images").iterdir())
