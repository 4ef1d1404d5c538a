"""Issue 13, storage and recording: values stored as JSON are storable on both databases,
a step runs again only when its worker died, and a broker error after commit never turns a
saved change into a 500.

Run on PostgreSQL too (where the first findings were made):
DATABASE_URL=postgres://…/flowplay_x FLOWPLAY_TEST_DB_NAME=test_flowplay_x pytest tests/test_storage_safety.py
"""

from __future__ import annotations

import json
import math
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from django.db import DataError, OperationalError, connection, transaction
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from flows import modules
from flows.modules import Module, RunContext
from plays import tasks
from plays.models import Layer, Play
from plays.outbox import BROKER_UNAVAILABLE
from tenancy.storable import MAX_DEPTH, UnstorableValue, storable

from .factories import make_flow, run, trigger

on_postgres = pytest.mark.skipif(connection.vendor != "postgresql", reason="needs PostgreSQL (DATABASE_URL)")


def post_raw(api: Any, url: str, text: str) -> Any:
    """POST JSON text as is (the test client's renderer cannot encode a lone surrogate)."""
    return api.post(url, data=text.encode(), content_type="application/json")


# --- storable() -------------------------------------------------------------------------


def test_storable_repairs_what_json_columns_refuse_and_keeps_the_rest() -> None:
    clean = {"a": [1, 2.5, "é😀", None, True], "b": {"c": "text"}}
    assert storable(clean) is clean  # nothing to repair: the same object, no copy
    assert storable({"note": "x\x00y", "lone": "\ud800", "low": "a\udc00b", "k\x00": 1}) == {
        "note": "x\ufffdy",
        "lone": "\ufffd",
        "low": "a\ufffdb",
        "k\ufffd": 1,
    }
    pair = ["\ud83d\ude00"]  # a valid surrogate pair: stored as the character it encodes
    assert storable(pair) is pair
    assert storable(["\ud83d\ude00", "\x00"]) == ["😀", "\ufffd"]
    assert storable([math.inf, -math.inf, math.nan, 10**5000, 10**20]) == [None, None, None, None, 10**20]
    assert storable((1, "\x00")) == [1, "\ufffd"]
    deep: Any = "x"
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(UnstorableValue):
        storable(deep)
    with pytest.raises(UnstorableValue):  # brackets inside strings do not hide the depth
        storable(["]" * 1000, deep, "[" * 1000])
    very_deep: Any = []
    for _ in range(5000):
        very_deep = [very_deep]
    with pytest.raises(UnstorableValue):
        storable(very_deep)


# --- Step outputs are repaired; the side effect runs once -------------------------------


class NulHandler(BaseHTTPRequestHandler):
    hits: ClassVar[dict[str, int]] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        NulHandler.hits[self.path] = NulHandler.hits.get(self.path, 0) + 1
        body = b'{"note": "x\\u0000y", "lone": "\\ud800", "pair": "\\ud83d\\ude00", "big": 1e400}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def nul_server(settings: Any) -> Any:
    settings.FLOWPLAY = {**settings.FLOWPLAY, "CURL_ALLOW": ["127.0.0.1/32"]}
    NulHandler.hits = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NulHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_curl_side_effect_behind_a_nul_returning_server_is_called_once(api: Any, drain: Any, nul_server: str) -> None:
    # Before: on PostgreSQL the layer write raised DataError, the lease expired and the
    # reaper ran the POST again and again; on SQLite the layers answered 500.
    flow = make_flow(api, [
        {"ref": "post", "appId": "curl", "args": {"url": nul_server + "/charge", "method": "POST"}},
        {"ref": "after", "appId": "var", "args": {"values": {"note": "{{ $prev.post.body.note }}"}}},
    ])
    play_id = run(api, flow, drain)
    play = api.get(f"/api/plays/{play_id}").json()
    assert play["state"] == "DONE", play
    assert NulHandler.hits == {"/charge": 1}
    body = Layer.objects.get(play_id=play_id, ref="post").out["body"]
    assert body == {"note": "x\ufffdy", "lone": "\ufffd", "pair": "😀", "big": None}
    # The next step saw the stored value, and every reader answers.
    assert Layer.objects.get(play_id=play_id, ref="after").out == {"note": "x\ufffdy"}
    layers = api.get(f"/api/plays/{play_id}/layers")
    assert layers.status_code == 200 and layers.json()[0]["out"]["body"]["note"] == "x\ufffdy"
    events = api.get(f"/api/plays/{play_id}/events")
    assert events.status_code == 200 and "x\ufffdy" in json.dumps(events.json(), ensure_ascii=False)


