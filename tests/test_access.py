"""Who may see and do what: every route refuses anonymous callers, companies are isolated,
credentials stop working at once, cookies and CSRF are set up safely, production settings
pass ``check --deploy``, outbound requests cannot reach metadata services, and every
operator action lands in the audit log.

Routes are enumerated from the URL resolver and the WebSocket router when the test runs,
so pages and admin views added later are covered without touching this file.

Public on purpose (the spec's section 3): ``POST /api/auth/login`` and ``GET /api/health``,
plus the admin's own login page (it is how staff sign in), ``GET /api/ready`` (health's
readiness twin, for load balancers) and ``/metrics``, which is guarded by its own token or
address allow-list instead of a login (tests/test_metrics.py). The OpenAPI schema and the docs
need a login like every other endpoint.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.cache import cache
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from flows import credentials, modules
from plays.models import Play
from tenancy.models import AuditEntry, User

from .conftest import PASSWORD, client_for
from .factories import make_flow

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = {"api-login", "health", "ready", "metrics", "admin:login", "pages:login"}
# Logging out needs no protection, and following it would end the session under test.
LOGOUT = {"api-logout", "admin:logout", "pages:logout"}
# Sample values for path parameters that do not name one of alice's objects.
SAMPLES = {"app_label": "flows", "model_name": "flow", "object_id": "1", "content_type_id": "1", "url": "x",
           "uidb64": "x", "token": "x", "path": "x"}


# --- Route enumeration ---------------------------------------------------------------------


def all_patterns(resolver: URLResolver | None = None, prefix: str = "", namespace: str = "") -> list[tuple[str, str, Any]]:
    """(route regex, name, callback) of every URL pattern, recursively."""
    resolver = resolver or get_resolver()
    found = []
    for entry in resolver.url_patterns:
        regex = prefix + _regex(entry)
        if isinstance(entry, URLResolver):
            ns = f"{namespace}{entry.namespace}:" if entry.namespace else namespace
            found += all_patterns(entry, regex, ns)
        elif isinstance(entry, URLPattern):
            found.append((regex, f"{namespace}{entry.name}" if entry.name else "", entry.callback))
    return found


def _regex(entry: Any) -> str:
    return entry.pattern.regex.pattern.lstrip("^").rstrip("$").replace(r"\Z", "")


def concrete(regex: str, values: dict[str, str]) -> str:
    """A path that matches ``regex``, with named groups filled from ``values``."""
    def group(match: re.Match[str]) -> str:
        name, body = match.group(1), match.group(2)
        if name in values:
            return values[name]
        if name in SAMPLES:
            return SAMPLES[name]
        alternatives = re.fullmatch(r"[\w|]+", body)
        return body.split("|")[0] if alternatives else "1"

    # Innermost groups first; one level of nesting is all Django's routes use.
    path = re.sub(r"\(\?P<(\w+)>((?:[^()]|\([^()]*\))*)\)", group, regex)
    path = re.sub(r"\(\?:[^)]*\)\??", "", path)
    return "/" + path.replace("\\", "")


def methods_of(callback: Any) -> list[str]:
    actions = getattr(callback, "actions", None)
    if actions:
        return sorted(m.upper() for m in actions if m not in ("options", "head"))
    cls = getattr(callback, "view_class", None) or getattr(callback, "cls", None)
    if cls is not None:
        return sorted(m.upper() for m in cls.http_method_names if m not in ("options", "head") and hasattr(cls, m))
    return ["GET", "POST"]


def ws_routes() -> list[str]:
    from plays.routing import websocket_urlpatterns

    return ["/" + _regex(p) for p in websocket_urlpatterns]


# --- Fixtures -----------------------------------------------------------------------------


@pytest.fixture
def world(api: APIClient, alice: User, bob: User, charlie: User, drain: Any) -> dict[str, str]:
    """alice's objects: a flow with a step, a play waiting for approval, an API key."""
    flow = make_flow(api, [
        {"ref": "a", "appId": "var", "args": {"values": {"x": 1}}},
        {"ref": "ok", "appId": "var", "args": {"values": {"y": 2}}, "needsApproval": True},
    ], name="Alice's flow")
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {"secret": "alice-only"}}, format="json").json()["playId"]
    drain()
    assert Play.objects.get(pk=play_id).state == "WAIT"
    key = api.post("/api/auth/api-keys", {"name": "alice's script"}, format="json").json()
    channel = api.post("/api/channels", {"name": "Alice's hooks"}, format="json").json()
    route = api.post(f"/api/channels/{channel['id']}/routes", {"path": "/x", "flowIds": [flow["id"]]},
                     format="json").json()
    credential = credentials.create(alice, "alices_token", "token", "alice-secret-token-value")
    schedule = api.post(f"/api/flows/{flow['id']}/schedules", {"intervalSeconds": 3600, "enabled": False},
                        format="json").json()
    return {"flow_id": flow["id"], "flow_key": flow["id"], "layer_id": flow["layers"][0]["id"], "play_id": play_id,
            "key_id": key["id"], "pk": flow["id"], "object_id": flow["id"], "credential_id": credential.pk,
            "channel_id": channel["id"], "channel_key": channel["id"], "route_id": route["id"],
            "schedule_id": schedule["id"]}


