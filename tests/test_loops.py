"""iterator … aggregator loops and subflow child plays, driven in-process.

Iterations are enqueued as tasks of their own; the ``drain`` fixture runs them in this
process in FIFO order, like a fleet of workers would in some order.
"""

from __future__ import annotations

from typing import Any

import pytest

from flows.models import Flow
from plays.models import Event, Iteration, Layer, Play

from .factories import make_flow, run, trigger
from .test_runner import Flaky, layers_of, test_modules  # noqa: F401  (fixture)


def loop_flow(api: Any, items: Any = "{{ $prev.args.items }}", body: list[dict] | None = None, **iterator_args: Any) -> dict:
    body = body or [{"ref": "double", "appId": "var", "args": {"values": {"n": "{{ $prev.each.item * 2 }}",
                                                                        "last": "{{ $prev.each.isLast }}"}}}]
    return make_flow(api, [
        {"ref": "each", "appId": "iterator", "args": {"items": items, **iterator_args}},
        *body,
        {"ref": "gather", "appId": "aggregator", "args": {"sourceRef": body[-1]["ref"]}},
        {"ref": "after", "appId": "var", "args": {"values": {"count": "{{ $prev.gather.count }}"}}},
    ])


def test_a_loop_runs_its_body_once_per_item_and_aggregates_in_item_order(api: Any, drain: Any) -> None:
    flow = loop_flow(api, concurrency=2)
    play = trigger(api, flow, {"items": [1, 2, 3, 4, 5]})
    drain()
    detail = api.get(f"/api/plays/{play['playId']}").json()
    assert detail["state"] == "DONE", detail
    layers = layers_of(api, play["playId"])
    body = [layer for layer in layers if layer["ref"] == "double"]
    assert [layer["iteration"] for layer in body] == [0, 1, 2, 3, 4]
    assert [layer["out"]["n"] for layer in body] == [2, 4, 6, 8, 10]
    assert [layer["out"]["last"] for layer in body] == [False, False, False, False, True]
    gather = next(layer for layer in layers if layer["ref"] == "gather")
    assert gather["out"] == {"items": [{"n": n, "last": n == 10} for n in (2, 4, 6, 8, 10)], "count": 5}
    assert next(layer for layer in layers if layer["ref"] == "after")["out"] == {"count": 5}
    # Layers stay readable: ordered by index, then iteration.
    assert [layer["ref"] for layer in layers] == ["each"] + ["double"] * 5 + ["gather", "after"]
    assert next(layer for layer in layers if layer["ref"] == "each")["out"] == {"count": 5}


def test_at_most_concurrency_iterations_are_launched_at_once(api: Any, no_enqueue: list[str], drain: Any) -> None:
    flow = loop_flow(api, concurrency=3)
    play = trigger(api, flow, {"items": list(range(10))})
    # Run only the play's runner: it launches the first iterations and gives the play up.

    drain.step()
    assert len(drain.iterations) == 3
    assert Iteration.objects.filter(play_id=play["playId"], state="RUN").count() == 3
    assert Iteration.objects.filter(play_id=play["playId"], state="PENDING").count() == 7
    assert Play.objects.get(pk=play["playId"]).state == "RUN"
    drain()
    assert Play.objects.get(pk=play["playId"]).state == "DONE"
    assert Iteration.objects.filter(play_id=play["playId"], state="DONE").count() == 10


def test_an_empty_list_runs_no_iteration_and_aggregates_nothing(api: Any, drain: Any) -> None:
    flow = loop_flow(api)
    play = trigger(api, flow, {"items": []})
    drain()
    layers = layers_of(api, play["playId"])
    assert [layer["ref"] for layer in layers] == ["each", "gather", "after"]
    assert layers[1]["out"] == {"items": [], "count": 0}
    assert api.get(f"/api/plays/{play['playId']}").json()["state"] == "DONE"


def test_items_from_an_enumeration_and_a_field_to_gather(api: Any, drain: Any) -> None:
    flow = make_flow(api, [
        {"ref": "nums", "appId": "enumeration", "args": {"from": 1, "to": 4}},
        {"ref": "each", "appId": "iterator", "args": {"items": "{{ $prev.nums }}"}},
        {"ref": "sq", "appId": "var", "args": {"values": {"v": "{{ $prev.each.item * $prev.each.item }}"}}},
        {"ref": "gather", "appId": "aggregator", "args": {"sourceRef": "sq", "field": "v"}},
    ])
    play = trigger(api, flow)
    drain()
    assert layers_of(api, play["playId"])[-1]["out"] == {"items": [1, 4, 9, 16], "count": 4}


