"""``/metrics``: scraped with prometheus_client's own parser after a known workload."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from flows import modules
from flows.modules import Module, RunContext, StepError
from plays import metrics
from plays.models import Play, State

from .factories import make_flow, trigger

ROOT = Path(__file__).resolve().parents[1]


def scrape(client: Client | None = None, **headers: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = (client or Client()).get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum over the samples of ``name`` whose labels include ``labels``."""
    return sum(
        v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    )


class Counted(Module):
    """A module only this file uses, so that its step counts are exact whatever else runs."""

    app_id = "test-counted"
    summary = "test module"
    args_schema: ClassVar[dict] = {"type": "object"}
    out_schema: ClassVar[dict] = {"type": "object"}

    def run(self, args: dict, ctx: RunContext) -> Any:
        if args.get("fail"):
            raise StepError("told to fail", code="TOLD")
        return {"n": args.get("n")}


@pytest.fixture(autouse=True)
def counted() -> Any:
    modules.REGISTRY["test-counted"] = Counted()
    yield
    modules.REGISTRY.pop("test-counted", None)


def test_a_known_workload_is_counted_exactly(api: Any, drain: Any, no_enqueue: list[str]) -> None:
    metrics._flow_labels.clear()  # the label cap counts per process; start this test afresh
    before = scrape()
    ok = make_flow(
        api,
        [
            {"ref": "a", "appId": "test-counted", "args": {"n": "{{ $prev.args.n }}"}},
            {"ref": "b", "appId": "template", "args": {"template": "n={{ n }}", "data": {"n": "{{ $prev.a.n }}"}}},
        ],
        name="OK",
        permanentId="metrics-ok",
    )
    bad = make_flow(
        api,
        [{"ref": "parse", "appId": "test-counted", "args": {"fail": "{{ $prev.args.doc }}"}}],
        name="Bad",
        permanentId="metrics-bad",
    )
    skipped = make_flow(
        api,
        [{"ref": "a", "appId": "var", "args": {"values": {}}}],
        name="Skip",
        permanentId="metrics-skip",
        filters=[{"leftValue": "{{ $prev.args.go }}", "operator": "eq", "rightValue": True}],
    )
    approval = make_flow(
        api,
        [{"ref": "ask", "appId": "var", "args": {"values": {}}, "needsApproval": True}],
        name="Ask",
        permanentId="metrics-ask",
    )
    gpu = make_flow(
        api,
        [{"ref": "a", "appId": "var", "args": {"values": {}}}],
        name="GPU",
        permanentId="metrics-gpu",
        execution={"queue": "gpu"},
    )

    plays = [trigger(api, ok, args={"n": i})["playId"] for i in range(3)] + [trigger(api, bad, args={"doc": "{no"})["playId"] for _ in range(2)]
    plays.append(trigger(api, skipped, args={"go": False})["playId"])
    plays.append(trigger(api, approval)["playId"])
    plays.append(trigger(api, ok, args={"n": 9}, runAt=(timezone.now() + timedelta(hours=1)).isoformat())["playId"])
    waiting = trigger(api, gpu)["playId"]
    drain.flush()  # the runs' commits: their tasks are sent
    no_enqueue.remove(waiting)  # sent to the "gpu" queue, which no worker consumes
    plays.append(waiting)
    drain()
    states = dict(Play.objects.filter(pk__in=plays).values_list("pk", "state"))
    assert sorted(states.values()) == sorted(["DONE"] * 3 + ["FAIL"] * 2 + ["SKIP", "WAIT", "DEFERRED", "RUN"])

    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # Plays started and finished, by flow (permanentId) and final state: exact.
    assert value(after, "flowplay_plays_started_total", flow="metrics-ok") == 3
    assert value(after, "flowplay_plays_started_total", flow="metrics-bad") == 2
    assert value(after, "flowplay_plays_started_total", flow="metrics-ask") == 1
    assert value(after, "flowplay_plays_started_total", flow="metrics-gpu") == 1
    assert value(after, "flowplay_plays_finished_total", flow="metrics-ok", state="DONE") == 3
    assert value(after, "flowplay_plays_finished_total", flow="metrics-bad", state="FAIL") == 2
    assert value(after, "flowplay_plays_finished_total", flow="metrics-skip", state="SKIP") == 1
    assert total(after, "flowplay_plays_finished_total", flow="metrics-ask") == 0
    assert value(after, "flowplay_play_duration_seconds_count", flow="metrics-ok", state="DONE") == 3

    # Steps by module and outcome; the histograms are populated.
    assert delta("flowplay_step_duration_seconds_count", module="test-counted", outcome="done") == 3
    assert delta("flowplay_step_duration_seconds_count", module="test-counted", outcome="fail") == 2
    assert delta("flowplay_step_duration_seconds_count", module="template", outcome="done") >= 3
    assert delta("flowplay_step_duration_seconds_sum", module="test-counted", outcome="done") > 0
    assert delta("flowplay_step_duration_seconds_bucket", module="test-counted", outcome="done", le="+Inf") == 3
    # Trigger → first step: the five plays whose first step ran (the histogram has no
    # labels, so a step another test's thread finishes meanwhile may add to it).
    assert delta("flowplay_play_start_latency_seconds_count") >= 5
    assert delta("flowplay_play_start_latency_seconds_bucket", le="60.0") >= 5

    # Database facts at scrape time.
    assert value(after, "flowplay_queue_depth", queue="gpu") == 1
    assert value(after, "flowplay_queue_workers", queue="gpu") == 0
    assert value(after, "flowplay_queue_depth", queue="default") == 0
    assert value(after, "flowplay_queue_oldest_waiting_seconds", queue="gpu") >= 0
    assert value(after, "flowplay_plays_waiting_approval") == 1
    assert value(after, "flowplay_deferred_plays", kind="scheduled") == 1
    assert value(after, "flowplay_deferred_plays", kind="due") == 0
    assert value(after, "flowplay_deferred_release_lag_seconds") == 0

    # HTTP latency by route pattern, never by path.
    routes = {
        dict(ls).get("route") for (n, ls), _ in after.items() if n == "flowplay_http_request_duration_seconds_count"
    }
    assert any("run" in (r or "") and "flow_id" in (r or "") for r in routes), routes

    # Bounded labels: no play id, no flow id anywhere.
    ids = set(plays) | {f["id"] for f in (ok, bad, skipped, approval, gpu)}
    for (name, labels), _ in after.items():
        for _, label in labels:
            assert not any(i in label for i in ids), (name, labels)


