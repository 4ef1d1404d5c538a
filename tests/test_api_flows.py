from __future__ import annotations

from typing import Any

from flows.models import Flow, FlowVersion

from .factories import make_flow

TWO_STEPS = [
    {"ref": "first", "appId": "var", "args": {"values": {"n": "{{ $prev.args.n }}"}}},
    {"ref": "second", "appId": "template", "args": {"template": "n={{ n }}", "data": {"n": "{{ $prev.first.n }}"}}},
]


def test_it_creates_a_flow_with_inline_layers(api: Any) -> None:
    flow = make_flow(api, TWO_STEPS, name="Invoice processing", category="Finance")
    assert flow["permanentId"] == "invoice-processing"
    assert flow["version"] == 1
    assert flow["enabled"] is True
    assert flow["execution"] == {"timeout": None, "maxConcurrency": None, "queue": "default"}
    assert [(layer["ref"], layer["index"], layer["appId"]) for layer in flow["layers"]] == [
        ("first", 0, "var"), ("second", 1, "template")]
    assert flow["createdAt"].endswith("Z")


def test_permanent_id_works_in_paths_and_is_unique_per_company(api: Any, charlie_api: Any) -> None:
    make_flow(api, TWO_STEPS, name="Same name")
    second = make_flow(api, TWO_STEPS, name="Same name")
    assert second["permanentId"] == "same-name-2"
    assert api.get("/api/flows/same-name").json()["permanentId"] == "same-name"
    # Another company may use the same slug, and cannot see alice's.
    assert make_flow(charlie_api, TWO_STEPS, name="Same name")["permanentId"] == "same-name"
    assert charlie_api.get(f"/api/flows/{second['id']}").status_code == 404


def test_every_change_bumps_the_version_and_keeps_old_snapshots(api: Any) -> None:
    flow = make_flow(api, TWO_STEPS)
    r = api.patch(f"/api/flows/{flow['id']}", {"category": "Ops"}, format="json")
    assert r.status_code == 200, r.content
    assert r.json()["version"] == 2
    r = api.post(f"/api/flows/{flow['id']}/layers", {"ref": "third", "appId": "var", "args": {"values": {}}}, format="json")
    assert r.status_code == 201, r.content
    assert r.json()["index"] == 2
    assert api.get(f"/api/flows/{flow['id']}").json()["version"] == 3
    versions = FlowVersion.objects.filter(flow_id=flow["id"]).order_by("version")
    assert [len(v.definition["layers"]) for v in versions] == [2, 2, 3]


def test_layers_subresource_inserts_moves_and_removes_keeping_indexes_dense(api: Any) -> None:
    flow = make_flow(api, TWO_STEPS)
    url = f"/api/flows/{flow['id']}/layers"
    r = api.post(url, {"ref": "zero", "appId": "var", "index": 0, "args": {"values": {"a": 1}}}, format="json")
    assert r.status_code == 201, r.content
    refs = [(x["ref"], x["index"]) for x in api.get(url).json()]
    assert refs == [("zero", 0), ("first", 1), ("second", 2)]
    second = next(x for x in api.get(url).json() if x["ref"] == "second")
    r = api.patch(f"{url}/{second['id']}", {"name": "Renamed"}, format="json")
    assert r.status_code == 200 and r.json()["name"] == "Renamed"
    zero = next(x for x in api.get(url).json() if x["ref"] == "zero")
    assert api.delete(f"{url}/{zero['id']}").status_code == 204
    assert [(x["ref"], x["index"]) for x in api.get(url).json()] == [("first", 0), ("second", 1)]
    assert api.get(f"{url}/nope").status_code == 404


def test_moving_a_step_before_the_one_it_reads_is_refused(api: Any) -> None:
    flow = make_flow(api, TWO_STEPS)
    url = f"/api/flows/{flow['id']}/layers"
    second = next(x for x in api.get(url).json() if x["ref"] == "second")
    r = api.patch(f"{url}/{second['id']}", {"index": 0}, format="json")
    assert r.status_code == 400
    assert "first" in str(r.json()["details"])


