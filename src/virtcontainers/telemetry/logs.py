"""Log output: plain text, or one JSON object per line with the spans' ids.

``vc --log-format json`` (and ``VC_LOG_FORMAT=json``, which sandbox servers inherit) prints
every record as JSON: ``time``, ``level``, ``logger``, ``message``, and when a span is current
its ``trace_id`` and ``span_id`` (the ids in ``vc --trace`` files). Each operation's record
from :mod:`.tracing` (logger ``virtcontainers.ops``) adds ``operation``, ``duration_ms``,
``error`` and the span's attributes (``sandbox_id`` among them), and carries the ids of the
operation's own span.

The standard :mod:`logging` module does the work; this is only a formatter and a setup.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from virtcontainers.errors import ConfigError

__all__ = ["FORMATS", "LOG_FORMAT_ENV", "JsonFormatter", "configure"]

LOG_FORMAT_ENV = "VC_LOG_FORMAT"
FORMATS = ("text", "json")
_HANDLER = "virtcontainers"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        import json  # here: the text format, every command's default, never needs it

        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        operation = getattr(record, "vc_operation", None)
        if operation is not None:
            attrs = dict(getattr(record, "vc_attributes", {}))
            out.update(
                operation=operation,
                duration_ms=getattr(record, "vc_duration_ms", None),
                error=getattr(record, "vc_error", None),
                sandbox_id=attrs.pop("vc.sandbox.id", None),
                attributes=attrs,
            )
            trace_id, span_id = (
                getattr(record, "vc_trace_id", None),
                getattr(record, "vc_span_id", None),
            )
        else:
            trace_id, span_id = _current_ids()
        if trace_id:
            out.update(trace_id=trace_id, span_id=span_id)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _current_ids() -> tuple[str | None, str | None]:
    if "opentelemetry.trace" not in sys.modules:  # nothing can be traced: skip the import
        return None, None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def configure(
    log_format: str | None = None,
    *,
    level: int = logging.WARNING,
    text_format: str = "%(levelname)s %(name)s: %(message)s",
) -> None:
    """Set up the root logger on stderr in ``log_format`` (default: ``$VC_LOG_FORMAT``, else
    text). In JSON, each operation's line is logged too (``virtcontainers.ops`` at INFO).

    Raises:
        ConfigError: a format other than text or json.
    """
    fmt = (log_format or os.environ.get(LOG_FORMAT_ENV) or "text").lower()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown log format {fmt!r}", field="--log-format", allowed=FORMATS)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text_format))
    handler.set_name(_HANDLER)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER]:
        root.removeHandler(old)  # ours from an earlier call; others' handlers stay
    root.addHandler(handler)
    root.setLevel(level)
    if fmt == "json" and level > logging.INFO:
        logging.getLogger("virtcontainers.ops").setLevel(logging.INFO)
