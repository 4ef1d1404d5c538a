"""Credentials: encrypted at rest, used by name, never shown back, managed by company admins.

alice is a company admin (the "Company admins" group), bob a plain member of her company,
olga an Operator, charlie in another company. A local echo server answers every request with
the headers, path and body it received, so a credential a step sends comes straight back in
the step's out; a local token server plays an OAuth2 authorization server.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.db import connection, connections
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from flows import credentials, vault
from flows.expr import ExpressionError
from flows.models import KV, Credential
from flows.modules import base as module_base
from flows.modules import get_module
from flows.modules.base import Module, RunContext, StepError, _obj
from plays.management.commands.ensure_roles import ensure_company_admins, ensure_operators
from plays.models import Event, Layer, Play
from tenancy.models import ApiKey, AuditEntry, Company, User

from .conftest import PASSWORD, client_for
from .factories import make_flow, run
from .test_modules_more import _in_thread, concurrent_db  # noqa: F401 - a fixture

TOKEN = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"
PASSWORD_VALUE = "correct-horse-battery"


# --- Servers ------------------------------------------------------------------------------


class _Echo(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        payload = json.dumps({"headers": dict(self.headers.items()), "path": self.path, "body": body}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        # Echoed in a response header as well.
        self.send_header("X-Echo-Authorization", self.headers.get("Authorization", ""))
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


class _TokenServer(BaseHTTPRequestHandler):
    requests: list[dict[str, Any]]
    expires_in = 3600
    delay = 0.0

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = self.rfile.read(length).decode()
        server = self.server
        with server.lock:  # type: ignore[attr-defined]
            server.requests.append({"form": form, "authorization": self.headers.get("Authorization", "")})  # type: ignore[attr-defined]
            n = len(server.requests)  # type: ignore[attr-defined]
        time.sleep(server.delay)  # type: ignore[attr-defined]
        payload = json.dumps(
            {"access_token": f"access-token-number-{n:04d}", "token_type": "Bearer", "expires_in": server.expires_in}
        ).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


def _serve(handler: type) -> Iterator[Any]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []  # type: ignore[attr-defined]
    server.lock = threading.Lock()  # type: ignore[attr-defined]
    server.delay = 0.0  # type: ignore[attr-defined]
    server.expires_in = 3600  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def echo() -> Iterator[Any]:
    yield from _serve(_Echo)


@pytest.fixture
def token_server() -> Iterator[Any]:
    yield from _serve(_TokenServer)


# --- People -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _keys(settings: Any) -> None:
    settings.FLOWPLAY_SECRET_KEYS = [vault.generate_key()]


@pytest.fixture
def admin_alice(alice: User) -> User:
    alice.groups.add(ensure_company_admins())
    return User.objects.get(pk=alice.pk)  # no stale permission cache


@pytest.fixture
def admin_api(admin_alice: User) -> APIClient:
    return client_for(admin_alice)


@pytest.fixture
def olga(acme: Company) -> User:
    user = User.objects.create_user("olga", "olga@acme.test", PASSWORD, company=acme, is_staff=True)
    user.groups.add(ensure_operators())
    return user


def key_client(user: User, scopes: list[str]) -> APIClient:
    _, token = ApiKey.issue(user, "script", scopes)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def create(api: APIClient, name: str = "stripe", kind: str = "token", value: Any = TOKEN, **extra: Any) -> dict:
    r = api.post("/api/credentials", {"name": name, "kind": kind, "value": value, **extra}, format="json")
    assert r.status_code == 201, r.content
    return r.json()


# --- Encryption at rest ---------------------------------------------------------------------


def test_values_round_trip_and_survive_a_key_rotation(settings: Any, admin_alice: User, db: Any) -> None:
    old, new = settings.FLOWPLAY_SECRET_KEYS[0], vault.generate_key()
    credential = credentials.create(admin_alice, "stripe", "token", TOKEN)
    KV.objects.create(company=admin_alice.company, key="k", value=vault.seal({"pin": "kv-secret-1234"}))
    stored = Credential.objects.get(pk=credential.pk).secret
    assert TOKEN not in stored and credentials.secret_of(credential) == {"token": TOKEN}

    settings.FLOWPLAY_SECRET_KEYS = [new, old]  # the new key first, the old one still decrypts
    assert credentials.secret_of(Credential.objects.get(pk=credential.pk)) == {"token": TOKEN}
    call_command("rotate_secret_keys", stdout=open("/dev/null", "w"))
    assert Credential.objects.get(pk=credential.pk).secret != stored

    settings.FLOWPLAY_SECRET_KEYS = [new]  # the old key is gone: everything was re-encrypted
    assert credentials.secret_of(Credential.objects.get(pk=credential.pk)) == {"token": TOKEN}
    assert KV.objects.get(key="k").plain_value == {"pin": "kv-secret-1234"}

    settings.FLOWPLAY_SECRET_KEYS = [old]  # and the old key alone no longer opens anything
    with pytest.raises(credentials.CredentialError):
        credentials.secret_of(Credential.objects.get(pk=credential.pk))
    with pytest.raises(vault.SecretKeyError):
        KV.objects.get(key="k").plain_value  # noqa: B018


def test_rotation_command_refuses_when_the_old_key_is_already_gone(settings: Any, admin_alice: User) -> None:
    credentials.create(admin_alice, "stripe", "token", TOKEN)
    settings.FLOWPLAY_SECRET_KEYS = [vault.generate_key()]
    with pytest.raises(Exception, match="keep the old keys"):
        call_command("rotate_secret_keys")


def test_the_embedded_default_generates_its_key_once_into_the_var_folder(settings: Any, tmp_path: Path) -> None:
    settings.FLOWPLAY_SECRET_KEYS = []
    settings.VAR_DIR = tmp_path
    token = vault.encrypt({"a": 1})
    path = tmp_path / vault.KEY_FILE
    assert path.exists() and path.stat().st_mode & 0o777 == 0o600
    assert vault.decrypt(token) == {"a": 1} and len(vault.key_list()) == 1
    settings.PRODUCTION = True  # production needs FLOWPLAY_SECRET_KEYS
    with pytest.raises(vault.SecretKeyError):
        vault.key_list()


def test_kv_values_are_stored_encrypted_and_read_plain(api: APIClient, drain: Any) -> None:
    flow = make_flow(
        api,
        [
            {"ref": "put", "appId": "kv-set", "args": {"key": "pin", "value": {"code": "kv-plaintext-4711"}}},
            {"ref": "count", "appId": "kv-set", "args": {"key": "n", "increment": 2}},
            {"ref": "more", "appId": "kv-append", "args": {"key": "list", "value": "x"}},
            {"ref": "get", "appId": "kv-get", "args": {"key": "pin"}},
        ],
    )
    play_id = run(api, flow, drain)
    assert Layer.objects.get(play_id=play_id, ref="get").out == {"value": {"code": "kv-plaintext-4711"}, "found": True}
    raw = KV.objects.get(key="pin").value
    assert vault.is_sealed(raw) and "kv-plaintext-4711" not in json.dumps(raw)
    assert KV.objects.get(key="n").plain_value == 2 and KV.objects.get(key="list").plain_value == ["x"]


def _dump(tmp_path: Path) -> bytes:
    """The whole database as bytes: a copy of SQLite's file, or pg_dump of PostgreSQL's."""
    if connection.vendor == "sqlite":
        copy = tmp_path / "copy.sqlite3"
        with connection.cursor() as cursor:
            cursor.execute("VACUUM INTO %s", [str(copy)])
        return copy.read_bytes()
    assert shutil.which("pg_dump"), "pg_dump is needed for this test on PostgreSQL"
    settings_dict = connection.settings_dict
    out = subprocess.run(
        [
            "pg_dump",
            "-h",
            settings_dict["HOST"] or "127.0.0.1",
            "-p",
            str(settings_dict["PORT"] or 5432),
            "-U",
            settings_dict["USER"] or "postgres",
            "--no-owner",
            settings_dict["NAME"],
        ],
        capture_output=True,
        check=True,
        env={"PGPASSWORD": settings_dict["PASSWORD"] or "", "PATH": "/usr/bin:/bin"},
    )
    return out.stdout


def test_a_database_dump_holds_no_plaintext(transactional_db: Any, tmp_path: Path, echo: Any, drain: Any) -> None:
    acme = Company.objects.create(name="Acme", slug="acme")
    alice = User.objects.create_user("alice", "alice@acme.test", PASSWORD, company=acme)
    alice.groups.add(ensure_company_admins())
    api = client_for(User.objects.get(pk=alice.pk))
    create(api)
    create(api, "site", "basic", {"username": "robot", "password": PASSWORD_VALUE})
    flow = make_flow(
        api,
        [
            {"ref": "call", "appId": "curl", "args": {"url": f"{echo.url}/pay", "auth": "stripe"}},
            {"ref": "basic", "appId": "curl", "args": {"url": f"{echo.url}/b", "auth": "site"}},
        ],
    )
    play_id = run(api, flow, drain)
    assert Play.objects.get(pk=play_id).state == "DONE"
    # A KV value written by kv-set (the value in a flow's args or a step's out is not the KV store's).
    get_module("kv-set").run({"key": "note", "value": "kv-plaintext-4711"}, RunContext(company_id=acme.pk))
    dump = _dump(tmp_path)
    assert b"stripe" in dump and Credential.objects.get(name="stripe").fingerprint.encode() in dump  # it is a dump
    for plaintext in (TOKEN, PASSWORD_VALUE, vault.basic_token("robot", PASSWORD_VALUE), "kv-plaintext-4711"):
        assert plaintext.encode() not in dump, plaintext


# --- Use in flows, and masking ------------------------------------------------------------------


def test_a_bearer_credential_reaches_the_server_and_comes_back_masked_everywhere(
    admin_api: APIClient, admin_alice: User, echo: Any, drain: Any
) -> None:
    create(admin_api)
    flow = make_flow(
        admin_api,
        [
            {"ref": "byName", "appId": "curl", "args": {"url": f"{echo.url}/pay", "auth": "stripe"}},
            {
                "ref": "byExpression",
                "appId": "curl",
                "args": {
                    "url": echo.url + "/q?key={{ $credentials.stripe.token }}",
                    "headers": {"X-Custom": "Token {{ $credentials.stripe.token }}"},
                    "body": {"nested": "{{ $credentials.stripe.token }}"},
                    "method": "POST",
                },
            },
        ],
    )
    play_id = run(admin_api, flow, drain)
    play = Play.objects.get(pk=play_id)
    assert play.state == "DONE", play.error
    by_name = Layer.objects.get(play_id=play_id, ref="byName").out
    # The server got the real header; the stored out shows it masked.
    assert by_name["body"]["headers"]["Authorization"] == "[REDACTED]"
    assert by_name["headers"]["x-echo-authorization"] == "Bearer [REDACTED]"
    by_expression = Layer.objects.get(play_id=play_id, ref="byExpression").out
    assert by_expression["body"]["path"] == "/q?key=[REDACTED]"
    assert by_expression["body"]["headers"]["X-Custom"] == "Token [REDACTED]"
    assert by_expression["statusCode"] == 200

    everything = [
        admin_api.get(f"/api/plays/{play_id}/layers").content,
        admin_api.get(f"/api/plays/{play_id}/events").content,
        admin_api.get(f"/api/plays/{play_id}").content,
        admin_api.get("/api/credentials").content,
        admin_api.get("/api/credentials/stripe").content,
        json.dumps(list(Event.objects.filter(play_id=play_id).values("payload"))).encode(),
    ]
    page = Client()
    page.force_login(admin_alice)
    everything += [page.get(f"/plays/{play_id}/").content, page.get("/credentials/").content]
    root = User.objects.create_superuser("root", "root@acme.test", PASSWORD, company=admin_alice.company)
    admin = Client()
    admin.force_login(root)
    credential = Credential.objects.get(name="stripe")
    for url in (
        f"/admin/plays/play/{play_id}/change/",
        "/admin/flows/credential/",
        f"/admin/flows/credential/{credential.pk}/change/",
    ):
        response = admin.get(url)
        assert response.status_code == 200, url
        everything.append(response.content)
    for blob in everything:
        assert TOKEN.encode() not in blob
    assert b"[REDACTED]" in everything[0] and b"[REDACTED]" in everything[1]


def test_basic_and_header_credentials_are_masked_by_value(admin_api: APIClient, echo: Any, drain: Any) -> None:
    create(admin_api, "site", "basic", {"username": "robot", "password": PASSWORD_VALUE})
    create(admin_api, "apikey", "header", {"header": "X-Api-Key", "value": "hdr-secret-value-99"})
    flow = make_flow(
        admin_api,
        [
            {"ref": "basic", "appId": "curl", "args": {"url": f"{echo.url}/b", "auth": "site"}},
            {"ref": "header", "appId": "curl", "args": {"url": f"{echo.url}/h", "auth": "apikey"}},
            # A header name that says nothing about credentials, and a password in a JSON body.
            {
                "ref": "fields",
                "appId": "curl",
                "args": {
                    "url": f"{echo.url}/f",
                    "method": "POST",
                    "headers": {"X-Whatever": "{{ $credentials.site.password }}"},
                    "body": {"user": "{{ $credentials.site.username }}", "pw": "{{ $credentials.site.password }}"},
                },
            },
        ],
    )
    play_id = run(admin_api, flow, drain)
    outs = {layer.ref: layer.out for layer in Layer.objects.filter(play_id=play_id)}
    assert outs["basic"]["body"]["headers"]["Authorization"] == "[REDACTED]"
    assert outs["header"]["body"]["headers"]["X-Api-Key"] == "[REDACTED]"
    assert outs["fields"]["body"]["headers"]["X-Whatever"] == "[REDACTED]"
    assert "robot" in outs["fields"]["body"]["body"]  # the username is not a secret
    text = json.dumps(outs)
    for secret in (PASSWORD_VALUE, "hdr-secret-value-99", vault.basic_token("robot", PASSWORD_VALUE)):
        assert secret not in text


class _Leaky(Module):
    """A test module that takes credentials and leaks them: in its out, or in its error."""

    app_id = "test-leaky"
    summary = "test only"
    uses_credentials = True
    args_schema = _obj({"value": {"type": "string"}, "fail": {"type": "boolean"}})
    out_schema = _obj({})

    def execute(self, args: dict, ctx: RunContext) -> Any:
        if args.get("fail"):
            raise StepError(f"the server refused {args['value']}", "HTTP_ERROR", retryable=True)
        return {"echo": args["value"], "upper": args["value"].upper()[::-1][::-1].lower()}


@pytest.fixture
def leaky() -> Iterator[None]:
    module_base.REGISTRY["test-leaky"] = _Leaky()
    yield
    del module_base.REGISTRY["test-leaky"]


def test_errors_retries_and_retry_copies_are_masked(admin_api: APIClient, leaky: None, drain: Any) -> None:
    create(admin_api)
    flow = make_flow(
        admin_api,
        [
            {"ref": "ok", "appId": "test-leaky", "args": {"value": "{{ $credentials.stripe.token }}"}},
            {
                "ref": "bad",
                "appId": "test-leaky",
                "args": {"value": "{{ $credentials.stripe.token }}", "fail": True},
                "retry": {"count": 2, "delayMs": 0},
            },
        ],
    )
    play_id = run(admin_api, flow, drain)
    play = Play.objects.get(pk=play_id)
    assert play.state == "FAIL"
    bad = Layer.objects.get(play_id=play_id, ref="bad")
    assert bad.attempts == 3 and bad.error["message"] == "the server refused [REDACTED]"
    assert Layer.objects.get(play_id=play_id, ref="ok").out["echo"] == "[REDACTED]"
    retry = admin_api.post(f"/api/plays/{play_id}/retry")
    assert retry.status_code == 201
    drain()
    for pid in (play_id, retry.json()["playId"]):
        for blob in (
            admin_api.get(f"/api/plays/{pid}/layers").content,
            admin_api.get(f"/api/plays/{pid}/events").content,
            admin_api.get(f"/api/plays/{pid}").content,
        ):
            assert TOKEN.encode() not in blob
    assert Layer.objects.get(play_id=retry.json()["playId"], ref="ok").reused_from_id is not None


def test_an_expression_error_does_not_quote_the_credential(admin_api: APIClient, echo: Any, drain: Any) -> None:
    create(admin_api)
    flow = make_flow(
        admin_api,
        [
            {
                "ref": "call",
                "appId": "curl",
                "args": {"url": f"{echo.url}/", "timeout": "{{ $credentials.stripe.token }}"},
            },
        ],
    )
    play_id = run(admin_api, flow, drain)
    layer = Layer.objects.get(play_id=play_id, ref="call")
    assert layer.state == "FAIL" and TOKEN not in json.dumps(layer.error)


def test_revealed_values_are_masked_in_log_lines(admin_alice: User) -> None:
    credential = credentials.create(admin_alice, "stripe", "token", TOKEN)
    credentials.secret_of(credential)
    record = logging.LogRecord("httpx", logging.INFO, __file__, 1, "HTTP Request: GET http://x/?key=%s", (TOKEN,), None)
    assert (
        vault.SecretLogFilter().filter(record) and record.getMessage() == "HTTP Request: GET http://x/?key=[REDACTED]"
    )


def test_the_logging_configuration_wires_the_secret_filter() -> None:
    from django.conf import settings

    assert "secrets" in settings.LOGGING["handlers"]["console"]["filters"]


def test_each_use_is_counted_with_the_play(admin_api: APIClient, echo: Any, drain: Any) -> None:
    create(admin_api)
    flow = make_flow(admin_api, [{"ref": "call", "appId": "curl", "args": {"url": echo.url, "auth": "stripe"}}])
    first = run(admin_api, flow, drain)
    second = run(admin_api, flow, drain)
    detail = admin_api.get("/api/credentials/stripe").json()
    assert detail["useCount"] == 2 and detail["lastUsedPlayId"] == second and first != second
    assert detail["lastUsedAt"] is not None


def test_a_rotated_value_is_used_by_the_next_play(admin_api: APIClient, echo: Any, drain: Any) -> None:
    before = create(admin_api)
    flow = make_flow(admin_api, [{"ref": "call", "appId": "curl", "args": {"url": echo.url, "auth": "stripe"}}])
    r = admin_api.patch("/api/credentials/stripe", {"value": "sk_live_rotated_value_0001"}, format="json")
    assert r.status_code == 200 and r.json()["fingerprint"] != before["fingerprint"] and r.json()["last4"] == "0001"
    seen: list[str] = []
    original = credentials.resolve_auth

    def spy(*args: Any) -> dict:
        material = original(*args)
        seen.append(material["token"])
        return material

    credentials.resolve_auth = spy  # type: ignore[assignment]
    try:
        run(admin_api, flow, drain)
    finally:
        credentials.resolve_auth = original  # type: ignore[assignment]
    assert seen == ["sk_live_rotated_value_0001"]


# --- Save-time validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, path, words",
    [
        (
            {
                "ref": "call",
                "appId": "curl",
                "args": {"url": "http://x", "headers": {"Authorization": "Bearer {{ $credentials.nope.token }}"}},
            },
            "layers[0].args.headers.Authorization",
            "unknown credential 'nope'",
        ),
        (
            {"ref": "call", "appId": "curl", "args": {"url": "http://x", "auth": "nope"}},
            "layers[0].args.auth",
            "unknown credential 'nope'",
        ),
        (
            {"ref": "v", "appId": "var", "args": {"values": {"t": "{{ $credentials.stripe.token }}"}}},
            "layers[0].args.values.t",
            "cannot be used in 'var'",
        ),
        (
            {
                "ref": "t",
                "appId": "template",
                "args": {"template": "x", "data": {"t": "{{ $credentials.stripe.token }}"}},
            },
            "layers[0].args.data.t",
            "cannot be used in 'template'",
        ),
        (
            {"ref": "k", "appId": "kv-set", "args": {"key": "k", "value": "{{ $credentials.stripe.token }}"}},
            "layers[0].args.value",
            "cannot be used in 'kv-set'",
        ),
        (
            {
                "ref": "call",
                "appId": "curl",
                "args": {"url": "http://x"},
                "filters": [{"leftValue": "{{ $credentials.stripe.token }}", "operator": "eq", "rightValue": "x"}],
            },
            "layers[0].filters[0].leftValue",
            "cannot be used in filters",
        ),
        (
            {
                "ref": "call",
                "appId": "curl",
                "args": {"url": "http://x", "bearerToken": "{{ $credentials.stripe.token | upper }}"},
            },
            "layers[0].args.bearerToken",
            "can only be used whole",
        ),
        (
            {"ref": "call", "appId": "curl", "args": {"url": "http://x", "bearerToken": "{{ $credentials.stripe }}"}},
            "layers[0].args.bearerToken",
            "can only be used whole",
        ),
    ],
)
def test_saving_a_flow_names_bad_credential_use(admin_api: APIClient, layer: dict, path: str, words: str) -> None:
    create(admin_api)
    r = admin_api.post("/api/flows", {"name": "f", "layers": [layer]}, format="json")
    assert r.status_code == 400, r.content
    body = r.json()
    assert body["error"] == "VALIDATION_ERROR" and path in body["details"], body
    assert any(words in message for message in body["details"][path]), body["details"][path]


def test_a_known_credential_saves(admin_api: APIClient) -> None:
    create(admin_api)
    make_flow(
        admin_api,
        [
            {
                "ref": "call",
                "appId": "curl",
                "args": {"url": "http://x", "auth": "stripe", "headers": {"X-T": "{{ $credentials.stripe.token }}"}},
            }
        ],
    )


def test_a_missing_field_or_a_deleted_credential_fails_the_step_clearly(
    admin_api: APIClient, echo: Any, drain: Any
) -> None:
    create(admin_api)
    flow = make_flow(
        admin_api,
        [
            {
                "ref": "call",
                "appId": "curl",
                "args": {"url": echo.url, "headers": {"X-T": "{{ $credentials.stripe.password }}"}},
            }
        ],
    )
    play_id = run(admin_api, flow, drain)
    assert "has no field 'password'" in Layer.objects.get(play_id=play_id).error["message"]
    flow = make_flow(
        admin_api, [{"ref": "call", "appId": "curl", "args": {"url": echo.url, "auth": "stripe"}}], name="second"
    )
    assert admin_api.delete("/api/credentials/stripe").status_code == 204
    play_id = run(admin_api, flow, drain)
    error = Layer.objects.get(play_id=play_id).error
    assert error["code"] == "CREDENTIAL_NOT_FOUND" and "stripe" in error["message"]


# --- OAuth2 client credentials -----------------------------------------------------------------


def _oauth(api: APIClient, server: Any, **extra: Any) -> dict:
    return create(
        api,
        "partner",
        "oauth2-client",
        {
            "tokenUrl": f"{server.url}/token",
            "clientId": "flowplay-client",
            "clientSecret": "client-secret-xyz-123",
            "scopes": ["read", "write"],
            **extra,
        },
    )


def test_oauth2_token_is_fetched_cached_and_refreshed_before_expiry(
    admin_api: APIClient, token_server: Any, echo: Any, drain: Any
) -> None:
    _oauth(admin_api, token_server)
    flow = make_flow(admin_api, [{"ref": "call", "appId": "curl", "args": {"url": echo.url, "auth": "partner"}}])
    first = run(admin_api, flow, drain)
    assert len(token_server.requests) == 1
    request = token_server.requests[0]
    assert "grant_type=client_credentials" in request["form"] and "scope=read+write" in request["form"]
    assert request["authorization"] == "Basic " + vault.basic_token("flowplay-client", "client-secret-xyz-123")
    out = Layer.objects.get(play_id=first).out
    assert out["body"]["headers"]["Authorization"] == "[REDACTED]" and "access-token-number" not in json.dumps(out)

    run(admin_api, flow, drain)
    assert len(token_server.requests) == 1  # cached

    credential = Credential.objects.get(name="partner")
    cached = vault.decrypt(credential.access_token)
    assert cached["token"] == "access-token-number-0001"
    assert credential.access_token_expires_at - timezone.now() > timedelta(seconds=3500)
    # Refreshed a margin before it expires, not at expiry.
    refresh_at = timezone.datetime.fromisoformat(cached["refreshAt"])
    assert credential.access_token_expires_at - refresh_at == timedelta(seconds=credentials.REFRESH_MARGIN_SECONDS)
    # Once the refresh time has passed, the next use fetches a new token.
    Credential.objects.filter(pk=credential.pk).update(
        access_token=vault.encrypt({**cached, "refreshAt": (timezone.now() - timedelta(seconds=1)).isoformat()})
    )
    run(admin_api, flow, drain)
    assert len(token_server.requests) == 2
    assert vault.decrypt(Credential.objects.get(pk=credential.pk).access_token)["token"] == "access-token-number-0002"
    # A rotation forgets the cached token.
    admin_api.patch(
        "/api/credentials/partner",
        {
            "value": {
                "tokenUrl": f"{token_server.url}/token",
                "clientId": "flowplay-client",
                "clientSecret": "another-secret-456",
                "clientAuth": "body",
            }
        },
        format="json",
    )
    assert Credential.objects.get(pk=credential.pk).access_token == ""
    run(admin_api, flow, drain)
    assert len(token_server.requests) == 3 and "client_secret=another-secret-456" in token_server.requests[2]["form"]


def test_a_short_lived_token_is_refreshed_at_half_its_lifetime(admin_alice: User, token_server: Any) -> None:
    token_server.expires_in = 10
    credential = credentials.create(
        admin_alice,
        "partner",
        "oauth2-client",
        {"tokenUrl": f"{token_server.url}/token", "clientId": "c", "clientSecret": "client-secret-xyz-123"},
    )
    credentials.access_token(credential)
    credential.refresh_from_db()
    refresh_at = timezone.datetime.fromisoformat(vault.decrypt(credential.access_token)["refreshAt"])
    assert credential.access_token_expires_at - refresh_at == timedelta(seconds=5)


def test_a_token_endpoint_error_fails_the_step_without_the_secret(admin_api: APIClient, echo: Any, drain: Any) -> None:
    create(
        admin_api,
        "partner",
        "oauth2-client",
        {"tokenUrl": f"{echo.url}/not-a-token-endpoint", "clientId": "c", "clientSecret": "client-secret-xyz-123"},
    )
    flow = make_flow(admin_api, [{"ref": "call", "appId": "curl", "args": {"url": echo.url, "auth": "partner"}}])
    play_id = run(admin_api, flow, drain)
    layer = Layer.objects.get(play_id=play_id)
    assert layer.state == "FAIL" and layer.error["code"] == "CREDENTIAL_ERROR"
    assert "client-secret-xyz-123" not in json.dumps(layer.error)


def test_one_refresh_for_20_concurrent_plays(
    concurrent_db: Any,  # noqa: F811 - the fixture imported above
    no_enqueue: list[str],
    token_server: Any,
    echo: Any,
) -> None:
    from plays import runner

    token_server.delay = 0.3  # long enough for the others to queue behind the refresher

    def setup() -> list[str]:
        acme = Company.objects.create(name="Acme", slug="acme")
        alice = User.objects.create_user("alice", "alice@acme.test", "pw", company=acme)
        alice.groups.add(ensure_company_admins())
        api = client_for(User.objects.get(pk=alice.pk))
        _oauth(api, token_server)
        flow = make_flow(api, [{"ref": "call", "appId": "curl", "args": {"url": echo.url, "auth": "partner"}}])
        return [
            api.post(f"/api/flows/{flow['id']}/run", {"args": {}}, format="json").json()["playId"] for _ in range(20)
        ]

    play_ids = _in_thread(setup)
    barrier = threading.Barrier(20)
    errors: list[BaseException] = []

    def play(play_id: str) -> None:
        try:
            barrier.wait()
            runner.run(play_id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=play, args=(pid,)) for pid in play_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []

    def results() -> tuple[set[str], int]:
        states = set(Play.objects.filter(pk__in=play_ids).values_list("state", flat=True))
        return states, Credential.objects.get(name="partner").use_count

    states, uses = _in_thread(results)
    assert states == {"DONE"}
    assert len(token_server.requests) == 1
    assert uses == 20


# --- The API and who may use it ---------------------------------------------------------------


def test_the_api_never_returns_a_value(admin_api: APIClient) -> None:
    created = create(admin_api, description="Stripe live key")
    assert set(created) == {
        "id",
        "name",
        "kind",
        "description",
        "public",
        "fingerprint",
        "last4",
        "createdBy",
        "createdAt",
        "rotatedAt",
        "lastUsedAt",
        "lastUsedPlayId",
        "useCount",
        "accessTokenExpiresAt",
    }
    assert created["last4"] == TOKEN[-4:] and len(created["fingerprint"]) == 16 and created["createdBy"] == "Alice"
    short = create(admin_api, "short", value="abcd1234")
    assert short["last4"] == ""  # too short to show any of it
    basic = create(admin_api, "site", "basic", {"username": "robot", "password": PASSWORD_VALUE})
    assert basic["public"] == {"username": "robot"}
    for body in (admin_api.get("/api/credentials").content, admin_api.get(f"/api/credentials/{created['id']}").content):
        assert TOKEN.encode() not in body and PASSWORD_VALUE.encode() not in body
    actions = list(AuditEntry.objects.filter(object_type="credential").values_list("action", flat=True))
    assert actions.count("credential.created") == 3
    assert TOKEN not in json.dumps(list(AuditEntry.objects.values("details")))


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "x", "kind": "password", "value": "abcdefgh"}, "kind"),
        ({"name": "bad-name", "kind": "token", "value": "abcdefgh"}, "name"),
        ({"name": "x", "kind": "token", "value": "ab"}, "value"),
        ({"name": "x", "kind": "token"}, "value"),
        ({"name": "x", "kind": "basic", "value": {"username": "u"}}, "value.password"),
        ({"name": "x", "kind": "basic", "value": "abcdefgh"}, "value"),
        ({"name": "x", "kind": "header", "value": {"header": "Bad Header", "value": "abcdefgh"}}, "value.header"),
        (
            {
                "name": "x",
                "kind": "oauth2-client",
                "value": {"tokenUrl": "ftp://x", "clientId": "c", "clientSecret": "abcdefgh"},
            },
            "value.tokenUrl",
        ),
        ({"name": "x", "kind": "token", "value": "abcdefgh", "description": 7}, "description"),
    ],
)
def test_bad_input_is_a_validation_error(admin_api: APIClient, body: dict, field: str) -> None:
    r = admin_api.post("/api/credentials", body, format="json")
    assert r.status_code == 400 and r.json()["error"] == "VALIDATION_ERROR" and field in r.json()["details"], r.json()
    assert r.json()["statusCode"] == 400


def test_duplicate_names_renames_and_unknown_ids(admin_api: APIClient) -> None:
    create(admin_api)
    r = admin_api.post("/api/credentials", {"name": "stripe", "kind": "token", "value": "abcdefgh"}, format="json")
    assert r.status_code == 400 and "name" in r.json()["details"]
    r = admin_api.patch("/api/credentials/stripe", {"name": "other"}, format="json")
    assert r.status_code == 400 and r.json()["details"] == {"name": ["cannot be changed"]}
    assert admin_api.get("/api/credentials/nope").json()["error"] == "CREDENTIAL_NOT_FOUND"
    r = admin_api.post("/api/credentials", b"not json", content_type="application/json")
    assert r.status_code == 400 and r.json()["error"] == "VALIDATION_ERROR"


def test_changes_are_in_the_audit_log(admin_api: APIClient) -> None:
    created = create(admin_api)
    admin_api.patch("/api/credentials/stripe", {"value": "sk_live_next_value_0002"}, format="json")
    admin_api.patch("/api/credentials/stripe", {"description": "new words"}, format="json")
    admin_api.delete("/api/credentials/stripe")
    entries = AuditEntry.objects.filter(object_type="credential", object_id=created["id"]).order_by("id")
    assert [e.action for e in entries] == [
        "credential.created",
        "credential.rotated",
        "credential.changed",
        "credential.deleted",
    ]
    assert {e.actor_name for e in entries} == {"alice"}


@pytest.fixture
def people(admin_alice: User, bob: User, olga: User, charlie: User) -> dict[str, APIClient]:
    return {
        "admin": client_for(admin_alice),
        "member": client_for(bob),
        "operator": client_for(olga),
        "other company": client_for(charlie),
        "admin key with scope": key_client(admin_alice, ["credentials"]),
        "admin key without scope": key_client(admin_alice, ["plays:run"]),
        "admin key with no scopes": key_client(admin_alice, []),
        "member key with scope": key_client(bob, ["credentials"]),
    }


MANAGERS = {"admin", "admin key with scope"}


def test_permission_matrix(people: dict[str, APIClient]) -> None:
    create(people["admin"])
    for who, client in people.items():
        manager = who in MANAGERS
        listing = client.get("/api/credentials")
        assert listing.status_code == 200, who
        rows = listing.json()
        if who == "other company":
            assert rows == [], who
            assert client.get("/api/credentials/stripe").status_code == 404
            continue
        assert "stripe" in [r["name"] for r in rows], who
        assert all((set(row) == {"id", "name", "kind"}) != manager for row in rows), who
        detail = client.get("/api/credentials/stripe")
        assert detail.status_code == (200 if manager else 403), who
        if not manager:
            assert detail.json()["error"] == "FORBIDDEN"
        made = client.post(
            "/api/credentials", {"name": f"n{abs(hash(who))}", "kind": "token", "value": "abcdefgh"}, format="json"
        )
        assert made.status_code == (201 if manager else 403), who
        rotated = client.patch("/api/credentials/stripe", {"value": f"rotated-by-{len(who)}"}, format="json")
        assert rotated.status_code == (200 if manager else 403), who
    assert people["member key with scope"].delete("/api/credentials/stripe").status_code == 403
    assert people["admin key with scope"].delete("/api/credentials/stripe").status_code == 204


def test_members_can_still_use_credentials_in_their_flows(people: dict[str, APIClient]) -> None:
    create(people["admin"])
    make_flow(people["member"], [{"ref": "call", "appId": "curl", "args": {"url": "http://x", "auth": "stripe"}}])


# --- Page and admin --------------------------------------------------------------------------


def test_the_page_shows_names_to_members_and_lets_admins_manage(admin_alice: User, bob: User) -> None:
    admin = Client()
    admin.force_login(admin_alice)
    r = admin.post(
        "/credentials/change/",
        {"action": "create", "name": "stripe", "kind": "token", "secret": TOKEN, "description": "live"},
        follow=True,
    )
    assert r.status_code == 200 and b"Created credential stripe" in r.content
    credential = Credential.objects.get(name="stripe")
    assert credential.fingerprint.encode() in r.content and TOKEN.encode() not in r.content
    r = admin.post(
        "/credentials/change/",
        {"action": "rotate", "id": credential.pk, "secret": "sk_rotated_from_page_77"},
        follow=True,
    )
    assert b"Rotated credential stripe" in r.content and b"sk_rotated_from_page_77" not in r.content
    assert credentials.secret_of(Credential.objects.get(pk=credential.pk)) == {"token": "sk_rotated_from_page_77"}

    member = Client()
    member.force_login(bob)
    page = member.get("/credentials/")
    assert page.status_code == 200 and b"stripe" in page.content
    assert credential.fingerprint.encode() not in page.content and b"Rotate" not in page.content
    r = member.post("/credentials/change/", {"action": "delete", "id": credential.pk}, follow=True)
    assert b"Only company admins" in r.content and Credential.objects.filter(pk=credential.pk).exists()
    r = admin.post("/credentials/change/", {"action": "delete", "id": credential.pk}, follow=True)
    assert not Credential.objects.filter(pk=credential.pk).exists()


def test_the_admin_creates_and_rotates_write_only(acme: Company, olga: User) -> None:
    staff_admin = User.objects.create_user("ada", "ada@acme.test", PASSWORD, company=acme, is_staff=True)
    staff_admin.groups.add(ensure_company_admins())
    client = Client()
    client.force_login(staff_admin)
    r = client.post(
        "/admin/flows/credential/add/", {"name": "stripe", "kind": "token", "description": "", "value": TOKEN}
    )
    assert r.status_code == 302, r.content.decode()[:3000]
    credential = Credential.objects.get(name="stripe")
    assert credentials.secret_of(credential) == {"token": TOKEN} and credential.created_by == staff_admin
    page = client.get(f"/admin/flows/credential/{credential.pk}/change/")
    assert page.status_code == 200 and TOKEN.encode() not in page.content
    r = client.post(
        f"/admin/flows/credential/{credential.pk}/change/",
        {
            "kind": "basic",
            "description": "now basic",
            "value": json.dumps({"username": "u", "password": PASSWORD_VALUE}),
        },
    )
    assert r.status_code == 302, r.content.decode()[:3000]
    credential.refresh_from_db()
    assert credential.kind == "basic" and credential.public == {"username": "u"}
    assert list(AuditEntry.objects.filter(object_id=credential.pk).values_list("action", flat=True).order_by("id")) == [
        "credential.created",
        "credential.rotated",
    ]
    operator = Client()
    operator.force_login(olga)
    assert operator.get("/admin/flows/credential/").status_code == 403
    assert Group.objects.filter(name="Company admins").exists()


def test_expression_values_are_read_lazily(admin_alice: User) -> None:
    credentials.create(admin_alice, "stripe", "token", TOKEN)
    view = credentials.CredentialsView(admin_alice.company_id, "play-1")
    with pytest.raises(ExpressionError, match="Unknown credential 'nope'"):
        view["nope"]  # noqa: B018
    assert Credential.objects.get(name="stripe").use_count == 0
    assert view["stripe"]["token"] == TOKEN
    assert Credential.objects.get(name="stripe").use_count == 1


def test_the_page_creates_and_rotates_an_oauth2_client_keeping_its_settings(admin_alice: User) -> None:
    page = Client()
    page.force_login(admin_alice)
    page.post(
        "/credentials/change/",
        {
            "action": "create",
            "name": "partner",
            "kind": "oauth2-client",
            "secret": "client-secret-xyz-123",
            "token_url": "https://auth.example/token",
            "client_id": "cid",
            "scopes": "read write",
            "client_auth": "body",
        },
    )
    credential = Credential.objects.get(name="partner")
    assert credential.public == {
        "tokenUrl": "https://auth.example/token",
        "clientId": "cid",
        "scopes": ["read", "write"],
        "clientAuth": "body",
    }
    page.post("/credentials/change/", {"action": "rotate", "id": credential.pk, "secret": "client-secret-new-456"})
    credential.refresh_from_db()
    assert credential.public["clientAuth"] == "body" and credential.rotated_at is not None
    assert credentials.secret_of(credential)["clientSecret"] == "client-secret-new-456"


class _Redirect(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.server.target)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_credential_header_does_not_follow_a_redirect_to_another_origin(
    admin_api: APIClient, echo: Any, drain: Any
) -> None:
    create(admin_api, "apikey", "header", {"header": "X-Api-Key", "value": "hdr-secret-value-99"})
    servers = _serve(_Redirect)
    redirect = next(servers)
    redirect.target = f"{echo.url}/elsewhere"
    try:
        flow = make_flow(
            admin_api, [{"ref": "call", "appId": "curl", "args": {"url": f"{redirect.url}/go", "auth": "apikey"}}]
        )
        play_id = run(admin_api, flow, drain)
    finally:
        next(servers, None)
    out = Layer.objects.get(play_id=play_id).out
    assert out["statusCode"] == 200 and out["body"]["path"] == "/elsewhere"
    assert "X-Api-Key" not in out["body"]["headers"]
