"""Hostile and broken input against the whole API.

- schemathesis generates requests for every operation of the OpenAPI schema (the one
  ``/api/schema`` serves) and sends them to the app in-process: no response is a 500, and
  every response matches what the schema documents (status, content type, body);
- oversized bodies are 413, deeply nested JSON, invalid UTF-8 and non-JSON content types
  are 400, all with the spec's error body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck, settings
from rest_framework.test import APIClient

from tenancy.models import ApiKey, User

from .factories import make_flow


def openapi() -> dict[str, Any]:
    """The schema exactly as GET /api/schema renders it."""
    generated = SchemaGenerator().get_schema(request=None, public=True)
    return json.loads(OpenApiJsonRenderer().render(generated, renderer_context={}))


SCHEMA = openapi()
schema = schemathesis.openapi.from_dict(SCHEMA)
schema.app = get_wsgi_application()

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


@pytest.fixture
def token(alice: User, api: APIClient) -> str:
    # A flow and a play to find, so that list endpoints return real rows to validate.
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}], name="Schema target")
    api.post(f"/api/flows/{flow['id']}/run", {"args": {"n": 1}}, format="json")
    _, secret = ApiKey.issue(alice, "schemathesis")
    return secret


@pytest.fixture(autouse=True)
def _no_broker(no_enqueue: list[str]) -> None:
    """Runs triggered by generated requests are captured instead of sent to a broker."""


@contextmanager
def request_signals_keep_the_test_transaction() -> Iterator[None]:
    """schemathesis calls the WSGI app directly: like Django's test client, keep the request
    signals from closing the test's database connection (it holds the test transaction)."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def test_the_schema_covers_every_api_route() -> None:
    paths = set(SCHEMA["paths"])
    for expected in ("/api/flows", "/api/flows/{flow_id}", "/api/flows/{flow_id}/run", "/api/flows/{flow_id}/layers",
                     "/api/flows/{flow_id}/layers/{layer_id}", "/api/flows/{flow_id}/plays", "/api/plays",
                     "/api/plays/{play_id}", "/api/plays/{play_id}/layers", "/api/plays/{play_id}/events",
                     "/api/plays/{play_id}/hold", "/api/plays/{play_id}/resume", "/api/plays/{play_id}/cancel",
                     "/api/plays/{play_id}/approve", "/api/plays/{play_id}/retry", "/api/auth/login",
                     "/api/auth/logout", "/api/auth/me", "/api/auth/api-keys", "/api/health"):
        assert expected in paths, expected
    assert SCHEMA["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "An API key from POST /api/auth/api-keys"}


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much, HealthCheck.data_too_large])
@pytest.mark.django_db
def test_every_operation_answers_as_documented_and_never_500(case: Any, token: str) -> None:
    if case.path == "/api/auth/logout":
        return  # logging out would end the session the other examples use; covered in test_access
    if case.path == "/api/ready":
        return  # 503 is its documented answer while a queue has no worker; covered in test_health
    with request_signals_keep_the_test_transaction():
        case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)


# --- Broken bodies ---------------------------------------------------------------------------


@pytest.fixture
def run_url(api: APIClient) -> str:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}])
    return f"/api/flows/{flow['id']}/run"


def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content[:300]
    body = response.json()
    assert body["error"] == code and body["statusCode"] == status and body["message"], body
    assert "Traceback" not in response.content.decode(errors="replace")
    return body


def test_args_over_the_limit_are_413(api: APIClient, run_url: str, settings: Any, no_enqueue: list[str]) -> None:
    settings.FLOWPLAY = {**settings.FLOWPLAY, "MAX_ARGS_BYTES": 1024 * 1024}
    big = {"args": {"blob": "x" * (1024 * 1024 + 1)}}
    error_of(api.post(run_url, big, format="json"), 413, "PAYLOAD_TOO_LARGE")
    just_under = {"args": {"blob": "x" * (1024 * 1024 - 100)}}
    assert api.post(run_url, just_under, format="json").status_code == 201


@pytest.mark.parametrize("path", ["run", "/api/flows", "/api/auth/login"])
def test_bodies_over_the_request_limit_are_413(api: APIClient, run_url: str, path: str, settings: Any) -> None:
    url = run_url if path == "run" else path
    body = b'{"name": "' + b"x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10) + b'"}'
    error_of(api.generic("POST", url, body, content_type="application/json"), 413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize("depth", [150, 5000, 100000])
def test_deeply_nested_json_is_400(api: APIClient, run_url: str, depth: int, no_enqueue: list[str]) -> None:
    nested = b'{"args": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
    body = error_of(api.generic("POST", run_url, nested, content_type="application/json"), 400, "VALIDATION_ERROR")
    assert "nested" in body["message"]
    flows = b'{"name": "deep", "layers": [{"ref": "a", "appId": "var", "args": ' + b'{"v": ' * depth + b"1" + b"}" * depth + b"}]}"
    error_of(api.generic("POST", "/api/flows", flows, content_type="application/json"), 400, "VALIDATION_ERROR")
    # Reasonable nesting is fine.
    ok = b'{"args": {"a": ' + b"[" * 50 + b"]" * 50 + b"}}"
    assert api.generic("POST", run_url, ok, content_type="application/json").status_code == 201


@pytest.mark.parametrize("raw", [b'{"args": {"a": "\xff\xfe"}}', b'{"name": "\xc3\x28"}', b"\x80\x81"])
def test_invalid_utf8_is_400(api: APIClient, run_url: str, raw: bytes) -> None:
    error_of(api.generic("POST", run_url, raw, content_type="application/json"), 400, "VALIDATION_ERROR")


@pytest.mark.parametrize("body", [b"{", b"[1, 2", b'{"args": NaN}', b"\x00", b'{"args": {"a": 1}} trailing'])
def test_malformed_json_is_400(api: APIClient, run_url: str, body: bytes) -> None:
    error_of(api.generic("POST", run_url, body, content_type="application/json"), 400, "VALIDATION_ERROR")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/xml", "application/octet-stream"])
def test_wrong_content_types_are_400(api: APIClient, run_url: str, content_type: str) -> None:
    for url in (run_url, "/api/flows"):
        body = error_of(api.generic("POST", url, b"args=1", content_type=content_type), 400, "VALIDATION_ERROR")
        assert "application/json" in body["message"]


@pytest.mark.parametrize("since", ["-1", str(2**63), "9" * 40, "abc"])
def test_websocket_since_out_of_range_is_refused_not_a_crash(transactional_db: Any, alice: User, since: str) -> None:
    from asgiref.sync import async_to_sync
    from channels.testing import WebsocketCommunicator

    from flowplay.asgi import application

    _, secret = ApiKey.issue(alice, "ws")

    async def attempt() -> tuple[bool, Any]:
        communicator = WebsocketCommunicator(application, f"/api/ws?token={secret}&since={since}")
        connected, code = await communicator.connect(timeout=5)
        if connected:
            code = (await communicator.receive_output(timeout=5)).get("code")
        await communicator.disconnect()
        return connected, code

    connected, code = async_to_sync(attempt)()
    assert code == 4400, (connected, code)