def test_json_parse_of_a_lone_surrogate_is_stored_repaired(api: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "p", "appId": "json-parse", "args": {"input": '"\\ud800"'}}])
    play_id = run(api, flow, drain)
    assert api.get(f"/api/plays/{play_id}").json()["state"] == "DONE"
    assert Layer.objects.get(play_id=play_id, ref="p").out == {"result": "\ufffd"}


# --- Request bodies: refused, not repaired ---------------------------------------------------


@pytest.mark.parametrize("value", ["x\\u0000y", "\\ud800", "a\\udfffb"])
def test_run_args_and_flowlet_args_with_nul_or_surrogate_are_refused(api: Any, drain: Any, value: str) -> None:
    # Before: 500 on PostgreSQL; on SQLite stored, and every history list answered 500.
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}])
    r = post_raw(api, f"/api/flows/{flow['id']}/run", '{"args": {"note": "' + value + '"}}')
    assert r.status_code == 400, r.content
    assert r.json()["error"] == "VALIDATION_ERROR" and list(r.json()["details"]) == ["args.note"]
    layers = '[{"ref": "a", "appId": "var", "args": {"values": {"x": "' + value + '"}}}]'
    r = post_raw(api, "/api/flows", '{"name": "n", "layers": ' + layers + "}")
    assert r.status_code == 400 and r.json()["error"] == "VALIDATION_ERROR", r.content
    r = post_raw(api, f"/api/flows/{flow['id']}/run", '{"args": {"k' + value + '": 1}}')
    assert r.status_code == 400 and r.json()["error"] == "VALIDATION_ERROR", r.content
    r = post_raw(api, f"/api/flows/{flow['id']}/run", '{"args": {"n": 1e400}}')
    assert r.status_code == 400 and r.json()["details"] == {"args.n": ["numbers must be finite"]}, r.content
    assert not Play.objects.exists()
    assert api.get("/api/plays").status_code == 200


# --- A deterministic write error fails the step once ------------------------------------------


class Deep(Module):
    """Returns a value nested deeper than can be stored; counts its calls."""

    app_id = "test-deep"
    summary = "test module"
    args_schema: ClassVar[dict] = {"type": "object"}
    out_schema: ClassVar[dict] = {}
    calls = 0

    def run(self, args: dict, ctx: RunContext) -> Any:
        Deep.calls += 1
        value: Any = "bottom"
        for _ in range(int(args.get("depth", MAX_DEPTH + 10))):
            value = {"v": value}
        return value


class Once(Module):
    """A side effect: counts its calls, returns what args.out says."""

    app_id = "test-once"
    summary = "test module"
    args_schema: ClassVar[dict] = {"type": "object"}
    out_schema: ClassVar[dict] = {}
    calls = 0

    def run(self, args: dict, ctx: RunContext) -> Any:
        Once.calls += 1
        if args.get("kill_connections"):
            kill_other_connections()
        return {"done": Once.calls}


@pytest.fixture(autouse=True)
def test_modules() -> Any:
    Deep.calls = Once.calls = 0
    modules.REGISTRY["test-deep"] = Deep()
    modules.REGISTRY["test-once"] = Once()
    yield
    modules.REGISTRY.pop("test-deep", None)
    modules.REGISTRY.pop("test-once", None)


@pytest.mark.parametrize("on_error", ["fail", "continue"])
def test_an_unstorable_outcome_fails_the_step_once_with_storage_error(api: Any, drain: Any, on_error: str) -> None:
    flow = make_flow(api, [
        {"ref": "deep", "appId": "test-deep", "args": {}, "onError": on_error},
        {"ref": "next", "appId": "var", "args": {"values": {"x": 1}}},
    ])
    play_id = run(api, flow, drain)
    play = Play.objects.get(pk=play_id)
    layer = Layer.objects.get(play_id=play_id, ref="deep")
    assert Deep.calls == 1 and layer.attempts == 1
    assert layer.state == "FAIL" and layer.error["code"] == "STORAGE_ERROR", layer.error
    assert "nested more than" in layer.error["message"]
    if on_error == "fail":
        assert play.state == "FAIL" and play.error["ref"] == "deep"
    else:
        assert play.state == "DONE" and Layer.objects.get(play_id=play_id, ref="next").state == "DONE"
    assert api.get(f"/api/plays/{play_id}/layers").status_code == 200


