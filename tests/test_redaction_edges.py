"""Redaction gaps found in issue 13, each reproduced: a URL's password in the worker log
(httpx's request line), an echoed ``Basic …`` header, ``Private-Token`` headers, passwords
inside JSON text, and run args ``{"password": …}`` masked on the page but not in the API or
the admin. One redaction (plays/redaction.py) serves them all.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.test import Client

from flows.modules import RunContext, get_module
from plays.models import Play
from plays.redaction import MASK, RedactingFilter, redact, secrets_of
from plays.runner import _call
from tenancy.models import User

from .conftest import PASSWORD as LOGIN_PASSWORD
from .factories import make_flow

SECRET = "PASS-9f8e7d6c5b"
TOKEN = "glpat-Zx81mQ2vT7pL0kR4"


class TextEcho(BaseHTTPRequestHandler):
    """Echoes the request as text (its header lines), plus JSON text naming a password."""

    def do_GET(self) -> None:  # noqa: N802
        lines = "".join(f"{k}: {v}\n" for k, v in self.headers.items())
        body = (lines + json.dumps({"user": "ann", "password": SECRET}) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def echo() -> Any:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), TextEcho)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


def ctx() -> RunContext:
    return RunContext(play_id="p", flow_id="f", company_id="c", ref="r", attempt=1, timeout=10)


@pytest.fixture
def log_text() -> Any:
    """What the console handler of settings.LOGGING would print (with its redacting filter)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    root, httpx_logger = logging.getLogger(), logging.getLogger("httpx")
    old_level = httpx_logger.level
    httpx_logger.setLevel(logging.INFO)
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)
    httpx_logger.setLevel(old_level)


def test_a_urls_password_is_masked_in_the_worker_log_and_the_output(db: Any, echo: int, log_text: io.StringIO) -> None:
    out = _call(get_module("curl"), {"url": f"http://ann:{SECRET}@127.0.0.1:{echo}/x"}, ctx())
    printed = log_text.getvalue()
    assert "HTTP Request: GET http://ann:" in printed  # the line is there, its password is not
    assert SECRET not in printed and f"ann:{MASK}@" in printed
    # httpx sent the URL's credentials as a Basic header, which the server echoed as text.
    echoed = base64.b64encode(f"ann:{SECRET}".encode()).decode()
    assert SECRET not in json.dumps(out) and echoed not in json.dumps(out)


def test_echoed_basic_and_private_token_headers_and_json_text_passwords_are_masked(db: Any, echo: int) -> None:
    basic = base64.b64encode(b"bob:hunter2-hunter2").decode()
    out = _call(
        get_module("curl"),
        {"url": f"http://127.0.0.1:{echo}/x", "headers": {"Private-Token": TOKEN, "X-Forward-Auth": f"Basic {basic}"}},
        ctx(),
    )
    body = out["body"]
    assert TOKEN not in body and basic not in body and SECRET not in body, body
    assert f"Private-Token: {MASK}" in body and f'"password": "{MASK}"' in body and f"Basic {MASK}" in body
    assert "User-Agent: flowplay" in body  # the rest stays readable


@pytest.mark.parametrize(
    "text",
    [
        f'{{"password": "{SECRET}"}}',
        f'{{\\"password\\": \\"{SECRET}\\"}}',
        f"Private-Token: {SECRET}",
        f"https://deploy:{SECRET}@git.example.com/repo.git",
        f"Authorization: Basic {base64.b64encode(('u:' + SECRET).encode()).decode()}",
        f"grant_type=password&password={SECRET}",
    ],
)
def test_credentials_in_text_are_masked_in_values_and_logs(text: str) -> None:
    assert SECRET not in json.dumps(redact({"note": text}))
    assert SECRET not in json.dumps(redact([text]))
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "got %s", (text,), None)
    RedactingFilter().filter(record)
    assert SECRET not in record.getMessage()
    assert "Basic" not in text or MASK in record.getMessage()


def test_ordinary_text_is_left_alone() -> None:
    for text in (
        "Basic information about the invoice",
        "the bearer of good news",
        "see https://example.com/a@b",
        '{"passwordHint": "the usual"}',
        "token budget: 10",
    ):
        assert redact({"note": text}) == {"note": text}


def test_secrets_of_a_url_with_credentials() -> None:
    found = secrets_of({"url": f"https://ann:{SECRET}@example.com/"})
    assert SECRET in found and base64.b64encode(f"ann:{SECRET}".encode()).decode() in found


def test_run_args_with_a_password_are_masked_in_the_api_the_page_and_the_admin(
    api: Any, alice: User, no_enqueue: list[str]
) -> None:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}}}])
    play_id = api.post(
        f"/api/flows/{flow['id']}/run", {"args": {"user": "ann", "password": SECRET}}, format="json"
    ).json()["playId"]
    detail = api.get(f"/api/plays/{play_id}")
    # Found: masked on the HTML page, in clear in the API and the admin.
    assert detail.json()["args"] == {"user": "ann", "password": MASK}
    assert SECRET not in api.get("/api/plays").content.decode()
    assert SECRET not in api.get(f"/api/flows/{flow['id']}/plays").content.decode()
    assert Play.objects.get(pk=play_id).args["password"] == SECRET  # stored as given: the steps need it
    alice.is_superuser = alice.is_staff = True
    alice.save()
    browser = Client()
    browser.force_login(alice)
    admin = browser.get(f"/admin/plays/play/{play_id}/change/").content.decode()
    assert SECRET not in admin and MASK in admin
    assert SECRET not in browser.get(f"/plays/{play_id}/").content.decode()
    assert LOGIN_PASSWORD not in admin
