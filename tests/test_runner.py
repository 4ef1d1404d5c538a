"""The step runner, driven in-process: every outcome of section 2 of the spec."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from flows import modules
from flows.modules import Module, RunContext, StepError
from plays.models import Event, Layer, Play

from .factories import make_flow, run, trigger


class Flaky(Module):
    """Fails ``failures`` times per ref, then returns {"ok": True, "attempt": n}."""

    app_id = "test-flaky"
    summary = "test module"
    args_schema: ClassVar[dict] = {"type": "object"}
    out_schema: ClassVar[dict] = {"type": "object"}
    calls: ClassVar[dict[str, int]] = {}

    def run(self, args: dict, ctx: RunContext) -> Any:
        n = Flaky.calls[ctx.ref] = Flaky.calls.get(ctx.ref, 0) + 1
        if n <= int(args.get("failures", 0)):
            raise StepError(f"flaky failure {n}", code="FLAKY", retryable=bool(args.get("retryable", True)))
        return {"ok": True, "attempt": ctx.attempt}


class Slow(Module):
    app_id = "test-slow"
    summary = "test module"
    args_schema: ClassVar[dict] = {"type": "object"}
    out_schema: ClassVar[dict] = {"type": "object"}

    def run(self, args: dict, ctx: RunContext) -> Any:
        time.sleep(float(args.get("seconds", 1)))
        return {"slept": True}


@pytest.fixture(autouse=True)
def test_modules() -> Any:
    Flaky.calls = {}
    modules.REGISTRY["test-flaky"] = Flaky()
    modules.REGISTRY["test-slow"] = Slow()
    yield
    modules.REGISTRY.pop("test-flaky", None)
    modules.REGISTRY.pop("test-slow", None)


def layers_of(api: Any, play_id: str) -> list[dict[str, Any]]:
    return api.get(f"/api/plays/{play_id}/layers").json()


def events_of(play_id: str) -> list[str]:
    return [e.type for e in Event.objects.filter(play_id=play_id).order_by("seq")]


def test_three_steps_run_in_order_and_pass_outputs(api: Any, drain: Any) -> None:
    flow = make_flow(api, [
        {"ref": "a", "appId": "var", "args": {"values": {"n": "{{ $prev.args.n }}"}}},
        {"ref": "b", "appId": "var", "args": {"values": {"double": "{{ $prev.a.n * 2 }}"}}},
        {"ref": "c", "appId": "template", "args": {"template": "total={{ t }}", "data": {"t": "{{ $prev.b.double + 1 }}"}}},
    ])
    started = trigger(api, flow, {"n": 20})
    assert started["state"] == "RUN" and started["startedAt"]
    drain()
    play = api.get(f"/api/plays/{started['playId']}").json()
    assert play["state"] == "DONE"
    assert play["duration"] is not None and play["completedAt"].endswith("Z")
    layers = layers_of(api, started["playId"])
    assert [(x["ref"], x["state"], x["attempts"]) for x in layers] == [("a", "DONE", 1), ("b", "DONE", 1), ("c", "DONE", 1)]
    assert layers[2]["out"] == {"result": "total=41"}
    assert events_of(started["playId"]) == [
        "play:started",
        "play:layer:started", "play:layer:completed",
        "play:layer:started", "play:layer:completed",
        "play:layer:started", "play:layer:completed",
        "play:completed",
    ]
    seqs = list(Event.objects.filter(play_id=started["playId"]).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_a_failing_step_fails_the_play_and_later_steps_never_run(api: Any, drain: Any) -> None:
    flow = make_flow(api, [
        {"ref": "parse", "appId": "json-parse", "args": {"input": "{{ $prev.args.doc }}"}},
        {"ref": "never", "appId": "var", "args": {"values": {}}},
    ])
    play_id = run(api, flow, drain, {"doc": "{not json"})
    play = api.get(f"/api/plays/{play_id}").json()
    assert play["state"] == "FAIL"
    assert play["error"]["code"] == "STEP_FAILED" and play["error"]["ref"] == "parse"
    layers = layers_of(api, play_id)
    assert [(x["ref"], x["state"]) for x in layers] == [("parse", "FAIL")]
    assert layers[0]["error"]["code"]
    assert events_of(play_id)[-2:] == ["play:layer:failed", "play:failed"]
    failed = Event.objects.get(play_id=play_id, type="play:failed").payload
    assert failed["ref"] == "parse" and failed["error"]["code"] == "STEP_FAILED" and "duration" in failed


@pytest.mark.parametrize(("on_error", "layer_state"), [("continue", "FAIL"), ("skip", "SKIP")])
def test_on_error_continue_and_skip_go_on_with_a_null_output(api: Any, drain: Any, on_error: str, layer_state: str) -> None:
    flow = make_flow(api, [
        {"ref": "bad", "appId": "json-parse", "args": {"input": "{{ $prev.args.doc }}"}, "onError": on_error},
        {"ref": "after", "appId": "var", "args": {"values": {"was": "{{ $prev.bad }}", "d": "{{ $prev.bad.result | default('none') }}"}}},
    ])
    play_id = run(api, flow, drain, {"doc": "{"})
    assert api.get(f"/api/plays/{play_id}").json()["state"] == "DONE"
    layers = layers_of(api, play_id)
    assert layers[0]["state"] == layer_state
    assert layers[1]["out"] == {"was": None, "d": "none"}


def test_retries_with_backoff_count_attempts(api: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "f", "appId": "test-flaky", "args": {"failures": 2},
                            "retry": {"count": 2, "delayMs": 10, "backoffMultiplier": 2, "jitter": True}}])
    play_id = run(api, flow, drain)
    layer = layers_of(api, play_id)[0]
    assert (layer["state"], layer["attempts"], layer["out"]) == ("DONE", 3, {"ok": True, "attempt": 3})


def test_retries_exhausted_fail_the_step(api: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "f", "appId": "test-flaky", "args": {"failures": 5}, "retry": {"count": 1, "delayMs": 1}}])
    play_id = run(api, flow, drain)
    layer = layers_of(api, play_id)[0]
    assert (layer["state"], layer["attempts"], layer["error"]["code"]) == ("FAIL", 2, "FLAKY")


def test_a_non_retryable_error_is_not_retried(api: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "f", "appId": "test-flaky", "args": {"failures": 5, "retryable": False}, "retry": {"count": 3, "delayMs": 1}}])
    play_id = run(api, flow, drain)
    assert layers_of(api, play_id)[0]["attempts"] == 1


def test_an_attempt_over_its_timeout_fails(api: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "s", "appId": "test-slow", "args": {"seconds": 3}, "timeout": 1}])
    play_id = run(api, flow, drain)
    layer = layers_of(api, play_id)[0]
    assert layer["state"] == "FAIL" and layer["error"]["code"] == "TIMEOUT"


def test_a_play_over_its_timeout_fails_with_play_timeout(api: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "s", "appId": "test-slow", "args": {"seconds": 3}}], execution={"timeout": 1})
    play_id = run(api, flow, drain)
    play = api.get(f"/api/plays/{play_id}").json()
    assert play["state"] == "FAIL" and play["error"]["code"] == "PLAY_TIMEOUT"


def test_filtered_steps_and_all_filtered_play(api: Any, drain: Any) -> None:
    never = [{"leftValue": "{{ $prev.args.go }}", "operator": "eq", "rightValue": "yes"}]
    flow = make_flow(api, [
        {"ref": "a", "appId": "var", "args": {"values": {}}, "filters": never},
        {"ref": "b", "appId": "var", "args": {"values": {}}, "filters": never},
    ])
    play_id = run(api, flow, drain, {"go": "no"})
    assert api.get(f"/api/plays/{play_id}").json()["state"] == "FILTERED"
    assert [x["state"] for x in layers_of(api, play_id)] == ["FILTERED", "FILTERED"]
    play_id = run(api, flow, drain, {"go": "yes"})
    assert api.get(f"/api/plays/{play_id}").json()["state"] == "DONE"


def test_flow_filters_skip_the_play_at_once(api: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}}}],
                     filters=[{"leftValue": "{{ $prev.args.amount }}", "operator": "gte", "rightValue": "1000", "cast": "number"}])
    small = trigger(api, flow, {"amount": 5})
    assert small["state"] == "SKIP"
    assert layers_of(api, small["playId"]) == []
    big = trigger(api, flow, {"amount": 5000})
    assert big["state"] == "RUN"
    drain()
    assert api.get(f"/api/plays/{big['playId']}").json()["state"] == "DONE"


def test_a_filter_that_cannot_cast_fails_the_layer(api: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}},
                            "filters": [{"leftValue": "{{ $prev.args.x }}", "operator": "gt", "rightValue": "1", "cast": "number"}]}])
    play_id = run(api, flow, drain, {"x": "abc"})
    layer = layers_of(api, play_id)[0]
    assert layer["state"] == "FAIL" and layer["error"]["code"] == "FILTER_ERROR"


def test_an_expression_runtime_error_fails_the_layer(api: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": "{{ 1 / $prev.args.zero }}"}}}])
    play_id = run(api, flow, drain, {"zero": 0})
    layer = layers_of(api, play_id)[0]
    assert layer["error"]["code"] == "EXPRESSION_ERROR"
    assert layer["error"]["message"]


def test_plays_run_the_version_they_were_created_with(api: Any, no_enqueue: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"v": 1}}}])
    play_id = trigger(api, flow)["playId"]
    api.put(f"/api/flows/{flow['id']}", {"name": flow["name"], "layers": [
        {"ref": "a", "appId": "var", "args": {"values": {"v": 2}}}]}, format="json")
    drain()
    play = api.get(f"/api/plays/{play_id}").json()
    assert play["flowVersion"] == 1
    assert layers_of(api, play_id)[0]["out"] == {"v": 1}


def test_a_duplicate_delivery_does_not_run_a_finished_step_again(api: Any, no_enqueue: list[str], drain: Any) -> None:
    flow = make_flow(api, [{"ref": "f", "appId": "test-flaky", "args": {}}])
    play_id = trigger(api, flow)["playId"]
    no_enqueue.append(play_id)  # the broker delivers the task twice
    drain()
    assert Flaky.calls == {"f": 1}
    assert Layer.objects.filter(play_id=play_id).count() == 1


def test_a_runner_that_died_mid_step_is_resumed_and_counts_the_attempt(api: Any, no_enqueue: list[str], drain: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from plays import tasks

    flow = make_flow(api, [
        {"ref": "a", "appId": "var", "args": {"values": {"x": 1}}},
        {"ref": "b", "appId": "test-flaky", "args": {}},
    ])
    play_id = trigger(api, flow)["playId"]
    drain.flush()
    no_enqueue.clear()
    play = Play.objects.get(pk=play_id)
    # Simulate a worker that finished step a, opened step b and was killed.
    assert Play.take_lease(play.pk, "dead-worker", 30) is not None
    a = Layer.objects.create(play=play, ref="a", app_id="var", index=0, state="DONE", attempts=1, out={"x": 1},
                             started_at=timezone.now(), completed_at=timezone.now())
    Layer.objects.create(play=play, ref="b", app_id="test-flaky", index=1, state="RUN", attempts=1, started_at=timezone.now())
    Play.objects.filter(pk=play_id).update(next_index=1, lease_until=timezone.now() - timedelta(seconds=1))
    assert tasks.reap_stuck_one()
    drain.flush()
    assert no_enqueue == [play_id]
    drain()
    assert Play.objects.get(pk=play_id).state == "DONE"
    b = Layer.objects.get(play_id=play_id, ref="b")
    assert (b.state, b.attempts) == ("DONE", 2)
    assert Layer.objects.get(pk=a.pk).attempts == 1
    notes = [e.payload.get("note") for e in Event.objects.filter(play_id=play_id, type="play:layer:started")]
    assert "previous attempt interrupted" in notes


def test_each_step_is_one_transaction_that_also_starts_the_next_one(api: Any, drain: Any, monkeypatch: Any) -> None:
    """A success, the cursor and the next step's start (or the play's end) commit together:
    one store of events (one transaction that writes events) per step, events still in order."""
    from plays import models as play_models

    reservations: list[int] = []
    store = play_models._store

    def counting(items: list) -> list:
        reservations.append(len(items))
        return store(items)

    monkeypatch.setattr(play_models, "_store", counting)
    flow = make_flow(api, [{"ref": f"s{i}", "appId": "var", "args": {"values": {"i": i}}} for i in range(6)])
    play_id = trigger(api, flow)["playId"]
    with CaptureQueriesContext(connection) as queries:
        drain()
    assert Play.objects.get(pk=play_id).state == "DONE"
    # play:started (trigger), the first layer's start, then one per step: its completion with
    # the next step's start, or with play:completed after the last one.
    if connection.vendor == "postgresql":
        # The first step opens in one statement (Play.open_on), steps 0-4 hand over to the
        # next one in one (Play.step_on), the last one finishes the play in one
        # (Play.finish_on); each stores its events itself.
        assert len([q for q in queries.captured_queries if "WITH ok AS" in q["sql"]]) == 7
        # play:started was written by the run request's one statement (Play.trigger): no
        # event of this play went through _store.
        assert reservations == []
    else:
        assert reservations == [1, 1] + [2] * 6
    assert events_of(play_id) == ["play:started"] + ["play:layer:started", "play:layer:completed"] * 6 + ["play:completed"]
    assert [x["attempts"] for x in layers_of(api, play_id)] == [1] * 6
    assert not [e for e in Event.objects.filter(play_id=play_id, type="play:layer:started") if e.payload.get("note")]


def test_a_hold_that_lands_during_a_step_records_it_and_starts_nothing_more(api: Any, drain: Any, monkeypatch: Any) -> None:
    class HoldsItsPlay(Module):
        app_id = "test-holds"
        summary = "test module"
        inline = True  # in the runner's thread: SQLite's in-memory test database
        args_schema: ClassVar[dict] = {"type": "object"}
        out_schema: ClassVar[dict] = {"type": "object"}

        def run(self, args: dict, ctx: RunContext) -> Any:
            Play.objects.get(pk=ctx.play_id).hold()  # an operator, while the step runs
            return {"done": True}

    monkeypatch.setitem(modules.REGISTRY, "test-holds", HoldsItsPlay())
    flow = make_flow(api, [{"ref": "a", "appId": "test-holds", "args": {}},
                           {"ref": "b", "appId": "var", "args": {"values": {"x": 1}}}])
    play_id = run(api, flow, drain)
    play = Play.objects.get(pk=play_id)
    assert play.state == "ON_HOLD" and play.next_index == 1
    assert [(x["ref"], x["state"]) for x in layers_of(api, play_id)] == [("a", "DONE")]
    play.resume()
    drain()
    assert Play.objects.get(pk=play_id).state == "DONE"
    assert [(x["ref"], x["state"], x["attempts"]) for x in layers_of(api, play_id)] == [("a", "DONE", 1), ("b", "DONE", 1)]


def test_batched_events_take_their_seqs_together_at_the_end_and_vanish_with_a_rollback(api: Any) -> None:
    from django.db import transaction

    from flows.models import Flow
    from plays.models import EventType, batched_events, emit

    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}])
    play = Play.trigger(Flow.objects.get(pk=flow["id"]), {}, start=False)[0]
    started = {"layerId": "L", "ref": "a", "state": "RUN"}
    with transaction.atomic(), batched_events():
        assert emit(play, [(EventType.LAYER_STARTED, started)]) == []  # not stored yet
        with batched_events():  # nested: the outer block stores
            emit(play, [(EventType.LAYER_STARTED, {**started, "ref": "b"})])
        assert not Event.objects.filter(play=play).exists()
    stored = list(Event.objects.filter(play=play).order_by("seq"))
    assert [e.payload["ref"] for e in stored] == ["a", "b"] and stored[1].seq == stored[0].seq + 1

    with pytest.raises(RuntimeError), transaction.atomic(), batched_events():
        emit(play, [(EventType.LAYER_STARTED, {**started, "ref": "c"})])
        raise RuntimeError("the step's transaction fails")
    assert Event.objects.filter(play=play).count() == 2
    # The batch did not leak into what follows: this one is stored at once.
    assert len(emit(play, [(EventType.LAYER_STARTED, {**started, "ref": "d"})])) == 1


def test_a_long_retry_delay_parks_the_play_instead_of_holding_the_worker(api: Any, drain: Any, settings: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from plays import tasks

    settings.FLOWPLAY = {**settings.FLOWPLAY, "RETRY_PARK_SECONDS": 5.0}
    flow = make_flow(api, [{"ref": "f", "appId": "test-flaky", "args": {"failures": 2},
                            "retry": {"count": 2, "delayMs": 60000, "backoffMultiplier": 2}}])
    play_id = trigger(api, flow)["playId"]
    before = timezone.now()
    drain()  # the first attempt fails: the play waits a minute without a worker
    play = Play.objects.get(pk=play_id)
    assert play.state == "DEFERRED" and play.runner == ""
    assert before + timedelta(seconds=59) < play.run_at < timezone.now() + timedelta(seconds=61)
    layer = Layer.objects.get(play_id=play_id)
    assert (layer.state, layer.attempts) == ("RUN", 1)
    for expected_delay in (120, None):  # second attempt fails too (delay doubles), the third succeeds
        Play.objects.filter(pk=play_id).update(run_at=timezone.now() - timedelta(seconds=1))
        assert tasks.release_due_one()
        drain()
        play = Play.objects.get(pk=play_id)
        if expected_delay:
            assert play.state == "DEFERRED"
            assert timezone.now() + timedelta(seconds=expected_delay - 2) < play.run_at
    assert play.state == "DONE"
    layer = Layer.objects.get(play_id=play_id)
    assert (layer.state, layer.attempts, layer.out["attempt"]) == ("DONE", 3, 3)
    notes = [e.payload.get("note") for e in Event.objects.filter(play_id=play_id, type="play:layer:started").order_by("seq")]
    assert notes == [None, "retry after FLAKY", "retry after FLAKY"]
    states = [e.payload.get("state") for e in Event.objects.filter(play_id=play_id, type="play:state").order_by("seq")]
    assert states == ["DEFERRED", "RUN", "DEFERRED", "RUN"]


def test_short_retry_delays_stay_in_the_worker(api: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "f", "appId": "test-flaky", "args": {"failures": 1}, "retry": {"count": 1, "delayMs": 20}}])
    play_id = run(api, flow, drain)
    assert Play.objects.get(pk=play_id).state == "DONE"
    assert not Event.objects.filter(play_id=play_id, type="play:state").exists()


def leased_play_with_a_running_first_step(api: Any) -> tuple[Play, list[dict[str, Any]], Layer]:
    """A two-step play whose lease runner "r1" holds, its first layer RUN: step_on's input."""
    from plays.models import LayerState

    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}}},
                           {"ref": "b", "appId": "var", "args": {"values": {}}}])
    play = Play.take_lease(trigger(api, flow)["playId"], "r1", 30)
    steps = play.flow_version.definition["layers"]
    return play, steps, Layer.open(play, steps[0], LayerState.RUN)


