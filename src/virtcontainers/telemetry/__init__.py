"""Telemetry: traces (OpenTelemetry), per-sandbox metrics (Prometheus) and JSON logs.

Cross-cutting, like :mod:`virtcontainers.errors`, and free when unused: this package
imports nothing itself, and the fast ``vc`` commands (``vc ps``, ``vc exec``) load neither
OpenTelemetry nor ``prometheus_client`` unless the user asked for traces or metrics.

- :mod:`.tracing`: spans for every hypervisor and sandbox operation (the API only)
- :mod:`.context`: the ``traceparent`` crossing into a sandbox server, without the API
- :mod:`.export`: installing the SDK (``vc --trace FILE``, ``OTEL_*`` environment)
- :mod:`.metrics`: one sandbox server's metrics, served on ``metrics.sock`` in its run dir
- :mod:`.monitor`: ``vc metrics serve``, every server's metrics for one Prometheus target
- :mod:`.logs`: JSON log lines with the spans' ids (``vc --log-format json``)

What each span and metric means: ``docs/observability.md``.
"""
