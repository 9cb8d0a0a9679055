"""OpenTelemetry spans per RPC: optional (the `otel` extra), off unless `tracing` is true.

Every call that reaches a PrefillService method gets one span named after the method, ended with
the call's gRPC status (`proxyprefill.status`, and the span's status ERROR when it is not OK). A
Prefill span carries what the request was and has a child span per stage:

    Prefill          proxyprefill.request_id, .num_tokens, .worker, .pipeline_stages, .sparsity, .status
      queue_wait     admitted -> the request's turn on its worker
      worker_prefill the worker's chunked prefill (progress events included)
      kv_return      logits, then the inline KV or the KV handle, sent to the client

A call refused before its method runs (no valid token, a malformed message: service/wire.py) gets
no span; KV handles are never recorded (they are capabilities).

Where the spans go: when the process already has a tracer provider (it runs under
`opentelemetry-instrument`, or a program embedding the server installed one), that one;
otherwise an SDK provider with the exporter that OTEL_TRACES_EXPORTER names, as the SDK's
auto-configuration reads it: `otlp` (the default: OTLP over HTTP to OTEL_EXPORTER_OTLP_ENDPOINT,
http://localhost:4318 unless set), `console` (spans printed on stdout) or `none`. The service
name is OTEL_SERVICE_NAME, "proxyprefill" unless set; OTEL_RESOURCE_ATTRIBUTES adds to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

INSTRUMENTATION_NAME = "proxyprefill.service"
ATTRIBUTE_PREFIX = "proxyprefill."
EXPORTERS = ("otlp", "console", "none")
INSTALL_HINT = "pip install 'proxyprefill[otel]'"


class TracingUnavailable(RuntimeError):
    """Tracing was asked for and cannot run here; the message says what is missing."""


def _has_module(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _global_provider():
    """The tracer provider this process already installed, or None."""
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    return None if isinstance(provider, trace.ProxyTracerProvider) else provider


def _exporter_name(environ) -> str:
    return environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"


def check_available(environ=None) -> None:
    """Raises TracingUnavailable when spans could not be made and exported from this process:
    the OpenTelemetry API missing, or (no tracer provider installed yet) the SDK or the exporter
    that OTEL_TRACES_EXPORTER names."""
    environ = os.environ if environ is None else environ
    if not _has_module("opentelemetry.trace"):
        raise TracingUnavailable(f"opentelemetry-api is not installed ({INSTALL_HINT})")
    if _global_provider() is not None:
        return
    if not _has_module("opentelemetry.sdk.trace"):
        raise TracingUnavailable(f"opentelemetry-sdk is not installed ({INSTALL_HINT})")
    exporter = _exporter_name(environ)
    if exporter not in EXPORTERS:
        raise TracingUnavailable(
            f"OTEL_TRACES_EXPORTER={exporter!r} is not supported here: one of {', '.join(EXPORTERS)}"
        )
    if exporter == "otlp" and not _has_module("opentelemetry.exporter.otlp.proto.http.trace_exporter"):
        raise TracingUnavailable(
            f"OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http ({INSTALL_HINT})"
        )


def _sdk_provider(environ):
    """An SDK tracer provider exporting to what OTEL_TRACES_EXPORTER names (see the docstring)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    service_name = environ.get("OTEL_SERVICE_NAME") or "proxyprefill"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    exporter = _exporter_name(environ)
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider


@dataclass
class ChildSpan:
    """One stage of an RPC; `end()` may be called more than once (the RPC's end closes it too)."""

    span: object | None  # an OpenTelemetry span; None when tracing is off
    ended: bool = False

    def end(self) -> None:
        if self.span is not None and not self.ended:
            self.span.end()
        self.ended = True