def test_step_on_writes_all_or_nothing(api: Any, no_enqueue: Any) -> None:
    """Play.step_on: everything in one statement when the play is ours and RUN and the layer
    RUN; when either is not so, not one row changes and the caller takes the general path.
    Where it cannot write (SQLite) it writes nothing at all."""
    from datetime import timedelta

    from django.utils import timezone

    from plays.models import LayerState

    play, steps, first = leased_play_with_a_running_first_step(api)
    play_id = play.pk
    lease = timezone.now() + timedelta(seconds=30)

    def seq() -> tuple[int, int]:
        return Play.objects.get(pk=play_id).event_seq, Event.objects.filter(play_id=play_id).count()

    def snapshot() -> tuple:
        p = Play.objects.get(pk=play_id)
        return p.next_index, p.lease_until, seq(), sorted(Layer.objects.filter(play_id=play_id).values_list("ref", "state"))

    before = snapshot()
    assert play.step_on("someone-else", first, {"x": 1}, steps[1], lease) is None  # not our lease
    assert snapshot() == before
    Layer.objects.filter(pk=first.pk).update(state=LayerState.FAIL)  # the layer ended meanwhile
    before = snapshot()
    assert play.step_on("r1", first, {"x": 1}, steps[1], lease) is None
    assert snapshot() == before
    Layer.objects.filter(pk=first.pk).update(state=LayerState.RUN)

    if not Play.can_step_on():
        before = snapshot()
        assert play.step_on("r1", first, {"x": 1}, steps[1], lease) is None
        assert snapshot() == before
        return
    opened = play.step_on("r1", first, {"x": 1}, steps[1], lease)
    assert opened is not None and opened.ref == "b" and opened.state == LayerState.RUN
    p = Play.objects.get(pk=play_id)
    assert (p.next_index, p.lease_until, p.state) == (1, lease, "RUN")
    a, b = Layer.objects.get(pk=first.pk), Layer.objects.get(pk=opened.pk)
    assert (a.state, a.out, a.completed_at is not None) == ("DONE", {"x": 1}, True)
    assert (b.state, b.attempts, b.started_at is not None, b.completed_at) == ("RUN", 1, True, None)
    events = list(Event.objects.filter(play_id=play_id).order_by("seq"))[-2:]
    assert [e.type for e in events] == ["play:layer:completed", "play:layer:started"]
    counter, count = seq()
    assert counter == count  # seq numbers the play's events 1, 2, 3 … with no gap
    assert [e.seq for e in events] == [count - 1, count]
    assert [e.payload["seq"] for e in events] == [e.seq for e in events]
    assert events[0].payload | {"timestamp": None} == {
        "type": "play:layer:completed", "seq": events[0].seq, "playId": play_id, "flowId": play.flow_id,
        "layerId": first.pk, "ref": "a", "state": "DONE", "out": {"x": 1}, "timestamp": None}
    assert events[1].payload | {"timestamp": None} == {
        "type": "play:layer:started", "seq": events[1].seq, "playId": play_id, "flowId": play.flow_id,
        "layerId": opened.pk, "ref": "b", "state": "RUN", "attempt": 1, "timestamp": None}


