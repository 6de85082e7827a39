"""The trace context a sandbox server's client hands on, at no cost when nothing traces.

The client half of :mod:`virtcontainers.server` (``vc exec``'s path) must not import
OpenTelemetry: it costs ~40 ms. No span can be current in a process that never imported
the API, so the lookup is skipped there.
"""

from __future__ import annotations

import sys

__all__ = ["ENV", "current_traceparent"]

#: The environment variable a child process reads its parent span from (the name the
#: OpenTelemetry proposal for environment carriers uses).
ENV = "TRACEPARENT"


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, or None (no span, or no API loaded)."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    from virtcontainers.telemetry.tracing import traceparent

    return traceparent()
