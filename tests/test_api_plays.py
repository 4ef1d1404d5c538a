"""POST /run, idempotency, the play and layer reads, history filters and pagination."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone

from plays.models import Play

from .factories import make_flow

ONE_STEP = [{"ref": "a", "appId": "var", "args": {"values": {"id": "{{ $prev.args.id }}"}}}]


def test_run_answers_201_with_play_id_and_run_state(api: Any, no_enqueue: list[str]) -> None:
    flow = make_flow(api, ONE_STEP)
    r = api.post(f"/api/flows/{flow['id']}/run", {"args": {"invoiceId": "INV-001"}}, format="json")
    assert r.status_code == 201
    body = r.json()
    assert body["state"] == "RUN" and body["playId"]
    play = api.get(f"/api/plays/{body['playId']}").json()
    assert play["args"] == {"invoiceId": "INV-001"}
    assert play["flowId"] == flow["id"] and play["flowVersion"] == 1
    assert set(play) >= {"id", "flowId", "flowVersion", "state", "args", "idempotencyKey", "createdAt", "startedAt",
                         "completedAt", "duration", "runAt", "retryOf", "error"}


def test_run_by_permanent_id_and_without_a_body(api: Any, no_enqueue: list[str]) -> None:
    make_flow(api, ONE_STEP, name="Nightly report")
    r = api.post("/api/flows/nightly-report/run")
    assert r.status_code == 201, r.content
    assert Play.objects.get(pk=r.json()["playId"]).args == {}


def test_repeated_key_returns_the_same_play(api: Any, drain: Any) -> None:
    flow = make_flow(api, ONE_STEP)
    body = {"args": {"orderId": "ORD-999"}, "idempotencyKey": "process-order-ORD-999"}
    first = api.post(f"/api/flows/{flow['id']}/run", body, format="json")
    assert first.status_code == 201
    again = api.post(f"/api/flows/{flow['id']}/run", body, format="json")
    assert again.status_code == 200 and again.json()["playId"] == first.json()["playId"]
    drain()
    done = api.post(f"/api/flows/{flow['id']}/run", body, format="json")
    assert done.status_code == 200 and done.json()["state"] == "DONE"
    assert Play.objects.count() == 1


def test_same_key_with_other_args_is_a_409(api: Any, no_enqueue: list[str]) -> None:
    flow = make_flow(api, ONE_STEP)
    api.post(f"/api/flows/{flow['id']}/run", {"args": {"a": 1}, "idempotencyKey": "k"}, format="json")
    r = api.post(f"/api/flows/{flow['id']}/run", {"args": {"a": 2}, "idempotencyKey": "k"}, format="json")
    assert r.status_code == 409 and r.json()["error"] == "IDEMPOTENCY_KEY_REUSED"


def test_a_key_whose_play_failed_is_free_again(api: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "p", "appId": "json-parse", "args": {"input": "{{ $prev.args.doc }}"}}])
    body = {"args": {"doc": "{"}, "idempotencyKey": "import-1"}
    first = api.post(f"/api/flows/{flow['id']}/run", body, format="json").json()
    drain()
    assert api.get(f"/api/plays/{first['playId']}").json()["state"] == "FAIL"
    second = api.post(f"/api/flows/{flow['id']}/run", body, format="json")
    assert second.status_code == 201 and second.json()["playId"] != first["playId"]
    assert api.get(f"/api/plays/{first['playId']}").json()["idempotencyKey"] == "import-1"


def test_keys_are_scoped_to_the_flow(api: Any, no_enqueue: list[str]) -> None:
    one, two = make_flow(api, ONE_STEP, name="one"), make_flow(api, ONE_STEP, name="two")
    a = api.post(f"/api/flows/{one['id']}/run", {"idempotencyKey": "k"}, format="json")
    b = api.post(f"/api/flows/{two['id']}/run", {"idempotencyKey": "k"}, format="json")
    assert a.status_code == b.status_code == 201


def test_disabled_flow_is_409(api: Any) -> None:
    flow = make_flow(api, ONE_STEP, enabled=False)
    r = api.post(f"/api/flows/{flow['id']}/run", {}, format="json")
    assert r.status_code == 409 and r.json()["error"] == "FLOW_DISABLED"


def test_bad_run_bodies_are_400(api: Any) -> None:
    flow = make_flow(api, ONE_STEP)
    url = f"/api/flows/{flow['id']}/run"
    for body in ({"args": [1, 2]}, {"args": "x"}, {"idempotencyKey": ""}, {"idempotencyKey": "x" * 256},
                 {"delayMs": -1}, {"runAt": "yesterday"}):
        r = api.post(url, body, format="json")
        assert r.status_code == 400, body
        assert r.json()["error"] == "VALIDATION_ERROR"
    assert api.post(url, "[1,2", content_type="application/json").status_code == 400


def test_oversized_args_are_413(api: Any, settings: Any) -> None:
    settings.FLOWPLAY = {**settings.FLOWPLAY, "MAX_ARGS_BYTES": 1000}
    flow = make_flow(api, ONE_STEP)
    r = api.post(f"/api/flows/{flow['id']}/run", {"args": {"blob": "x" * 2000}}, format="json")
    assert r.status_code == 413 and r.json()["error"] == "PAYLOAD_TOO_LARGE"


def test_other_companies_get_404_for_everything(api: Any, charlie_api: Any, no_enqueue: list[str]) -> None:
    flow = make_flow(api, ONE_STEP)
    play_id = api.post(f"/api/flows/{flow['id']}/run", {}, format="json").json()["playId"]
    for path in (f"/api/plays/{play_id}", f"/api/plays/{play_id}/layers", f"/api/plays/{play_id}/events",
                 f"/api/flows/{flow['id']}", f"/api/flows/{flow['id']}/plays", f"/api/flows/{flow['id']}/layers"):
        r = charlie_api.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"].endswith("NOT_FOUND")
    assert charlie_api.post(f"/api/flows/{flow['id']}/run", {}, format="json").status_code == 404
    assert charlie_api.post(f"/api/plays/{play_id}/cancel").status_code == 404
    assert charlie_api.get("/api/plays").json()["total"] == 0
    assert api.get("/api/plays/nope").json()["error"] == "PLAY_NOT_FOUND"


def test_teammates_share_plays(api: Any, bob_api: Any, no_enqueue: list[str]) -> None:
    flow = make_flow(api, ONE_STEP)
    play_id = api.post(f"/api/flows/{flow['id']}/run", {}, format="json").json()["playId"]
    assert bob_api.get(f"/api/plays/{play_id}").status_code == 200


def _seed_history(flow_id: str) -> None:
    play = Play.objects.filter(flow_id=flow_id).first()
    now = timezone.now()
    rows = []
    for i in range(30):
        state = ["DONE", "FAIL", "SKIP"][i % 3]
        rows.append(Play(company_id=play.company_id, flow_id=flow_id, flow_version_id=play.flow_version_id, state=state,
                         args={"i": i}, args_hash="x", created_at=now - timedelta(days=i), idempotency_key=f"key-{i}"))
    Play.objects.bulk_create(rows)


def test_history_filters_and_pagination(api: Any, drain: Any) -> None:
    flow = make_flow(api, ONE_STEP)
    api.post(f"/api/flows/{flow['id']}/run", {}, format="json")
    drain()
    _seed_history(flow["id"])
    url = f"/api/flows/{flow['id']}/plays"
    page = api.get(f"{url}?state=FAIL&size=4&page=0").json()
    assert page["total"] == 10 and page["pages"] == 3 and len(page["data"]) == 4
    assert all(p["state"] == "FAIL" for p in page["data"])
    created = [p["createdAt"] for p in page["data"]]
    assert created == sorted(created, reverse=True)
    assert api.get(f"{url}?state=FAIL,SKIP").json()["total"] == 20
    assert api.get(f"{url}?state=fail").json()["total"] == 10
    day = (timezone.now() - timedelta(days=5)).date().isoformat()
    assert api.get(f"{url}?from={day}&to={day}").json()["total"] == 1
    assert api.get(f"{url}?from={day}").json()["total"] == 7  # days 0..5 plus the real play
    assert api.get(f"{url}?idempotencyKey=key-7").json()["data"][0]["args"] == {"i": 7}
    assert api.get(f"/api/plays?flowId={flow['id']}&state=DONE").json()["total"] == 11
    assert api.get(f"/api/plays?flowId={flow['permanentId']}").json()["total"] == 31
    # No page overlaps another.
    ids = [p["id"] for n in range(4) for p in api.get(f"{url}?size=8&page={n}").json()["data"]]
    assert len(ids) == len(set(ids)) == 31


def test_history_rejects_bad_filters_with_400(api: Any, no_enqueue: list[str]) -> None:
    flow = make_flow(api, ONE_STEP)
    url = f"/api/flows/{flow['id']}/plays"
    for query in ("state=BOGUS", "state=DONE,NOPE", "size=101", "page=-1", "from=notadate", "to=2024-13-45", "size=abc"):
        r = api.get(f"{url}?{query}")
        assert r.status_code == 400, query
        assert r.json()["error"] == "VALIDATION_ERROR", query
        assert r.json()["details"], query


def test_layers_is_a_bare_array_in_execution_order(api: Any, drain: Any) -> None:
    flow = make_flow(api, [
        {"ref": "downloadPdf", "appId": "var", "args": {"values": {"statusCode": 200}}},
        {"ref": "extractText", "appId": "var", "args": {"values": {"text": "Invoice #INV-001"}}},
    ])
    play_id = api.post(f"/api/flows/{flow['id']}/run", {}, format="json").json()["playId"]
    drain()
    layers = api.get(f"/api/plays/{play_id}/layers").json()
    assert isinstance(layers, list)
    assert [x["ref"] for x in layers] == ["downloadPdf", "extractText"]
    assert layers[1]["out"]["text"] == "Invoice #INV-001"
    assert {"id", "ref", "state", "startedAt", "completedAt", "out"} <= set(layers[0])


def test_events_endpoint_replays_since_a_seq(api: Any, drain: Any) -> None:
    flow = make_flow(api, ONE_STEP)
    play_id = api.post(f"/api/flows/{flow['id']}/run", {}, format="json").json()["playId"]
    drain()
    events = api.get(f"/api/plays/{play_id}/events").json()
    assert [e["type"] for e in events] == ["play:started", "play:layer:started", "play:layer:completed", "play:completed"]
    later = api.get(f"/api/plays/{play_id}/events?since={events[1]['seq']}").json()
    assert later == events[2:]
    assert api.get(f"/api/plays/{play_id}/events?since=x").status_code == 400


def test_a_play_says_what_triggered_it_and_history_filters_by_it(api: Any, acme: Any, drain: Any) -> None:
    from flows.models import Flow

    flow = make_flow(api, ONE_STEP)
    by_api = api.post(f"/api/flows/{flow['id']}/run", {"args": {"id": 1}}, format="json").json()["playId"]
    fired, _ = Play.trigger(
        Flow.objects.get(pk=flow["id"]), {"id": 2}, source={"kind": "schedule", "scheduleId": "s1", "firedAt": "t"}
    )
    assert api.get(f"/api/plays/{by_api}").json()["trigger"] == {"kind": "api"}
    assert api.get(f"/api/plays/{fired.id}").json()["trigger"] == {"kind": "schedule", "scheduleId": "s1", "firedAt": "t"}
    listed = api.get(f"/api/flows/{flow['id']}/plays?trigger=schedule").json()
    assert [p["id"] for p in listed["data"]] == [fired.id]
    assert [p["id"] for p in api.get("/api/plays?trigger=api").json()["data"]] == [by_api]
    bad = api.get("/api/plays?trigger=fax")
    assert bad.status_code == 400 and bad.json()["error"] == "VALIDATION_ERROR"


def test_a_percent_sign_in_a_state_filter_is_a_400_not_a_500(api: Any) -> None:
    # Found by schemathesis: the value was formatted into the message, "%Y" broke DRF's "%".
    r = api.get("/api/plays", {"state": "%Y-%m-%d %H"})
    assert r.status_code == 400, r.content
    assert r.json()["error"] == "VALIDATION_ERROR" and "%Y-%M-%D %H" in str(r.json()["details"])