@pytest.mark.skipif(connection.vendor != "postgresql", reason="Play.step_on writes in one statement on PostgreSQL only")
@pytest.mark.django_db(transaction=True)
def test_step_on_waits_for_a_concurrent_hold_and_then_writes_nothing(api: Any, no_enqueue: Any) -> None:
    """A hold that locked the play first commits, then step_on's FOR UPDATE sees the play
    ON_HOLD on the row's newest version: no half-written step (cursor moved, layer not)."""
    import threading
    from datetime import timedelta

    from django.db import connections, transaction
    from django.utils import timezone

    play, steps, first = leased_play_with_a_running_first_step(api)
    play_id = play.pk
    locked, release = threading.Event(), threading.Event()

    def operator() -> None:
        try:
            with transaction.atomic():
                Play.objects.get(pk=play_id).hold()
                locked.set()
                release.wait(10)
        finally:
            connections.close_all()

    holder = threading.Thread(target=operator)
    holder.start()
    assert locked.wait(10)
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    assert play.step_on("r1", first, {"x": 1}, steps[1], timezone.now() + timedelta(seconds=30)) is None
    assert time.monotonic() - started >= 0.2  # it waited for the hold's commit
    holder.join(10)
    p = Play.objects.get(pk=play_id)
    assert (p.state, p.next_index) == ("ON_HOLD", 0)
    assert sorted(Layer.objects.filter(play_id=play_id).values_list("ref", "state")) == [("a", "RUN")]
    assert not Event.objects.filter(play_id=play_id, type="play:layer:completed").exists()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="Play.step_on writes in one statement on PostgreSQL only")
