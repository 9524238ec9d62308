"""A minimal OTLP/HTTP trace receiver for tests: decodes what real OpenTelemetry exporters send."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, str]


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._runner: web.AppRunner | None = None
        self.endpoint = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.endpoint = f"http://{host}:{self._runner.addresses[0][1]}/v1/traces"
        return self.endpoint

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def spans_of(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def _traces(self, request: web.Request) -> web.Response:
        req = ExportTraceServiceRequest()
        req.ParseFromString(await request.read())
        for rs in req.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for span in ss.spans:
                    attrs = {a.key: a.value.string_value or str(a.value.int_value) for a in span.attributes}
                    self.spans.append(ReceivedSpan(service, span.name, span.trace_id.hex(), span.span_id.hex(),
                                                   span.parent_span_id.hex(), attrs))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")


class ThreadedOtlpReceiver:
    """An OtlpReceiver on its own event loop in a daemon thread, for synchronous (session) fixtures."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="otlp-receiver", daemon=True)
        self.receiver = OtlpReceiver()

    def start(self) -> str:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.receiver.start(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.receiver.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def spans_of(self, trace_id: str) -> list[ReceivedSpan]:
        # list() copies under the GIL; the receiver thread only appends.
        return [s for s in list(self.receiver.spans) if s.trace_id == trace_id]
