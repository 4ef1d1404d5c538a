"""A fleet across hosts (network namespaces): partitions, a slow link, rolling restarts,
queue affinity. Each scenario runs 200+ plays of 5 ``curl`` steps and then checks the same
things: every play reached its documented end state, no step's side effect happened more
often than the step was attempted (once for a step done at its first attempt), no layer
twice, every play's events numbered 1, 2, 3 … without a gap, and the company-wide replay
(``GET /api/events?since=<cursor>``) holds each stored event exactly once, in cursor order.

Figures (takeover time, steps/s with a slow link) go to ``fleet-results.json`` in the
fleet's folder and to the test's output; the README's Reliability section quotes them.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .fleet import Fleet, as_json, available, five_curl_steps, fleet_root
from .processes import TERMINAL, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.fleet]

PLAYS = 200
RESULTS: dict[str, Any] = {}


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    reason = available()
    if reason:
        pytest.skip(f"no fleet on this machine: {reason}")
    fleet = Fleet(root=fleet_root())
    try:
        fleet.start()
        yield fleet
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        (fleet.root / "fleet-results.json").write_text(json.dumps(RESULTS, indent=1))
        print("fleet results:", json.dumps(RESULTS))
        fleet.destroy()


# --- helpers -----------------------------------------------------------------------------------


def make_flow(fleet: Fleet, name: str, ms: int = 0, **fields: Any) -> str:
    with fleet.client("web1") as client:
        r = client.post("/api/flows", json={"name": name, "layers": five_curl_steps(fleet, ms), **fields})
        assert r.status_code == 201, r.text
        return r.json()["id"]


def post_run(
    fleet: Fleet,
    flow_id: str,
    key: str,
    webs: tuple[str, ...] = ("web1", "web2"),
    errors: list[int] | None = None,
    deadline: float = 120,
) -> str:
    """POST /run with an idempotency key, retried on the other web host until it answers."""
    ends = time.monotonic() + deadline
    for web in itertools.cycle(webs):
        try:
            with fleet.client(web, timeout=5) as client:
                r = client.post(f"/api/flows/{flow_id}/run", json={"args": {"key": key}, "idempotencyKey": key})
        except httpx.HTTPError:
            r = None
        if r is not None and r.status_code in (200, 201):
            return r.json()["playId"]
        if r is not None and r.status_code >= 500 and errors is not None:
            errors.append(r.status_code)
        if time.monotonic() > ends:
            raise AssertionError(f"no web host accepted run {key}")
        time.sleep(0.2)
    raise AssertionError("unreachable")


def run_many(fleet: Fleet, flow_id: str, prefix: str, n: int = PLAYS) -> list[str]:
    """Start ``n`` plays through both web hosts, 8 requests at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> str:
        return post_run(fleet, flow_id, f"{prefix}-{i}", webs=("web1", "web2") if i % 2 else ("web2", "web1"))

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def api(fleet: Fleet) -> httpx.Client:
    for web in ("web2", "web1"):
        try:
            client = fleet.client(web, timeout=10)
            if client.get("/api/health").status_code == 200:
                return client
        except httpx.HTTPError:
            continue
    raise AssertionError("no web host answers")


def wait_done(fleet: Fleet, play_ids: list[str], timeout: float = 300) -> dict[str, dict[str, Any]]:
    client = api(fleet)
    done: dict[str, dict[str, Any]] = {}

    def check() -> bool:
        rows = fleet.sql("SELECT id, state FROM plays_play WHERE id = ANY(%s)", (play_ids,))
        if sum(1 for _, state in rows if state in TERMINAL) < len(play_ids):
            return False
        for play_id in play_ids:
            done[play_id] = client.get(f"/api/plays/{play_id}").json()
        return True

    try:
        wait_until(check, timeout, f"{len(play_ids)} plays to end", every=0.5)
    except AssertionError:
        rows = dict(fleet.sql("SELECT id, state FROM plays_play WHERE id = ANY(%s)", (play_ids,)))
        pending = {k: v for k, v in rows.items() if v not in TERMINAL}
        raise AssertionError(f"{len(pending)} plays not ended: {as_json(pending)}\n{fleet.logs()}") from None
    return done


