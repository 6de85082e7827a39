"""Turning tracing on: the OpenTelemetry SDK with a JSON-lines file or an OTLP exporter.

Two ways, which combine:

- ``vc --trace FILE`` (or ``VC_TRACE_FILE=FILE``): every span as one JSON line (the SDK's
  own ``ReadableSpan.to_json``), appended to FILE (0600). Sandbox servers inherit the
  variable, so the spans of the server a command starts land in the same file;
- the standard environment: ``OTEL_TRACES_EXPORTER=otlp`` (or ``console``), or an
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``: the OTLP/HTTP
  exporter, configured by its own ``OTEL_EXPORTER_OTLP_*`` variables. ``OTEL_SDK_DISABLED=true``
  turns all of it off.

The SDK is the ``otlp`` extra (``pip install 'virtcontainers[otlp]'``); asking for traces
without it raises :class:`~virtcontainers.errors.MissingDependencyError`. This module imports
the SDK only inside :func:`configure`: :func:`requested` is cheap enough for every command.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, TextIO

from virtcontainers.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["TRACE_FILE_ENV", "configure", "requested"]

TRACE_FILE_ENV = "VC_TRACE_FILE"
_OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_EXPORTERS = ("otlp", "console", "none")


def _exporters(env: Mapping[str, str]) -> list[str]:
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and any(env.get(name) for name in _OTLP_ENDPOINTS):
        names = ["otlp"]
    unknown = [n for n in names if n not in _EXPORTERS]
    if unknown:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER names unknown exporters {', '.join(unknown)}",
            field="OTEL_TRACES_EXPORTER",
            allowed=_EXPORTERS,
        )
    return [n for n in names if n != "none"]


def requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces (a trace file or an OTEL exporter)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(env.get(TRACE_FILE_ENV)) or bool(_exporters(env))


def configure(
    trace_file: str | os.PathLike[str] | None = None,
    *,
    service_name: str = "vc",
    env: Mapping[str, str] | None = None,
) -> TracerProvider | None:
    """Install the SDK's tracer provider for this process, exporting to ``trace_file``
    (default: ``$VC_TRACE_FILE``) and the ``OTEL_*`` exporters; None when nothing asks for
    traces. Spans are flushed when the process exits (or on ``provider.shutdown()``).

    Raises:
        MissingDependencyError: the SDK (or the OTLP exporter) is not installed.
        ConfigError: an unknown ``OTEL_TRACES_EXPORTER``, or a trace file that cannot be
            opened.
    """
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    path = trace_file if trace_file is not None else env.get(TRACE_FILE_ENV) or None
    exporters = _exporters(env)
    if path is None and not exporters:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError as exc:
        raise MissingDependencyError(
            "tracing", package="opentelemetry-sdk", extra="otlp", field="--trace"
        ) from exc
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    if path is not None:
        out = _open_trace_file(os.fspath(path))
        # One line per span, written as the span ends: several processes (the CLI and the
        # servers it starts) append to one file, and a killed process loses no finished span.
        provider.add_span_processor(
            SimpleSpanProcessor(
                ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(None) + "\n")
            )
        )
    if "console" in exporters:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    if "otlp" in exporters:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError as exc:
            raise MissingDependencyError(
                "OTLP export", package="opentelemetry-exporter-otlp-proto-http", extra="otlp",
                field="OTEL_TRACES_EXPORTER",
            ) from exc  # fmt: skip
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def _open_trace_file(path: str) -> TextIO:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the trace file {path}: {exc.strerror or exc}", field="--trace"
        ) from exc
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8")