def test_a_failing_iteration_fails_the_play_by_default(api: Any, drain: Any) -> None:
    flow = loop_flow(api, body=[{"ref": "parse", "appId": "json-parse", "args": {"input": "{{ $prev.each.item }}"}}])
    play = trigger(api, flow, {"items": ['{"a": 1}', "{broken", '{"b": 2}']})
    drain()
    detail = api.get(f"/api/plays/{play['playId']}").json()
    assert detail["state"] == "FAIL"
    assert detail["error"]["code"] == "STEP_FAILED" and detail["error"]["ref"] == "parse"
    failed = [layer for layer in layers_of(api, play["playId"]) if layer["state"] == "FAIL"]
    # The failed iteration's step, and the loop it ended.
    assert [(layer["ref"], layer["iteration"]) for layer in failed] == [("each", None), ("parse", 1)]
    assert not any(layer["ref"] in ("gather", "after") for layer in layers_of(api, play["playId"]))


@pytest.mark.parametrize(("on_error", "state"), [("continue", "FAIL"), ("skip", "SKIP")])
def test_a_failing_iteration_with_continue_or_skip_goes_on(api: Any, drain: Any, on_error: str, state: str) -> None:
    flow = loop_flow(api, body=[{"ref": "parse", "appId": "json-parse", "onError": on_error,
                                 "args": {"input": "{{ $prev.each.item }}"}}])
    play = trigger(api, flow, {"items": ['{"a": 1}', "{broken", '{"b": 2}']})
    drain()
    assert api.get(f"/api/plays/{play['playId']}").json()["state"] == "DONE"
    layers = layers_of(api, play["playId"])
    assert [layer["state"] for layer in layers if layer["ref"] == "parse"] == ["DONE", state, "DONE"]
    # The aggregator gathers the iterations that produced an output, in item order.
    gather = next(layer for layer in layers if layer["ref"] == "gather")
    assert gather["out"] == {"items": [{"result": {"a": 1}}, {"result": {"b": 2}}], "count": 2}


def test_router_inside_a_loop_filters_the_branch_not_taken(api: Any, drain: Any) -> None:
    flow = loop_flow(api, body=[
        {"ref": "route", "appId": "router", "args": {"routes": [
            {"condition": "{{ $prev.each.item > 100 }}", "label": "large"}, {"condition": "true", "label": "small"}]}},
        {"ref": "large", "appId": "var", "args": {"values": {"id": "{{ $prev.each.item }}"}},
         "filters": [{"leftValue": "{{ $prev.route.route }}", "operator": "eq", "rightValue": "large"}]},
    ])
    play = trigger(api, flow, {"items": [5, 500, 50, 5000]})
    drain()
    layers = layers_of(api, play["playId"])
    assert [layer["state"] for layer in layers if layer["ref"] == "large"] == ["FILTERED", "DONE", "FILTERED", "DONE"]
    assert next(layer for layer in layers if layer["ref"] == "gather")["out"]["items"] == [{"id": 500}, {"id": 5000}]


def test_items_must_be_a_list_and_within_the_limit(api: Any, drain: Any, settings: Any) -> None:
    flow = loop_flow(api)
    play = trigger(api, flow, {"items": "not a list"})
    drain()
    detail = api.get(f"/api/plays/{play['playId']}").json()
    assert detail["state"] == "FAIL" and detail["error"]["ref"] == "each"
    settings.FLOWPLAY = {**settings.FLOWPLAY, "MAX_ITERATOR_ITEMS": 3}
    play = trigger(api, flow, {"items": [1, 2, 3, 4]})
    drain()
    layer = layers_of(api, play["playId"])[0]
    assert layer["state"] == "FAIL" and layer["error"]["code"] == "TOO_MANY_ITEMS"


def test_holding_a_play_mid_loop_stops_new_iterations_and_resume_finishes_it(api: Any, no_enqueue: list[str], drain: Any) -> None:

    flow = loop_flow(api, concurrency=2)
    play_id = trigger(api, flow, {"items": [1, 2, 3, 4]})["playId"]
    drain.step()
    assert api.post(f"/api/plays/{play_id}/hold").status_code == 200
    drain()  # the two launched iterations see the hold and give up
    assert Play.objects.get(pk=play_id).state == "ON_HOLD"
    assert Layer.objects.filter(play_id=play_id, ref="double").count() == 0
    assert api.post(f"/api/plays/{play_id}/resume").status_code == 200
    drain()
    assert Play.objects.get(pk=play_id).state == "DONE"
    assert Layer.objects.filter(play_id=play_id, ref="double", state="DONE").count() == 4


