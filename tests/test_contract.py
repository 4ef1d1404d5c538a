"""The OpenAPI document says what the server does, and the server holds to it (issue 16).

Against the live server, with schemathesis and a generated client: tests/integration/test_contract.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from plays.models import Play
from tenancy.models import ApiKey, User

from .factories import make_flow
from .test_schema import SCHEMA

ONE_STEP = [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}]


def assert_400(response: Any, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == 400, response.content[:300]
    body = response.json()
    assert body["error"] == "VALIDATION_ERROR" and body["statusCode"] == 400, body
    if field is not None:
        assert field in body["details"], body
    return body


# --- History filters: out-of-range dates and %-signs are 400s, never 500s ------------------------


@pytest.mark.parametrize(
    "query, field",
    [
        ("to=9999-12-31", "to"),
        ("from=9999-12-31T23:59:59-23:59", "from"),
        ("from=0001-01-01T00:00:00%2B01:00", "from"),
        ("to=", "to"),
        ("state=%25", "state"),
        ("state=%25s", "state"),
        ("state=%25(x)s,DONE", "state"),
        ("state=,", "state"),
        ("trigger=%25s", "trigger"),
        ("from=%25s", "from"),
    ],
)
def test_history_filters_out_of_range_or_with_percent_signs_are_400(api: APIClient, query: str, field: str) -> None:
    flow = make_flow(api, ONE_STEP)
    for url in ("/api/plays", f"/api/flows/{flow['id']}/plays"):
        body = assert_400(api.get(f"{url}?{query}"), field)
        if query.startswith("state=%"):
            assert "%" in body["details"]["state"][0]  # the input is quoted, not interpreted


@pytest.mark.parametrize("query", ["to=9999-12-31", "from=9999-12-31T23:59:59-23:59", "state=%25"])
def test_history_pages_show_the_error_instead_of_a_500(api: APIClient, query: str) -> None:
    r = api.get(f"/plays/?{query}", follow=True)
    assert r.status_code == 200
    assert b"Traceback" not in r.content


def test_from_is_one_parameter_and_state_takes_repeated_values(api: APIClient, no_enqueue: list[str]) -> None:
    flow = make_flow(api, ONE_STEP)
    api.post(f"/api/flows/{flow['id']}/run", {}, format="json")
    assert api.get("/api/plays?from=2000-01-01&to=9999-12-30").json()["total"] == 1
    assert api.get("/api/plays?from=9999-12-30").json()["total"] == 0
    assert api.get("/api/plays?state=RUN&state=DONE").json()["total"] == 1
    assert api.get("/api/plays?state=RUN,DONE").json()["total"] == 1
    assert api.get("/api/plays?state=DONE").json()["total"] == 0
    params = {p["name"] for p in SCHEMA["paths"]["/api/plays"]["get"]["parameters"]}
    assert params == {"state", "from", "to", "idempotencyKey", "flowId", "trigger", "page", "size"}


def test_flow_list_enabled_takes_true_or_false_only(api: APIClient) -> None:
    make_flow(api, ONE_STEP)
    assert api.get("/api/flows?enabled=true").json()["total"] == 1
    assert api.get("/api/flows?enabled=false").json()["total"] == 0
    for value in ("null", "1", "unknown", "", "%25s", "%25(x)s"):
        assert_400(api.get(f"/api/flows?enabled={value}"), "enabled")


# --- Request bodies: JSON types as documented -------------------------------------------------------


@pytest.mark.parametrize(
    "body, field",
    [
        ({"delayMs": None}, "delayMs"),
        ({"args": None}, "args"),
        ({"args": [1]}, "args"),
        ({"args": "x"}, "args"),
        ({"delayMs": "5"}, "delayMs"),
        ({"start": "true"}, "start"),
        ({"idempotencyKey": 5}, "idempotencyKey"),
        ({"idempotencyKey": "a\u0000b"}, "idempotencyKey"),
        ({"runAt": "2030-01-01T00:00:00Z", "delayMs": 5}, "runAt"),
    ],
)
def test_run_refuses_what_the_schema_does_not_allow(
    api: APIClient, body: dict[str, Any], field: str, no_enqueue: list[str]
) -> None:
    flow = make_flow(api, ONE_STEP)
    assert_400(api.post(f"/api/flows/{flow['id']}/run", body, format="json"), field)
    assert Play.objects.count() == 0


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "x", "enabled": None}, "enabled"),
        ({"name": "x", "enabled": "yes"}, "enabled"),
        ({"name": 5}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x", "filters": None}, "filters"),
        ({"name": "x", "layers": [{"ref": "a", "appId": "var", "args": None}]}, "layers[0].args"),
        (
            {"name": "x", "layers": [{"ref": "a", "appId": "var", "args": {"values": {}}, "filters": None}]},
            "layers[0].filters",
        ),
        (
            {"name": "x", "layers": [{"ref": "a", "appId": "var", "args": {"values": {}}, "timeout": "5"}]},
            "layers[0].timeout",
        ),
        ({"name": "x", "layers": [{"ref": "1a", "appId": "var", "args": {"values": {}}}]}, "layers[0].ref"),
    ],
)
def test_flows_refuse_what_the_schema_does_not_allow(api: APIClient, body: dict[str, Any], field: str) -> None:
    assert_400(api.post("/api/flows", body, format="json"), field)


def test_api_key_scopes_are_strings(api: APIClient) -> None:
    assert_400(api.post("/api/auth/api-keys", {"name": "k", "scopes": [0]}, format="json"), "scopes")
    assert_400(api.post("/api/auth/api-keys", {"name": "k", "scopes": [None]}, format="json"), "scopes")
    assert api.post("/api/auth/api-keys", {"name": "k", "scopes": ["read"]}, format="json").status_code == 201


# --- PATCH changes only what it names ---------------------------------------------------------------


def test_patching_a_steps_args_keeps_its_approval_gate_and_the_rest(api: APIClient) -> None:
    flow = make_flow(
        api,
        [
            {
                "ref": "pay",
                "appId": "var",
                "args": {"values": {"n": 1}},
                "needsApproval": True,
                "onError": "continue",
                "name": "Pay",
                "timeout": 30,
                "filters": [{"leftValue": "{{ $prev.args.go }}", "operator": "eq", "rightValue": True}],
                "retry": {"count": 2, "delayMs": 10, "backoffMultiplier": 2, "jitter": False},
            }
        ],
    )
    step = flow["layers"][0]
    r = api.patch(f"/api/flows/{flow['id']}/layers/{step['id']}", {"args": {"values": {"n": 2}}}, format="json")
    assert r.status_code == 200, r.content
    after = api.get(f"/api/flows/{flow['id']}").json()["layers"][0]
    assert after == {**step, "args": {"values": {"n": 2}}}
    # PATCH of the flow itself leaves the steps and the other fields alone too.
    r = api.patch(f"/api/flows/{flow['id']}", {"category": "billing"}, format="json")
    assert r.status_code == 200 and r.json()["layers"][0] == after and r.json()["enabled"] is True


# --- The document ---------------------------------------------------------------------------------


def test_the_document_describes_statuses_nullability_and_types() -> None:
    paths, components = SCHEMA["paths"], SCHEMA["components"]["schemas"]
    run = paths["/api/flows/{flow_id}/run"]["post"]
    assert {"200", "201"} <= set(run["responses"])
    assert run["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RunRequest"}
    assert components["RunRequest"]["not"] == {"required": ["runAt", "delayMs"]}
    assert components["RunRequest"]["properties"]["args"]["type"] == "object"
    assert components["ApiKey"]["properties"]["lastUsedAt"]["nullable"] is True
    for name, component in components.items():
        if name.startswith("Patched"):
            assert all("default" not in prop for prop in component["properties"].values()), name
    login401 = paths["/api/auth/login"]["post"]["responses"]["401"]
    assert login401["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    for path, methods in paths.items():
        for method, operation in methods.items():
            for code, response in operation["responses"].items():
                if code.startswith("4"):
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }, (path, method, code)
    event = components["Payload"]["properties"]
    assert {
        "type",
        "seq",
        "cursor",
        "playId",
        "flowId",
        "timestamp",
        "ref",
        "state",
        "out",
        "error",
        "layerId",
        "attempt",
        "duration",
        "previousState",
        "iteration",
    } <= set(event)
    assert event["cursor"]["type"] == "string"
    assert components["PlayDetail"]["properties"]["pendingApproval"]["nullable"] is True
    decided = components["Approval"]["properties"]["decidedBy"]
    assert decided["nullable"] is True and decided["allOf"] == [{"$ref": "#/components/schemas/DecidedBy"}]
    assert components["Layer"]["properties"]["out"]["nullable"] is True
    assert components["Layer"]["properties"]["error"]["allOf"] == [{"$ref": "#/components/schemas/StepError"}]
    flowlet = components["FlowletRequest"]["properties"]
    assert flowlet["ref"]["pattern"] == "^[A-Za-z_][A-Za-z0-9_]*$"
    app_id = flowlet["appId"]
    app_id = components[app_id["allOf"][0]["$ref"].rsplit("/", 1)[-1]] if "allOf" in app_id else app_id
    assert "var" in app_id["enum"] and "curl" in app_id["enum"]
    assert flowlet["args"]["type"] == "object" and flowlet["filters"]["type"] == "array"
    events = {p["name"]: p["schema"] for p in paths["/api/plays/{play_id}/events"]["get"]["parameters"]}
    assert (events["limit"]["minimum"], events["limit"]["maximum"]) == (1, 10000)


def test_the_schema_without_credentials_is_the_json_error_body(anon: APIClient) -> None:
    r = anon.get("/api/schema")
    assert r.status_code == 401 and r["Content-Type"].startswith("application/json")
    assert r.json() == {"error": "UNAUTHORIZED", "message": r.json()["message"], "statusCode": 401}


def test_api_key_list_with_a_key_never_used(api: APIClient, alice: User) -> None:
    ApiKey.issue(alice, "never used")
    keys = api.get("/api/auth/api-keys").json()
    assert [k["lastUsedAt"] for k in keys if k["name"] == "never used"] == [None]


@pytest.mark.parametrize("path", ["/api/docs", "/api/redoc"])
def test_docs_pages_load_their_scripts_from_this_server(api: APIClient, path: str) -> None:
    html = api.get(path).content.decode()
    assert "/static/drf_spectacular_sidecar/" in html
    assert "cdn.jsdelivr.net" not in html and "unpkg" not in html


@pytest.mark.parametrize("path", ["/api/docs", "/api/redoc"])
def test_docs_pages_send_anonymous_visitors_to_the_login_page(anon: APIClient, path: str) -> None:
    r = anon.get(path)
    assert r.status_code == 302, r.content
    assert r["Location"] == f"/login/?next={path}", r["Location"]