def test_an_old_due_deferred_play_shows_release_lag(api: Any, no_enqueue: list[str]) -> None:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}}}])
    play_id = trigger(api, flow, runAt=(timezone.now() + timedelta(hours=1)).isoformat())["playId"]
    Play.objects.filter(pk=play_id).update(run_at=timezone.now() - timedelta(seconds=90))
    samples = scrape()
    assert Play.objects.get(pk=play_id).state == State.DEFERRED
    assert value(samples, "flowplay_deferred_plays", kind="due") == 1
    assert value(samples, "flowplay_deferred_release_lag_seconds") >= 90


def test_flows_beyond_the_cap_are_other(settings: Any, db: Any, api: Any) -> None:
    metrics._flow_labels.clear()
    settings.FLOWPLAY = {**settings.FLOWPLAY, "METRICS_MAX_FLOWS": 2}
    flows = [
        make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}}}], permanentId=f"cap-{i}") for i in range(4)
    ]
    labels = [metrics.flow_label(f["id"]) for f in flows]
    assert labels == ["cap-0", "cap-1", "other", "other"]
    assert metrics.flow_label(flows[0]["id"]) == "cap-0"
    metrics._flow_labels.clear()


def test_reaper_requeues_are_counted_by_reason(api: Any, no_enqueue: list[str]) -> None:
    from plays.tasks import reap_stuck_one

    before = scrape()
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}}}])
    lost = trigger(api, flow)["playId"]
    dead = trigger(api, flow)["playId"]
    old = timezone.now() - timedelta(minutes=5)
    Play.objects.filter(pk=lost).update(updated_at=old)
    Play.objects.filter(pk=dead).update(runner="gone:1:x", lease_until=old, updated_at=old)
    assert reap_stuck_one(30) and reap_stuck_one(30)
    after = scrape()
    for reason in ("task_lost", "lease_expired"):
        labels = {"kind": "play", "reason": reason}
        assert (
            total(after, "flowplay_reaper_requeues_total", **labels)
            - total(before, "flowplay_reaper_requeues_total", **labels)
            == 1
        )