def test_step_on_writes_what_the_general_path_writes(api: Any, no_enqueue: Any) -> None:
    """Play.step_on's statement and the transaction it replaces (Runner._record_success:
    step_past, Layer.end, Layer.open) leave equal rows and equal events."""
    from datetime import timedelta

    from django.db import transaction
    from django.utils import timezone

    from plays.models import LayerState, batched_events

    def outcome(play: Play, first: Layer) -> tuple:
        p = Play.objects.get(pk=play.pk)
        skip = {"id", "play", "started_at", "completed_at"}
        layers = [{f.name: getattr(x, f.attname) for f in Layer._meta.concrete_fields if f.name not in skip}
                  for x in Layer.objects.filter(play=play).order_by("index")]
        events = [{k: v for k, v in e.payload.items() if k not in ("layerId", "playId", "flowId", "timestamp")}
                  for e in Event.objects.filter(play=play).order_by("seq")]
        ends = [x.completed_at is not None for x in Layer.objects.filter(play=play).order_by("index")]
        return p.next_index, p.event_seq, p.state, layers, events, ends

    lease = timezone.now() + timedelta(seconds=30)
    fast, steps, first = leased_play_with_a_running_first_step(api)
    assert fast.step_on("r1", first, {"x": [1, "two"]}, steps[1], lease) is not None
    slow, steps, second = leased_play_with_a_running_first_step(api)
    with transaction.atomic(), batched_events():
        assert slow.step_past("r1", 1, lease)
        assert second.end(LayerState.DONE, out={"x": [1, "two"]})
        Layer.open(slow, steps[1], LayerState.RUN)
    assert outcome(fast, first) == outcome(slow, second)
    assert (first.state, first.out, first.parked) == (second.state, second.out, second.parked)


