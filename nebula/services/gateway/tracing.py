"""OpenTelemetry spans for gateway requests, exported over OTLP/HTTP when [tracing] otlp_endpoint is set.

Off (the default) there is no tracer at all: OpenTelemetry is not even imported, and the request path
pays one `is None` test. The client's W3C `traceparent` reaches the engine either way, because the
gateway forwards end-to-end headers unchanged; on, the gateway's span joins the client's trace and the
engine's spans become its children (the forwarded traceparent names the gateway's span).

Spans are ended on the event loop but exported by the SDK's BatchSpanProcessor thread, so a slow or
absent collector never blocks a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

from nebula.core.config import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer


class RequestTracer:
    """Starts one server span per inference request and writes its context into the upstream headers."""

    def __init__(self, provider: TracerProvider, tracer: Tracer) -> None:
        self._provider = provider
        self._tracer = tracer
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._propagator = TraceContextTextMapPropagator()

    @staticmethod
    def create(cfg: TracingConfig, service_name: str) -> RequestTracer | None:
        """The tracer for `cfg`, or None when tracing is off."""
        if not cfg.otlp_endpoint:
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                                  sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.otlp_endpoint)))
        return RequestTracer(provider, provider.get_tracer("nebula.gateway"))

    def start(self, name: str, incoming: Mapping[str, str], upstream: dict[str, str],
              attributes: Mapping[str, str]) -> Span:
        """A server span child of the client's traceparent (if any); `upstream` gets the span's context."""
        from opentelemetry.trace import SpanKind, set_span_in_context

        parent = self._propagator.extract(incoming)
        span = self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=dict(attributes))
        for header in [h for h in upstream if h.lower() in ("traceparent", "tracestate")]:
            del upstream[header]
        self._propagator.inject(upstream, context=set_span_in_context(span))
        return span

    @staticmethod
    def finish(span: Span, status: int, replica: str, attempts: int) -> None:
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("http.response.status_code", status)
        if replica:
            span.set_attribute("nebula.replica", replica)
        span.set_attribute("nebula.attempts", attempts)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    async def shutdown(self) -> None:
        """Flush what is queued (bounded by the exporter's timeout) off the loop."""
        await asyncio.to_thread(self._provider.shutdown)
