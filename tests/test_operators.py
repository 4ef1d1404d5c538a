"""The play state machine through the API: every verb from every state, legal and illegal.

Illegal transitions answer 409 with ``{"error": "INVALID_STATE", "message": ..., "statusCode": 409}``.
"""

from __future__ import annotations

from typing import Any

import pytest

from plays.models import Layer, Play

from .factories import make_flow, run, trigger

APPROVAL = [
    {"ref": "a", "appId": "var", "args": {"values": {"n": 1}}},
    {"ref": "gate", "appId": "var", "args": {"values": {"ok": True}}, "needsApproval": True},
    {"ref": "c", "appId": "var", "args": {"values": {"after": True}}},
]


def state(play_id: str) -> str:
    return Play.objects.get(pk=play_id).state


def post(api: Any, play_id: str, verb: str, body: dict[str, Any] | None = None) -> Any:
    return api.post(f"/api/plays/{play_id}/{verb}", body or {}, format="json")


def assert_409(response: Any) -> None:
    assert response.status_code == 409, response.content
    assert response.json()["error"] == "INVALID_STATE" and response.json()["statusCode"] == 409, response.json()


def make_in_state(api: Any, drain: Any, target: str) -> str:
    """A play of a fresh flow brought to ``target`` through the API."""
    if target == "NEW":
        return trigger(api, make_flow(api, APPROVAL), start=False)["playId"]
    if target == "DEFERRED":
        return trigger(api, make_flow(api, APPROVAL), delayMs=3_600_000)["playId"]
    if target == "RUN":
        return trigger(api, make_flow(api, APPROVAL))["playId"]  # queued, not drained
    if target == "WAIT":
        pid = run(api, make_flow(api, APPROVAL), drain)
        return pid
    if target == "ON_HOLD":
        pid = trigger(api, make_flow(api, APPROVAL), start=False)["playId"]
        assert post(api, pid, "hold").status_code == 200
        return pid
    if target == "DONE":
        pid = run(api, make_flow(api, APPROVAL[:1]), drain)
        return pid
    if target == "FAIL":
        pid = trigger(api, make_flow(api, APPROVAL), start=False)["playId"]
        assert post(api, pid, "cancel").status_code == 200
        return pid
    if target == "SKIP":
        pid = make_in_state(api, drain, "WAIT")
        layer = Layer.objects.get(play_id=pid, ref="gate")
        assert post(api, pid, "approve", {"layerId": layer.id, "decision": "declined"}).status_code == 200
        return pid
    if target == "FILTERED":
        pid = run(api, make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}}, "filters": [{"leftValue": "1", "operator": "eq", "rightValue": "2"}]}]), drain)
        return pid
    raise AssertionError(target)


ALL = ["NEW", "RUN", "DEFERRED", "WAIT", "ON_HOLD", "DONE", "FAIL", "SKIP", "FILTERED"]
LEGAL = {
    "hold": {"NEW", "RUN", "DEFERRED", "WAIT"},
    "resume": {"ON_HOLD"},
    "cancel": {"NEW", "RUN", "DEFERRED", "WAIT", "ON_HOLD"},
    "start": {"NEW"},
    "retry": {"FAIL"},
}


@pytest.mark.parametrize("verb", sorted(LEGAL))
@pytest.mark.parametrize("source", ALL)
def test_each_verb_from_each_state(api: Any, drain: Any, source: str, verb: str) -> None:
    pid = make_in_state(api, drain, source)
    assert state(pid) == source
    response = post(api, pid, verb)
    if source not in LEGAL[verb]:
        assert_409(response)
        assert state(pid) == source
        return
    assert response.status_code in (200, 201), response.content
    if verb == "hold":
        assert state(pid) == "ON_HOLD"
    elif verb == "cancel":
        play = Play.objects.get(pk=pid)
        assert play.state == "FAIL" and play.error["code"] == "CANCELLED"
    elif verb == "start":
        assert state(pid) == "RUN"
    elif verb == "retry":
        assert response.json()["retryOf"] == pid
    elif verb == "resume":
        assert state(pid) == "NEW"  # held before it was ever started