def boundary_outcome(play: Play) -> tuple:
    """What a step boundary left: the play's row, its layers and its events (ids, times and
    durations aside), for comparing the one-statement verbs with the general path."""
    p = Play.objects.get(pk=play.pk)
    skip = {"id", "play", "started_at", "completed_at"}
    layers = [{f.name: getattr(x, f.attname) for f in Layer._meta.concrete_fields if f.name not in skip}
              for x in Layer.objects.filter(play=play).order_by("index")]
    events = [{k: v for k, v in e.payload.items() if k not in ("layerId", "playId", "flowId", "timestamp", "duration")}
              for e in Event.objects.filter(play=play).order_by("seq")]
    ends = [x.completed_at is not None for x in Layer.objects.filter(play=play).order_by("index")]
    return (p.next_index, p.event_seq, p.state, p.runner, p.lease_until is None, p.completed_at is None,
            layers, events, ends)


def leased_play(api: Any, steps: int = 1, execution: dict | None = None) -> tuple[Play, list[dict[str, Any]]]:
    """A play of ``steps`` var steps whose lease runner "r1" holds, no layer opened yet."""
    body = {"execution": execution} if execution else {}
    flow = make_flow(api, [{"ref": f"s{i}", "appId": "var", "args": {"values": {}}} for i in range(steps)], **body)
    play = Play.take_lease(trigger(api, flow)["playId"], "r1", 30)
    return play, play.flow_version.definition["layers"]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the one-statement verbs write on PostgreSQL only")
