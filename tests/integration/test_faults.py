"""Fault injection against real processes: workers killed and stopped, the web process,
Redis and PostgreSQL restarted. Each test shows that nothing is lost and nothing runs twice.

All tests share one private ``Cluster`` (see processes.py) with its own database and
broker, so killing its workers never disturbs the session server of other tests. Steps
that must run once call a counting local HTTP server, which proves it.

The Redis and PostgreSQL restarts run only with ``DATABASE_URL`` and ``REDIS_URL`` set (CI's
second run); in that run they are not skipped.
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

from .processes import (
    PG_ONLY_REASON,
    Cluster,
    CountingServer,
    EventCollector,
    make_flow,
    pg_and_redis,
    redis_cli,
    restart_postgres,
    restart_redis,
    run_play,
    seqs_of,
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
    # Give a would-be redelivery its chance before counting.
    time.sleep(VISIBILITY + 1)
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
def test_redis_restart_during_100_running_plays(cluster: Cluster, alice: httpx.Client) -> None:
    cluster.start("worker-c", "worker")
    flow = make_flow(alice, "Across a Redis restart", [
        {"ref": "a", "appId": "var", "args": {"values": {"i": "{{ $prev.args.i }}"}}},
        {"ref": "nap", "appId": "sleep", "args": {"ms": 2000}},
        {"ref": "b", "appId": "var", "args": {"values": {"i": "{{ $prev.a.i }}"}}},
    ])
    collector = EventCollector(cluster.ws_url, alice.cookies).start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            play_ids = list(pool.map(lambda i: run_play(alice, flow["id"], {"i": i}), range(100)))
        before = redis_run_id()
        restart_redis()
        assert redis_run_id() != before, "Redis was not restarted"
        plays = wait_terminal(alice, play_ids, timeout=150)
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


@pg_only
def test_postgres_restart_workers_and_web_reconnect(cluster: Cluster, counter: CountingServer,
                                                    alice: httpx.Client) -> None:
    cluster.start("worker-c", "worker")
    flow = make_flow(alice, "Across a PostgreSQL restart", [
        curl("a", counter.url + "/pg/a?s=1"),
        {"ref": "nap", "appId": "sleep", "args": {"ms": 1000}},
        {"ref": "b", "appId": "var", "args": {"values": {"ok": True}}},
    ])
    play_ids = [run_play(alice, flow["id"], {"i": i}) for i in range(20)]
    wait_until(lambda: counter.count("/pg/a") >= 2, 60, "steps to be in flight")
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
