"""Fault injection against real processes: workers killed and stopped, the web process,
Redis and PostgreSQL restarted. Each test shows that nothing is lost and nothing runs twice.

All tests share one private ``Cluster`` (see processes.py) with its own database and
broker, so killing its workers never disturbs the session server of other tests. Steps
that must run once call a counting local HTTP server, which proves it.

The Redis and PostgreSQL restarts run only with ``DATABASE_URL`` and ``REDIS_URL`` set (CI's
second run); in that run they are not skipped. They restart the servers those URLs name:
point them at private instances (README, Reliability) to run the drills on a shared machine.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..polling import stays
from .processes import (
    PG_ONLY_REASON,
    Cluster,
    CountingServer,
    EventCollector,
    make_flow,
    pg_and_redis,
    redis_cli,
    restart_postgres,
    run_play,
    seqs_of,
    start_redis,
    stop_redis,
    wait_terminal,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

pg_only = pytest.mark.skipif(not pg_and_redis(), reason=PG_ONLY_REASON)

# The broker's visibility timeout in this cluster (Redis): shorter than the long step and the
# deferral below, so a redelivery would happen if anything relied on the broker alone.
VISIBILITY = 3


def redis_run_id() -> str:
    return next(line for line in redis_cli("info", "server").stdout.splitlines() if line.startswith("run_id:"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root: Path = tmp_path_factory.mktemp("faults")
    c = Cluster.create(root, CELERY_VISIBILITY_TIMEOUT=str(VISIBILITY))
    try:
        c.migrate_and_seed()
        c.start("web")
        c.start("beat")
        c.start("worker-a")
        yield c
    finally:
        c.destroy()


@pytest.fixture(scope="module")
def counter() -> Iterator[CountingServer]:
    srv = CountingServer()
    yield srv
    srv.close()


@pytest.fixture
def alice(cluster: Cluster) -> Iterator[httpx.Client]:
    client = cluster.client("alice")
    yield client
    client.close()


def curl(ref: str, url: str, **args: Any) -> dict[str, Any]:
    return {"ref": ref, "appId": "curl", "args": {"url": url, "timeout": 60, **args}}


def events_of(client: httpx.Client, play_id: str) -> list[dict[str, Any]]:
    return client.get(f"/api/plays/{play_id}/events").json()


def layers_of(client: httpx.Client, play_id: str) -> dict[str, dict[str, Any]]:
    return {layer["ref"]: layer for layer in client.get(f"/api/plays/{play_id}/layers").json()}


def only_worker(cluster: Cluster, name: str) -> None:
    """Make ``name`` the only running worker."""
    for other in [n for n in cluster.procs if n.startswith("worker") and n != name]:
        cluster.stop(other)
    cluster.start(name, "worker")


def test_sigkilled_worker_mid_step_play_finishes_on_another_worker(cluster: Cluster, counter: CountingServer,
                                                                    alice: httpx.Client) -> None:
    only_worker(cluster, "worker-a")
    flow = make_flow(alice, "Crash mid-step", [
        curl("first", counter.url + "/kill/first"),
        curl("slow", counter.url + "/kill/slow?s=4"),
        curl("last", counter.url + "/kill/last"),
    ])
    play_id = run_play(alice, flow["id"])
    # The slow step is in flight on worker-a: kill it and its pool, no chance to clean up.
    wait_until(lambda: counter.count("/kill/slow") == 1, 60, "the slow step to start")
    killed_at = time.monotonic()
    cluster.kill("worker-a", signal.SIGKILL)
    cluster.start("worker-b", "worker")
    play = wait_terminal(alice, [play_id], timeout=90)[play_id]
    recovered_in = time.monotonic() - killed_at
    assert play["state"] == "DONE", (play, cluster.logs())
    layers = layers_of(alice, play_id)
    # Completed steps are not run again; the interrupted one is, once more, and says so.
    assert counter.count("/kill/first") == 1
    assert counter.count("/kill/slow") == 2
    assert counter.count("/kill/last") == 1
    assert layers["first"]["attempts"] == 1 and layers["last"]["attempts"] == 1
    assert layers["slow"]["attempts"] == 2 and layers["slow"]["state"] == "DONE"
    notes = [e.get("note") for e in events_of(alice, play_id) if e["type"] == "play:layer:started" and e["ref"] == "slow"]
    assert notes == [None, "previous attempt interrupted"]
    # Found by the lease (3 s) and the reaper, not by the broker's visibility timeout.
    assert recovered_in < 60, recovered_in


def test_graceful_sigterm_finishes_the_step_in_flight(cluster: Cluster, counter: CountingServer,
                                                      alice: httpx.Client) -> None:
    only_worker(cluster, "worker-b")
    flow = make_flow(alice, "Graceful stop", [curl("slow", counter.url + "/term/slow?s=3"),
                                              curl("next", counter.url + "/term/next")])
    play_id = run_play(alice, flow["id"])
    wait_until(lambda: counter.count("/term/slow") == 1, 60, "the slow step to start")
    code = cluster.terminate("worker-b", timeout=90)
    assert code == 0, cluster.log("worker-b")[-3000:]
    # The worker finished its task before exiting: nothing left for another worker to redo.
    play = alice.get(f"/api/plays/{play_id}").json()
    assert play["state"] == "DONE", play
    cluster.start("worker-c", "worker")
    assert counter.count("/term/slow") == 1 and counter.count("/term/next") == 1
    assert layers_of(alice, play_id)["slow"]["attempts"] == 1


def test_long_step_and_long_deferral_run_exactly_once(cluster: Cluster, counter: CountingServer,
                                                      alice: httpx.Client) -> None:
    only_worker(cluster, "worker-c")
    cluster.start("worker-d", "worker")  # a second worker that could take a redelivered task
    seconds = 3 * VISIBILITY  # longer than the visibility timeout and than three leases
    long_flow = make_flow(alice, "Long step", [curl("long", counter.url + f"/long/step?s={seconds}")])
    deferred_flow = make_flow(alice, "Deferred", [curl("once", counter.url + "/long/deferred")])
    long_id = run_play(alice, long_flow["id"])
    deferred_id = run_play(alice, deferred_flow["id"], delayMs=(VISIBILITY + 2) * 1000)
    assert alice.get(f"/api/plays/{deferred_id}").json()["state"] == "DEFERRED"
    plays = wait_terminal(alice, [long_id, deferred_id], timeout=90)
    assert {p["state"] for p in plays.values()} == {"DONE"}
    # Give a would-be redelivery its chance (the visibility timeout) before counting.
    stays(lambda: counter.count("/long/step") == 1 and counter.count("/long/deferred") == 1, VISIBILITY + 1,
          what="each step ran once")
    assert counter.count("/long/step") == 1
    assert counter.count("/long/deferred") == 1
    assert layers_of(alice, long_id)["long"]["attempts"] == 1
    assert layers_of(alice, deferred_id)["once"]["attempts"] == 1


def test_web_restart_clients_resume_and_lose_no_event(cluster: Cluster, counter: CountingServer,
                                                      alice: httpx.Client) -> None:
    cluster.start("worker-c", "worker")
    flow = make_flow(alice, "Across a web restart", [curl("a", counter.url + "/web/a?s=1"),
                                                     {"ref": "nap", "appId": "sleep", "args": {"ms": 1500}},
                                                     curl("b", counter.url + "/web/b")])
    collector = EventCollector(cluster.ws_url, alice.cookies).start()
    try:
        play_ids = [run_play(alice, flow["id"], {"i": i}) for i in range(5)]
        cluster.stop("web")
        cluster.start("web")
        # The same session goes on after the restart.
        assert alice.get("/api/auth/me").status_code == 200
        plays = wait_terminal(alice, play_ids, timeout=90)
        assert {p["state"] for p in plays.values()} == {"DONE"}
        expected = sorted(s for p in play_ids for s in seqs_of(alice, p))
        wait_until(lambda: sorted(collector.seqs_for(set(play_ids))) == expected, 30,
                   "the WebSocket client to have every event")
    finally:
        collector.stop()
    assert collector.reconnects >= 1
    got = collector.seqs_for(set(play_ids))
    assert len(got) == len(set(got)), "an event was delivered twice"
    assert counter.count("/web/b") == 5


@pg_only
def test_redis_restart_during_100_running_plays(cluster: Cluster, counter: CountingServer,
                                                alice: httpx.Client) -> None:
    cluster.start("worker-c", "worker")
    flow = make_flow(alice, "Across a Redis restart", [
        {"ref": "a", "appId": "var", "args": {"values": {"i": "{{ $prev.args.i }}"}}},
        curl("hit", counter.url + "/redis/{{ $prev.args.i }}"),
        {"ref": "nap", "appId": "sleep", "args": {"ms": 2000}},
        {"ref": "b", "appId": "var", "args": {"values": {"i": "{{ $prev.a.i }}"}}},
    ])
    approval = make_flow(alice, "Approved while Redis is down", [
        {"ref": "ask", "appId": "var", "args": {"values": {}}, "needsApproval": True},
        curl("after", counter.url + "/redis/approved"),
    ])
    waiting = run_play(alice, approval["id"])
    wait_until(lambda: alice.get(f"/api/plays/{waiting}").json()["state"] == "WAIT", 60, "the approval play to wait")
    layer = alice.get(f"/api/plays/{waiting}").json()["pendingApproval"]["layerId"]
    collector = EventCollector(cluster.ws_url, alice.cookies).start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            play_ids = list(pool.map(lambda i: run_play(alice, flow["id"], {"i": i}), range(100)))
        before = redis_run_id()
        stop_redis()
        try:
            # A change saved while the broker is down answers 2xx and says so: a client has
            # no reason to send it again (and make a second play).
            down = [alice.post(f"/api/flows/{flow['id']}/run", json={"args": {"i": 100 + i}}) for i in range(10)]
            approved = alice.post(f"/api/plays/{waiting}/approve", json={"layerId": layer, "decision": "approved"})
        finally:
            start_redis()
        assert redis_run_id() != before, "Redis was not restarted"
        for r in [*down, approved]:
            assert r.status_code in (200, 201), (r.status_code, r.text[:500])
            assert r.headers.get("Flowplay-Warning") == "BROKER_UNAVAILABLE", r.headers
        play_ids += [r.json()["playId"] for r in down]
        plays = wait_terminal(alice, [*play_ids, waiting], timeout=150)
        assert {p["state"] for p in plays.values()} == {"DONE"}, cluster.logs()
        for play_id in play_ids[:10]:
            assert layers_of(alice, play_id)["b"]["out"] == {"i": plays[play_id]["args"]["i"]}
        expected = sorted(s for p in play_ids for s in seqs_of(alice, p))
        wait_until(lambda: sorted(set(collector.seqs_for(set(play_ids)))) == expected, 60,
                   "the WebSocket client to have every event")
    finally:
        collector.stop()
    got = collector.seqs_for(set(play_ids))
    assert len(got) == len(set(got)), "an event was delivered twice"
    # No DONE step ran twice: each play's side effect was called once.
    assert [counter.count(f"/redis/{i}") for i in range(110)] == [1] * 110
    assert counter.count("/redis/approved") == 1
    assert alice.get(f"/api/flows/{flow['id']}/plays").json()["total"] == 110  # no extra play from a retry


@pg_only
def test_postgres_restart_workers_and_web_reconnect(cluster: Cluster, counter: CountingServer,
                                                    alice: httpx.Client) -> None:
    cluster.start("worker-c", "worker")
    flow = make_flow(alice, "Across a PostgreSQL restart", [
        curl("a", counter.url + "/pg/a{{ $prev.args.i }}?s=1"),
        {"ref": "nap", "appId": "sleep", "args": {"ms": 1000}},
        {"ref": "b", "appId": "var", "args": {"values": {"ok": True}}},
    ])
    play_ids = [run_play(alice, flow["id"], {"i": i}) for i in range(20)]
    wait_until(lambda: sum(counter.count(f"/pg/a{i}") for i in range(20)) >= 2, 60, "steps to be in flight")
    started = cluster.sql("SELECT pg_postmaster_start_time()")
    restart_postgres()
    assert cluster.sql("SELECT pg_postmaster_start_time()") != started, "PostgreSQL was not restarted"
    # Web reconnects by itself: health and the same session work again.
    cluster.wait_healthy(timeout=60)
    wait_until(lambda: alice.get("/api/auth/me").status_code == 200, 60, "the API to answer again")
    plays = wait_terminal(alice, play_ids, timeout=150)
    # No play is left non-terminal; those cut off mid-step were reaped and finished.
    assert {p["state"] for p in plays.values()} == {"DONE"}, cluster.logs()
    for play_id in play_ids:
        layers = layers_of(alice, play_id)
        assert [layers[r]["state"] for r in ("a", "nap", "b")] == ["DONE"] * 3
    # A result that met the restart was written once the database was back, with the
    # result the runner held: no DONE step ran twice.
    assert [counter.count(f"/pg/a{i}") for i in range(20)] == [1] * 20, cluster.logs()
    assert {layers_of(alice, p)["a"]["attempts"] for p in play_ids} == {1}


# --- Hostile concurrency over HTTP -----------------------------------------------------------


def test_100_concurrent_identical_runs_with_one_idempotency_key_make_one_play(cluster: Cluster,
                                                                             alice: httpx.Client) -> None:
    flow = make_flow(alice, "Idempotent x100", [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}])
    body = {"args": {"order": "ORD-100"}, "idempotencyKey": "order-ORD-100"}
    clients = [cluster.client("alice") for _ in range(4)]

    def post(i: int) -> tuple[int, str]:
        r = clients[i % len(clients)].post(f"/api/flows/{flow['id']}/run", json=body)
        return r.status_code, r.json().get("playId", r.text)

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(post, range(100)))
    for c in clients:
        c.close()
    statuses = [s for s, _ in results]
    assert statuses.count(201) == 1 and statuses.count(200) == 99, results
    assert len({play for _, play in results}) == 1
    listing = alice.get(f"/api/flows/{flow['id']}/plays?idempotencyKey=order-ORD-100").json()
    assert listing["total"] == 1


def play_state_chain(events: list[dict[str, Any]]) -> list[str]:
    """The play's states as its events tell them; each change must start where the last ended."""
    chain: list[str] = []
    for e in events:
        if e["type"] not in ("play:started", "play:state", "play:waiting", "play:completed", "play:failed"):
            continue
        if "previousState" in e:
            assert chain and e["previousState"] == chain[-1], (e, chain)
        chain.append(e["state"])
    return chain


