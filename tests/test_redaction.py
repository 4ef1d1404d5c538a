"""Secrets do not leak: credentials in flowlet args never come back in outs, errors, events,
API responses or log lines."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from django.conf import settings

from flows import modules
from flows.modules import Module, RunContext, StepError
from plays.models import Event, Layer
from plays.redaction import MASK, RedactingFilter, redact, secrets_of
from plays.runner import _call

from .factories import make_flow

TOKEN = "tok_live_9f8e7d6c5b4a3210"
PASSWORD = "s3cr3t-pa55word"
API_KEY = "key-abcdef-0123456789"
COOKIE = "sessionid=Zm9vYmFyYmF6cXV4"


class EchoHandler(BaseHTTPRequestHandler):
    """Answers with the request headers it got, and sets a cookie: the worst case."""

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"headers": {k: v for k, v in self.headers.items()}, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Set-Cookie", "session=abcdefgh12345678; HttpOnly")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def echo() -> Any:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def assert_clean(text: str) -> None:
    for secret in (TOKEN, PASSWORD, API_KEY, COOKIE, "abcdefgh12345678"):
        assert secret not in text, f"{secret!r} leaked in {text[:400]}"


def test_secrets_of_collects_the_credentials_of_a_step() -> None:
    args = {"url": "http://x", "bearerToken": TOKEN, "basicAuth": {"username": "ann", "password": PASSWORD},
            "headers": {"X-Api-Key": API_KEY, "Cookie": COOKIE, "Accept": "application/json",
                        "Authorization": f"Bearer {TOKEN}"}}
    found = secrets_of(args)
    assert {TOKEN, PASSWORD, API_KEY, COOKIE, f"Bearer {TOKEN}"} <= found
    assert "application/json" not in found and "ann" not in found


def test_redact_masks_sensitive_keys_and_secret_values_anywhere() -> None:
    value = {"headers": {"authorization": "Bearer zzz", "Set-Cookie": "a=b", "content-type": "text/plain"},
             "body": f"you sent {TOKEN} and {PASSWORD}", "list": [{"password": "pw"}, TOKEN], "n": 3, "none": None}
    out = redact(value, {TOKEN, PASSWORD})
    assert out["headers"] == {"authorization": MASK, "Set-Cookie": MASK, "content-type": "text/plain"}
    assert out["body"] == f"you sent {MASK} and {MASK}"
    assert out["list"] == [{"password": MASK}, MASK]
    assert out["n"] == 3 and out["none"] is None
    assert value["body"].startswith("you sent tok_")  # the input is not changed


class Leaky(Module):
    """A module whose error quotes its credentials, as a careless HTTP library would."""

    app_id = "test-leaky"
    summary = "test module"
    args_schema: ClassVar[dict] = {"type": "object"}
    out_schema: ClassVar[dict] = {"type": "object"}

    def run(self, args: dict, ctx: RunContext) -> Any:
        if args.get("crash"):
            raise RuntimeError(f"connection to https://user:{args['password']}@host failed")
        raise StepError(f"login with token {args['bearerToken']} refused", "HTTP_ERROR", retryable=False)


def test_errors_raised_by_a_step_are_redacted(db: Any) -> None:
    ctx = RunContext(play_id="p", flow_id="f", company_id="c", ref="r", attempt=1, timeout=5)
    with pytest.raises(StepError) as info:
        _call(Leaky(), {"bearerToken": TOKEN}, ctx)
    assert TOKEN not in str(info.value) and TOKEN not in info.value.message and MASK in info.value.message
    assert info.value.code == "HTTP_ERROR" and info.value.retryable is False
    with pytest.raises(StepError) as info:
        _call(Leaky(), {"crash": True, "password": PASSWORD}, ctx)
    assert PASSWORD not in info.value.message and "RuntimeError" in info.value.message


def test_credentials_never_reach_outs_events_or_the_api(api: Any, drain: Any, echo: str) -> None:
    flow = make_flow(api, [
        {"ref": "bearer", "appId": "curl", "args": {"url": echo + "/b", "bearerToken": "{{ $prev.args.token }}"}},
        {"ref": "basic", "appId": "curl", "args": {"url": echo + "/a", "basicAuth": {"username": "ann", "password": PASSWORD}}},
        {"ref": "headers", "appId": "curl", "args": {"url": echo + "/h", "headers": {"X-Api-Key": API_KEY, "Cookie": COOKIE}}},
        # A later step still gets the earlier out (redacted) to work with.
        {"ref": "after", "appId": "var", "args": {"values": {"status": "{{ $prev.bearer.statusCode }}"}}},
    ])
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {"token": TOKEN}}, format="json").json()["playId"]
    drain()
    play = api.get(f"/api/plays/{play_id}").json()
    assert play["state"] == "DONE", play
    layers = api.get(f"/api/plays/{play_id}/layers").json()
    assert [layer["state"] for layer in layers] == ["DONE"] * 4
    # The echo server really received the credentials: the steps ran with them.
    bearer_out = layers[0]["out"]
    assert bearer_out["body"]["headers"]["Authorization"] == MASK
    assert bearer_out["headers"]["set-cookie"] == MASK
    assert layers[1]["out"]["body"]["headers"]["Authorization"] == MASK
    assert layers[2]["out"]["body"]["headers"]["X-Api-Key"] == MASK
    assert layers[3]["out"] == {"status": 200}
    assert_clean(json.dumps(layers))
    assert_clean(json.dumps(api.get(f"/api/plays/{play_id}/events").json()))
    assert_clean(json.dumps(list(Event.objects.filter(play_id=play_id).values_list("payload", flat=True))))
    assert_clean(json.dumps(list(Layer.objects.filter(play_id=play_id).values_list("out", "error", "parked_out"))))


def test_log_lines_are_redacted() -> None:
    handler = settings.LOGGING["handlers"]["console"]
    assert "redact" in handler["filters"], "the console handler must mask credentials"
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "calling %s with %s", (
        "https://api.example.com", f"Authorization: Bearer {TOKEN} password={PASSWORD}"), None)
    try:
        raise ValueError(f"token={TOKEN}")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record)
    line = logging.Formatter().format(record)
    assert_clean(line)
    assert "https://api.example.com" in line and MASK in line
    api_key_record = logging.LogRecord("x", logging.INFO, __file__, 1, "key fp_0123abcd_" + "x" * 40, None, None)
    RedactingFilter().filter(api_key_record)
    assert "x" * 40 not in api_key_record.getMessage()


@pytest.fixture(autouse=True)
def leaky_module() -> Any:
    modules.REGISTRY["test-leaky"] = Leaky()
    yield
    modules.REGISTRY.pop("test-leaky", None)
