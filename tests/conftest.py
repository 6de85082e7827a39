"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_dir() -> Path:
    """The project's read-only ../shared/ folder; skips when it is absent (a user's machine)."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (only on the project's own machines)")
    return SHARED


@pytest.fixture
def spans() -> Iterator[Any]:
    """An in-memory exporter of the spans this process ends, cleared around each test
    (the SDK provider is installed once per session: the API allows one per process)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    global _EXPORTER
    if _EXPORTER is None:
        _EXPORTER = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


_EXPORTER = None
