"""`--volume` parsing and the sandbox's refusal of volumes it cannot mount (no QEMU needed);
the mounts themselves are checked in real guests (tests/integration/test_volumes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtcontainers.config import HypervisorConfig
from virtcontainers.devices import FsShare
from virtcontainers.errors import ConfigError
from virtcontainers.persist import StateStore
from virtcontainers.persist.document import SandboxDocument
from virtcontainers.sandbox import Sandbox
from virtcontainers.volumes import Volume, volume_shares


def test_parse_docker_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    assert Volume.parse("src:/work") == Volume(source=str(tmp_path / "src"), target="/work")
    ro = Volume.parse(f"{tmp_path}/src:/work:ro")
    assert ro.read_only
    assert not Volume.parse(f"{tmp_path}/src:/work:rw").read_only
    assert volume_shares([ro, ro]) == [
        FsShare(host_path=str(tmp_path / "src"), mount_tag="vcvol0", read_only=True),
        FsShare(host_path=str(tmp_path / "src"), mount_tag="vcvol1", read_only=True),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("src", "give HOST_DIR:GUEST_PATH[:ro|rw]"),
        ("src:/a:ro:x", "give HOST_DIR:GUEST_PATH[:ro|rw]"),
        (":/a", "give HOST_DIR:GUEST_PATH[:ro|rw]"),
        ("src:/a:rx", "the mode must be ro or rw, got 'rx'"),
        ("src:a", "the guest path must be absolute"),
        ("src://", "not / itself"),
        ("nosuch:/a", "is not a directory"),
    ],
)
def test_bad_forms_are_config_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    with pytest.raises(ConfigError, match="--volume") as info:
        Volume.parse(text)
    assert message in str(info.value)
    assert info.value.field == "--volume"


async def test_a_driver_without_9p_is_refused_before_anything_is_recorded(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path / "vc")
    config = HypervisorConfig()
    config.boot.kernel_path = config.boot.initrd_path = str(tmp_path / "not-booted")
    with pytest.raises(ConfigError, match="volumes need virtio-9p, which the mock driver"):
        await Sandbox.create(
            config, hypervisor="mock", store=store,
            volumes=[Volume(source=str(tmp_path), target="/data")],
        )  # fmt: skip
    assert store.list() == []


def test_a_document_without_volumes_still_loads() -> None:
    doc = SandboxDocument.from_json(
        '{"version": 2, "id": "old", "hypervisor_type": "qemu", "state": "created",'
        ' "created_at": 1.0, "hypervisor": {"type": "qemu"}}'
    )
    assert doc.volumes == ()