def test_open_on_writes_what_the_general_path_writes_or_nothing(api: Any, no_enqueue: Any) -> None:
    """Play.open_on (a step's layer opened RUN, the lease renewed) leaves the rows and events
    of Runner.open's transaction (hold_lease, Layer.open); not our play: nothing at all."""
    from datetime import timedelta

    from django.db import transaction
    from django.utils import timezone

    from plays.models import LayerState

    lease = timezone.now() + timedelta(seconds=30)
    fast, steps = leased_play(api, 2)
    before = boundary_outcome(fast)
    assert fast.open_on("someone-else", steps[0], lease) is None
    assert boundary_outcome(fast) == before
    opened = fast.open_on("r1", steps[0], lease)
    assert opened is not None and (opened.ref, opened.state, opened.attempts) == ("s0", LayerState.RUN, 1)
    assert Play.objects.get(pk=fast.pk).lease_until == lease
    slow, steps = leased_play(api, 2)
    with transaction.atomic():
        assert slow.hold_lease("r1", lease)
        Layer.open(slow, steps[0], LayerState.RUN)
    assert boundary_outcome(fast) == boundary_outcome(slow)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the one-statement verbs write on PostgreSQL only")
def test_finish_on_writes_what_the_general_path_writes_or_nothing(api: Any, no_enqueue: Any) -> None:
    """Play.finish_on (the last step DONE, the play DONE) leaves the rows and events of
    Runner.succeed's transaction after the last step (step_past, Layer.end, finish); not our
    play, a layer that ended meanwhile or a play whose end wakes others: nothing at all."""
    from datetime import timedelta

    from django.db import transaction
    from django.utils import timezone

    from plays.models import LayerState, batched_events

    lease = timezone.now() + timedelta(seconds=30)
    fast, steps = leased_play(api)
    last = Layer.open(fast, steps[0], LayerState.RUN)
    before = boundary_outcome(fast)
    assert not fast.finish_on("someone-else", last, {"x": 1}, 1)
    Layer.objects.filter(pk=last.pk).update(state=LayerState.FAIL)
    assert not fast.finish_on("r1", last, {"x": 1}, 1)
    Layer.objects.filter(pk=last.pk).update(state=LayerState.RUN)
    assert boundary_outcome(fast) == before
    assert fast.finish_on("r1", last, {"x": [1, "two"]}, 1)
    assert (fast.state, fast.runner, fast.completed_at is not None) == ("DONE", "", True)
    completed = Event.objects.get(play=fast, type="play:completed").payload
    assert isinstance(completed["duration"], int) and completed["state"] == "DONE"

    slow, steps = leased_play(api)
    last = Layer.open(slow, steps[0], LayerState.RUN)
    with transaction.atomic(), batched_events():
        assert slow.step_past("r1", 1, lease)
        assert last.end(LayerState.DONE, out={"x": [1, "two"]})
        assert slow.finish("r1", filtered=False)
    assert boundary_outcome(fast) == boundary_outcome(slow)

    # A play whose end frees a concurrency slot takes the general path (it wakes others).
    limited, steps = leased_play(api, execution={"maxConcurrency": 2})
    last = Layer.open(limited, steps[0], LayerState.RUN)
    before = boundary_outcome(limited)
    assert not limited.finish_on("r1", last, {}, 1)
    assert boundary_outcome(limited) == before