def test_a_dead_iteration_is_reaped_and_counts_the_interrupted_attempt(api: Any, no_enqueue: list[str], drain: Any) -> None:
    from django.utils import timezone

    from plays import tasks

    flow = loop_flow(api, concurrency=1)
    play_id = trigger(api, flow, {"items": [1, 2]})["playId"]
    drain.step()
    first = drain.iterations.pop(0)
    # A worker took the iteration and the step, then died: lease taken, layer RUN.
    it = Iteration.objects.get(pk=first)
    assert it.claim("dead-worker", 5)
    play = Play.objects.get(pk=play_id)
    Layer.open(play, {"ref": "double", "appId": "var", "index": 1}, "RUN", iteration=0)
    Iteration.objects.filter(pk=first).update(lease_until=timezone.now() - timezone.timedelta(seconds=1))
    assert tasks.reap_stuck_iteration_one()
    drain()
    assert Play.objects.get(pk=play_id).state == "DONE"
    layer = Layer.objects.get(play_id=play_id, ref="double", iteration=0)
    assert layer.state == "DONE" and layer.attempts == 2
    notes = [e.payload.get("note") for e in Event.objects.filter(play_id=play_id, type="play:layer:started")]
    assert "previous attempt interrupted" in notes


def test_retry_of_a_play_that_failed_inside_a_loop_runs_the_loop_again(api: Any, drain: Any) -> None:
    Flaky.calls = {}
    flow = loop_flow(api, body=[{"ref": "flaky", "appId": "test-flaky", "args": {"failures": 1, "retryable": False}}])
    play_id = run(api, flow, drain, {"items": [1]})
    assert Play.objects.get(pk=play_id).state == "FAIL"
    retried = api.post(f"/api/plays/{play_id}/retry").json()
    drain()
    new = Play.objects.get(pk=retried["playId"])
    assert new.state == "DONE"
    # The loop ran again from its start in the retry; nothing inside it was copied.
    assert not new.layers.filter(reused_from__isnull=False, iteration__isnull=False).exists()


# --- validation -------------------------------------------------------------------------


def test_nested_loops_and_stray_aggregators_are_refused_at_save(api: Any) -> None:
    r = api.post("/api/flows", {"name": "nested", "layers": [
        {"ref": "outer", "appId": "iterator", "args": {"items": [1]}},
        {"ref": "inner", "appId": "iterator", "args": {"items": [1]}},
        {"ref": "x", "appId": "var", "args": {"values": {}}},
        {"ref": "g", "appId": "aggregator", "args": {"sourceRef": "x"}},
    ]}, format="json")
    assert r.status_code == 400
    assert "inner" in str(r.json()["details"]["layers[1].appId"])
    r = api.post("/api/flows", {"name": "stray", "layers": [
        {"ref": "x", "appId": "var", "args": {"values": {}}},
        {"ref": "g", "appId": "aggregator", "args": {"sourceRef": "x"}},
    ]}, format="json")
    assert r.status_code == 400 and "layers[1].args.sourceRef" in r.json()["details"]


# --- subflows ---------------------------------------------------------------------------


def child_flow(api: Any, **fields: Any) -> dict:
    return make_flow(api, [{"ref": "greet", "appId": "var", "args": {"values": {"hello": "{{ $prev.args.name }}"}}}],
                     name="child", **fields)


def test_a_synchronous_subflow_parks_the_parent_until_the_child_ends(api: Any, no_enqueue: list[str], drain: Any) -> None:
    from plays import tasks

    child = child_flow(api)
    parent = make_flow(api, [
        {"ref": "call", "appId": "subflow", "args": {"flowId": child["id"], "args": {"name": "{{ $prev.args.who }}"}}},
        {"ref": "after", "appId": "var", "args": {"values": {"got": "{{ $prev.call.out.hello }}"}}},
    ])
    play_id = trigger(api, parent, {"who": "Ada"})["playId"]
    drain.step()  # the parent starts the child and parks
    assert Play.objects.get(pk=play_id).state == "DEFERRED"
    kid = Play.objects.get(parent_id=play_id)
    assert api.get(f"/api/plays/{kid.id}").json()["parentPlayId"] == play_id
    drain()  # the child runs and wakes the parent
    assert tasks.release_due_one()
    drain()
    detail = api.get(f"/api/plays/{play_id}").json()
    assert detail["state"] == "DONE", detail
    layers = layers_of(api, play_id)
    assert layers[0]["out"] == {"state": "DONE", "playId": kid.id, "out": {"hello": "Ada"}}
    assert layers[0]["attempts"] == 1
    assert layers[1]["out"] == {"got": "Ada"}


