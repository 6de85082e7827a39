"""Image references and image configs: parsing and docker's override rules (no tools needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtcontainers.errors import ConfigError
from virtcontainers.images import ImageConfig, Transport, parse_reference, process_spec
from virtcontainers.images.config import resolve_user

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "transport", "name", "tag", "digest", "canonical"),
    [
        ("python:3.12-slim", Transport.REGISTRY, "docker.io/library/python", "3.12-slim", "",
         "docker.io/library/python:3.12-slim"),
        ("busybox", Transport.REGISTRY, "docker.io/library/busybox", "latest", "",
         "docker.io/library/busybox:latest"),
        ("team/app", Transport.REGISTRY, "docker.io/team/app", "latest", "",
         "docker.io/team/app:latest"),
        ("registry:5000/ns/name:tag", Transport.REGISTRY, "registry:5000/ns/name", "tag", "",
         "registry:5000/ns/name:tag"),
        ("127.0.0.1:5000/a/b", Transport.REGISTRY, "127.0.0.1:5000/a/b", "latest", "",
         "127.0.0.1:5000/a/b:latest"),
        ("localhost/x:1", Transport.REGISTRY, "localhost/x", "1", "", "localhost/x:1"),
        (f"quay.io/a/b@{DIGEST}", Transport.REGISTRY, "quay.io/a/b", "", DIGEST,
         f"quay.io/a/b@{DIGEST}"),
        (f"docker://quay.io/a/b:v1@{DIGEST}", Transport.REGISTRY, "quay.io/a/b", "v1", DIGEST,
         f"quay.io/a/b:v1@{DIGEST}"),
        ("oci:/srv/layout", Transport.OCI, "/srv/layout", "latest", "", "oci:/srv/layout:latest"),
        ("oci:/srv/layout:v2", Transport.OCI, "/srv/layout", "v2", "", "oci:/srv/layout:v2"),
        ("docker-archive:/tmp/x.tar", Transport.DOCKER_ARCHIVE, "/tmp/x.tar", "", "",
         "docker-archive:/tmp/x.tar"),
        ("dir:/srv/root", Transport.DIR, "/srv/root", "", "", "dir:/srv/root"),
        ("tar:/srv/root.tar", Transport.TAR, "/srv/root.tar", "", "", "tar:/srv/root.tar"),
    ],
)  # fmt: skip
def test_references_parse_to_a_transport_and_canonical_name(
    text: str, transport: Transport, name: str, tag: str, digest: str, canonical: str
) -> None:
    ref = parse_reference(text)
    assert (ref.transport, ref.name, ref.tag, ref.digest) == (transport, name, tag, digest)
    assert ref.canonical == canonical
    assert parse_reference(ref.canonical) == ref


def test_a_relative_local_path_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    assert parse_reference("oci:layout:t").name == str(tmp_path / "layout")
    assert parse_reference("oci:layout:t").skopeo_source() == f"oci:{tmp_path / 'layout'}:t"


@pytest.mark.parametrize(
    "text",
    ["", "UPPER/case", "name:bad tag", "name@sha256:short", "a//b", "oci:", "dir:", "x:-bad"],
)
def test_malformed_references_are_config_errors_listing_the_forms(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_reference(text)
    assert err.value.field == "image"
    assert "oci:DIR[:TAG]" in str(err.value)


PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\nstaff:x:50:\n"


@pytest.mark.parametrize(
    ("user", "ids"),
    [("", (0, 0)), ("app", (1000, 1000)), ("1000", (1000, 1000)), ("4242", (4242, 0)),
     ("app:staff", (1000, 50)), ("1000:7", (1000, 7)), ("root", (0, 0))],
)  # fmt: skip
def test_users_resolve_against_the_images_passwd_and_group(user: str, ids: tuple[int, int]) -> None:
    assert resolve_user(user, PASSWD, GROUP) == ids


@pytest.mark.parametrize("user", ["nobody", "app:wheel"])
def test_unknown_user_or_group_is_a_config_error(user: str) -> None:
    with pytest.raises(ConfigError, match="not in the image's /etc/"):
        resolve_user(user, PASSWD, GROUP)


CONFIG = ImageConfig(
    env=("PATH=/usr/bin:/bin", "GREETING=hi"),
    entrypoint=("/bin/busybox",),
    cmd=("sh", "-c", "echo default"),
    working_dir="/work",
    user="app",
)


def test_the_image_config_gives_the_default_process() -> None:
    spec = process_spec(CONFIG, passwd=PASSWD, group=GROUP)
    assert spec.argv == ("/bin/busybox", "sh", "-c", "echo default")
    assert spec.env == {"PATH": "/usr/bin:/bin", "GREETING": "hi", "HOME": "/home/app"}
    assert (spec.cwd, spec.uid, spec.gid) == ("/work", 1000, 1000)


def test_command_line_overrides_follow_docker() -> None:
    spec = process_spec(
        CONFIG, ["id", "-u"], env={"GREETING": "bye", "NEW": "1"}, workdir="/tmp", user="0",
        passwd=PASSWD, group=GROUP,
    )  # fmt: skip
    assert spec.argv == ("/bin/busybox", "id", "-u")  # the command replaces Cmd only
    assert spec.env["GREETING"] == "bye"
    assert spec.env["NEW"] == "1"
    assert (spec.cwd, spec.uid, spec.gid) == ("/tmp", 0, 0)
    plain = ImageConfig(entrypoint=CONFIG.entrypoint, cmd=CONFIG.cmd)
    assert process_spec(plain, [], entrypoint=["/bin/env"]).argv == ("/bin/env",)
    assert process_spec(plain, ["x"], entrypoint=[]).argv == ("x",)


def test_nothing_to_run_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nothing to run"):
        process_spec(ImageConfig())
    assert process_spec(ImageConfig(), ["true"]).env["PATH"].startswith("/usr/local/sbin")
