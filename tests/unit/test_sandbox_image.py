"""The sandbox side of images: devices, kernel parameter, exec defaults, persistence, and
the CLI's option parsing (no VM, no tools)."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtcontainers.cli import options
from virtcontainers.config import HypervisorConfig, Param
from virtcontainers.devices import BlockDrive
from virtcontainers.errors import ConfigError
from virtcontainers.images import ImageConfig
from virtcontainers.images.sandbox_image import IMAGE_DRIVE_ID, SandboxImage, exec_defaults
from virtcontainers.lifecycle import VmState
from virtcontainers.persist import HypervisorState, SandboxDocument

IMAGE = SandboxImage(
    id="sha256:" + "1" * 64,
    ref="oci:/x:latest",
    disk="/cache/oci/images/1111/root.erofs",
    config=ImageConfig(env=("PATH=/bin", "A=image"), working_dir="/work", user="app"),
    passwd="root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
    group="root:x:0:\napp:x:1001:\n",
)


def test_the_image_disk_is_a_read_only_drive_and_the_kernel_is_told(tmp_path: Path) -> None:
    cfg = HypervisorConfig()
    cfg.boot.kernel_params.append(Param("quiet"))
    once = IMAGE.configure(cfg)
    twice = IMAGE.configure(once)
    assert [p for p in twice.boot.kernel_params if p.key == "vc.rootfs"] == [
        Param("vc.rootfs", "tmpfs")
    ]
    assert Param("quiet") in twice.boot.kernel_params
    assert cfg.boot.kernel_params == [Param("quiet")]  # the caller's config is untouched
    assert IMAGE.devices(tmp_path) == [
        BlockDrive(file=IMAGE.disk, id=IMAGE_DRIVE_ID, read_only=True)
    ]
    assert not list(tmp_path.iterdir())


def test_exec_defaults_come_from_the_image_and_give_way_to_the_caller() -> None:
    env, cwd, uid, gid = exec_defaults(IMAGE, None, None, None, None, None)
    assert (env["A"], env["HOME"], cwd, uid, gid) == ("image", "/home/app", "/work", 1000, 1001)
    env, cwd, uid, gid = exec_defaults(IMAGE, {"A": "mine"}, "/tmp", None, None, "root")
    assert (env["A"], env["PATH"], cwd, uid, gid) == ("mine", "/bin", "/tmp", 0, 0)
    assert exec_defaults(IMAGE, None, None, 7, 8, None)[2:] == (7, 8)


def test_the_sandbox_image_survives_the_document_round_trip() -> None:
    scratch = IMAGE.with_scratch(64)
    doc = SandboxDocument(
        id="sb", hypervisor_type="qemu", state=VmState.CREATED, created_at=1.0,
        hypervisor=HypervisorState(), image=scratch,
    )  # fmt: skip
    back = SandboxDocument.from_json(doc.to_json()).image
    assert back is not None
    assert SandboxImage.from_record(back) == scratch
    assert scratch.configure(HypervisorConfig()).boot.kernel_params[-1] == Param(
        "vc.rootfs", "scratch"
    )


def test_a_busybox_guest_knows_only_numeric_users_and_root() -> None:
    assert SandboxImage.numeric_user("0") == (0, 0)
    assert SandboxImage.numeric_user("1000:5") == (1000, 5)
    with pytest.raises(ConfigError):
        SandboxImage.numeric_user("app")


def test_exec_defaults_without_an_image_keep_the_caller_and_know_numeric_users() -> None:
    assert exec_defaults(None, None, None, None, None, None) == (None, None, None, None)
    given = exec_defaults(None, {"A": "b"}, "/w", None, None, "1000:5")
    assert given == ({"A": "b"}, "/w", 1000, 5)
    assert exec_defaults(None, None, None, 7, None, "root") == (None, None, 7, 0)
    with pytest.raises(ConfigError, match="app"):
        exec_defaults(None, None, None, None, None, "app")


@pytest.mark.parametrize(
    ("text", "mib"),
    [(None, 0), ("", 0), ("512M", 512), ("2G", 2048), ("1024", 1024), ("1.5g", 1536),
     ("64MiB", 64)],
)  # fmt: skip
def test_disk_size_spellings(text: str | None, mib: int) -> None:
    assert options.disk_size_mb(text) == mib


def test_bad_disk_size_and_env_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not a size"):
        options.disk_size_mb("lots")
    with pytest.raises(ConfigError, match="name is empty"):
        options.env_items(["=x"])
    monkeypatch.setenv("FROM_HOST", "h")
    monkeypatch.delenv("UNSET_HERE", raising=False)
    assert options.env_items(["A=1", "B=", "FROM_HOST", "UNSET_HERE"]) == {
        "A": "1", "B": "", "FROM_HOST": "h",
    }  # fmt: skip
    assert options.parse_bool("false", "--tls-verify") is False
    with pytest.raises(ConfigError):
        options.parse_bool("maybe", "--tls-verify")
