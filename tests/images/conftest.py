"""Fixtures for image tests: real OCI layouts built on this machine (cached), a private
image store per test, and a real registry on 127.0.0.1."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtcontainers.images import ImageStore, StoredImage, pull
from virtcontainers.testing.oci_images import (
    TestImageError,
    busybox_layout,
    debian_python_layout,
)
from virtcontainers.testing.registry import LocalRegistry, local_registry

TOOLS = ("skopeo", "umoci", "mkfs.erofs")


def _need(*tools: str) -> None:
    missing = [t for t in tools if not (shutil.which(t) or shutil.which(t, path="/usr/sbin"))]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/setup installs them)")


@pytest.fixture(scope="session")
def busybox_oci() -> Path:
    """The busybox test image's OCI layout (read-only: copy it before changing it)."""
    _need(*TOOLS)
    try:
        return busybox_layout()
    except TestImageError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def debian_oci() -> Path:
    """The Debian + python3 test image's OCI layout (mmdebstrap, cached across runs)."""
    _need(*TOOLS, "mmdebstrap")
    try:
        return debian_python_layout()
    except TestImageError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ImageStore:
    """A private image store, also used by `vc` subprocesses (VC_IMAGE_STORE)."""
    root = tmp_path / "oci"
    monkeypatch.setenv("VC_IMAGE_STORE", str(root))
    return ImageStore(root)


@pytest.fixture(scope="module")
def registry() -> Iterator[LocalRegistry]:
    """Debian's docker-registry on 127.0.0.1:<free port>, stopped after the module."""
    _need("docker-registry", "skopeo")
    with local_registry() as reg:
        yield reg


# The real-guest fixtures (guest image, private state root) are the integration suite's.
# The API documents' checkers, for the driver tests (fixtures of the contract suites).
from tests.contract.test_clh_contract import spec  # noqa: E402, F401
from tests.contract.test_firecracker_contract import contract  # noqa: E402, F401
from tests.integration.conftest import guest_image, guest_image_generic, vc_root  # noqa: E402, F401


@pytest.fixture
def busybox_image(busybox_oci: Path, store: ImageStore) -> StoredImage:
    """The busybox test image pulled into this test's private store."""
    return pull(f"oci:{busybox_oci}", store=store)


@pytest.fixture
def debian_image(debian_oci: Path, store: ImageStore) -> StoredImage:
    """The Debian + python3 test image pulled into this test's private store."""
    return pull(f"oci:{debian_oci}", store=store)