def test_100_concurrent_hold_resume_cancel_calls_leave_one_consistent_story(cluster: Cluster, counter: CountingServer,
                                                                            alice: httpx.Client) -> None:
    cluster.start("worker-c", "worker")
    # Long enough that the play cannot finish before the calls are over, however slow they are:
    # the cancel among them always finds it unfinished.
    flow = make_flow(alice, "Hammered", [curl("slow", counter.url + "/hammer/slow?s=2"),
                                         {"ref": "nap", "appId": "sleep", "args": {"ms": 120000}},
                                         curl("end", counter.url + "/hammer/end")])
    play_id = run_play(alice, flow["id"])
    clients = [cluster.client("alice") for _ in range(4)]
    verbs = ["hold", "resume"] * 45 + ["cancel"] * 10

    def call(i: int) -> tuple[str, int]:
        verb = verbs[i]
        r = clients[i % len(clients)].post(f"/api/plays/{play_id}/{verb}")
        return verb, r.status_code

    import random

    random.Random(8).shuffle(verbs)
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(call, range(len(verbs))))
    for c in clients:
        c.close()
    assert {status for _, status in results} <= {200, 409}, results
    # Exactly one cancel won; every verb after it was refused.
    assert [v for v, s in results if v == "cancel" and s == 200] == ["cancel"], results
    play = alice.get(f"/api/plays/{play_id}").json()
    assert play["state"] == "FAIL" and play["error"]["code"] == "CANCELLED"
    events = events_of(alice, play_id)
    chain = play_state_chain(events)
    assert chain[-1] == "FAIL" and chain.count("FAIL") == 1
    assert [e["type"] for e in events].count("play:failed") == 1
    holds = sum(1 for v, s in results if v == "hold" and s == 200)
    resumes = sum(1 for v, s in results if v == "resume" and s == 200)
    assert chain.count("ON_HOLD") == holds
    assert resumes in (holds, holds - 1)  # the cancel may have come while held
    # A cancelled play stays cancelled: nothing runs after it.
    stays(lambda: alice.get(f"/api/plays/{play_id}").json()["state"] == "FAIL" and counter.count("/hammer/end") == 0,
          4, what="cancelled and nothing ran after")
    assert alice.get(f"/api/plays/{play_id}").json()["state"] == "FAIL"
    assert counter.count("/hammer/end") == 0
    assert all(e["seq"] < f["seq"] for e, f in zip(events, events[1:], strict=False))