def test_the_route_enumeration_sees_the_api_admin_and_websocket() -> None:
    names = {name for _, name, _ in all_patterns()}
    assert {"api-login", "health", "schema", "flow-list", "play-detail", "admin:index"} <= names
    assert "/api/ws" in ws_routes()
    assert concrete(r"api/flows/(?P<flow_id>[^/]+)/layers/(?P<layer_id>[^/.]+)", {"flow_id": "F", "layer_id": "L"}) \
        == "/api/flows/F/layers/L"


def test_every_route_refuses_anonymous_callers(db: Any, world: dict[str, str]) -> None:
    anon = Client()
    checked = 0
    for regex, name, callback in all_patterns():
        if name in PUBLIC or name in LOGOUT:
            continue
        path = concrete(regex, world)
        for method in methods_of(callback):
            response = anon.generic(method, path, b"{}", content_type="application/json")
            checked += 1
            if path.startswith("/api/") and name not in ("docs", "redoc"):  # the docs are pages
                assert response.status_code in (401, 403), (method, path, response.status_code)
                if response["Content-Type"].startswith("application/json"):
                    assert response.json()["error"] in ("UNAUTHORIZED", "FORBIDDEN"), (method, path)
            else:
                # Pages and the admin send a browser to the login page (or refuse outright).
                assert response.status_code in (302, 401, 403, 404, 405), (method, path, response.status_code)
                hops = 0
                while response.status_code == 302 and "login" not in response["Location"] and hops < 3:
                    response, hops = anon.get(response["Location"]), hops + 1  # e.g. / → /flows/ → login
                if response.status_code == 302:
                    assert "login" in response["Location"], (method, path, response["Location"])
                else:
                    assert response.status_code in (401, 403, 404, 405), (method, path, response.status_code)
                assert b"Alice" not in response.content
    assert checked >= 20


def test_public_routes_are_only_login_and_health(db: Any) -> None:
    anon = Client()
    assert anon.get("/api/health").status_code in (200, 503)
    assert anon.post("/api/auth/login", {"email": "nobody@x.test", "password": "x"},
                     content_type="application/json").status_code == 401
    assert anon.get("/admin/login/").status_code == 200
    assert anon.get("/api/schema").status_code == 401
    for path in ("/api/docs", "/api/redoc"):  # pages for people: to the login page, nothing else
        response = anon.get(path)
        assert response.status_code == 302 and response["Location"] == f"/login/?next={path}", path


def test_every_websocket_route_refuses_anonymous_connections(transactional_db: Any) -> None:
    from channels.testing import WebsocketCommunicator

    from flowplay.asgi import application

    async def attempt(path: str) -> Any:
        # Accepted, then closed at once with the code (a close before the accept would be a
        # bare HTTP 403 under Daphne), and nothing sent before the close.
        communicator = WebsocketCommunicator(application, path)
        connected, _ = await communicator.connect(timeout=5)
        assert connected, path
        out = await communicator.receive_output(timeout=5)
        await communicator.disconnect()
        assert out["type"] == "websocket.close", (path, out)
        return out.get("code")

    for path in ws_routes():
        assert async_to_sync(attempt)(path) == 4401, path
        assert async_to_sync(attempt)(path + "?token=fp_00000000_not-a-real-token") == 4401, path


# --- Tenant isolation ---------------------------------------------------------------------