# --- access ---------------------------------------------------------------------------------


def test_metrics_are_refused_outside_the_allow_list_without_the_token(settings: Any, db: Any) -> None:
    settings.FLOWPLAY = {**settings.FLOWPLAY, "METRICS_ALLOW": ["10.0.0.0/8"], "METRICS_TOKEN": "s3cret-scrape"}
    r = Client().get("/metrics")
    assert r.status_code == 403
    assert r.json()["error"] == "FORBIDDEN" and r.json()["statusCode"] == 403
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-scrape").status_code == 200
    assert Client(REMOTE_ADDR="10.1.2.3").get("/metrics").status_code == 200


def test_no_token_and_an_empty_allow_list_refuse_everyone(settings: Any, db: Any) -> None:
    settings.FLOWPLAY = {**settings.FLOWPLAY, "METRICS_ALLOW": [], "METRICS_TOKEN": ""}
    assert Client().get("/metrics").status_code == 403
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 403


# --- several processes ---------------------------------------------------------------------

CHILD = """
import os, sys
import django
django.setup()
from flows import modules
from flows.modules import Module, RunContext, StepError
from plays import metrics
n = int(sys.argv[1])
metrics.PLAYS_FINISHED.labels("multi", "DONE").inc(n)
metrics.STEP_DURATION.labels("var", "done").observe(0.2)
metrics.WS_CONNECTIONS.inc()
print(os.getpid())
"""


def child(folder: Path, n: int) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder), "DJANGO_SETTINGS_MODULE": "flowplay.settings"}
    env.pop("PYTEST_XDIST_WORKER", None)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


def test_values_of_several_processes_are_summed(db: Any, tmp_path: Path, monkeypatch: Any) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    first, second = child(folder, 2), child(folder, 5)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    samples = scrape()
    assert value(samples, "flowplay_plays_finished_total", flow="multi", state="DONE") == 7
    assert value(samples, "flowplay_step_duration_seconds_count", module="var", outcome="done") == 2
    assert value(samples, "flowplay_step_duration_seconds_sum", module="var", outcome="done") == pytest.approx(0.4)
    assert value(samples, "flowplay_ws_connections") == 2

    # A prefork child that exits drops its live gauges; its counters stay in the sum.
    metrics.process_exited(first)
    samples = scrape()
    assert value(samples, "flowplay_ws_connections") == 1
    assert value(samples, "flowplay_plays_finished_total", flow="multi", state="DONE") == 7

    # A new start removes what processes that no longer run left behind.
    assert metrics.clean_multiproc_dir(str(folder)) >= 2
    samples = scrape()
    assert value(samples, "flowplay_plays_finished_total", flow="multi", state="DONE") == 0
    assert not any(name.endswith(f"_{second}.db") for name in os.listdir(folder))


# --- WebSockets -------------------------------------------------------------------------------