def test_validation_names_the_flowlet_and_argument(api: Any) -> None:
    layers = [
        {"ref": "a", "appId": "nope", "args": {}},
        {"ref": "b", "appId": "curl", "args": {"url": "http://x/{{ $prev.later.id }}"}},
        {"ref": "later", "appId": "var", "args": {"values": {"x": "{{ 1 + }}"}}},
        {"ref": "later", "appId": "var", "args": {"values": {}}},
        {"ref": "args", "appId": "var", "args": {"values": {}}},
        {"ref": "9bad", "appId": "var", "args": {"values": {}}},
    ]
    r = api.post("/api/flows", {"name": "Broken", "layers": layers}, format="json")
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "VALIDATION_ERROR" and body["statusCode"] == 400
    details = body["details"]
    assert any(k.startswith("layers[4].ref") for k in details)
    assert any(k.startswith("layers[5].ref") for k in details)
    # With the field errors fixed, the whole-flow checks speak.
    layers[4]["ref"], layers[5]["ref"] = "e", "f"
    details = api.post("/api/flows", {"name": "Broken", "layers": layers}, format="json").json()["details"]
    assert "unknown appId" in " ".join(details["layers[0].appId"])
    assert any("later" in m and "'b'" in m for m in details["layers[1].args"])
    assert any("'later'" in m for m in details["layers[2].args.values.x"])
    assert any("Duplicate ref" in m for m in details["layers[3].ref"])


def test_module_schema_errors_point_at_the_argument(api: Any) -> None:
    r = api.post("/api/flows", {"name": "x", "layers": [{"ref": "dl", "appId": "curl", "args": {"method": "GET"}}]}, format="json")
    assert r.status_code == 400
    assert any(key.startswith("layers[0].args") for key in r.json()["details"])
    # An expression is accepted where the schema wants another type.
    ok = api.post("/api/flows", {"name": "y", "layers": [
        {"ref": "dl", "appId": "curl", "args": {"url": "{{ $prev.args.url }}", "timeout": "{{ $prev.args.t }}"}}]}, format="json")
    assert ok.status_code == 201, ok.content


def test_flow_filters_are_validated(api: Any) -> None:
    r = api.post("/api/flows", {"name": "f", "filters": [{"leftValue": "{{ $prev.args.x }}", "operator": "bogus"}],
                                "layers": TWO_STEPS}, format="json")
    assert r.status_code == 400
    assert any(k.startswith("filters") for k in r.json()["details"])


def test_soft_delete_hides_the_flow_but_keeps_it(api: Any) -> None:
    flow = make_flow(api, TWO_STEPS)
    assert api.delete(f"/api/flows/{flow['id']}").status_code == 204
    assert api.get(f"/api/flows/{flow['id']}").status_code == 404
    assert api.get("/api/flows").json()["total"] == 0
    assert Flow.objects.filter(pk=flow["id"], deleted_at__isnull=False).exists()
    assert api.post(f"/api/flows/{flow['id']}/run", {}, format="json").status_code == 404
    # The slug is free again.
    assert make_flow(api, TWO_STEPS)["permanentId"] == flow["permanentId"]


def test_list_filters_and_pagination(api: Any) -> None:
    make_flow(api, TWO_STEPS, name="Invoices", category="Finance")
    make_flow(api, TWO_STEPS, name="Payroll", category="Finance", enabled=False)
    make_flow(api, TWO_STEPS, name="Backups", category="Ops")
    assert api.get("/api/flows?category=Finance").json()["total"] == 2
    assert api.get("/api/flows?enabled=false").json()["data"][0]["name"] == "Payroll"
    assert api.get("/api/flows?q=voice").json()["data"][0]["name"] == "Invoices"
    page = api.get("/api/flows?size=2&page=1").json()
    assert (page["total"], page["page"], page["size"], page["pages"], len(page["data"])) == (3, 1, 2, 2, 1)
    for bad in ("size=101", "size=0", "page=-1", "page=x"):
        r = api.get(f"/api/flows?{bad}")
        assert r.status_code == 400 and r.json()["error"] == "VALIDATION_ERROR", bad


def test_put_replaces_layers_and_keeps_ids_by_ref(api: Any) -> None:
    flow = make_flow(api, TWO_STEPS)
    first_id = flow["layers"][0]["id"]
    body = {"name": "Renamed", "layers": [TWO_STEPS[0], {"ref": "other", "appId": "var", "args": {"values": {}}}]}
    r = api.put(f"/api/flows/{flow['id']}", body, format="json")
    assert r.status_code == 200, r.content
    data = r.json()
    assert data["name"] == "Renamed" and data["version"] == 2
    assert [x["ref"] for x in data["layers"]] == ["first", "other"]
    assert data["layers"][0]["id"] == first_id


def test_malformed_json_is_a_400_not_a_500(api: Any) -> None:
    r = api.generic("POST", "/api/flows", "{not json", content_type="application/json")
    assert r.status_code == 400
    assert r.json()["error"] == "VALIDATION_ERROR"
    r = api.post("/api/flows", {"name": 5, "layers": "nope"}, format="json")
    assert r.status_code == 400


def test_unknown_api_path_is_a_json_404(api: Any) -> None:
    r = api.get("/api/nothing-here")
    assert r.status_code == 404
    assert r.json()["error"] == "NOT_FOUND"