def test_charlie_gets_404_for_every_one_of_alices_objects_on_every_route(db: Any, world: dict[str, str], charlie: User) -> None:
    """Every route with an object in its path, every method: another company's object is 404."""
    outsider = client_for(charlie)
    checked = 0
    for regex, _name, callback in all_patterns():
        if not regex.startswith("api/") or "(?P<" not in regex:
            continue
        path = concrete(regex, world)
        for method in methods_of(callback):
            response = outsider.generic(method, path, "{}", content_type="application/json")
            assert response.status_code == 404, (method, path, response.status_code, response.content[:200])
            body = response.json()
            assert body["statusCode"] == 404 and body["error"].endswith("NOT_FOUND"), body
            checked += 1
    assert checked >= 15
    # Nothing was changed by those attempts.
    play = Play.objects.get(pk=world["play_id"])
    assert play.state == "WAIT"


def test_charlie_sees_none_of_alices_objects_in_lists(db: Any, world: dict[str, str], charlie: User) -> None:
    outsider = client_for(charlie)
    for path in ("/api/flows", "/api/plays", f"/api/plays?flowId={world['flow_id']}", "/api/auth/api-keys"):
        response = outsider.get(path)
        assert response.status_code == 200, path
        assert "alice" not in response.content.decode().lower(), path
        assert world["play_id"] not in response.content.decode() and world["flow_id"] not in response.content.decode()


def test_bob_shares_alices_company_and_sees_her_flows_and_plays(db: Any, world: dict[str, str], bob: User) -> None:
    colleague = client_for(bob)
    for regex, _name, callback in all_patterns():
        if not regex.startswith("api/") or "(?P<" not in regex or "GET" not in methods_of(callback):
            continue
        if "key_id" in regex:
            continue  # API keys are personal
        if "credential_id" in regex:
            continue  # a credential's details are for company admins (tests/test_credentials.py)
        path = concrete(regex, world)
        assert colleague.get(path).status_code == 200, path
    # API keys belong to one person, not to the company.
    assert colleague.delete(f"/api/auth/api-keys/{world['key_id']}").status_code == 404


def test_charlie_sees_no_event_of_alice_on_the_websocket(transactional_db: Any, api: APIClient, charlie: User,
                                                         drain: Any) -> None:
    from channels.testing import WebsocketCommunicator

    from flowplay.asgi import application
    from tenancy.models import ApiKey

    _, token = ApiKey.issue(charlie, "charlie's socket")
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}])
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {}}, format="json").json()["playId"]
    drain()

    async def listen(query: str) -> tuple[list[Any], Any]:
        communicator = WebsocketCommunicator(application, f"/api/ws?token={token}&since={'0' * 32}{query}")
        connected, _ = await communicator.connect(timeout=5)
        assert connected
        got = []
        while not await communicator.receive_nothing(timeout=1.5):
            out = await communicator.receive_output()
            if out["type"] == "websocket.close":
                return got, out.get("code")
            got.append(out)
        await communicator.disconnect()
        return got, None

    assert Play.objects.get(pk=play_id).events.count() >= 3
    # Naming alice's play or flow is refused (4403); the whole stream has nothing of hers.
    assert async_to_sync(listen)(f"&playId={play_id}") == ([], 4403)
    assert async_to_sync(listen)(f"&flowId={flow['id']}") == ([], 4403)
    assert async_to_sync(listen)("") == ([], None)


def test_pages_and_admin_refuse_another_company(db: Any, world: dict[str, str], charlie: User) -> None:
    """HTML pages (and admin views) that name one of alice's objects are 404 or refused for charlie."""
    browser = Client()
    browser.force_login(charlie)
    for regex, name, callback in all_patterns():
        if regex.startswith("api/"):
            continue
        path = concrete(regex, world)
        if name in LOGOUT:
            continue
        names_object = any(f"<{k}>" in regex for k in ("flow_id", "flow_key", "play_id", "layer_id", "pk", "object_id",
                                                          "channel_key"))
        for method in methods_of(callback):
            response = browser.generic(method, path)
            if regex.startswith("admin/"):
                # charlie is not staff: every admin view sends him to the admin login.
                if name not in ("admin:login", "admin:logout"):
                    assert response.status_code in (302, 403, 404, 405), (method, path, response.status_code)
                    if response.status_code == 302:
                        assert "/admin/login/" in response["Location"], (method, path)
                continue
            if names_object:
                # An action on alice's play or flow: refused, never carried out.
                assert response.status_code in (403, 404, 405), (method, path, response.status_code)
                if response.status_code == 302:
                    assert "login" in response["Location"], (method, path)
            assert b"alice-only" not in response.content and b"Alice&#x27;s flow" not in response.content, path
            assert b"Alice's flow" not in response.content, path
    assert Play.objects.get(pk=world["play_id"]).state == "WAIT"