def test_websocket_connections_and_event_lag(db: Any) -> None:
    import asyncio
    import json
    from datetime import UTC, datetime

    from plays.models import iso

    seen_open: list[float] = []

    async def consumer(scope: dict, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        seen_open.append(metrics.WS_CONNECTIONS._value.get())
        fresh = iso(datetime.now(UTC) - timedelta(seconds=1.5))
        replayed = iso(datetime.now(UTC) - timedelta(hours=2))  # history replayed on ?since=: not lag
        for stamp in (fresh, replayed):
            await send(
                {"type": "websocket.send", "text": json.dumps({"type": "play:started", "seq": 1, "timestamp": stamp})}
            )
        await send({"type": "websocket.send", "text": json.dumps({"type": "pong", "seq": 1})})
        await send({"type": "websocket.close", "code": 1000})

    async def drive() -> None:
        messages = iter([{"type": "websocket.connect"}])

        async def receive() -> dict:
            return next(messages)

        async def send(message: dict) -> None:
            pass

        await metrics.WebSocketMetrics(consumer)({"type": "websocket", "path": "/api/ws"}, receive, send)

    before = scrape()
    opened = metrics.WS_CONNECTIONS._value.get()
    asyncio.run(drive())
    after = scrape()
    assert seen_open == [opened + 1]
    assert metrics.WS_CONNECTIONS._value.get() == opened  # closed: back down
    assert (
        value(after, "flowplay_ws_event_delivery_seconds_count")
        - value(before, "flowplay_ws_event_delivery_seconds_count")
        == 1
    )
    lag = value(after, "flowplay_ws_event_delivery_seconds_sum") - value(
        before, "flowplay_ws_event_delivery_seconds_sum"
    )
    assert 1.5 <= lag < 600


def test_plays_are_counted_by_what_triggered_them(api: Any, drain: Any) -> None:
    # drain: on-commit hooks (where the count happens) run at once in this never-committed test.
    # This process's own counter values: a scrape sums every process writing to the metrics
    # folder, other test processes included.
    from flows.models import Flow

    def counted(kind: str) -> float:
        return metrics.PLAYS_TRIGGERED.labels(trigger=kind)._value.get()

    before = {kind: counted(kind) for kind in ("api", "schedule", "channel")}
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}}}])
    trigger(api, flow)
    model = Flow.objects.get(pk=flow["id"])
    Play.trigger(model, {}, source={"kind": "schedule", "scheduleId": "s1"})
    Play.trigger(model, {}, source={"kind": "channel", "route": "/hooks/x"})
    Play.trigger(model, {}, source={"kind": "channel", "route": "/hooks/x"})
    drain.flush()  # counted once committed
    for kind, n in (("api", 1), ("schedule", 1), ("channel", 2)):
        got = counted(kind) - before[kind]
        assert got == n, kind


def test_hooks_and_mcp_requests_get_a_request_id_and_the_latency_metric(settings: Any, db: Any) -> None:
    """They bypass Django's middleware (flowplay.asgi), so the ASGI wrapper gives them both."""
    import httpx
    from asgiref.sync import async_to_sync

    from flowplay.asgi import http_app


    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=http_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return [
                await client.post("/hooks/no-such-channel/x", headers={"X-Request-ID": "trace-me-1"}),
                await client.post("/hooks/no-such-channel/y"),
                await client.get("/mcp"),
            ]

    before = scrape()
    given, made, mcp = async_to_sync(go)()
    after = scrape()
    assert given.status_code == 404 and given.headers["X-Request-ID"] == "trace-me-1"
    assert made.status_code == 404 and len(made.headers["X-Request-ID"]) == 32
    assert mcp.headers["X-Request-ID"]
    name = "flowplay_http_request_duration_seconds_count"
    hooks = {"route": "hooks/<slug>/<path>", "method": "POST", "status": "4xx"}
    assert total(after, name, **hooks) - total(before, name, **hooks) == 2
    assert total(after, name, route="mcp", method="GET") - total(before, name, route="mcp", method="GET") == 1