def test_a_database_error_while_recording_fails_the_step_once(api: Any, drain: Any, monkeypatch: Any) -> None:
    # Before: the error escaped the runner, the lease expired, the step ran again, for ever.
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise DataError("value out of range")

    monkeypatch.setattr(Play, "step_on", refuse)
    real_end = Layer.end
    monkeypatch.setattr(Layer, "end", lambda self, state, **kw: refuse() if state == "DONE" else real_end(self, state, **kw))
    flow = make_flow(api, [
        {"ref": "effect", "appId": "test-once", "args": {}},
        {"ref": "next", "appId": "var", "args": {"values": {"x": 1}}},
    ])
    play_id = run(api, flow, drain)
    for _ in range(3):  # the reaper finds nothing to run again
        assert not tasks.reap_stuck_one(0)
        drain()
    play = Play.objects.get(pk=play_id)
    assert Once.calls == 1
    assert play.state == "FAIL"
    layer = Layer.objects.get(play_id=play_id, ref="effect")
    assert layer.error == {"code": "STORAGE_ERROR", "message": "The outcome of step effect could not be stored: "
                           "DataError: value out of range"}


# --- A transient error while recording is retried with the result held ---------------------------


@pytest.mark.django_db(transaction=True)
def test_a_dropped_connection_while_recording_is_retried_not_rerun(api: Any, drain: Any, monkeypatch: Any,
                                                                   settings: Any) -> None:
    drops = {"n": 0}
    real_end, real_step_on = Layer.end, Play.step_on

    def drop() -> None:
        drops["n"] += 1
        raise OperationalError("server closed the connection unexpectedly")

    def end(self: Layer, state: str, **kw: Any) -> Any:
        if state == "DONE" and self.ref == "effect" and drops["n"] < 3:
            drop()
        return real_end(self, state, **kw)

    def step_on(self: Play, runner: str, done: Layer, *args: Any) -> Any:
        if done.ref == "effect" and drops["n"] < 3:
            drop()
        return real_step_on(self, runner, done, *args)

    from plays import runner

    real_reset = runner.reset_connection
    reaped: list[bool] = []

    def reset_and_reap() -> None:
        # The outage outlived the lease: the reaper requeued the play before the retry.
        real_reset()
        if not reaped:
            Play.objects.filter(state="RUN").update(lease_until=timezone.now() - timedelta(seconds=1))
            reaped.append(tasks.reap_stuck_one(3600))

    monkeypatch.setattr(Layer, "end", end)
    monkeypatch.setattr(Play, "step_on", step_on)
    monkeypatch.setattr(runner, "reset_connection", reset_and_reap)
    flow = make_flow(api, [
        {"ref": "effect", "appId": "test-once", "args": {}},
        {"ref": "next", "appId": "var", "args": {"values": {"x": "{{ $prev.effect.done }}"}}},
    ])
    play_id = trigger(api, flow)["playId"]
    drain()  # also runs the task the reaper sent: it finds the play taken back, or done
    play = Play.objects.get(pk=play_id)
    assert drops["n"] == 3 and reaped == [True]
    assert play.state == "DONE" and Once.calls == 1
    effect = Layer.objects.get(play_id=play_id, ref="effect")
    assert effect.attempts == 1 and effect.out == {"done": 1}
    assert Layer.objects.get(play_id=play_id, ref="next").out == {"x": 1}


