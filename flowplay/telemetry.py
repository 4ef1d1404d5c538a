"""OpenTelemetry tracing: off by default, on with the standard ``OTEL_*`` variables.

Tracing starts when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``) or an
OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``),
unless ``OTEL_SDK_DISABLED=true``. Everything else (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_EXPORTER_OTLP_HEADERS`` …) is read
by the SDK itself. The OTLP exporter speaks HTTP/protobuf (port 4318).

Instrumented: Django (inbound ``traceparent`` accepted, a span per request), Celery (the
context travels in task headers), psycopg (a span per query) and httpx. The runner adds a
span per play run and per step, parented to the trace stored with the play (plays/observe.py),
and the ``curl`` module sends ``traceparent`` on its outbound requests.

Called once per process from ``plays.apps.PlaysConfig.ready``. The SDK's batch processor
restarts its thread in prefork children by itself.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

_configured = False


def enabled_by_env(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporters() -> list[Any]:
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",") if n.strip()]
    exporters: list[Any] = []
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif name != "none":
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported here (otlp, console)", name)
    return exporters


def setup_from_env() -> bool:
    """Start tracing if the environment asks for it; True if it is on."""
    if not enabled_by_env():
        return False
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return setup([BatchSpanProcessor(exporter) for exporter in _exporters()])


def setup(processors: list[Any]) -> bool:
    """Install a tracer provider with ``processors`` and instrument the libraries (once)."""
    global _configured
    if _configured:
        return True
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "flowplay")})
    provider = TracerProvider(resource=resource)
    for processor in processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    instrument(provider)
    _configured = True
    return True


def instrument(provider: Any = None) -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    # /metrics, /api/health and /api/ready are polled: no trace each time.
    os.environ.setdefault("OTEL_PYTHON_DJANGO_EXCLUDED_URLS", "metrics,api/health,api/ready")
    for instrumentor in (DjangoInstrumentor(), CeleryInstrumentor(), HTTPXClientInstrumentor()):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider)
    psycopg = PsycopgInstrumentor()
    if not psycopg.is_instrumented_by_opentelemetry:
        psycopg.instrument(tracer_provider=provider, skip_dep_check=True)


__all__ = ["enabled_by_env", "setup", "setup_from_env", "instrument"]