def events_of(client: httpx.Client, play_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/api/plays/{play_id}/events")
    assert r.status_code == 200, r.text
    return r.json()


def replay(client: httpx.Client) -> list[dict[str, Any]]:
    """Every event of the company through GET /api/events, page by page from the start."""
    events: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"size": 100, **({"since": cursor} if cursor is not None else {})}
        r = client.get("/api/events", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        page = body["data"] if isinstance(body, dict) else body
        if not page:
            return events
        events.extend(page)
        cursor = page[-1]["cursor"]


def verify(fleet: Fleet, play_ids: list[str], state: str = "DONE") -> None:
    """The checks every scenario ends with (see the module docstring)."""
    plays = wait_done(fleet, play_ids)
    wrong = {p: (v["state"], v.get("error")) for p, v in plays.items() if v["state"] != state}
    assert not wrong, f"plays not {state}: {as_json(wrong)}"
    client = api(fleet)
    counts = fleet.counts()
    stored: set[tuple[str, int]] = set()
    for play_id in play_ids:
        layers = client.get(f"/api/plays/{play_id}/layers").json()
        refs = [layer["ref"] for layer in layers]
        assert sorted(refs) == [f"s{i}" for i in range(1, 6)], (play_id, refs)  # each step once, no duplicate
        for layer in layers:
            assert layer["state"] == "DONE", (play_id, layer)
            calls = len(counts.get(f"{play_id}/{layer['ref']}", []))
            # A step is called again only for an attempt that the runner counted (its
            # worker was cut off mid-call); a step done at its first attempt, exactly once.
            assert 1 <= calls <= layer["attempts"], (play_id, layer["ref"], calls, layer["attempts"])
        seqs = [e["seq"] for e in events_of(client, play_id)]
        assert seqs == list(range(1, len(seqs) + 1)), (play_id, seqs)
        stored |= {(play_id, s) for s in seqs}
    replayed = [e for e in replay(client) if e["playId"] in set(play_ids)]
    keys = [(e["playId"], e["seq"]) for e in replayed]
    assert len(keys) == len(set(keys)), "the replay repeats events"
    assert set(keys) == stored, f"replay misses {len(stored - set(keys))} events"
    ordered = [e["cursor"] for e in replayed]
    assert all(a < b for a, b in zip(ordered, ordered[1:], strict=False)) or _numeric_order(ordered)


def _numeric_order(cursors: list[Any]) -> bool:
    try:
        values = [int(c) for c in cursors]
    except (TypeError, ValueError):
        return False
    return all(a < b for a, b in zip(values, values[1:], strict=False))


def runner_pids(fleet: Fleet, worker: str) -> tuple[set[int], list[str]]:
    """The plays whose lease a process of ``worker`` holds right now."""
    pids = fleet.pids(worker)
    rows = fleet.sql("SELECT id, runner FROM plays_play WHERE state = 'RUN' AND runner <> ''")
    return pids, [play for play, runner in rows if int(runner.split(":")[1]) in pids]


# --- scenarios ------------------------------------------------------------------------------------


def test_a_cut_off_worker_host_is_taken_over_and_its_late_writes_are_refused(fleet: Fleet) -> None:
    flow = make_flow(fleet, "partition a worker", ms=40)
    plays: list[str] = []
    poster = threading.Thread(target=lambda: plays.extend(run_many(fleet, flow, "p1")))
    poster.start()
    held: list[str] = []

    def w1_holds_plays() -> bool:
        nonlocal held
        pids, held = runner_pids(fleet, "w1")
        return len(held) >= 1

    wait_until(w1_holds_plays, 120, "worker-1 to hold a play", every=0.05)
    progress = dict(fleet.sql("SELECT id, next_index FROM plays_play WHERE id = ANY(%s)", (held,)))
    fleet.cut("w1")
    cut_at = time.monotonic()
    pids = fleet.pids("w1")

    def taken_over() -> bool:
        rows = fleet.sql("SELECT id, state, runner, next_index FROM plays_play WHERE id = ANY(%s)", (held,))
        return all(
            state in TERMINAL or (runner and int(runner.split(":")[1]) not in pids and index > progress[play])
            for play, state, runner, index in rows
        )

    wait_until(taken_over, 120, "the other workers to take worker-1's plays over", every=0.1)
    RESULTS["takeover_seconds"] = round(time.monotonic() - cut_at, 2)
    RESULTS["takeover_plays"] = len(held)
    # Cut for longer than the lease (3 s here): the late writes come after the takeover.
    time.sleep(max(0.0, 6 - (time.monotonic() - cut_at)))
    fleet.heal("w1")
    poster.join(timeout=300)
    assert len(plays) == PLAYS
    verify(fleet, plays)
    # worker-1 is back and working again.
    more = run_many(fleet, flow, "p1-after", n=20)
    verify(fleet, more)


class Watcher:
    """A WebSocket client of one web host that fails over to the other with its cursor."""

    def __init__(self, fleet: Fleet, first: str):
        self.fleet, self.webs = fleet, itertools.cycle([first, "web2" if first == "web1" else "web1"])
        self.web = next(self.webs)
        self.events: list[dict[str, Any]] = []
        self.cursor: Any = None
        self.failovers = 0
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        from websockets.sync.client import connect

        while not self.stop.is_set():
            url = f"ws://{self.fleet.ip(self.web)}:8000/api/ws?token={self.fleet.token}"
            if self.cursor is not None:
                url += f"&since={self.cursor}"
            try:
                with connect(url, open_timeout=3, ping_interval=1, ping_timeout=2, close_timeout=1) as ws:
                    ws.send(json.dumps({"type": "ping"}))
                    while not self.stop.is_set():
                        try:
                            message = json.loads(ws.recv(timeout=0.5))
                        except TimeoutError:
                            continue
                        if "playId" in message and "seq" in message:
                            self.events.append(message)
                            self.cursor = message.get("cursor", message["seq"])
                        elif message.get("type") == "pong":
                            if self.cursor is None:
                                self.cursor = message.get("cursor", message.get("seq"))
                            self.ready.set()
                    return
            except Exception:  # noqa: BLE001 - cut off: fail over to the other host
                if self.stop.is_set():
                    return
                self.failovers += 1
                self.web = next(self.webs)
                time.sleep(0.2)


def test_a_cut_off_web_host_loses_no_run_request_and_no_event(fleet: Fleet) -> None:
    flow = make_flow(fleet, "partition a web host", ms=10)
    watchers = [Watcher(fleet, "web1"), Watcher(fleet, "web2")]
    for watcher in watchers:
        assert watcher.ready.wait(30)
    plays: list[str] = []
    errors: list[int] = []

    def post() -> None:
        for i in range(PLAYS):
            key = f"p2-{i}"
            first = post_run(fleet, flow, key, webs=("web1", "web2") if i % 2 else ("web2", "web1"), errors=errors)
            # The same request again through the other host (a client whose answer was lost).
            again = post_run(fleet, flow, key, webs=("web2", "web1") if i % 2 else ("web1", "web2"), errors=errors)
            assert again == first, key
            plays.append(first)

    poster = threading.Thread(target=post)
    poster.start()
    wait_until(lambda: len(plays) >= 40, 120, "some plays to start")
    fleet.cut("web1")
    time.sleep(6)
    fleet.heal("web1")
    poster.join(timeout=600)
    assert len(plays) == PLAYS and not errors
    keys = fleet.sql("SELECT idempotency_key, count(*) FROM plays_play WHERE flow_id = %s GROUP BY 1", (flow,))
    assert len(keys) == PLAYS and all(n == 1 for _, n in keys)
    verify(fleet, plays)
    client = api(fleet)
    stored = {(p, e["seq"]) for p in plays for e in events_of(client, p)}

    def complete(watcher: Watcher) -> bool:
        return {(e["playId"], e["seq"]) for e in watcher.events if e["playId"] in set(plays)} == stored

    for watcher in watchers:
        wait_until(lambda w=watcher: complete(w), 60, "a WebSocket client to have every event")
        watcher.stop.set()
        mine = [(e["playId"], e["seq"]) for e in watcher.events if e["playId"] in set(plays)]
        assert len(mine) == len(set(mine)), "an event arrived twice"
    assert watchers[0].failovers >= 1  # the client of web1 moved to web2 and resumed from its cursor
    RESULTS["web_partition_failovers"] = [w.failovers for w in watchers]


def test_a_slow_link_to_one_worker_host_keeps_the_fleet_correct(fleet: Fleet) -> None:
    flow = make_flow(fleet, "slow link")
    started = time.monotonic()
    plays = run_many(fleet, flow, "p3-base")
    wait_done(fleet, plays)
    base = 5 * PLAYS / (time.monotonic() - started)
    how = fleet.slow("w1", 50, 10)
    if how == "proxy":
        fleet.terminate("w1")
        fleet.start_worker("w1", env=fleet.proxied_env())
    try:
        started = time.monotonic()
        slow_plays = run_many(fleet, flow, "p3-slow")
        wait_done(fleet, slow_plays, timeout=600)
        slow = 5 * PLAYS / (time.monotonic() - started)
        verify(fleet, plays + slow_plays)
        calls = fleet.counts()
        from_w1 = sum(1 for p in slow_plays for i in range(1, 6) if fleet.ip("w1") in calls.get(f"{p}/s{i}", []))
    finally:
        if how == "proxy":
            fleet.terminate("w1")
            fleet.start_worker("w1")
    RESULTS["slow_link"] = {
        "how": how,
        "steps_per_s_base": round(base, 1),
        "steps_per_s_slow": round(slow, 1),
        "ratio": round(slow / base, 2),
        "steps_on_slow_host": from_w1,
    }
    assert from_w1 >= 1  # the slow host took part


def test_a_rolling_restart_fails_no_play_and_shows_no_5xx(fleet: Fleet) -> None:
    flow = make_flow(fleet, "rolling restart", ms=20)
    plays: list[str] = []
    errors: list[int] = []
    stop = threading.Event()

    def post() -> None:
        for i in itertools.count():
            if stop.is_set() and i >= PLAYS:
                return
            plays.append(
                post_run(fleet, flow, f"p4-{i}", webs=("web1", "web2") if i % 2 else ("web2", "web1"), errors=errors)
            )

    poster = threading.Thread(target=post)
    poster.start()
    wait_until(lambda: len(plays) >= 20, 60, "plays to start")
    for worker in ("w1", "w2", "w3"):
        fleet.terminate(worker)
        fleet.start_worker(worker)
    for web in ("web1", "web2"):
        fleet.terminate(web)
        fleet.start_web(web)
    stop.set()
    poster.join(timeout=600)
    assert len(plays) >= PLAYS
    assert not errors, f"clients saw {errors}"
    verify(fleet, plays)


def test_a_flow_on_a_second_queue_runs_only_where_that_queue_is_served(fleet: Fleet) -> None:
    background = make_flow(fleet, "queue affinity background")
    second = make_flow(fleet, "queue affinity second", execution={"queue": "second"})
    load = threading.Thread(target=lambda: load_plays.extend(run_many(fleet, background, "p5-bg")))
    load_plays: list[str] = []
    load.start()
    first = [post_run(fleet, second, f"p5-a-{i}") for i in range(20)]
    wait_done(fleet, first)
    fleet.cut("w3")
    waiting = [post_run(fleet, second, f"p5-b-{i}") for i in range(10)]
    time.sleep(5)  # long enough for any other worker to have picked them up, were it to
    rows = fleet.sql(
        "SELECT p.id, p.state, count(l.id) FROM plays_play p LEFT JOIN plays_layer l ON l.play_id = p.id "
        "WHERE p.id = ANY(%s) GROUP BY 1, 2",
        (waiting,),
    )
    # Waiting for worker-3: no step started (RUN, or DEFERRED while the company's running-play
    # limit is taken by the background load).
    assert all(state in ("RUN", "DEFERRED") and layers == 0 for _, state, layers in rows), rows
    fleet.heal("w3")
    load.join(timeout=600)
    verify(fleet, first + waiting + load_plays)
    calls = fleet.counts()
    hosts = {ip for p in first + waiting for i in range(1, 6) for ip in calls[f"{p}/s{i}"]}
    assert hosts == {fleet.ip("w3")}
