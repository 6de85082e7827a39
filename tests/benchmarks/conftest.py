"""Fixtures of the benchmark-runner tests: the integration tests' guest image."""

from __future__ import annotations

from tests.integration.conftest import guest_image

__all__ = ["guest_image"]