def kill_other_connections() -> None:
    """Cut every other connection to this database, as a PostgreSQL restart does."""
    import psycopg

    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    params.pop("prepare_threshold", None)
    params.pop("server_side_binding", None)
    with psycopg.connect(**params, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@on_postgres
@pytest.mark.django_db(transaction=True)
def test_postgres_connections_cut_while_a_step_runs_do_not_run_it_again(api: Any, drain: Any) -> None:
    # Before: every step whose result write hit a restart ran again after the lease expired.
    flow = make_flow(api, [
        {"ref": "effect", "appId": "test-once", "args": {"kill_connections": True}},
        {"ref": "next", "appId": "var", "args": {"values": {"x": "{{ $prev.effect.done }}"}}},
    ])
    play_id = run(api, flow, drain)
    assert Once.calls == 1
    assert Play.objects.get(pk=play_id).state == "DONE"
    assert Layer.objects.get(play_id=play_id, ref="effect").attempts == 1


# --- Broker down after commit -----------------------------------------------------------------


@pytest.fixture
def broker_down(monkeypatch: Any) -> Any:
    """on_commit runs at once (the test's transaction never commits); sending any task raises."""
    monkeypatch.setattr(transaction, "on_commit", lambda func, using=None, robust=False: func())

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise BrokerError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    for task in (tasks.run_play, tasks.run_iteration, tasks.release_flow):
        monkeypatch.setattr(task, "apply_async", refuse)
        monkeypatch.setattr(task, "delay", refuse)
    return refuse


def assert_saved_and_told(r: Any, status: int = 200) -> dict[str, Any]:
    assert r.status_code == status, r.content
    assert r["Flowplay-Warning"] == BROKER_UNAVAILABLE
    body = r.json()
    assert body["warning"]["code"] == BROKER_UNAVAILABLE
    return body


def test_broker_down_after_commit_answers_the_saved_change_and_the_reaper_starts_it(
    api: Any, broker_down: Any, monkeypatch: Any
) -> None:
    # Before: POST /run answered 500 although the play was saved; a client retried and
    # created a second play.
    flow = make_flow(api, [{"ref": "ask", "appId": "var", "args": {"values": {"x": 1}}, "needsApproval": True}])
    r = api.post(f"/api/flows/{flow['id']}/run", {"args": {}}, format="json")
    body = assert_saved_and_told(r, 201)
    play = Play.objects.get(pk=body["playId"])
    assert play.state == "RUN" and play.runner == "" and Play.objects.count() == 1
    # Marked for the reaper's next sweep (an expired lease), not after REAP_IDLE_SECONDS.
    assert play.lease_until is not None
    # While the broker is still down the reaper's own send fails again, and marks it again.
    assert tasks.reap_stuck_one(idle_seconds=3600)
    assert Play.objects.get(pk=play.pk).lease_until is not None
    # The broker is back: the next sweep sends the play's task.
    sent: list[str] = []
    monkeypatch.setattr(tasks.run_play, "apply_async", lambda args, **kw: sent.append(args[0]))
    assert tasks.reap_stuck_one(idle_seconds=3600)
    assert sent == [play.pk]
    from plays import runner

    runner.run(sent.pop())
    play.refresh_from_db()
    assert play.state == "WAIT"
    layer = play.pending_approval()
    # Approve with the broker down again: the decision is saved, and the answer says so.
    monkeypatch.setattr(tasks.run_play, "apply_async", broker_down)
    r = api.post(f"/api/plays/{play.pk}/approve", {"layerId": layer.pk, "decision": "approved"}, format="json")
    assert_saved_and_told(r)
    assert Play.objects.get(pk=play.pk).state == "RUN"
    # Hold and resume, retry of a failed play, start of a NEW one: the same.
    assert api.post(f"/api/plays/{play.pk}/hold").status_code == 200
    assert_saved_and_told(api.post(f"/api/plays/{play.pk}/resume"))
    assert api.post(f"/api/plays/{play.pk}/cancel").status_code == 200
    body = assert_saved_and_told(api.post(f"/api/plays/{play.pk}/retry"), 201)
    assert Play.objects.get(pk=body["playId"]).state == "RUN"
    r = api.post(f"/api/flows/{flow['id']}/run", {"args": {}, "start": False}, format="json")
    assert r.status_code == 201 and "Flowplay-Warning" not in r  # nothing was sent: nothing to say
    assert_saved_and_told(api.post(f"/api/plays/{r.json()['playId']}/start"))


def test_broker_up_answers_carry_no_warning(api: Any, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}])
    r = api.post(f"/api/flows/{flow['id']}/run", {"args": {}}, format="json")
    assert r.status_code == 201 and "warning" not in r.json() and "Flowplay-Warning" not in r


def test_a_loops_iterations_unsent_while_the_broker_is_down_are_reaped_and_finish(api: Any, drain: Any,
                                                                                  monkeypatch: Any) -> None:
    from plays import runner
    from plays.models import Iteration

    from .test_loops import loop_flow

    flow = loop_flow(api, concurrency=2)
    play_id = trigger(api, flow, {"items": [1, 2, 3]})["playId"]

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise BrokerError("Connection refused.")

    monkeypatch.setattr(tasks.run_iteration, "apply_async", refuse)
    runner.run(play_id)  # the play's runner launches the first iterations
    drain.flush()  # its commit: sending them fails
    launched = Iteration.objects.filter(play_id=play_id, state="RUN")
    assert launched.count() == 2 and all(it.runner == "" and it.lease_until is not None for it in launched)
    # The broker is back: the reaper's next sweep sends them, and the loop finishes.
    monkeypatch.setattr(tasks.run_iteration, "apply_async", lambda args, **kw: drain.iterations.append(args[0]))
    assert tasks.reap_stuck_iteration_one(3600) and tasks.reap_stuck_iteration_one(3600)
    drain()
    assert Play.objects.get(pk=play_id).state == "DONE"
