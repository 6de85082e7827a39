"""Fixtures for integration tests: the real guest image, built once and cached across runs."""

from __future__ import annotations

import shutil

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