def test_the_parking_migration_splits_parked_out_into_its_fields(api: Any, no_enqueue: Any) -> None:
    """plays.0008: what parked_out held (a sleep's result, $rerun, $retry, a loop's
    concurrency) moves to parked / retry_code / loop_concurrency; ended layers keep none."""
    import importlib

    from django.apps import apps

    from plays.models import LayerState

    migration = importlib.import_module("plays.migrations.0008_i14e_layer_parking")
    flow = make_flow(api, [{"ref": f"s{i}", "appId": "var", "args": {"values": {}}} for i in range(6)])
    play = Play.take_lease(trigger(api, flow)["playId"], "r1", 30)
    steps = play.flow_version.definition["layers"]
    old = [({"slept": True}, "var", LayerState.RUN), ({"$rerun": True}, "subflow", LayerState.RUN),
           ({"$retry": "FLAKY"}, "curl", LayerState.RUN), ({"concurrency": 3, "total": 9}, "iterator", LayerState.RUN),
           ({"slept": True}, "sleep", LayerState.DONE), (None, "var", LayerState.RUN)]
    layers = []
    for step, (parked_out, app_id, state) in zip(steps, old, strict=True):
        layer = Layer.open(play, step, LayerState.RUN)
        Layer.objects.filter(pk=layer.pk).update(parked_out=parked_out, app_id=app_id, state=state)
        layers.append(layer.pk)
    migration.split(apps, None)
    got = [Layer.objects.filter(pk=pk).values_list("parked", "parked_out", "retry_code", "loop_concurrency").get()
           for pk in layers]
    assert got == [("result", {"slept": True}, "", None), ("recheck", None, "", None), ("retry", None, "FLAKY", None),
                   ("recheck", None, "", 3), ("", None, "", None), ("", None, "", None)]
