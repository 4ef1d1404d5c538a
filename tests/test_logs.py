"""JSON logs (LOG_FORMAT=json): one object per line, with the ids of the play, step and
request being handled, secrets masked."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from django.test import Client

from flowplay.logs import ContextFilter, JsonFormatter, bind
from flows import modules
from flows.modules import Module, RunContext
from plays.models import Play
from plays.redaction import RedactingFilter

from .factories import make_flow

ROOT = Path(__file__).resolve().parents[1]
step_log = logging.getLogger("flows.modules.test_chatty")


class Chatty(Module):
    """Logs from inside the step's thread, then fails unexpectedly when told to."""

    app_id = "test-chatty"
    summary = "test module"
    args_schema: ClassVar[dict] = {"type": "object"}
    out_schema: ClassVar[dict] = {"type": "object"}

    def run(self, args: dict, ctx: RunContext) -> Any:
        step_log.info("calling with Authorization: Bearer sk-live-abcdef123456")
        if args.get("explode"):
            raise RuntimeError("boom")
        return {"ok": True}


@pytest.fixture(autouse=True)
def chatty() -> Iterator[None]:
    modules.REGISTRY["test-chatty"] = Chatty()
    yield
    modules.REGISTRY.pop("test-chatty", None)


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The root logger writes JSON lines to a buffer, filtered as settings.LOGGING does."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(old_level)


def parsed(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]  # every line is one object


def test_every_line_of_a_running_play_carries_its_ids(api: Any, drain: Any, json_lines: io.StringIO) -> None:
    flow = make_flow(
        api,
        [
            {"ref": "hello", "appId": "test-chatty", "args": {}},
            {"ref": "crash", "appId": "test-chatty", "args": {"explode": True}},
        ],
    )
    play_id = api.post(f"/api/flows/{flow['id']}/run", {}, format="json").json()["playId"]
    json_lines.truncate(0)
    json_lines.seek(0)
    drain()
    play = Play.objects.get(pk=play_id)
    assert play.state == "FAIL"
    lines = parsed(json_lines)
    running = [line for line in lines if line.get("playId") == play_id]
    assert running, lines
    for line in running:
        assert line["flowId"] == flow["id"] and line["companyId"] == play.company_id
        assert {"time", "level", "logger", "message"} <= set(line)
    chatty_lines = [line for line in running if line["logger"] == "flows.modules.test_chatty"]
    assert [line["layerRef"] for line in chatty_lines] == ["hello", "crash"]  # logged in the step's thread
    assert all("sk-live-abcdef123456" not in line["message"] for line in chatty_lines)  # redacted
    crash = next(line for line in running if line["level"] == "ERROR")
    assert crash["layerRef"] == "crash" and "RuntimeError: boom" in crash["exception"]
    # Nothing the runner logged for this play lacks its id.
    # (Other tests' runner threads may still be logging: only this play's lines are checked.)
    assert all(line.get("playId") == play_id for line in lines if play_id in line["message"])


def test_web_lines_carry_the_request_id(api: Any, json_lines: io.StringIO, db: Any) -> None:
    r = api.get("/api/flows/nope", HTTP_X_REQUEST_ID="req-42")
    assert r.status_code == 404 and r["X-Request-ID"] == "req-42"
    lines = parsed(json_lines)
    request_lines = [line for line in lines if line["logger"] == "django.request"]
    assert request_lines and all(line["requestId"] == "req-42" for line in request_lines)

    made = Client().get("/api/flows/nope")
    assert len(made["X-Request-ID"]) == 32  # made up when the caller sent none (or a bad one)
    assert len(Client().get("/api/flows/nope", HTTP_X_REQUEST_ID="bad id\n")["X-Request-ID"]) == 32


def test_trace_id_is_on_the_line_when_a_span_is_current(json_lines: io.StringIO) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("x") as span, bind(playId="p1"):
        logging.getLogger("plays.runner").warning("inside")
    line = parsed(json_lines)[-1]
    assert line["traceId"] == format(span.get_span_context().trace_id, "032x") and line["playId"] == "p1"


def test_log_format_json_is_what_the_processes_write() -> None:
    code = "import logging, django; django.setup(); logging.getLogger('plays.runner').warning('hello %s', 'world')"
    env = {"LOG_FORMAT": "json", "DJANGO_SETTINGS_MODULE": "flowplay.settings", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stderr.strip().splitlines()[-1])
    assert line["message"] == "hello world" and line["level"] == "WARNING" and line["logger"] == "plays.runner"
