"""Fixtures for integration tests: the real guest image, built once and cached across runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtcontainers.guest.image import GuestImage, build_image, find_image


def _guest_image(flavour: str) -> GuestImage:
    """Build (or reuse from ~/.cache/virtcontainers) the image; skip when it cannot be built."""
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        cached = find_image(flavour)
        if cached is not None:
            return cached
        pytest.skip(f"cannot build the {flavour} guest image: {', '.join(missing)} not installed")
    return build_image(flavour)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The cloud-flavour guest image (kernel + initrd); the first run downloads ~27 MB."""
    return _guest_image("cloud")


@pytest.fixture(scope="session")
def guest_image_generic() -> GuestImage:
    """The generic-flavour image (has 9p); built only by tests that ask for it (~70 MB)."""
    return _guest_image("generic")


@pytest.fixture
def vc_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private state-store root (short, so socket paths stay under 108 bytes), exported
    as VC_RUN_ROOT so `vc` subprocesses use it too; whatever a test leaves is stopped."""
    root = Path(tempfile.mkdtemp(prefix="vc-it-"))
    monkeypatch.setenv("VC_RUN_ROOT", str(root))
    yield root
    for pid_file in root.glob("sandboxes/*/qemu.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
