"""Modules: save-time checks, run-time outputs and error codes. No database needed."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from flows import modules
from flows.modules import Module, Park, RunContext, StepError, describe, get_module

ROOT = Path(__file__).resolve().parent.parent


def step_error(app_id: str, args: Any, ctx: RunContext | None = None) -> StepError:
    with pytest.raises(StepError) as info:
        get_module(app_id).run(args, ctx or RunContext())
    return info.value


from .factories import check_module, run_module  # noqa: E402
from .helpers import make_pdf  # noqa: E402

INVOICE_PDF = make_pdf("Invoice #INV-001")
BINARY = bytes(range(256))


# --- Local HTTP server ----------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def handle_any(self) -> None:
        path = urlsplit(self.path).path
        if path == "/json":
            self.send(200, b'{"hello": "world", "n": 1}', "application/json; charset=utf-8")
        elif path == "/text":
            self.send(200, "plain text é".encode(), "text/plain; charset=utf-8")
        elif path == "/latin1":
            self.send(200, "café".encode("latin-1"), "text/plain; charset=iso-8859-1")
        elif path == "/binary":
            self.send(200, BINARY, "application/octet-stream")
        elif path == "/invoice.pdf":
            self.send(200, INVOICE_PDF, "application/pdf")
        elif path == "/missing":
            self.send(404, b'{"error": "not found"}', "application/json")
        elif path == "/notjson":
            self.send(200, b"<html>oops</html>", "application/json")
        elif path == "/big":
            self.send(200, b"x" * 5000, "text/plain")
        elif path == "/slow":
            time.sleep(1.5)
            self.send(200, b"late", "text/plain")
        elif path == "/trickle":
            # Each byte arrives well within a per-read timeout, the whole body does not.
            self.send_response(200)
            self.send_header("Content-Length", "20")
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/redirect":
            self.send(302, b"", "text/plain", {"Location": "/json"})
        elif path == "/redirect-metadata":
            self.send(302, b"", "text/plain", {"Location": "http://169.254.169.254/latest/meta-data/"})
        elif path == "/echo":
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("latin-1")
            echo = {
                "method": self.command,
                "query": parse_qs(urlsplit(self.path).query),
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
            }
            self.send(200, json.dumps(echo).encode(), "application/json")
        else:
            self.send(500, b"unknown path", "text/plain")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_any


@pytest.fixture(scope="module")
def server() -> Any:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    # Timeout tests hang up on /slow and /trickle; the broken pipe is expected.
    httpd.handle_error = lambda request, client_address: None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record (and refuse) every outgoing TCP connection attempt."""
    calls: list = []

    def fake_create_connection(address: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(address)
        raise OSError("test: connections are not allowed here")

    monkeypatch.setattr(socket, "create_connection", fake_create_connection)
    return calls


def flowplay_settings(monkeypatch: pytest.MonkeyPatch, **conf: Any) -> None:
    from flows import egress

    monkeypatch.setattr(egress, "_flowplay_settings", lambda: conf)


# --- Registry and describe() ----------------------------------------------------------

ALL_APP_IDS = [
    "aggregator",
    "array-filter",
    "array-map",
    "base64-decode",
    "base64-encode",
    "csv-parse",
    "curl",
    "enumeration",
    "iterator",
    "json-parse",
    "json-stringify",
    "kv-append",
    "kv-get",
    "kv-set",
    "pdf-extract",
    "regex",
    "router",
    "send-mail",
    "sleep",
    "subflow",
    "template",
    "url-decode",
    "url-encode",
    "var",
]


def test_registry_holds_every_module_under_its_app_id() -> None:
    assert sorted(modules.REGISTRY) == ALL_APP_IDS
    for app_id, module in modules.REGISTRY.items():
        assert isinstance(module, Module)
        assert module.app_id == app_id
        assert get_module(app_id) is module
    assert get_module("nope") is None


def test_describe_lists_valid_schemas_sorted_by_app_id() -> None:
    described = describe()
    assert [d["appId"] for d in described] == ALL_APP_IDS
    for entry in described:
        assert set(entry) == {"appId", "name", "description", "args", "out"}
        assert entry["name"] and entry["description"] and "\n" not in entry["description"]
        Draft202012Validator.check_schema(entry["args"])
        Draft202012Validator.check_schema(entry["out"])
        assert entry["args"]["type"] == "object"
    # Callers get copies: editing them must not change validation.
    described[0]["args"]["required"].append("bogus")
    assert "bogus" not in get_module(described[0]["appId"]).args_schema["required"]


def test_register_refuses_a_duplicate_app_id() -> None:
    with pytest.raises(ValueError, match="duplicate"):

        @modules.register
        class Again(Module):
            app_id = "var"
            summary = "x"
            args_schema = {"type": "object"}
            out_schema = {}


def test_step_error_and_park_carry_their_fields() -> None:
    err = StepError("boom")
    assert (str(err), err.code, err.retryable) == ("boom", "STEP_ERROR", True)
    err = StepError("bad", "INVALID_INPUT", retryable=False)
    assert (err.message, err.code, err.retryable) == ("bad", "INVALID_INPUT", False)
    until = datetime.now(UTC)
    park = Park(until, {"sleptMs": 5})
    assert park.until is until and park.out == {"sleptMs": 5}
    ctx = RunContext()
    assert (ctx.attempt, ctx.timeout, ctx.play_id) == (1, 300.0, "")


def test_module_imports_without_django_configured() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    code = "from flows import modules; p = modules.OutboundPolicy.from_settings(); print([str(n) for n in p.deny])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.replace("'", '"')) == modules.DEFAULT_CURL_DENY


# --- check(): save-time validation ----------------------------------------------------

VALID_ARGS = [
    ("var", {"values": {"a": 1, "b": [1, 2]}}),
    ("template", {"template": "Hi {{ name }}", "data": {"name": "Ann"}}),
    ("template", {"template": "plain"}),
    ("curl", {"url": "https://example.com/x"}),
    (
        "curl",
        {
            "method": "POST",
            "url": "http://example.com",
            "headers": {"X-Api-Key": "k"},
            "query": {"a": 1, "b": ["x", "y"], "c": True},
            "body": {"x": 1},
            "timeout": 5,
            "followRedirects": False,
            "responseType": "binary",
            "basicAuth": {"username": "u", "password": "p"},
        },
    ),
    ("curl", {"url": "http://example.com", "bodyForm": {"a": "b"}, "bearerToken": "t"}),
    ("pdf-extract", {"content": "JVBERi0="}),
    ("pdf-extract", {"content": {"statusCode": 200, "body": "JVBERi0=", "headers": {}, "duration": 3}}),
    ("regex", {"input": "abc", "pattern": r"(?P<x>b)", "flags": "im", "operation": "replace", "replacement": r"\g<x>"}),
    ("base64-encode", {"input": "hi", "urlSafe": True}),
    ("base64-decode", {"input": "aGk"}),
    ("url-encode", {"input": {"a": 1, "b": ["x", None]}}),
    ("url-decode", {"input": "a%20b"}),
    ("json-parse", {"input": '{"a": [1, 2]}'}),
    ("json-stringify", {"input": None, "pretty": True}),
    ("router", {"routes": [{"condition": True, "label": "yes"}, {"condition": "true", "label": "else"}]}),
    ("sleep", {"ms": 0}),
    ("sleep", {"ms": modules.MAX_SLEEP_MS}),
    ("enumeration", {"from": 1, "to": 10, "step": 3}),
    ("csv-parse", {"input": "a,b\n1,2", "delimiter": ";", "header": False}),
]


@pytest.mark.parametrize(("app_id", "args"), VALID_ARGS)
def test_check_accepts_good_args(app_id: str, args: dict) -> None:
    assert check_module(app_id, args) == {}


EXPRESSION_ARGS = [
    ("var", {"values": "{{ steps.a.out }}"}),
    ("template", {"template": "{{ t }}", "data": "{{ steps.a.out }}"}),
    (
        "curl",
        {
            "method": "{{ method }}",
            "url": "{{ base }}/items",
            "headers": "{{ headers }}",
            "query": {"a": "{{ q }}"},
            "body": "{{ payload }}",
            "timeout": "{{ t }}",
            "followRedirects": "{{ follow }}",
            "responseType": "{{ kind }}",
            "basicAuth": {"username": "{{ user }}", "password": "{{ secrets.pw }}"},
        },
    ),
    ("curl", {"url": "https://{{ host }}/x", "basicAuth": "{{ auth }}"}),
    ("pdf-extract", {"content": "{{ steps.download.out }}"}),
    ("regex", {"input": "{{ text }}", "pattern": "{{ p }}", "flags": "{{ f }}", "operation": "{{ op }}"}),
    ("regex", {"input": "x", "pattern": "(a)", "replacement": "{{ r }}"}),
    ("regex", {"input": "x", "pattern": "a # ( only valid with the x flag", "flags": "{{ f }}"}),
    ("base64-decode", {"input": "{{ x }}"}),
    ("url-encode", {"input": "{{ x }}"}),
    ("json-parse", {"input": "{{ body }}"}),
    ("json-stringify", {"input": "{{ x }}", "pretty": "{{ p }}"}),
    ("router", {"routes": "{{ routes }}"}),
    ("router", {"routes": [{"condition": "{{ a > 1 }}", "label": "{{ label }}"}]}),
    ("sleep", {"ms": "{{ delay }}"}),
    ("enumeration", {"from": "{{ a }}", "to": "{{ b }}", "step": "{{ c }}"}),
    ("csv-parse", {"input": "{{ file }}", "delimiter": "{{ d }}", "header": "{{ h }}"}),
    ("var", "{{ everything }}"),
]


@pytest.mark.parametrize(("app_id", "args"), EXPRESSION_ARGS)
def test_check_accepts_expression_strings_wherever_a_value_goes(app_id: str, args: Any) -> None:
    assert check_module(app_id, args) == {}


BAD_ARGS = [
    ("var", {}, "values"),
    ("var", {"values": [1]}, "values"),
    ("var", {"values": {}, "valuez": 1}, "valuez"),
    ("var", ["not", "an", "object"], ""),
    ("template", {"data": {}}, "template"),
    ("template", {"template": "x", "data": [1]}, "data"),
    ("curl", {}, "url"),
    ("curl", {"url": "ftp://example.com/file"}, "url"),
    ("curl", {"url": "example.com"}, "url"),
    ("curl", {"url": "http://x", "metod": "POST"}, "metod"),
    ("curl", {"url": "http://x", "method": "FETCH"}, "method"),
    ("curl", {"url": "http://x", "headers": {"X-Count": 3}}, "headers.X-Count"),
    ("curl", {"url": "http://x", "headers": {"Bad Header": "v"}}, 'headers["Bad Header"]'),
    ("curl", {"url": "http://x", "headers": {"X-A": "a\r\nInjected: 1"}}, "headers.X-A"),
    ("curl", {"url": "http://x", "timeout": 0}, "timeout"),
    ("curl", {"url": "http://x", "timeout": "soon"}, "timeout"),
    ("curl", {"url": "http://x", "responseType": "xml"}, "responseType"),
    ("curl", {"url": "http://x", "basicAuth": {"username": "u"}}, "basicAuth.password"),
    ("curl", {"url": "http://x", "body": {}, "bodyForm": {}}, "bodyForm"),
    ("curl", {"url": "http://x", "bearerToken": "t", "basicAuth": {"username": "u", "password": "p"}}, "bearerToken"),
    ("pdf-extract", {}, "content"),
    ("pdf-extract", {"content": 12}, "content"),
    ("pdf-extract", {"content": {"statusCode": 200}}, "content"),
    ("regex", {"input": "x", "pattern": "("}, "pattern"),
    ("regex", {"input": "x", "pattern": "a", "flags": "iq"}, "flags"),
    ("regex", {"input": "x", "pattern": "a", "operation": "search"}, "operation"),
    ("regex", {"input": "x", "pattern": "(a)", "replacement": r"\2"}, "replacement"),
    ("regex", {"input": "x", "pattern": "a" * (modules.MAX_REGEX_PATTERN + 1)}, "pattern"),
    ("base64-encode", {"input": 5}, "input"),
    ("base64-decode", {"input": "!!!"}, "input"),
    ("url-encode", {"input": {"a": {"nested": 1}}}, "input.a"),
    ("url-decode", {}, "input"),
    ("json-parse", {"input": "{bad"}, "input"),
    ("json-parse", {"input": "NaN"}, "input"),
    ("json-stringify", {"input": 1, "pretty": "yes"}, "pretty"),
    ("router", {"routes": []}, "routes"),
    ("router", {"routes": [{"condition": True, "label": "a"}, {"condition": False}]}, "routes[1].label"),
    ("router", {"routes": [{"condition": True, "label": ""}]}, "routes[0].label"),
    ("sleep", {"ms": -1}, "ms"),
    ("sleep", {"ms": modules.MAX_SLEEP_MS + 1}, "ms"),
    ("sleep", {"ms": 1.5}, "ms"),
    ("enumeration", {"from": 1}, "to"),
    ("enumeration", {"from": 1, "to": 5, "step": 0}, "step"),
    ("enumeration", {"from": 0, "to": modules.MAX_ENUM_ITEMS}, ""),
    ("csv-parse", {"input": "a", "delimiter": ",,"}, "delimiter"),
    ("csv-parse", {"input": "a", "delimiter": '"'}, "delimiter"),
    ("csv-parse", {"input": "a", "header": "yes"}, "header"),
]


@pytest.mark.parametrize(("app_id", "args", "path"), BAD_ARGS)
def test_check_reports_bad_args_at_their_path(app_id: str, args: Any, path: str) -> None:
    problems = check_module(app_id, args)
    assert path in problems, problems
    assert all(isinstance(m, str) and m for m in problems[path])


def test_check_messages_are_readable() -> None:
    assert check_module("curl", {}) == {"url": ["is required"]}
    assert check_module("curl", {"url": "http://x", "metod": "GET"}) == {"metod": ["is not an allowed property"]}
    assert check_module("curl", {"url": "http://x", "followRedirects": "no"}) == {
        "followRedirects": ["must be of type boolean"]
    }
    problems = check_module("regex", {"input": "x", "pattern": "(", "flags": "z"})
    assert problems["pattern"][0].startswith("is not a valid regular expression")
    assert "flags" in problems


def test_check_reports_every_problem_at_once() -> None:
    problems = check_module("curl", {"url": 5, "method": "FETCH", "headers": {"A": 1, "B": 2}})
    assert set(problems) == {"url", "method", "headers.A", "headers.B"}


def test_check_vets_literals_that_sit_next_to_expressions() -> None:
    # An expression elsewhere does not switch checks off for literal neighbours.
    assert "pattern" in check_module("regex", {"input": "{{ x }}", "pattern": "[", "replacement": "{{ r }}"})
    assert "url" in check_module("curl", {"url": "ftp://x", "headers": "{{ h }}"})


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(app_id=st.sampled_from(ALL_APP_IDS), args=JSON)
def test_check_never_fails_internally_on_any_json(app_id: str, args: Any) -> None:
    problems = check_module(app_id, args)
    assert isinstance(problems, dict)
    for path, messages in problems.items():
        assert isinstance(path, str)
        assert messages and all(isinstance(m, str) for m in messages)
        assert not any(m.startswith("could not validate") for m in messages), (args, problems)


def test_run_rejects_invalid_rendered_args_as_non_retryable() -> None:
    err = step_error("curl", {"url": "ftp://example.com"})
    assert err.code == "INVALID_INPUT" and err.retryable is False
    assert "url" in err.message
    # At run time an expression-looking string is plain data, not a pass.
    err = step_error("var", {"values": "{{ not rendered }}"})
    assert err.code == "INVALID_INPUT"


# --- var, template --------------------------------------------------------------------


def test_var_returns_its_values() -> None:
    values = {"a": 1, "nested": {"list": [1, "two", None]}}
    assert run_module("var", {"values": values}) == values


def test_template_renders_with_flows_expr() -> None:
    out = run_module("template", {"template": "Hello {{ name }}, you owe {{ amount }}", "data": {"name": "Ann", "amount": 5}})
    assert out == {"result": "Hello Ann, you owe 5"}
    assert run_module("template", {"template": "no placeholders"}) == {"result": "no placeholders"}
    err = step_error("template", {"template": "{{ 1 + }}"})
    assert (err.code, err.retryable) == ("EXPRESSION_ERROR", False)
    assert (
        step_error("template", {"template": "{{ name.__class__ }}", "data": {"name": "x"}}).code == "EXPRESSION_ERROR"
    )


def test_template_turns_expression_errors_into_step_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("flows.expr")

    class ExpressionError(Exception):
        code = "EXPRESSION_ERROR"

    seen = {}

    def render_template(text: str, data: Any) -> str:
        seen.update(text=text, data=data)
        if "boom" in text:
            raise ExpressionError("unknown name 'boom'")
        return text.replace("{{ name }}", str(data.get("name")))

    fake.ExpressionError, fake.render_template = ExpressionError, render_template
    monkeypatch.setitem(sys.modules, "flows.expr", fake)

    assert run_module("template", {"template": "Hi {{ name }}", "data": {"name": "Bo"}}) == {"result": "Hi Bo"}
    assert seen == {"text": "Hi {{ name }}", "data": {"name": "Bo"}}
    run_module("template", {"template": "x"})
    assert seen["data"] == {}  # default data
    err = step_error("template", {"template": "{{ boom }}"})
    assert (err.code, err.retryable) == ("EXPRESSION_ERROR", False)
    assert "boom" in err.message


# --- curl -----------------------------------------------------------------------------


def test_curl_get_json(server: str) -> None:
    out = run_module("curl", {"url": f"{server}/json"})
    assert out["statusCode"] == 200
    assert out["body"] == {"hello": "world", "n": 1}
    assert out["headers"]["content-type"] == "application/json; charset=utf-8"
    assert all(k == k.lower() for k in out["headers"])
    assert isinstance(out["duration"], int) and 0 <= out["duration"] < 5000


def test_curl_text_and_charset(server: str) -> None:
    assert run_module("curl", {"url": f"{server}/text"})["body"] == "plain text é"
    assert run_module("curl", {"url": f"{server}/latin1"})["body"] == "café"
    # Explicit text keeps JSON as a string.
    assert run_module("curl", {"url": f"{server}/json", "responseType": "text"})["body"] == '{"hello": "world", "n": 1}'


def test_curl_binary_is_base64(server: str) -> None:
    out = run_module("curl", {"url": f"{server}/binary", "responseType": "binary"})
    assert base64.b64decode(out["body"]) == BINARY


def test_curl_non_2xx_is_a_result_not_a_failure(server: str) -> None:
    out = run_module("curl", {"url": f"{server}/missing"})
    assert out["statusCode"] == 404
    assert out["body"] == {"error": "not found"}


def test_curl_json_content_type_that_does_not_parse(server: str) -> None:
    assert run_module("curl", {"url": f"{server}/notjson"})["body"] == "<html>oops</html>"
    err = step_error("curl", {"url": f"{server}/notjson", "responseType": "json"})
    assert err.code == "INVALID_RESPONSE"


def test_curl_sends_method_headers_query_and_json_body(server: str) -> None:
    out = run_module(
        "curl",
        {
            "method": "PUT",
            "url": f"{server}/echo?fixed=1",
            "headers": {"X-Custom": "yes", "User-Agent": "mine"},
            "query": {"q": "a b", "n": 2, "flag": True, "tags": ["x", "y"]},
            "body": {"name": "Ann", "items": [1, 2]},
        },
    )
    echo = out["body"]
    assert echo["method"] == "PUT"
    assert echo["query"] == {"fixed": ["1"], "q": ["a b"], "n": ["2"], "flag": ["true"], "tags": ["x", "y"]}
    assert echo["headers"]["x-custom"] == "yes"
    assert echo["headers"]["user-agent"] == "mine"
    assert echo["headers"]["content-type"] == "application/json"
    assert json.loads(echo["body"]) == {"name": "Ann", "items": [1, 2]}


def test_curl_sends_form_body(server: str) -> None:
    echo = run_module("curl", {"method": "POST", "url": f"{server}/echo", "bodyForm": {"a": "1 2", "b": ["x", "y"]}})["body"]
    assert echo["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert parse_qs(echo["body"]) == {"a": ["1 2"], "b": ["x", "y"]}


def test_curl_sends_raw_string_body(server: str) -> None:
    echo = run_module(
        "curl",
        {"method": "POST", "url": f"{server}/echo", "body": "<xml/>", "headers": {"Content-Type": "text/xml"}},
    )["body"]
    assert echo["body"] == "<xml/>"
    assert echo["headers"]["content-type"] == "text/xml"
    assert echo["headers"]["user-agent"] == "flowplay"


def test_curl_basic_auth_and_bearer_token(server: str) -> None:
    echo = run_module("curl", {"url": f"{server}/echo", "basicAuth": {"username": "ann", "password": "s3cret"}})["body"]
    assert echo["headers"]["authorization"] == "Basic " + base64.b64encode(b"ann:s3cret").decode()
    echo = run_module("curl", {"url": f"{server}/echo", "bearerToken": "tok", "headers": {"authorization": "old"}})["body"]
    assert echo["headers"]["authorization"] == "Bearer tok"


def test_curl_head_and_coerced_rendered_scalars(server: str) -> None:
    out = run_module("curl", {"method": "HEAD", "url": f"{server}/text", "timeout": "5", "followRedirects": "false"})
    assert out["statusCode"] == 200 and out["body"] == ""


def test_curl_follows_redirects_by_default(server: str) -> None:
    out = run_module("curl", {"url": f"{server}/redirect"})
    assert out["statusCode"] == 200 and out["body"]["hello"] == "world"
    out = run_module("curl", {"url": f"{server}/redirect", "followRedirects": False})
    assert out["statusCode"] == 302
    assert out["headers"]["location"] == "/json"


def test_curl_timeout(server: str) -> None:
    started = time.monotonic()
    err = step_error("curl", {"url": f"{server}/slow", "timeout": 0.3})
    assert (err.code, err.retryable) == ("TIMEOUT", True)
    assert time.monotonic() - started < 1.2


def test_curl_timeout_is_capped_by_the_attempt_budget(server: str) -> None:
    started = time.monotonic()
    err = step_error("curl", {"url": f"{server}/slow", "timeout": 30}, RunContext(timeout=0.3))
    assert err.code == "TIMEOUT"
    assert time.monotonic() - started < 1.2
    assert step_error("curl", {"url": f"{server}/json"}, RunContext(timeout=0)).code == "TIMEOUT"


def test_curl_total_timeout_covers_a_trickling_body(server: str) -> None:
    started = time.monotonic()
    err = step_error("curl", {"url": f"{server}/trickle", "timeout": 0.5})
    assert err.code == "TIMEOUT"
    assert time.monotonic() - started < 1.5


def test_curl_connection_refused_is_http_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    err = step_error("curl", {"url": f"http://127.0.0.1:{port}/"})
    assert (err.code, err.retryable) == ("HTTP_ERROR", True)


def test_curl_unresolvable_host_is_http_error() -> None:
    err = step_error("curl", {"url": "http://does-not-exist.invalid/"})
    assert err.code == "HTTP_ERROR"


def test_curl_response_size_cap(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modules.curl, "MAX_RESPONSE_BYTES", 1000)
    err = step_error("curl", {"url": f"{server}/big"})
    assert (err.code, err.retryable) == ("RESPONSE_TOO_LARGE", False)
    assert run_module("curl", {"url": f"{server}/json"})["statusCode"] == 200
    # HEAD announces the size of a body it does not send.
    assert run_module("curl", {"method": "HEAD", "url": f"{server}/big"})["headers"]["content-length"] == "5000"


def test_curl_refuses_metadata_address_without_connecting(no_connect: list) -> None:
    err = step_error("curl", {"url": "http://169.254.169.254/latest/meta-data/"})
    assert (err.code, err.retryable) == ("HOST_DENIED", False)
    assert "169.254.169.254" in err.message
    assert step_error("curl", {"url": "http://[::ffff:169.254.169.254]/"}).code == "HOST_DENIED"
    assert step_error("curl", {"url": "http://100.100.100.200/"}).code == "HOST_DENIED"
    assert no_connect == []


def test_curl_refuses_a_redirect_to_a_denied_address(server: str) -> None:
    err = step_error("curl", {"url": f"{server}/redirect-metadata"})
    assert err.code == "HOST_DENIED"


def test_curl_deny_and_allow_lists_come_from_settings(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = urlsplit(server).port
    flowplay_settings(monkeypatch, CURL_DENY=["127.0.0.0/8", "::1/128"])
    assert step_error("curl", {"url": f"{server}/json"}).code == "HOST_DENIED"

    flowplay_settings(monkeypatch, CURL_DENY=["127.0.0.0/8", "::1/128"], CURL_ALLOW=["127.0.0.1/32"])
    assert run_module("curl", {"url": f"{server}/json"})["statusCode"] == 200

    # Allowed by name; "localhost" may resolve to ::1 first, where nothing listens.
    flowplay_settings(monkeypatch, CURL_DENY=["127.0.0.0/8", "::1/128"], CURL_ALLOW=["LOCALHOST"])
    assert run_module("curl", {"url": f"http://localhost:{port}/json"})["statusCode"] == 200

    # An empty deny list opens even the metadata range.
    flowplay_settings(monkeypatch, CURL_DENY=[])
    assert modules.OutboundPolicy.from_settings().deny == ()

    flowplay_settings(monkeypatch, CURL_DENY=["not-a-network"])
    assert step_error("curl", {"url": f"{server}/json"}).code == "CONFIG_ERROR"


def test_outbound_policy_defaults_and_mapped_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    flowplay_settings(monkeypatch)
    policy = modules.OutboundPolicy.from_settings()
    assert policy.address_denied("169.254.169.254")
    assert policy.address_denied("::ffff:169.254.169.254")
    assert policy.address_denied("fd00:ec2::254")
    assert policy.address_denied("100.100.100.200")
    assert not policy.address_denied("127.0.0.1")
    assert not policy.address_denied("::1")
    assert not policy.address_denied("93.184.216.34")


# --- pdf-extract ----------------------------------------------------------------------


def test_pdf_extract_from_base64() -> None:
    out = run_module("pdf-extract", {"content": base64.b64encode(INVOICE_PDF).decode()})
    assert out["pages"] == 1
    assert "Invoice #INV-001" in out["text"]


def test_pdf_extract_from_a_curl_binary_download(server: str) -> None:
    download = run_module("curl", {"url": f"{server}/invoice.pdf", "responseType": "binary"})
    out = run_module("pdf-extract", {"content": download})
    assert "Invoice #INV-001" in out["text"]
    assert out["pages"] == 1


def test_pdf_extract_from_data_url_and_unpadded_urlsafe_base64() -> None:
    url = "data:application/pdf;base64," + base64.b64encode(INVOICE_PDF).decode()
    assert "Invoice #INV-001" in run_module("pdf-extract", {"content": url})["text"]
    urlsafe = base64.urlsafe_b64encode(INVOICE_PDF).decode().rstrip("=")
    assert "Invoice #INV-001" in run_module("pdf-extract", {"content": urlsafe})["text"]


def test_pdf_extract_joins_pages_with_newlines() -> None:
    out = run_module("pdf-extract", {"content": base64.b64encode(make_pdf("First page", "Second page")).decode()})
    assert out["pages"] == 2
    first, second = out["text"].split("\n")
    assert "First page" in first and "Second page" in second


@pytest.mark.parametrize(
    "content",
    [
        base64.b64encode(b"definitely not a pdf").decode(),
        "%%% not base64 %%%",
        base64.b64encode(b"%PDF-1.4\nthis is not really a PDF body").decode(),
        base64.b64encode(INVOICE_PDF[: len(INVOICE_PDF) // 3]).decode(),
        "data:application/pdf;base64",
        {"statusCode": 200, "body": "plain text, not base64!", "headers": {}, "duration": 1},
    ],
)
def test_pdf_extract_bad_input_is_pdf_error(content: Any) -> None:
    err = step_error("pdf-extract", {"content": content})
    assert (err.code, err.retryable) == ("PDF_ERROR", False)


def test_pdf_extract_hints_at_binary_for_a_text_download(server: str) -> None:
    download = run_module("curl", {"url": f"{server}/text"})
    err = step_error("pdf-extract", {"content": {**download, "body": base64.b64encode(b"hello").decode()}})
    assert "responseType" in err.message


# --- regex ----------------------------------------------------------------------------


def test_regex_match() -> None:
    out = run_module("regex", {"input": "Order 42 from Ann", "pattern": r"(\d+) from (?P<who>\w+)"})
    assert out == {"matched": True, "groups": ["42", "Ann"], "named": {"who": "Ann"}}
    assert run_module("regex", {"input": "abc", "pattern": r"\d"}) == {"matched": False, "groups": [], "named": {}}


def test_regex_find() -> None:
    out = run_module("regex", {"input": "a1 b22", "pattern": r"[a-z](?P<n>\d\d)", "operation": "find"})
    assert out == {"found": True, "match": "b22", "index": 3, "groups": ["22"], "named": {"n": "22"}}
    out = run_module("regex", {"input": "abc", "pattern": "z", "operation": "find"})
    assert out == {"found": False, "match": None, "index": None, "groups": [], "named": {}}


def test_regex_find_all() -> None:
    out = run_module(
        "regex", {"input": "INV-1, inv-22, INV-333", "pattern": r"inv-(\d+)", "flags": "i", "operation": "findAll"}
    )
    assert out["count"] == 3
    assert [m["match"] for m in out["matches"]] == ["INV-1", "inv-22", "INV-333"]
    assert out["matches"][1] == {"match": "inv-22", "index": 7, "groups": ["22"], "named": {}}


def test_regex_replace_and_split() -> None:
    out = run_module("regex", {"input": "a-b-c", "pattern": r"-", "operation": "replace", "replacement": "+"})
    assert out == {"result": "a+b+c", "count": 2}
    out = run_module(
        "regex",
        {"input": "2024-05-01", "pattern": r"(\d+)-(\d+)-(\d+)", "operation": "replace", "replacement": r"\3/\2/\1"},
    )
    assert out == {"result": "01/05/2024", "count": 1}
    assert run_module("regex", {"input": "a1b", "pattern": r"\d", "operation": "replace"}) == {"result": "ab", "count": 1}
    assert run_module("regex", {"input": "a, b,c", "pattern": r",\s*", "operation": "split"}) == {"parts": ["a", "b", "c"]}


def test_regex_flags_multiline_dotall_verbose() -> None:
    assert run_module("regex", {"input": "x\nfoo", "pattern": "^foo$", "flags": "m"})["matched"] is True
    assert run_module("regex", {"input": "x\nfoo", "pattern": "^foo$"})["matched"] is False
    assert run_module("regex", {"input": "a\nb", "pattern": "a.b", "flags": "s"})["matched"] is True
    assert run_module("regex", {"input": "ab", "pattern": "a  b  # spaced", "flags": "x"})["matched"] is True


def test_regex_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    err = step_error("regex", {"input": "a" * (modules.MAX_REGEX_INPUT + 1), "pattern": "a"})
    assert (err.code, err.retryable) == ("INVALID_INPUT", False)
    assert step_error("regex", {"input": "x", "pattern": "("}).code == "INVALID_INPUT"
    monkeypatch.setattr(modules.regex, "MAX_REGEX_MATCHES", 3)
    assert step_error("regex", {"input": "aaaa", "pattern": "a", "operation": "findAll"}).code == "INVALID_INPUT"


# --- encoders -------------------------------------------------------------------------


def test_base64_round_trip() -> None:
    assert run_module("base64-encode", {"input": "héllo?"}) == {"result": "aMOpbGxvPw=="}
    assert run_module("base64-encode", {"input": "héllo?", "urlSafe": True}) == {"result": "aMOpbGxvPw=="}
    assert run_module("base64-encode", {"input": "\xff\xfe", "urlSafe": True}) == {"result": "w7_Dvg=="}
    assert run_module("base64-decode", {"input": "aMOpbGxvPw=="}) == {"result": "héllo?"}


def test_base64_decode_accepts_urlsafe_missing_padding_and_whitespace() -> None:
    assert run_module("base64-decode", {"input": "w7_Dvg"}) == {"result": "\xff\xfe"}
    assert run_module("base64-decode", {"input": "aMOp\nbGxv Pw"}) == {"result": "héllo?"}


def test_base64_decode_errors() -> None:
    err = step_error("base64-decode", {"input": base64.b64encode(b"\xff\xfe\xfd").decode()})
    assert (err.code, err.retryable) == ("INVALID_INPUT", False)
    assert "UTF-8" in err.message
    assert step_error("base64-decode", {"input": "!!!"}).code == "INVALID_INPUT"
    assert step_error("base64-decode", {"input": "abcde"}).code == "INVALID_INPUT"


def test_url_encode_and_decode() -> None:
    assert run_module("url-encode", {"input": "a b&c/é"}) == {"result": "a%20b%26c%2F%C3%A9"}
    out = run_module("url-encode", {"input": {"q": "a b", "n": 1, "flag": True, "tags": ["x", "y"], "none": None}})
    assert out == {"result": "q=a%20b&n=1&flag=true&tags=x&tags=y&none="}
    assert run_module("url-decode", {"input": "a%20b+c%2F%C3%A9"}) == {"result": "a b c/é"}


def test_json_parse_and_stringify() -> None:
    assert run_module("json-parse", {"input": '{"a": [1, 2.5, null, "é"]}'}) == {"result": {"a": [1, 2.5, None, "é"]}}
    assert run_module("json-parse", {"input": "3"}) == {"result": 3}
    err = step_error("json-parse", {"input": "{oops"})
    assert (err.code, err.retryable) == ("INVALID_INPUT", False)
    assert step_error("json-parse", {"input": "[NaN]"}).code == "INVALID_INPUT"
    assert run_module("json-stringify", {"input": {"a": [1, "é"]}}) == {"result": '{"a":[1,"é"]}'}
    assert run_module("json-stringify", {"input": {"a": 1}, "pretty": True}) == {"result": '{\n  "a": 1\n}'}
    assert run_module("json-stringify", {"input": None}) == {"result": "null"}


# --- router, sleep, enumeration -------------------------------------------------------


def routes(*conditions: Any) -> dict:
    return {"routes": [{"condition": c, "label": f"r{i}"} for i, c in enumerate(conditions)]}


@pytest.mark.parametrize(
    "falsy", [False, None, 0, 0.0, "", "false", "False", " FALSE ", "0", "0.0", "null", "None", [], {}]
)
def test_router_false_conditions_are_skipped(falsy: Any) -> None:
    assert run_module("router", routes(falsy, "true")) == {"route": "r1"}


@pytest.mark.parametrize("truthy", [True, 1, -2, "true", "True", "yes", "1", "x", [0], {"a": 1}])
def test_router_truthy_conditions_win(truthy: Any) -> None:
    assert run_module("router", routes(truthy, "true")) == {"route": "r0"}


def test_router_first_match_wins_and_none_when_nothing_matches() -> None:
    assert run_module("router", routes("false", True, True)) == {"route": "r1"}
    assert run_module("router", routes("false", None, 0)) == {"route": None}


def test_sleep_parks_until_later() -> None:
    before = datetime.now(UTC)
    with pytest.raises(Park) as info:
        run_module("sleep", {"ms": 1500})
    park = info.value
    assert park.out == {"sleptMs": 1500}
    assert park.until.tzinfo is not None
    assert before + timedelta(milliseconds=1500) <= park.until <= datetime.now(UTC) + timedelta(milliseconds=1500)


def test_sleep_zero_or_past_returns_at_once() -> None:
    assert run_module("sleep", {"ms": 0}) == {"sleptMs": 0}
    # A computed "time until" that already passed.
    assert run_module("sleep", {"ms": -5000}) == {"sleptMs": 0}


def test_sleep_accepts_rendered_numbers_and_bounds_them() -> None:
    with pytest.raises(Park) as info:
        run_module("sleep", {"ms": "2000"})
    assert info.value.out == {"sleptMs": 2000}
    err = step_error("sleep", {"ms": modules.MAX_SLEEP_MS + 1})
    assert (err.code, err.retryable) == ("INVALID_INPUT", False)
    assert step_error("sleep", {"ms": "soon"}).code == "INVALID_INPUT"


def test_enumeration() -> None:
    assert run_module("enumeration", {"from": 1, "to": 5}) == {"items": [1, 2, 3, 4, 5]}
    assert run_module("enumeration", {"from": 0, "to": 10, "step": 3}) == {"items": [0, 3, 6, 9]}
    assert run_module("enumeration", {"from": 5, "to": 1}) == {"items": [5, 4, 3, 2, 1]}
    assert run_module("enumeration", {"from": 5, "to": 1, "step": -2}) == {"items": [5, 3, 1]}
    assert run_module("enumeration", {"from": 1, "to": 5, "step": -1}) == {"items": []}
    assert run_module("enumeration", {"from": 3, "to": 3}) == {"items": [3]}
    assert run_module("enumeration", {"from": 0, "to": 1, "step": 0.25}) == {"items": [0, 0.25, 0.5, 0.75, 1.0]}
    assert run_module("enumeration", {"from": 0, "to": 0.3, "step": 0.1}) == {"items": [0, 0.1, 0.2, 0.3]}
    assert run_module("enumeration", {"from": "1", "to": "3"}) == {"items": [1, 2, 3]}


def test_enumeration_errors() -> None:
    err = step_error("enumeration", {"from": 0, "to": modules.MAX_ENUM_ITEMS})
    assert (err.code, err.retryable) == ("INVALID_INPUT", False)
    assert len(run_module("enumeration", {"from": 1, "to": modules.MAX_ENUM_ITEMS})["items"]) == modules.MAX_ENUM_ITEMS
    assert step_error("enumeration", {"from": 0, "to": 5, "step": 0}).code == "INVALID_INPUT"
    assert step_error("enumeration", {"from": -1e308, "to": 1e308, "step": 1e-300}).code == "INVALID_INPUT"
    assert check_module("enumeration", {"from": 0.5, "to": 1e300}) == {
        "": [f"would produce more than {modules.MAX_ENUM_ITEMS} items"]
    }


# --- csv-parse ------------------------------------------------------------------------


def test_csv_parse_with_header() -> None:
    text = '\ufeffname,amount,note\nAnn,5,"says ""hi"", twice"\n\nBo,7,"multi\nline"\n'
    out = run_module("csv-parse", {"input": text})
    assert out == {
        "rows": [
            {"name": "Ann", "amount": "5", "note": 'says "hi", twice'},
            {"name": "Bo", "amount": "7", "note": "multi\nline"},
        ],
        "count": 2,
    }


def test_csv_parse_without_header_and_other_delimiter() -> None:
    out = run_module("csv-parse", {"input": "a;b\r\n1;2\r\n", "delimiter": ";", "header": False})
    assert out == {"rows": [["a", "b"], ["1", "2"]], "count": 2}
    out = run_module("csv-parse", {"input": "a\tb\n1\t2", "delimiter": "\t", "header": "false"})
    assert out["rows"] == [["a", "b"], ["1", "2"]]


def test_csv_parse_ragged_rows_and_odd_headers() -> None:
    out = run_module("csv-parse", {"input": "id,id,\n1,2,3,4\n5\n"})
    assert out["rows"] == [
        {"id": "1", "id_2": "2", "column3": "3", "column4": "4"},
        {"id": "5", "id_2": "", "column3": "", "column4": ""},
    ]
    assert run_module("csv-parse", {"input": ""}) == {"rows": [], "count": 0}
    assert run_module("csv-parse", {"input": "only,header\n"}) == {"rows": [], "count": 0}


def test_csv_parse_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    err = step_error("csv-parse", {"input": 'a,b\n1,"2"x\n'})
    assert (err.code, err.retryable) == ("INVALID_INPUT", False)
    monkeypatch.setattr(modules.csv_parse, "MAX_CSV_ROWS", 2)
    assert step_error("csv-parse", {"input": "h\n1\n2\n3\n"}).code == "INVALID_INPUT"
