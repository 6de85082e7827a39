"""Spans for every hypervisor and sandbox operation, with the OpenTelemetry API.

Nothing here configures an exporter: until a program installs an SDK tracer provider
(:mod:`virtcontainers.telemetry.export`, ``vc --trace FILE``, or an application of its own),
``opentelemetry.trace`` hands out its no-op tracer, and a span costs one context switch
of a few microseconds (``bench/tracing.py`` measures it on the exec round trip).

Every :func:`operation` ends with the same bookkeeping whether traced or not:

- the span (when tracing is on) gets the error recorded: the exception event, status
  ERROR and ``error.type`` (the public error class, see :mod:`virtcontainers.errors`);
- one log record on the ``virtcontainers.ops`` logger (INFO; built only when that logger
  is enabled) with the operation's name, attributes, duration and the span's ids, which
  :mod:`.logs` prints as one JSON line;
- every registered observer (:func:`observe`; the sandbox server's metrics) is told the
  operation's name, duration and error class.

Hypervisor spans carry Kata's names (``CreateVM``, ``StartVM``, ...: :data:`HYPERVISOR_SPANS`)
and are added once for every driver by :func:`instrument_hypervisor`, which the
``Hypervisor`` base calls for each subclass.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from virtcontainers import errors

__all__ = [
    "HYPERVISOR_SPANS",
    "Attributes",
    "Observer",
    "Operation",
    "attached",
    "error_kind",
    "instrument_hypervisor",
    "observe",
    "operation",
    "traced",
    "traceparent",
]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")

Attributes = Mapping[str, AttributeValue]
#: ``(operation name, seconds, error class or None, attributes)``
Observer = Callable[[str, float, str | None, Attributes], None]

TRACER_NAME = "virtcontainers"
ops_log = logging.getLogger("virtcontainers.ops")

# A proxy: it follows a tracer provider installed later (before that, the no-op tracer).
_tracer = trace.get_tracer(TRACER_NAME)
_propagator = TraceContextTextMapPropagator()
_observers: list[Observer] = []


def error_kind(exc: BaseException) -> str:
    """The public class name of ``exc`` (a private subclass reports its public parent)."""
    for cls in type(exc).__mro__:
        if cls.__name__ in errors.__all__:
            return cls.__name__
    return type(exc).__qualname__


class Operation:
    """The running operation :func:`operation` yields: add attributes as they are known."""

    __slots__ = ("attributes", "failure", "span")

    def __init__(self, span: Span, attributes: dict[str, AttributeValue]) -> None:
        self.span = span
        self.attributes = attributes
        self.failure: str | None = None

    def fail(self, exc: BaseException) -> None:
        """Record ``exc`` as this operation's end: the exception event, status ERROR and
        ``error.type``; for a cancellation (``CancelledError``, Ctrl-C) ``vc.cancelled``."""
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            self.set("vc.cancelled", True)
            self.failure = "cancelled"
            return
        self.failure = error_kind(exc)
        self.span.record_exception(exc)
        self.span.set_status(Status(StatusCode.ERROR, f"{self.failure}: {exc}"))
        self.set("error.type", self.failure)

    def set(self, key: str, value: AttributeValue) -> None:
        self.span.set_attribute(key, value)
        self.attributes[key] = value

    def update(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set(key, value)


@contextlib.contextmanager
def operation(name: str, attributes: Attributes | None = None) -> Iterator[Operation]:
    """A span named ``name`` (current inside the block), its log line and observers.

    An exception leaving the block is recorded on the span and re-raised unchanged;
    ``asyncio.CancelledError`` and ``KeyboardInterrupt`` are marked ``vc.cancelled``, not
    errors.
    """
    attrs = dict(attributes or {})
    start = time.perf_counter()
    with _tracer.start_as_current_span(
        name, attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as span:
        op = Operation(span, attrs)
        try:
            yield op
        except (Exception, asyncio.CancelledError, KeyboardInterrupt) as exc:
            op.fail(exc)
            raise
        finally:
            _finish(name, span, op.attributes, time.perf_counter() - start, op.failure)


def _finish(name: str, span: Span, attrs: Attributes, seconds: float, failure: str | None) -> None:
    for observer in _observers:
        try:
            observer(name, seconds, failure, attrs)
        except Exception:  # metrics must never break the operation they watch
            ops_log.exception("operation observer failed for %s", name)
    if ops_log.isEnabledFor(logging.INFO):
        ctx = span.get_span_context()
        ids = (
            {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}
            if ctx.is_valid
            else {}
        )
        ops_log.info(
            "%s %s in %.1f ms",
            name,
            "failed" if failure else "done",
            seconds * 1e3,
            extra={
                "vc_operation": name,
                "vc_duration_ms": round(seconds * 1e3, 3),
                "vc_error": failure,
                "vc_attributes": dict(attrs),
                **{f"vc_{k}": v for k, v in ids.items()},
            },
        )


def observe(observer: Observer) -> Callable[[], None]:
    """Call ``observer`` at the end of every operation in this process; returns the
    function that unregisters it."""
    _observers.append(observer)
    return lambda: _observers.remove(observer)


def traced(
    name: str,
    attributes: Callable[..., Mapping[str, Any]] | None = None,
    result: Callable[[Any], Mapping[str, Any]] | None = None,
) -> Callable[
    [Callable[Concatenate[S, P], Coroutine[Any, Any, R]]],
    Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
]:
    """Decorate an async method: each call is :func:`operation` ``name``.

    ``attributes(self, *args, **kwargs)`` gives the span's attributes from the call,
    ``result(value)`` more from what it returned.
    """

    def decorate(
        fn: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
    ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            attrs = attributes(self, *args, **kwargs) if attributes is not None else None
            with operation(name, attrs) as op:
                value = await fn(self, *args, **kwargs)
                if result is not None:
                    op.update(result(value))
                return value

        return wrapper

    return decorate


# -- context across processes (W3C trace context) -------------------------------------------


def traceparent() -> str | None:
    """The current span's W3C ``traceparent`` header value (None when nothing is traced)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


