"""Optional OpenTelemetry tracing: a span per API request, its trace context passed to the worker.

With ``tracing`` on (``--tracing``), each API request the access log sees
also gets a ``SERVER`` span, named ``METHOD PATH``. It continues the
client's trace when the request carries W3C trace context (``traceparent``,
``tracestate``), and the proxy sends the span's context on to the worker in
the same headers (vLLM and SGLang continue it in their own spans when their
tracing is on). When the request ends the span gets the routing decision
and the outcome as attributes:

- ``http.request.method``, ``url.path``, ``http.response.status_code``;
- ``gen_ai.request.model``, ``gen_ai.usage.input_tokens``,
  ``gen_ai.usage.output_tokens``;
- ``kvroute.request_id``, ``kvroute.session``, ``kvroute.stream``,
  ``kvroute.outcome``, ``kvroute.worker``, ``kvroute.worker.label``,
  ``kvroute.policy``, ``kvroute.matched_blocks``,
  ``kvroute.predicted_cached_tokens``, ``kvroute.reported_cached_tokens``,
  ``kvroute.retries``, ``kvroute.ttft_ms``.

A 5xx status, or an outcome other than ``ok`` and ``error``, sets the span's
status to ERROR. Spans go to the global tracer provider (or the one given):
an application embedding the proxy sets its own; the command line sets one
up with :func:`configure_sdk`. Needs ``opentelemetry-api``, imported only
here and only when tracing is on (the proxy without it never imports it).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

    from .record import RequestRecord

__all__ = ["Tracing", "configure_sdk"]


class Tracing:
    """Starts, propagates and ends the proxy's request spans.

    :param provider: an OpenTelemetry ``TracerProvider`` (default: the global one).
    :raises RuntimeError: ``opentelemetry-api`` is not installed.
    """

    def __init__(self, provider: Any = None) -> None:
        try:
            from opentelemetry import propagate, trace
        except ImportError:
            raise RuntimeError(
                "tracing needs the opentelemetry-api package (pip install opentelemetry-api"
                " opentelemetry-sdk, plus an exporter)"
            ) from None
        from .. import __version__

        self._trace = trace
        self._propagate = propagate
        self._kind = trace.SpanKind.SERVER
        get = provider.get_tracer if provider is not None else trace.get_tracer
        self._tracer = get("kvroute.proxy", __version__)

    def start(self, request: web.Request) -> Any:
        """A span for ``request``, continuing its trace context if it carries one."""
        parent = self._propagate.extract(request.headers)
        return self._tracer.start_span(
            f"{request.method} {request.path}",
            context=parent,
            kind=self._kind,
            attributes={"http.request.method": request.method, "url.path": request.path},
        )

    def inject(self, span: Any, headers: MutableMapping[str, str]) -> None:
        """Put ``span``'s context into ``headers`` (``traceparent``, ``tracestate``)."""
        self._propagate.inject(headers, context=self._trace.set_span_in_context(span))

    def end(self, span: Any, record: RequestRecord, label: str | None) -> None:
        """Set the decision and outcome on ``span`` and end it."""
        attributes: dict[str, Any] = {
            "http.response.status_code": record.status,
            "kvroute.outcome": record.outcome,
            "kvroute.stream": record.stream,
        }
        optional = (
            ("kvroute.request_id", record.id),
            ("gen_ai.request.model", record.model),
            ("kvroute.session", record.session),
            ("gen_ai.usage.input_tokens", record.prompt_tokens),
            ("gen_ai.usage.output_tokens", record.output_tokens),
            ("kvroute.reported_cached_tokens", record.cached_tokens),
        )
        attributes.update((k, v) for k, v in optional if v is not None)
        if record.worker >= 0:
            attributes.update({
                "kvroute.worker": record.worker,
                "kvroute.worker.label": label or str(record.worker),
                "kvroute.policy": record.policy or "",
                "kvroute.matched_blocks": record.matched_blocks,
                "kvroute.predicted_cached_tokens": record.predicted_cached_tokens,
                "kvroute.retries": max(record.attempts - 1, 0),
            })  # fmt: skip
        ttft = record.ttft
        if ttft is not None:
            attributes["kvroute.ttft_ms"] = round(ttft * 1000, 3)
        span.set_attributes(attributes)
        if record.status >= 500 or record.outcome not in ("ok", "error"):
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, record.outcome))
        span.end()


def configure_sdk(service_name: str = "kvroute-proxy") -> tuple[Any, str]:
    """Set up the OpenTelemetry SDK for the command line, unless a tracer provider is set.

    Exporters follow ``OTEL_TRACES_EXPORTER`` (comma-separated; default
    ``otlp``): ``otlp`` (``opentelemetry-exporter-otlp``, HTTP or gRPC, its
    endpoint from ``OTEL_EXPORTER_OTLP_ENDPOINT``), ``console`` (JSON spans on
    stdout) or ``none``. The service name is ``OTEL_SERVICE_NAME``, else
    ``service_name``. A provider set already (by ``opentelemetry-instrument``,
    say) is left alone.

    :returns: the provider made (to shut down at exit; None if none was
        made) and a sentence saying where spans go.
    """
    from opentelemetry import trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None, "spans go to the tracer provider already set"
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        return None, (
            "opentelemetry-sdk is not installed and no tracer provider is set: spans are dropped"
        )
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    wanted = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    done: list[str] = []
    for name in wanted:
        exporter: Any = None
        if name == "console":
            exporter = ConsoleSpanExporter()
        elif name == "otlp":
            exporter = _otlp_exporter()
            if exporter is None:
                done.append("not to OTLP (install opentelemetry-exporter-otlp)")
                continue
        elif name in ("none", ""):
            continue
        else:
            done.append(f"not to {name!r} (unknown exporter)")
            continue
        provider.add_span_processor(BatchSpanProcessor(exporter))
        done.append(f"to {name}")
    trace.set_tracer_provider(provider)
    where = ", ".join(done) if done else "nowhere (OTEL_TRACES_EXPORTER=none)"
    return provider, "spans go " + where


def _otlp_exporter() -> Any:
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    modules = ["http", "grpc"] if protocol != "grpc" else ["grpc", "http"]
    for kind in modules:
        try:
            if kind == "http":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                    OTLPSpanExporter,
                )
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                    OTLPSpanExporter,
                )
        except ImportError:
            continue
        return OTLPSpanExporter()
    return None
