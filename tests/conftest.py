"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_dir() -> Path:
    """The project's read-only ../shared/ folder; skips when it is absent (a user's machine)."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (only on the project's own machines)")
    return SHARED
