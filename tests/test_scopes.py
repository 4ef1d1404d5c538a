"""API key scopes and roles (tenancy/permissions.py), as found in issue 13: scopes were stored
and never enforced, a key could mint keys, a child key outlived its revoked parent, and
Operators could not edit flows in the admin but could through the API.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.test import Client
from rest_framework.test import APIClient

from flows.models import Flow
from plays.models import Play
from tenancy.models import ApiKey, User
from tenancy.permissions import ANY_SCOPE, SCOPES

from .conftest import PASSWORD, client_for
from .factories import make_flow
from .test_access import all_patterns

ONE_STEP = [{"ref": "a", "appId": "var", "args": {"values": {"n": 1}}}]

# Every API route with the scope it needs ({flow}, {layer}, {play}, {key} are filled in).
ROUTES = [
    ("GET", "/api/flows", "read"),
    ("POST", "/api/flows", "flows"),
    ("GET", "/api/flows/{flow}", "read"),
    ("PUT", "/api/flows/{flow}", "flows"),
    ("PATCH", "/api/flows/{flow}", "flows"),
    ("DELETE", "/api/flows/{flow}", "flows"),
    ("POST", "/api/flows/{flow}/run", "run"),
    ("GET", "/api/flows/{flow}/plays", "read"),
    ("GET", "/api/flows/{flow}/layers", "read"),
    ("POST", "/api/flows/{flow}/layers", "flows"),
    ("GET", "/api/flows/{flow}/layers/{layer}", "read"),
    ("PUT", "/api/flows/{flow}/layers/{layer}", "flows"),
    ("PATCH", "/api/flows/{flow}/layers/{layer}", "flows"),
    ("DELETE", "/api/flows/{flow}/layers/{layer}", "flows"),
    ("GET", "/api/plays", "read"),
    ("GET", "/api/plays/{play}", "read"),
    ("GET", "/api/plays/{play}/layers", "read"),
    ("GET", "/api/plays/{play}/events", "read"),
    ("GET", "/api/events", "read"),
    ("POST", "/api/plays/{play}/start", "operate"),
    ("POST", "/api/plays/{play}/hold", "operate"),
    ("POST", "/api/plays/{play}/resume", "operate"),
    ("POST", "/api/plays/{play}/cancel", "operate"),
    ("POST", "/api/plays/{play}/approve", "operate"),
    ("POST", "/api/plays/{play}/retry", "operate"),
    ("GET", "/api/auth/api-keys", "keys"),
    ("POST", "/api/auth/api-keys", "keys"),
    ("DELETE", "/api/auth/api-keys/{key}", "keys"),
    ("GET", "/api/schedules", "read"),
    ("GET", "/api/schedules/{schedule}", "read"),
    ("PATCH", "/api/schedules/{schedule}", "flows"),
    ("PUT", "/api/schedules/{schedule}", "flows"),
    ("DELETE", "/api/schedules/{schedule}", "flows"),
    ("POST", "/api/schedules/{schedule}/pause", "flows"),
    ("POST", "/api/schedules/{schedule}/resume", "flows"),
    ("POST", "/api/schedules/{schedule}/trigger", "run"),
    ("GET", "/api/flows/{flow}/schedules", "read"),
    ("POST", "/api/flows/{flow}/schedules", "flows"),
    ("GET", "/api/channels", "read"),
    ("POST", "/api/channels", "flows"),
    ("GET", "/api/channels/{channel}", "read"),
    ("PUT", "/api/channels/{channel}", "flows"),
    ("PATCH", "/api/channels/{channel}", "flows"),
    ("DELETE", "/api/channels/{channel}", "flows"),
    ("POST", "/api/channels/{channel}/rotate", "flows"),
    ("GET", "/api/channels/{channel}/requests", "read"),
    ("GET", "/api/channels/{channel}/routes", "read"),
    ("POST", "/api/channels/{channel}/routes", "flows"),
    ("GET", "/api/channels/{channel}/routes/{route}", "read"),
    ("PUT", "/api/channels/{channel}/routes/{route}", "flows"),
    ("PATCH", "/api/channels/{channel}/routes/{route}", "flows"),
    ("DELETE", "/api/channels/{channel}/routes/{route}", "flows"),
    ("GET", "/api/credentials", "*"),
    ("POST", "/api/credentials", "credentials"),
    ("GET", "/api/credentials/{credential}", "credentials"),
    ("PATCH", "/api/credentials/{credential}", "credentials"),
    ("DELETE", "/api/credentials/{credential}", "credentials"),
    ("GET", "/api/modules", "read"),
    ("GET", "/api/schema", "read"),
    ("GET", "/api/docs", "read"),
    ("GET", "/api/redoc", "read"),
]
# Any key may ask who it is and log out; login and health are public.
ANY_KEY = {"api-me", "api-logout", "api-login", "health", "ready"}


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


@pytest.fixture
def objects(api: APIClient, alice: User) -> dict[str, str]:
    from plays.management.commands.ensure_roles import ensure_company_admins

    alice.groups.add(ensure_company_admins())  # a member who also manages credentials
    flow = make_flow(api, ONE_STEP)
    play = Play.trigger(Flow.objects.get(pk=flow["id"]), {}, start=False)[0]
    other, _ = ApiKey.issue(alice, "victim")
    schedule = api.post(f"/api/flows/{flow['id']}/schedules", {"cron": "0 9 * * 1-5"}, format="json").json()
    credential = api.post(
        "/api/credentials", {"name": "stripe", "kind": "token", "value": "sk_live_abcdef123456"}, format="json"
    ).json()
    channel = api.post("/api/channels", {"name": "hooks"}, format="json").json()
    route = api.post(
        f"/api/channels/{channel['id']}/routes", {"path": "/x", "flowIds": [flow["id"]]}, format="json"
    ).json()
    return {
        "flow": flow["id"],
        "layer": flow["layers"][0]["id"],
        "play": play.id,
        "key": other.id,
        "schedule": schedule["id"],
        "credential": credential["id"],
        "channel": channel["id"],
        "route": route["id"],
    }


BODIES = {
    ("POST", "/api/flows"): {"name": "n", "layers": ONE_STEP},
    ("PUT", "/api/flows/{flow}"): {"name": "n", "layers": ONE_STEP},
    ("POST", "/api/flows/{flow}/layers"): {"ref": "b", "appId": "var", "args": {"values": {}}},
    ("PUT", "/api/flows/{flow}/layers/{layer}"): {"ref": "a", "appId": "var", "args": {"values": {}}},
    ("POST", "/api/auth/api-keys"): {"name": "n"},
    ("POST", "/api/flows/{flow}/schedules"): {"cron": "0 9 * * *"},
    ("PUT", "/api/schedules/{schedule}"): {"cron": "0 9 * * *"},
    ("POST", "/api/credentials"): {"name": "other", "kind": "token", "value": "sk_live_0987654321"},
}


def call(client: APIClient, method: str, path: str, objects: dict[str, str]) -> Any:
    body = BODIES.get((method, path), {})
    return client.generic(method, path.format(**objects), json.dumps(body), content_type="application/json")


def test_the_routes_table_covers_every_api_route() -> None:
    api_routes = [(regex, name) for regex, name, _ in all_patterns() if regex.startswith("api/")]
    assert len(api_routes) > 30
    for regex, name in api_routes:
        if name in ANY_KEY:
            continue
        pattern = re.compile(regex)
        assert any(
            pattern.fullmatch(
                path.format(
                    flow="f", layer="l", play="p", key="k", schedule="s", credential="c", channel="h", route="r"
                ).lstrip("/")
            )
            for _, path, _ in ROUTES
        ), f"{name} ({regex}) needs a row in ROUTES"


@pytest.mark.parametrize(("method", "path", "scope"), [route for route in ROUTES if route[2] != ANY_SCOPE])
def test_a_key_without_the_scope_is_refused(
    alice: User, objects: dict[str, str], method: str, path: str, scope: str
) -> None:
    # Found: scopes were stored and never enforced.
    _, token = ApiKey.issue(alice, "narrow", sorted(set(SCOPES) - {scope}))
    response = call(bearer(token), method, path, objects)
    assert response.status_code == 403, response.content
    if path not in ("/api/schema", "/api/docs", "/api/redoc"):  # those render their own formats
        assert response.json()["error"] == "FORBIDDEN" and f"'{scope}' scope" in response.json()["message"]


@pytest.mark.parametrize(("method", "path", "scope"), ROUTES)
def test_a_key_with_the_scope_passes(
    alice: User, objects: dict[str, str], method: str, path: str, scope: str, no_enqueue: list[str]
) -> None:
    _, token = ApiKey.issue(alice, "exact", [] if scope == ANY_SCOPE else [scope])
    response = call(bearer(token), method, path, objects)
    assert response.status_code not in (401, 403), response.content


def test_a_key_without_scopes_has_its_users_full_access(
    alice: User, objects: dict[str, str], no_enqueue: list[str]
) -> None:
    _, token = ApiKey.issue(alice, "legacy")
    client = bearer(token)
    for method, path, scope in ROUTES:
        if scope == "credentials":
            continue  # stricter by design (flows/credentials.py): only a key naming the scope manages them
        assert call(client, method, path, objects).status_code not in (401, 403), (method, path)


def test_any_key_may_ask_who_it_is(alice: User) -> None:
    _, token = ApiKey.issue(alice, "read only", ["read"])
    assert bearer(token).get("/api/auth/me").json()["email"] == alice.email


def test_unknown_scopes_are_refused(api: APIClient) -> None:
    response = api.post("/api/auth/api-keys", {"name": "x", "scopes": ["plays:run"]}, format="json")
    assert response.status_code == 400 and "scopes[0]" in response.json()["details"]


# --- Minting and revoking ----------------------------------------------------------------


def test_a_key_mints_only_keys_within_its_own_scopes(api: APIClient, alice: User) -> None:
    # Found: any key could mint keys (of any scope).
    _, reader = ApiKey.issue(alice, "reader", ["read"])
    refused = bearer(reader).post("/api/auth/api-keys", {"name": "escalate"}, format="json")
    assert refused.status_code == 403 and "'keys' scope" in refused.json()["message"]

    _, minter = ApiKey.issue(alice, "minter", ["keys", "read"])
    client = bearer(minter)
    beyond = client.post("/api/auth/api-keys", {"name": "more", "scopes": ["read", "run"]}, format="json")
    assert beyond.status_code == 403 and "run" in beyond.json()["message"]
    for asked in ({"name": "same"}, {"name": "same", "scopes": []}):  # none asked: the minter's own
        child = client.post("/api/auth/api-keys", asked, format="json")
        assert child.status_code == 201 and sorted(child.json()["scopes"]) == ["keys", "read"]
    narrower = client.post("/api/auth/api-keys", {"name": "narrow", "scopes": ["read"]}, format="json").json()
    assert narrower["scopes"] == ["read"]
    assert ApiKey.objects.get(pk=narrower["id"]).parent.name == "minter"
    assert bearer(narrower["token"]).post("/api/flows", {"name": "no"}, format="json").status_code == 403
    # A session or a key without scopes mints any key.
    assert api.post("/api/auth/api-keys", {"name": "ops", "scopes": ["operate"]}, format="json").status_code == 201


def test_revoking_a_key_revokes_every_key_it_minted(api: APIClient, alice: User) -> None:
    parent = api.post("/api/auth/api-keys", {"name": "parent"}, format="json").json()
    child = bearer(parent["token"]).post("/api/auth/api-keys", {"name": "child"}, format="json").json()
    grandchild = bearer(child["token"]).post("/api/auth/api-keys", {"name": "grandchild"}, format="json").json()
    sibling = api.post("/api/auth/api-keys", {"name": "sibling"}, format="json").json()
    assert bearer(grandchild["token"]).get("/api/auth/me").status_code == 200

    assert api.delete(f"/api/auth/api-keys/{parent['id']}").status_code == 204
    # Found: a child key outlived its revoked parent.
    for token in (parent["token"], child["token"], grandchild["token"]):
        assert bearer(token).get("/api/auth/me").status_code == 401
    assert bearer(sibling["token"]).get("/api/auth/me").status_code == 200


def test_the_admins_revoke_action_revokes_minted_keys_too(alice: User) -> None:
    parent, _ = ApiKey.issue(alice, "parent")
    child, child_token = ApiKey.issue(alice, "child", parent=parent)
    parent.revoke()
    assert ApiKey.lookup(child_token) is None
    with pytest.raises(Exception, match="revoked"):
        ApiKey.issue(alice, "late", parent=parent)


def test_a_scoped_key_manages_only_itself_and_the_keys_it_minted(alice: User) -> None:
    other, _ = ApiKey.issue(alice, "someone else's")
    manager, token = ApiKey.issue(alice, "manager", ["keys"])
    minted, _ = ApiKey.issue(alice, "minted", parent=manager)
    client = bearer(token)
    assert {k["name"] for k in client.get("/api/auth/api-keys").json()} == {"manager", "minted"}
    assert client.delete(f"/api/auth/api-keys/{other.id}").status_code == 404
    assert client.delete(f"/api/auth/api-keys/{minted.id}").status_code == 204


# --- The WebSocket ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_websocket_needs_the_read_scope(alice: User) -> None:
    from channels.testing import WebsocketCommunicator

    from flowplay.asgi import application

    _, writer = ApiKey.issue(alice, "writer", ["run"])
    _, reader = ApiKey.issue(alice, "reader", ["read"])

    async def connect(token: str) -> Any:
        # A refusal is accepted, then closed at once with its code (issue 16: a close before
        # the accept is a bare HTTP 403 under Daphne).
        comm = WebsocketCommunicator(application, f"/api/ws?token={token}")
        connected, code = await comm.connect()
        if connected:
            out = await comm.receive_nothing(timeout=0.5) or await comm.receive_output(timeout=5)
            if out is not True and out["type"] == "websocket.close":
                connected, code = False, out.get("code")
        await comm.disconnect()
        return connected, code

    assert asyncio.run(connect(writer)) == (False, 4403)
    assert asyncio.run(connect(reader))[0] is True
    # A user whose role may not view plays: refused as GET /api/plays would be.
    nina = User.objects.create_user("nina", "nina@acme.test", PASSWORD, company=alice.company)
    nina.groups.add(Group.objects.create(name="Nothing"))
    _, ninas = ApiKey.issue(nina, "hers")
    assert asyncio.run(connect(ninas)) == (False, 4403)


# --- Roles: the same through the API, the pages and the admin ----------------------------


@pytest.fixture
def operator(alice: User) -> User:
    call_command("ensure_roles", stdout=io.StringIO())
    olga = User.objects.create_user("olga", "olga@acme.test", PASSWORD, company=alice.company, is_staff=True)
    olga.groups.add(Group.objects.get(name="Operators"))
    return olga


def test_operators_edit_flows_neither_in_the_admin_nor_through_the_api(
    api: APIClient, operator: User, no_enqueue: list[str]
) -> None:
    flow = make_flow(api, ONE_STEP)
    admin = Client()
    admin.force_login(operator)
    assert admin.post(f"/admin/flows/flow/{flow['id']}/change/", {"name": "hacked"}).status_code == 403
    # Found: the same operator changed the flow through the API.
    ops = client_for(operator)
    for method, path, body in [
        ("PATCH", f"/api/flows/{flow['id']}", {"name": "hacked"}),
        ("PUT", f"/api/flows/{flow['id']}", {"name": "hacked", "layers": ONE_STEP}),
        ("DELETE", f"/api/flows/{flow['id']}", None),
        ("POST", "/api/flows", {"name": "new", "layers": ONE_STEP}),
        ("POST", f"/api/flows/{flow['id']}/layers", {"ref": "b", "appId": "var", "args": {"values": {}}}),
        ("DELETE", f"/api/flows/{flow['id']}/layers/{flow['layers'][0]['id']}", None),
        ("POST", f"/api/flows/{flow['id']}/run", {"args": {}}),
    ]:
        response = ops.generic(method, path, json.dumps(body) if body else "", content_type="application/json")
        assert response.status_code == 403, (method, path, response.content)
        assert response.json()["error"] == "FORBIDDEN"
    assert Flow.objects.get(pk=flow["id"]).name == "Test flow"
    # What they may do, they do in both places: read flows, operate plays.
    assert ops.get(f"/api/flows/{flow['id']}").status_code == 200
    play = api.post(f"/api/flows/{flow['id']}/run", {"args": {}, "start": False}, format="json").json()["playId"]
    assert ops.post(f"/api/plays/{play}/hold").status_code == 200
    assert admin.get("/admin/flows/flow/").status_code == 200


def test_a_role_without_operate_cannot_operate_anywhere(api: APIClient, alice: User, no_enqueue: list[str]) -> None:
    flow = make_flow(api, ONE_STEP)
    play = api.post(f"/api/flows/{flow['id']}/run", {"args": {}, "start": False}, format="json").json()["playId"]
    viewer = User.objects.create_user("vic", "vic@acme.test", PASSWORD, company=alice.company, is_staff=True)
    group = Group.objects.create(name="Viewers")
    from django.contrib.auth.models import Permission

    group.permissions.set(Permission.objects.filter(codename__in=["view_play", "view_flow"]))
    viewer.groups.add(group)
    assert client_for(viewer).get(f"/api/plays/{play}").status_code == 200
    assert client_for(viewer).post(f"/api/plays/{play}/cancel").status_code == 403
    page = Client()
    page.force_login(viewer)
    assert b"/cancel/" not in page.get(f"/plays/{play}/").content
    assert page.post(f"/plays/{play}/cancel/").status_code == 404
    admin = page.post("/admin/plays/play/", {"action": "cancel_plays", "_selected_action": [play]})
    assert admin.status_code in (200, 302, 403)
    assert Play.objects.get(pk=play).state == "NEW"


def test_a_member_without_a_role_has_the_same_rights_in_the_admin_as_in_the_api(api: APIClient, alice: User) -> None:
    flow = make_flow(api, ONE_STEP)
    alice.is_staff = True
    alice.save()
    admin = Client()
    admin.force_login(alice)
    assert admin.get(f"/admin/flows/flow/{flow['id']}/change/").status_code == 200
    assert alice.has_perm("flows.change_flow") and alice.has_perm("plays.operate_play")
    assert not alice.has_perm("tenancy.change_user") and not alice.has_perm("tenancy.change_company")


def test_the_pages_follow_the_role_too(api: APIClient, alice: User, no_enqueue: list[str]) -> None:
    flow = make_flow(api, ONE_STEP)
    play = api.post(f"/api/flows/{flow['id']}/run", {"args": {}, "start": False}, format="json").json()["playId"]
    nobody = User.objects.create_user("nina", "nina@acme.test", PASSWORD, company=alice.company)
    nobody.groups.add(Group.objects.create(name="Nothing"))
    page = Client()
    page.force_login(nobody)
    for path in ("/flows/", "/plays/", f"/plays/{play}/", f"/flows/{flow['id']}/plays/"):
        assert page.get(path).status_code == 403, path
    assert client_for(nobody).get("/api/plays").status_code == 403
    member = Client()
    member.force_login(alice)
    assert b"/cancel/" in member.get(f"/plays/{play}/").content