def test_an_async_subflow_returns_the_child_id_at_once(api: Any, drain: Any) -> None:
    child = child_flow(api)
    parent = make_flow(api, [{"ref": "call", "appId": "subflow", "args": {"flowId": child["permanentId"], "async": True}}])
    play_id = run(api, parent, drain)
    out = layers_of(api, play_id)[0]["out"]
    assert api.get(f"/api/plays/{play_id}").json()["state"] == "DONE"
    assert Play.objects.get(pk=out["playId"]).parent_id == play_id


def test_a_failing_child_fails_the_subflow_step(api: Any, drain: Any) -> None:
    from plays import tasks

    child = make_flow(api, [{"ref": "bad", "appId": "json-parse", "args": {"input": "{{ $prev.args.doc }}"}}], name="bad child")
    parent = make_flow(api, [{"ref": "call", "appId": "subflow", "args": {"flowId": child["id"], "args": {"doc": "{broken"}}}])
    play_id = run(api, parent, drain)
    tasks.release_due_one()
    drain()
    detail = api.get(f"/api/plays/{play_id}").json()
    assert detail["state"] == "FAIL" and detail["error"]["ref"] == "call"
    assert layers_of(api, play_id)[0]["error"]["code"] == "SUBFLOW_FAILED"


def test_cancelling_or_holding_the_parent_reaches_the_child(api: Any, no_enqueue: list[str], drain: Any) -> None:

    slow = make_flow(api, [{"ref": "nap", "appId": "sleep", "args": {"ms": 60000}}], name="slow child")
    parent = make_flow(api, [{"ref": "call", "appId": "subflow", "args": {"flowId": slow["id"]}}])
    play_id = trigger(api, parent)["playId"]
    drain.step()
    kid = Play.objects.get(parent_id=play_id)
    assert api.post(f"/api/plays/{play_id}/hold").status_code == 200
    assert Play.objects.get(pk=kid.id).state == "ON_HOLD"
    assert api.post(f"/api/plays/{play_id}/resume").status_code == 200
    assert Play.objects.get(pk=kid.id).state != "ON_HOLD"
    assert api.post(f"/api/plays/{play_id}/cancel").status_code == 200
    kid.refresh_from_db()
    assert kid.state == "FAIL" and kid.error["code"] == "CANCELLED"


def test_subflow_cycles_are_refused_at_save_and_unknown_flows_too(api: Any) -> None:
    a = make_flow(api, [{"ref": "v", "appId": "var", "args": {"values": {}}}], name="A")
    b = make_flow(api, [{"ref": "call", "appId": "subflow", "args": {"flowId": a["id"]}}], name="B")
    r = api.put(f"/api/flows/{a['id']}", {"name": "A", "layers": [
        {"ref": "call", "appId": "subflow", "args": {"flowId": b["id"]}}]}, format="json")
    assert r.status_code == 400, r.content
    assert "cycle" in str(r.json()["details"]["layers[0].args.flowId"])
    r = api.put(f"/api/flows/{a['id']}", {"name": "A", "layers": [
        {"ref": "call", "appId": "subflow", "args": {"flowId": a["id"]}}]}, format="json")
    assert r.status_code == 400
    r = api.post("/api/flows", {"name": "C", "layers": [
        {"ref": "call", "appId": "subflow", "args": {"flowId": "nope"}}]}, format="json")
    assert r.status_code == 400 and "no flow" in str(r.json()["details"])


def test_a_runtime_cycle_is_stopped_by_the_depth_limit(api: Any, drain: Any, settings: Any) -> None:
    from plays import tasks

    settings.FLOWPLAY = {**settings.FLOWPLAY, "MAX_SUBFLOW_DEPTH": 3}
    loop = make_flow(api, [{"ref": "call", "appId": "subflow", "args": {"flowId": "{{ $flowId }}"}}], name="self")
    play_id = trigger(api, loop)["playId"]
    for _ in range(10):
        drain()
        tasks.release_due_one()
    drain()
    plays = list(Play.objects.filter(flow_id=loop["id"]).order_by("created_at"))
    assert len(plays) == 3
    assert plays[-1].state == "FAIL"
    assert Layer.objects.get(play=plays[-1]).error["code"] == "SUBFLOW_DEPTH"
    assert Play.objects.get(pk=play_id).state == "FAIL"
    assert Flow.objects.filter(pk=loop["id"]).exists()