@dataclass
class RpcSpan:
    """The span of one RPC and its children; every method does nothing when tracing is off."""

    span: object | None  # an OpenTelemetry span; None when tracing is off
    tracer: object | None = None
    children: list[ChildSpan] = field(default_factory=list)

    def set(self, **attributes) -> None:
        """Attributes as proxyprefill.<name> (strings, numbers, booleans)."""
        if self.span is not None:
            for name, value in attributes.items():
                self.span.set_attribute(ATTRIBUTE_PREFIX + name, value)

    def child(self, name: str, **attributes) -> ChildSpan:
        """A child span started now; end it with .end() (or leave it to the RPC's end)."""
        if self.span is None:
            return ChildSpan(None)
        from opentelemetry import trace

        parent = trace.set_span_in_context(self.span)
        attributes = {ATTRIBUTE_PREFIX + key: value for key, value in attributes.items()}
        child = ChildSpan(self.tracer.start_span(name, context=parent, attributes=attributes))
        self.children.append(child)
        return child

    def end(self, status: str) -> None:
        """Ends the children still open (a stage cut short by an error or a cancellation), then
        this span, with the call's gRPC status code name."""
        if self.span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        for child in self.children:
            child.end()
        self.span.set_attribute(ATTRIBUTE_PREFIX + "status", status)
        if status != "OK":
            self.span.set_status(Status(StatusCode.ERROR, status))
        self.span.end()


NO_SPAN = RpcSpan(None)
_current: ContextVar[RpcSpan] = ContextVar("proxyprefill_rpc_span", default=NO_SPAN)


def current_rpc() -> RpcSpan:
    """The span of the RPC this code runs for (a handler's task); NO_SPAN when not traced."""
    return _current.get()


class RequestTracer:
    """Makes one span per RPC. `RequestTracer(None)` (NO_TRACING) makes none."""

    def __init__(self, tracer=None, provider=None):
        self.tracer = tracer
        self._provider = provider  # shut down (its spans flushed) by shutdown(), when owned here

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @classmethod
    def from_environment(cls, environ=None) -> RequestTracer:
        """The process's tracer provider when it has one, else an SDK provider as the OTEL_*
        environment says (see the module docstring). Raises TracingUnavailable."""
        environ = os.environ if environ is None else environ
        check_available(environ)
        installed = _global_provider()
        if installed is not None:
            return cls(installed.get_tracer(INSTRUMENTATION_NAME))
        provider = _sdk_provider(environ)
        return cls(provider.get_tracer(INSTRUMENTATION_NAME), provider)

    def shutdown(self) -> None:
        """Exports the spans still buffered and stops the provider this tracer made, if any."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None

    def rpc(self, method: str, service: str) -> RpcSpan:
        if self.tracer is None:
            return NO_SPAN
        from opentelemetry.trace import SpanKind

        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        span = self.tracer.start_span(method, kind=SpanKind.SERVER, attributes=attributes)
        return RpcSpan(span, self.tracer)

    def traced(self, method: str, service: str, behaviour: Callable, streams_responses: bool) -> Callable:
        """`behaviour(request, context)` (a coroutine, or an async generator when it streams)
        inside a span of its own, current while it runs (current_rpc()); unchanged when off."""
        if self.tracer is None:
            return behaviour

        if streams_responses:

            async def stream(request, context):
                with self._span(method, service, context):
                    async with contextlib.aclosing(behaviour(request, context)) as responses:
                        async for response in responses:
                            yield response

            return stream

        async def unary(request, context):
            with self._span(method, service, context):
                return await behaviour(request, context)

        return unary

    @contextlib.contextmanager
    def _span(self, method: str, service: str, context):
        """The call's span, current inside the block and ended with the call's status."""
        rpc = self.rpc(method, service)
        token = _current.set(rpc)
        status = "OK"
        try:
            yield rpc
            status = _status_name(context, "OK")
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: the stream was closed
            status = "CANCELLED"
            raise
        except BaseException:
            status = _status_name(context, "UNKNOWN")
            raise
        finally:
            rpc.end(status)
            # a stream closed after its call was cancelled ends in the task that closes it
            # (wire.finish_despite_cancellation), whose context did not set the token
            with contextlib.suppress(ValueError):
                _current.reset(token)


NO_TRACING = RequestTracer(None)


def _status_name(context, otherwise: str) -> str:
    """The status code the handler set on the call (context.abort sets it), else `otherwise`."""
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        return otherwise
    if code is None:
        return otherwise
    return getattr(code, "name", None) or str(code)