# --- Credentials --------------------------------------------------------------------------


def test_a_revoked_api_key_stops_working_at_once(db: Any, api: APIClient) -> None:
    created = api.post("/api/auth/api-keys", {"name": "script"}, format="json").json()
    script = APIClient()
    script.credentials(HTTP_AUTHORIZATION=f"Bearer {created['token']}")
    assert script.get("/api/auth/me").status_code == 200
    assert api.delete(f"/api/auth/api-keys/{created['id']}").status_code == 204
    response = script.get("/api/auth/me")
    assert response.status_code == 401 and response.json()["error"] == "UNAUTHORIZED"
    assert script.post("/api/flows", {"name": "x"}, format="json").status_code == 401


def test_a_logged_out_session_stops_working_at_once(db: Any, alice: User) -> None:
    browser = Client(enforce_csrf_checks=True)
    assert browser.post("/api/auth/login", {"email": alice.email, "password": PASSWORD},
                        content_type="application/json").status_code == 200
    session = browser.cookies["sessionid"].value
    csrf = browser.cookies["csrftoken"].value
    assert browser.get("/api/auth/me").status_code == 200
    assert browser.post("/api/auth/logout", content_type="application/json", HTTP_X_CSRFTOKEN=csrf).status_code == 204
    assert browser.get("/api/auth/me").status_code in (401, 403)
    # The old cookie, replayed by someone who copied it, is dead too.
    replay = Client()
    replay.cookies["sessionid"] = session
    assert replay.get("/api/auth/me").status_code in (401, 403)


def test_login_is_throttled(db: Any, alice: User, settings: Any) -> None:
    cache.clear()
    try:
        anon = Client()
        statuses = [anon.post("/api/auth/login", {"email": alice.email, "password": "wrong"},
                              content_type="application/json").status_code for _ in range(30)]
        assert statuses[0] == 401
        assert 429 in statuses
        throttled = anon.post("/api/auth/login", {"email": alice.email, "password": PASSWORD},
                              content_type="application/json")
        assert throttled.status_code == 429
        assert throttled.json()["error"] == "TOO_MANY_REQUESTS" and "Retry-After" in throttled
    finally:
        cache.clear()


def test_session_cookies_are_httponly_and_samesite(db: Any, alice: User) -> None:
    response = Client().post("/api/auth/login", {"email": alice.email, "password": PASSWORD},
                             content_type="application/json")
    session = response.cookies["sessionid"]
    assert session["httponly"] and session["samesite"] == "Lax"
    assert response.cookies["csrftoken"]["samesite"] == "Lax"


def production_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_SETTINGS"))}
    env.update(FLOWPLAY_PRODUCTION="1", DEBUG="0", SECRET_KEY="x7!k" + "prod-secret-key-for-the-check-" * 3,
               ALLOWED_HOSTS="flowplay.example.com", **extra)
    return env


def test_production_cookies_are_secure(tmp_path: Path) -> None:
    code = ("import django; django.setup(); from django.conf import settings as s; "
            "print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SESSION_COOKIE_HTTPONLY, s.DEBUG)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=production_env(DJANGO_SETTINGS_MODULE="flowplay.settings", FLOWPLAY_VAR_DIR=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True", "False"]