@contextlib.contextmanager
def attached(parent: str | None) -> Iterator[None]:
    """Make the remote span ``parent`` (a ``traceparent`` value) current inside the block,
    so the spans started there join its trace. None or a malformed value: no change."""
    if not parent:
        yield
        return
    token = otel_context.attach(_propagator.extract({"traceparent": parent}))
    try:
        yield
    finally:
        otel_context.detach(token)


# -- the Hypervisor boundary ------------------------------------------------------------------

#: Hypervisor method -> span name (Kata's names for the same operations).
HYPERVISOR_SPANS: dict[str, str] = {
    "create_sandbox": "CreateVM",
    "start_sandbox": "StartVM",
    "stop_sandbox": "StopVM",
    "pause_sandbox": "PauseVM",
    "resume_sandbox": "ResumeVM",
    "save_sandbox": "SaveVM",
    "check": "Check",
    "disconnect": "Disconnect",
    "cleanup": "Cleanup",
    "get_sandbox_console": "GetVMConsole",
    "add_device": "AddDevice",
    "hotplug_add_device": "HotplugAddDevice",
    "hotplug_remove_device": "HotplugRemoveDevice",
    "resize_memory": "ResizeMemory",
    "resize_vcpus": "ResizeVCPUs",
    "generate_socket": "GenerateSocket",
    "get_thread_ids": "GetThreadIDs",
    "to_grpc": "toGrpc",
    "from_grpc": "fromGrpc",
    "reattach": "Reattach",
}

# The driver method running in this task, so that a driver calling its base's method
# (``super().stop_sandbox()``) yields one span, not two.
_in_method: contextvars.ContextVar[tuple[int, str] | None] = contextvars.ContextVar(
    "vc_hypervisor_method", default=None
)


def instrument_hypervisor(cls: type[Any]) -> None:
    """Wrap the :data:`HYPERVISOR_SPANS` methods ``cls`` defines itself in spans (once)."""
    for method, span_name in HYPERVISOR_SPANS.items():
        fn = cls.__dict__.get(method)
        if fn is None or getattr(fn, "_vc_span", None):
            continue
        setattr(cls, method, _hypervisor_span(fn, method, span_name))


def _hypervisor_span(
    fn: Callable[..., Awaitable[Any]], method: str, span_name: str
) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        key = (id(self), method)
        if _in_method.get() == key:
            return await fn(self, *args, **kwargs)
        token = _in_method.set(key)
        try:
            attrs: dict[str, AttributeValue] = {
                "vc.driver": str(self.driver),
                "vc.sandbox.id": self.sandbox_id,
                **_call_attributes(method, args, kwargs),
            }
            with operation(span_name, attrs) as op:
                value = await fn(self, *args, **kwargs)
                op.update(_result_attributes(method, value))
                return value
        finally:
            _in_method.reset(token)

    wrapper._vc_span = span_name  # type: ignore[attr-defined]
    return wrapper


def _call_attributes(
    method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, AttributeValue]:
    def arg(index: int, name: str) -> Any:
        return args[index] if len(args) > index else kwargs.get(name)

    if method == "create_sandbox":
        config = arg(2, "config")
        return {
            "vc.sandbox.id": str(arg(0, "id")),
            "vc.vcpus": int(config.resources.num_vcpus),
            "vc.memory_mib": int(config.resources.memory_size),
            "vc.template.boot_from": bool(config.template.boot_from_template),
            "vc.template.boot_to_be": bool(config.template.boot_to_be_template),
        }
    if method in ("add_device", "hotplug_add_device", "hotplug_remove_device"):
        device = arg(0, "device")
        kind = getattr(device, "kind", None)
        return {
            "vc.device.kind": str(kind.value) if kind is not None else type(device).__name__,
            "vc.device.type": type(device).__name__,
        }
    if method == "stop_sandbox":
        return {"vc.wait_only": bool(arg(0, "wait_only"))}
    if method == "start_sandbox":
        return {"vc.timeout_s": float(arg(0, "timeout") or 0)}
    if method == "resize_vcpus":
        return {"vc.vcpus": int(arg(0, "vcpus"))}
    if method == "resize_memory":
        return {"vc.memory_mib": int(arg(0, "mem_mb"))}
    return {}


def _result_attributes(method: str, value: Any) -> dict[str, AttributeValue]:
    if method == "resize_vcpus":
        old, new = value
        return {"vc.vcpus.before": int(old), "vc.vcpus.after": int(new)}
    if method == "resize_memory":
        return {"vc.memory_mib.after": int(value[0])}
    if method in ("hotplug_add_device", "hotplug_remove_device"):
        if hasattr(value, "amount"):
            return {"vc.vcpus.changed": int(value.amount)}
        if hasattr(value, "size_mb"):
            return {"vc.memory_mib.changed": int(value.size_mb)}
    return {}