def test_approve_runs_the_step_and_continues(api: Any, drain: Any) -> None:
    pid = make_in_state(api, drain, "WAIT")
    detail = api.get(f"/api/plays/{pid}").json()
    layer = Layer.objects.get(play_id=pid, ref="gate")
    assert detail["state"] == "WAIT" and detail["approvals"] == []
    assert detail["pendingApproval"] == {"layerId": layer.id, "ref": "gate"}
    r = post(api, pid, "approve", {"layerId": layer.id, "decision": "approved", "note": "fine"})
    assert r.status_code == 200, r.content
    drain()
    play = Play.objects.get(pk=pid)
    assert play.state == "DONE"
    assert [lay.ref for lay in play.layers.order_by("index")] == ["a", "gate", "c"]
    assert play.approvals.get().note == "fine"
    # A second decision, or one on a play no longer waiting, is refused.
    assert_409(post(api, pid, "approve", {"layerId": layer.id, "decision": "declined"}))
    after = api.get(f"/api/plays/{pid}").json()
    assert after["pendingApproval"] is None
    [past] = after["approvals"]
    assert (past["layerId"], past["ref"], past["decision"], past["note"]) == (layer.id, "gate", "approved", "fine")
    assert past["decidedBy"]["email"] == "alice@acme.test" and past["decidedAt"]


def test_decline_skips_and_other_layer_is_refused(api: Any, drain: Any) -> None:
    pid = make_in_state(api, drain, "WAIT")
    other = Layer.objects.get(play_id=pid, ref="a")
    assert_409(post(api, pid, "approve", {"layerId": other.id, "decision": "approved"}))
    gate = Layer.objects.get(play_id=pid, ref="gate")
    assert post(api, pid, "approve", {"layerId": gate.id, "decision": "declined"}).status_code == 200
    assert state(pid) == "SKIP"
    assert Layer.objects.get(pk=gate.id).state == "SKIP"
    assert_409(post(api, pid, "approve", {"layerId": gate.id, "decision": "approved"}))


def test_resume_returns_to_wait_deferred_or_run(api: Any, drain: Any) -> None:
    waiting = make_in_state(api, drain, "WAIT")
    assert post(api, waiting, "hold").status_code == 200
    assert post(api, waiting, "resume").status_code == 200
    assert state(waiting) == "WAIT"

    deferred = make_in_state(api, drain, "DEFERRED")
    assert post(api, deferred, "hold").status_code == 200
    assert post(api, deferred, "resume").status_code == 200
    assert state(deferred) == "DEFERRED"

    running = make_in_state(api, drain, "RUN")
    assert post(api, running, "hold").status_code == 200
    drain()  # the runner sees ON_HOLD and starts no step
    assert state(running) == "ON_HOLD"
    assert Layer.objects.filter(play_id=running).count() == 0
    assert post(api, running, "resume").status_code == 200
    assert state(running) == "RUN"
    drain()
    assert state(running) == "WAIT"
    assert_409(post(api, running, "resume"))


def test_retry_copies_done_layers_and_resumes_at_the_failed_step(api: Any, drain: Any) -> None:
    flow = make_flow(api, [
        {"ref": "a", "appId": "var", "args": {"values": {"n": 1}}},
        {"ref": "b", "appId": "var", "args": {"values": {"x": "{{ 1 / $prev.args.zero }}"}}},
    ])
    pid = run(api, flow, drain, args={"zero": 0})
    assert state(pid) == "FAIL"
    r = post(api, pid, "retry")
    assert r.status_code == 201
    new = r.json()["playId"]
    drain()
    copied = Layer.objects.get(play_id=new, ref="a")
    assert copied.reused_from_id == Layer.objects.get(play_id=pid, ref="a").id
    assert Layer.objects.filter(play_id=new, ref="b").exists()


def test_delay_defers_and_sleep_parks(api: Any, drain: Any) -> None:
    deferred = trigger(api, make_flow(api, APPROVAL[:1]), delayMs=60_000)
    assert deferred["state"] == "DEFERRED" and deferred["runAt"]
    pid = run(api, make_flow(api, [{"ref": "s", "appId": "sleep", "args": {"ms": 60_000}},
                                   {"ref": "b", "appId": "var", "args": {"values": {}}}]), drain)
    play = Play.objects.get(pk=pid)
    assert play.state == "DEFERRED" and play.run_at is not None


def test_max_concurrency_releases_oldest_first(api: Any, drain: Any, no_enqueue: list[str]) -> None:
    flow = make_flow(api, APPROVAL, execution={"maxConcurrency": 1})
    first = trigger(api, flow)["playId"]
    second = trigger(api, flow)["playId"]
    third = trigger(api, flow)["playId"]
    assert [state(first), state(second), state(third)] == ["RUN", "DEFERRED", "DEFERRED"]
    drain()
    assert state(first) == "WAIT"  # a waiting play keeps its slot
    assert post(api, first, "cancel").status_code == 200
    drain()
    assert state(second) == "WAIT" and state(third) == "DEFERRED"