def test_check_deploy_is_clean_with_production_settings(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], cwd=ROOT,
                         capture_output=True, text=True, timeout=180, env=production_env(FLOWPLAY_VAR_DIR=str(tmp_path)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no issues" in out.stdout


def test_csrf_is_enforced_for_cookie_requests_but_not_for_bearer(db: Any, alice: User) -> None:
    browser = Client(enforce_csrf_checks=True)
    assert browser.post("/api/auth/login", {"email": alice.email, "password": PASSWORD},
                        content_type="application/json").status_code == 200
    refused = browser.post("/api/flows", {"name": "no token"}, content_type="application/json")
    assert refused.status_code == 403 and refused.json()["error"] == "FORBIDDEN"
    assert "CSRF" in refused.json()["message"]
    accepted = browser.post("/api/flows", {"name": "with token"}, content_type="application/json",
                            HTTP_X_CSRFTOKEN=browser.cookies["csrftoken"].value)
    assert accepted.status_code == 201
    token = browser.post("/api/auth/api-keys", {"name": "k"}, content_type="application/json",
                         HTTP_X_CSRFTOKEN=browser.cookies["csrftoken"].value).json()["token"]
    script = Client(enforce_csrf_checks=True)
    assert script.post("/api/flows", {"name": "bearer"}, content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 201


# --- Outbound policy ----------------------------------------------------------------------


@pytest.mark.parametrize("address", ["169.254.169.254", "fd00:ec2::254", "100.100.100.200", "::ffff:169.254.169.254"])
def test_cloud_metadata_addresses_are_denied_by_default(address: str) -> None:
    assert modules.OutboundPolicy.from_settings().address_denied(address)


def test_dns_rebinding_is_caught_at_connect_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that resolved to a public address at save time and to the metadata service now."""
    real = socket.getaddrinfo
    connects: list[Any] = []

    def rebinding(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.example.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(modules.socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(modules.httpcore.SyncBackend, "connect_tcp", lambda *a, **k: connects.append(a))
    curl = modules.get_module("curl")
    assert not curl.check({"url": "http://rebind.example.test/latest/meta-data/"})
    ctx = modules.RunContext(play_id="p", flow_id="f", company_id="c", ref="r", attempt=1, timeout=5)
    with pytest.raises(modules.StepError) as info:
        curl.run({"url": "http://rebind.example.test/latest/meta-data/"}, ctx)
    assert info.value.code == "HOST_DENIED" and not connects


# --- Audit log ------------------------------------------------------------------------------


def test_operator_actions_are_audited(db: Any, api: APIClient, alice: User, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "gate", "appId": "var", "args": {"values": {}}, "needsApproval": True}])
    assert api.patch(f"/api/flows/{flow['id']}", {"category": "Ops"}, format="json").status_code == 200
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {}}, format="json").json()["playId"]
    drain()
    assert api.post(f"/api/plays/{play_id}/hold").status_code == 200
    assert api.post(f"/api/plays/{play_id}/resume").status_code == 200
    layer_id = api.get(f"/api/plays/{play_id}").json()["pendingApproval"]["layerId"]
    assert api.post(f"/api/plays/{play_id}/approve", {"layerId": layer_id, "decision": "declined"},
                    format="json").status_code == 200
    other = api.post(f"/api/flows/{flow['id']}/run", {"args": {"n": 2}}, format="json").json()["playId"]
    assert api.post(f"/api/plays/{other}/cancel").status_code == 200
    retried = api.post(f"/api/plays/{other}/retry").json()["playId"]
    assert api.delete(f"/api/flows/{flow['id']}").status_code == 204
    # A refused verb is not audited.
    assert api.post(f"/api/plays/{other}/hold").status_code == 409
    entries = list(AuditEntry.objects.order_by("id").values_list("action", "object_id", "actor_name"))
    assert [(a, o) for a, o, _ in entries] == [
        ("flow.created", flow["id"]), ("flow.changed", flow["id"]), ("play.triggered", play_id),
        ("play.held", play_id), ("play.resumed", play_id), ("play.declined", play_id),
        ("play.triggered", other), ("play.cancelled", other), ("play.retried", other), ("flow.deleted", flow["id"]),
    ]
    assert {actor for _, _, actor in entries} == {"alice"}
    assert AuditEntry.objects.get(action="play.retried").details == {"newPlayId": retried}
    assert AuditEntry.objects.filter(company_id=alice.company_id).count() == len(entries)


def test_the_audit_log_is_read_only_and_for_staff_in_the_admin(db: Any, api: APIClient, alice: User, bob: User) -> None:
    make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}}}], name="Audited")
    entry = AuditEntry.objects.get(action="flow.created")
    staff = Client()
    bob.is_staff = True
    bob.save()
    staff.force_login(bob)
    listing = staff.get("/admin/tenancy/auditentry/")
    assert listing.status_code == 200 and b"flow.created" in listing.content
    assert staff.get(f"/admin/tenancy/auditentry/{entry.pk}/change/").status_code == 200
    assert staff.get("/admin/tenancy/auditentry/add/").status_code == 403
    assert staff.post(f"/admin/tenancy/auditentry/{entry.pk}/delete/", {"post": "yes"}).status_code == 403
    assert AuditEntry.objects.filter(pk=entry.pk).exists()
    outsider = Client()
    outsider.force_login(alice)  # not staff
    assert outsider.get("/admin/tenancy/auditentry/").status_code == 302
