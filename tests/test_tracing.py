"""OpenTelemetry: one trace from ``POST /run`` through the play's steps, with an in-memory
exporter; the outbound ``traceparent`` of a ``curl`` step reaches a local server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flowplay import telemetry
from plays.models import Play

from .factories import make_flow

exporter = InMemorySpanExporter()


@pytest.fixture(scope="module")
def tracing() -> Iterator[InMemorySpanExporter]:
    telemetry.setup([SimpleSpanProcessor(exporter)])
    yield exporter
    # Leave the other tests of this process untraced: the provider stays, its instrumentations go.
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    for instrumentor in (DjangoInstrumentor(), CeleryInstrumentor(), HTTPXClientInstrumentor(), PsycopgInstrumentor()):
        instrumentor.uninstrument()
    exporter.clear()


@pytest.fixture
def spans(tracing: InMemorySpanExporter) -> InMemorySpanExporter:
    tracing.clear()
    return tracing


@pytest.fixture
def echo() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A local HTTP server that records the headers it receives."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append({k.lower(): v for k, v in self.headers.items()})
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hook", seen
    httpd.shutdown()
    httpd.server_close()


def steps_for(url: str) -> list[dict[str, Any]]:
    return [
        {"ref": "first", "appId": "var", "args": {"values": {"n": 1}}},
        {"ref": "call", "appId": "curl", "args": {"url": url, "method": "GET"}},
        {
            "ref": "last",
            "appId": "template",
            "args": {"template": "{{ s }}", "data": {"s": "{{ $prev.call.statusCode }}"}},
        },
    ]


def test_one_trace_from_the_request_to_the_last_step(api: Any, drain: Any, spans: Any, echo: Any) -> None:
    url, seen = echo
    flow = make_flow(api, steps_for(url))
    spans.clear()
    r = api.post(f"/api/flows/{flow['id']}/run", {}, format="json")
    assert r.status_code == 201
    play = Play.objects.get(pk=r.json()["playId"])
    assert play.traceparent  # stored with the play, for whichever worker runs it
    drain()
    play.refresh_from_db()
    assert play.state == "DONE"

    finished = spans.get_finished_spans()
    request = [s for s in finished if s.kind.name == "SERVER"]
    assert (
        len(request) == 1
        and request[0].attributes.get("http.method", request[0].attributes.get("http.request.method")) == "POST"
    )
    trace_id = request[0].context.trace_id
    run = [s for s in finished if s.name == "flowplay.run"]
    steps = [s for s in finished if s.name.startswith("step ")]
    assert len(run) == 1 and run[0].context.trace_id == trace_id
    assert run[0].parent.span_id == request[0].context.span_id
    assert [s.name for s in sorted(steps, key=lambda s: s.start_time)] == ["step first", "step call", "step last"]
    for step in steps:
        assert step.context.trace_id == trace_id
        assert step.parent.span_id == run[0].context.span_id  # children of the play's run
        assert step.attributes["flowplay.play_id"] == play.pk
        assert step.attributes["flowplay.flow_id"] == flow["id"]
        assert step.attributes["flowplay.outcome"] == "done"
    assert {s.attributes["flowplay.module"] for s in steps} == {"var", "curl", "template"}

    # The curl step sent its own span as the parent of the outbound request.
    assert len(seen) == 1
    version, sent_trace, sent_parent, _flags = seen[0]["traceparent"].split("-")
    call = next(s for s in steps if s.name == "step call")
    assert version == "00"
    assert int(sent_trace, 16) == trace_id
    assert int(sent_parent, 16) == call.context.span_id


def test_an_inbound_traceparent_is_joined(api: Any, drain: Any, spans: Any, echo: Any) -> None:
    url, seen = echo
    flow = make_flow(api, steps_for(url))
    spans.clear()
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = api.post(
        f"/api/flows/{flow['id']}/run", {}, format="json", HTTP_TRACEPARENT=f"00-{caller_trace}-{caller_span}-01"
    )
    assert r.status_code == 201
    drain()
    finished = spans.get_finished_spans()
    assert finished
    assert {format(s.context.trace_id, "032x") for s in finished} == {caller_trace}
    request = next(s for s in finished if s.kind.name == "SERVER")
    assert format(request.parent.span_id, "016x") == caller_span
    assert seen[0]["traceparent"].split("-")[1] == caller_trace


def test_a_failing_step_marks_its_span(api: Any, drain: Any, spans: Any) -> None:
    flow = make_flow(api, [{"ref": "parse", "appId": "json-parse", "args": {"input": "{{ $prev.args.doc }}"}}])
    api.post(f"/api/flows/{flow['id']}/run", {"args": {"doc": "{no"}}, format="json")
    drain()
    step = next(s for s in spans.get_finished_spans() if s.name == "step parse")
    assert step.status.status_code.name == "ERROR"
    assert step.attributes["flowplay.outcome"] == "fail"


def test_tracing_is_off_unless_otel_variables_ask() -> None:
    assert not telemetry.enabled_by_env({})
    assert telemetry.enabled_by_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert telemetry.enabled_by_env({"OTEL_TRACES_EXPORTER": "otlp"})
    assert not telemetry.enabled_by_env(
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    )
    assert not telemetry.enabled_by_env({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})


def test_otel_variables_turn_on_the_otlp_exporter(tmp_path: Any) -> None:
    """A process started with OTEL_EXPORTER_OTLP_ENDPOINT sends its spans there (OTLP/HTTP)."""
    import subprocess
    import sys
    from pathlib import Path

    received: list[tuple[str, str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    code = (
        "import django; django.setup()\n"
        "from opentelemetry import trace\n"
        "with trace.get_tracer('t').start_as_current_span('hello-otlp'): pass\n"
        "assert trace.get_tracer_provider().force_flush(10000)\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "DJANGO_SETTINGS_MODULE": "flowplay.settings",
        "FLOWPLAY_VAR_DIR": str(tmp_path),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{httpd.server_address[1]}",
        "OTEL_SERVICE_NAME": "flowplay-otlp-test",
    }
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert [(path, kind) for path, kind, _ in received] == [("/v1/traces", "application/x-protobuf")]
    assert b"hello-otlp" in received[0][2] and b"flowplay-otlp-test" in received[0][2]
