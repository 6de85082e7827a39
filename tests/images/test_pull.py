"""Pulling images into the store: OCI layouts, a real local registry (tag and digest),
digest verification, platform check, concurrency, rm/prune, and the `vc image` CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from virtcontainers.errors import (
    ConfigError,
    ImageArchError,
    ImageDigestError,
    ImageNotFoundError,
)
from virtcontainers.images import ImageStore, PullPolicy, StoredImage, pull
from virtcontainers.images.layout import read_layout
from virtcontainers.testing.oci_images import BUSYBOX_CONFIG
from virtcontainers.testing.registry import LocalRegistry, push

VC = str(Path(sys.executable).with_name("vc"))


def _empty(store: ImageStore) -> bool:
    images = list(store.images_dir.iterdir()) if store.images_dir.is_dir() else []
    tmp = list(store.tmp_dir.iterdir()) if store.tmp_dir.is_dir() else []
    return not images and not tmp and store.images() == []


def test_pull_an_oci_layout_builds_an_erofs_root_disk(busybox_oci: Path, store: ImageStore):
    image = pull(f"oci:{busybox_oci}", store=store)
    assert image.id == read_layout(busybox_oci, tag="latest").config.digest
    assert image.refs == (f"oci:{busybox_oci}:latest",)
    assert image.layers == 3
    assert image.disk.read_bytes()[1024:1028] == bytes.fromhex("e2e1f5e0")  # erofs magic
    assert image.config.env == BUSYBOX_CONFIG.env
    assert image.config.entrypoint == BUSYBOX_CONFIG.entrypoint
    assert image.config.working_dir == "/srv"
    assert "app:x:1000:1000" in image.passwd
    assert store.get(f"oci:{busybox_oci}") == image
    assert store.get(image.short_id) == image
    assert not list(store.tmp_dir.iterdir())


def test_the_whiteout_layer_deletes_the_file_from_the_root_disk(
    busybox_oci: Path, store: ImageStore, tmp_path: Path
) -> None:
    image = pull(f"oci:{busybox_oci}", store=store)
    dump = shutil.which("dump.erofs")
    if dump is None:
        pytest.skip("dump.erofs is not installed")
    keep = subprocess.run([dump, "--path=/opt/keep.txt", str(image.disk)], capture_output=True)
    gone = subprocess.run([dump, "--path=/opt/doomed.txt", str(image.disk)], capture_output=True)
    # dump.erofs exits 0 either way: what it prints tells a present inode from a missing one.
    assert b"keep.txt" in keep.stdout, keep.stderr
    assert not gone.stdout
    assert b"read inode failed @ /opt/doomed.txt" in gone.stderr


def test_an_image_for_another_architecture_is_refused_and_leaves_nothing(
    busybox_oci: Path, store: ImageStore
) -> None:
    with pytest.raises(ImageArchError) as err:
        pull(f"oci:{busybox_oci}:arm64", store=store)
    assert err.value.image_arch == "linux/arm64"
    assert err.value.host_arch == "linux/amd64"
    assert _empty(store)


def test_a_corrupt_layer_in_a_layout_is_refused_naming_its_digest(
    busybox_oci: Path, store: ImageStore, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(busybox_oci, layout)
    layer = read_layout(layout, tag="latest").layers[-2]
    blob = layout / "blobs/sha256" / layer.digest.removeprefix("sha256:")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageDigestError) as err:
        pull(f"oci:{layout}", store=store)
    assert err.value.digest == layer.digest
    assert layer.digest in str(err.value)
    assert _empty(store)


def test_unknown_references_are_typed_errors_and_leave_nothing(
    tmp_path: Path, store: ImageStore, registry: LocalRegistry
) -> None:
    with pytest.raises(ImageNotFoundError):
        pull(f"oci:{tmp_path / 'nope'}", store=store)
    with pytest.raises(ImageNotFoundError):
        pull(f"{registry.host}/no/such:1", store=store, tls_verify=False)
    with pytest.raises(ConfigError):
        pull("Not A Reference", store=store)
    assert _empty(store)


def test_an_unreachable_registry_is_image_not_found(store: ImageStore) -> None:
    with pytest.raises(ImageNotFoundError, match="cannot fetch"):
        pull("127.0.0.1:1/no/such:1", store=store, tls_verify=False)
    assert _empty(store)


def test_pull_from_a_local_registry_by_tag_and_by_digest(
    busybox_oci: Path, store: ImageStore, registry: LocalRegistry
) -> None:
    push(busybox_oci, "latest", f"{registry.host}/test/busybox:1")
    by_tag = pull(f"{registry.host}/test/busybox:1", store=store, tls_verify=False)
    digest = read_layout(busybox_oci, tag="latest").manifest.digest
    assert by_tag.manifest_digest == digest
    by_digest = pull(f"{registry.host}/test/busybox@{digest}", store=store, tls_verify=False)
    assert by_digest.id == by_tag.id
    assert set(by_digest.refs) == {
        f"{registry.host}/test/busybox:1",
        f"{registry.host}/test/busybox@{digest}",
    }
    assert len(store.images()) == 1


def test_plain_http_registry_needs_tls_verify_false(
    busybox_oci: Path, store: ImageStore, registry: LocalRegistry
) -> None:
    push(busybox_oci, "latest", f"{registry.host}/test/tls:1")
    with pytest.raises(ImageNotFoundError, match="--tls-verify=false"):
        pull(f"{registry.host}/test/tls:1", store=store)
    assert _empty(store)


def test_a_corrupted_blob_in_the_registry_is_refused_naming_the_digest(
    busybox_oci: Path, store: ImageStore, registry: LocalRegistry
) -> None:
    push(busybox_oci, "latest", f"{registry.host}/test/corrupt:1")
    layer = read_layout(busybox_oci, tag="latest").layers[0]
    data = registry.blob_path(layer.digest)
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ImageDigestError) as err:
        pull(f"{registry.host}/test/corrupt:1", store=store, tls_verify=False)
    assert err.value.digest == layer.digest
    assert layer.digest in str(err.value)
    assert _empty(store)


def test_two_concurrent_pulls_of_one_image_both_succeed(
    busybox_oci: Path, store: ImageStore
) -> None:
    results: list[StoredImage | BaseException] = []

    def one() -> None:
        try:
            results.append(pull(f"oci:{busybox_oci}", store=ImageStore(store.root)))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 2
    assert all(isinstance(r, StoredImage) for r in results), results
    ids = {r.id for r in results if isinstance(r, StoredImage)}
    assert len(ids) == 1
    assert len(store.images()) == 1
    assert not list(store.tmp_dir.iterdir())
    image = store.images()[0]
    assert image.disk.is_file()


def test_rm_untags_and_deletes_the_last_reference_prune_clears_leftovers(
    busybox_oci: Path, store: ImageStore, tmp_path: Path
) -> None:
    layout = tmp_path / "copy"
    shutil.copytree(busybox_oci, layout)
    first = pull(f"oci:{busybox_oci}", store=store)
    second = pull(f"oci:{layout}", store=store)
    assert first.id == second.id
    assert store.remove(f"oci:{busybox_oci}") == [f"oci:{busybox_oci}:latest"]
    assert first.path.is_dir()  # still tagged by the copy
    assert store.remove(first.short_id) == [f"oci:{layout}:latest"]
    assert not first.path.exists()
    with pytest.raises(ImageNotFoundError):
        store.remove(f"oci:{layout}")
    dead = store.tmp_dir / "pull-999999999-dead"
    dead.mkdir()
    assert store.prune() == ["pull-999999999-dead"]
    assert _empty(store)


def test_plain_rootfs_dir_and_tar(tmp_path: Path, store: ImageStore) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin/hello").write_text("#!/bin/sh\necho hi\n")
    as_dir = pull(f"dir:{root}", store=store)
    tarball = tmp_path / "root.tar"
    subprocess.run(["tar", "-c", "-f", str(tarball), "-C", str(root), "."], check=True)
    as_tar = pull(f"tar:{tarball}", store=store)
    assert as_dir.config.architecture == as_tar.config.architecture == "amd64"
    assert as_dir.disk.stat().st_size > 0
    assert as_tar.refs == (f"tar:{tarball}",)


def test_pull_policies_missing_and_never_use_the_store_without_the_source(
    busybox_oci: Path, store: ImageStore, tmp_path: Path
) -> None:
    source = tmp_path / "layout"
    shutil.copytree(busybox_oci, source)
    with pytest.raises(ImageNotFoundError, match="the pull policy is never"):
        pull(f"oci:{source}", policy=PullPolicy.NEVER, store=store)
    assert _empty(store)
    image = pull(f"oci:{source}", policy=PullPolicy.MISSING, store=store)  # not stored: pulls
    shutil.rmtree(source)
    # The source is gone: only the store can answer, and it does for missing and never.
    assert pull(f"oci:{source}", policy=PullPolicy.MISSING, store=store) == image
    assert pull(f"oci:{source}", policy=PullPolicy.NEVER, store=store) == image
    with pytest.raises(ImageNotFoundError, match="does not exist"):
        pull(f"oci:{source}", store=store)  # always: goes to the source


def test_vc_image_cli_pull_ls_inspect_rm(busybox_oci: Path, store: ImageStore) -> None:
    env = {**os.environ, "VC_IMAGE_STORE": str(store.root)}

    def vc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([VC, "image", *args], capture_output=True, text=True, env=env,
                              timeout=120)  # fmt: skip

    pulled = vc("pull", f"oci:{busybox_oci}", "--json")
    assert pulled.returncode == 0, pulled.stderr
    image_id = json.loads(pulled.stdout)["id"]
    listed = vc("ls", "--json")
    assert [i["id"] for i in json.loads(listed.stdout)] == [image_id]
    assert image_id[7:19] in vc("ls").stdout
    doc = json.loads(vc("inspect", f"oci:{busybox_oci}", "--json").stdout)
    assert doc["config"]["Entrypoint"] == ["/bin/busybox"]
    assert doc["disk_format"] == "erofs"
    assert vc("rm", f"oci:{busybox_oci}").returncode == 0
    missing = vc("inspect", f"oci:{busybox_oci}")
    assert missing.returncode == 1
    assert "ImageNotFoundError" in missing.stderr
    bad = vc("pull", "--tls-verify=maybe", "x")
    assert bad.returncode == 1
    assert "ConfigError" in bad.stderr
