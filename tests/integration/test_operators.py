"""Operators against the real server and worker: races between verbs and the runner.

Each test polls with deadlines, so a slow machine makes it slower, not flaky.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import httpx
import pytest

from ..factories import make_flow, trigger
from ..polling import stays, wait_until
from .conftest import Server, clone, wait_for
from .processes import CountingServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
def counter() -> Iterator[CountingServer]:
    srv = CountingServer()
    yield srv
    srv.close()


class SwitchServer:
    """``/count`` counts; ``/switch`` is slow (a timeout for the step) until ``fast`` is set."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.fast = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                if self.path == "/switch" and not outer.fast.is_set():
                    time.sleep(4)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def layers(client: httpx.Client, play_id: str) -> list[dict[str, Any]]:
    return client.get(f"/api/plays/{play_id}/layers").json()


def events(client: httpx.Client, play_id: str) -> list[dict[str, Any]]:
    return client.get(f"/api/plays/{play_id}/events").json()


def when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def both(calls: list[Any]) -> list[int]:
    barrier = threading.Barrier(len(calls))

    def go(call: Any) -> int:
        barrier.wait()
        return call().status_code

    with ThreadPoolExecutor(len(calls)) as pool:
        return sorted(pool.map(go, calls))


def test_hold_during_steps_lets_no_further_step_start(server: Server, alice: httpx.Client,
                                                      counter: CountingServer) -> None:
    flow = make_flow(alice, [{"ref": f"s{i}", "appId": "curl", "args": {"url": f"{counter.url}/slow/s{i}?s=0.4"}}
                             for i in range(8)])
    pid = trigger(alice, flow)["playId"]
    wait_until(lambda: len(layers(alice, pid)) >= 2, what="two steps started")
    r = alice.post(f"/api/plays/{pid}/hold")
    assert r.status_code == 200, r.text

    def held_and_still() -> bool:
        story = events(alice, pid)
        held = next(e["seq"] for e in story if e["type"] == "play:state" and e["state"] == "ON_HOLD")
        late = [e for e in story if e["type"] == "play:layer:started" and e["seq"] > held]
        return alice.get(f"/api/plays/{pid}").json()["state"] == "ON_HOLD" and not late

    # 2 s: time for several more steps, were the runner to ignore the hold.
    stays(held_and_still, 2, what="held, no step started after the hold")
    assert alice.get(f"/api/plays/{pid}").json()["state"] == "ON_HOLD"
    story = events(alice, pid)
    held = next(e["seq"] for e in story if e["type"] == "play:state" and e["state"] == "ON_HOLD")
    late = [e for e in story if e["type"] == "play:layer:started" and e["seq"] > held]
    assert late == [], late
    assert sum(counter.count(f"/slow/s{i}") for i in range(8)) == len(layers(alice, pid)) < 8
    assert alice.post(f"/api/plays/{pid}/resume").status_code == 200
    done = wait_for(alice, pid)
    assert done["state"] == "DONE"
    assert all(counter.count(f"/slow/s{i}") == 1 for i in range(8))


def test_two_approvals_at_once_exactly_one_wins(server: Server, alice: httpx.Client) -> None:
    flow = make_flow(alice, [{"ref": "gate", "appId": "var", "args": {"values": {"ok": 1}}, "needsApproval": True}])
    pid = trigger(alice, flow)["playId"]
    wait_for(alice, pid, ("WAIT",))
    layer = wait_until(lambda: [lay for lay in layers(alice, pid) if lay["state"] == "WAIT"], what="waiting layer")[0]
    other = clone(alice)
    codes = both([
        lambda: alice.post(f"/api/plays/{pid}/approve", json={"layerId": layer["id"], "decision": "approved"}),
        lambda: other.post(f"/api/plays/{pid}/approve", json={"layerId": layer["id"], "decision": "declined"}),
    ])
    assert codes == [200, 409]
    final = wait_for(alice, pid)
    assert final["state"] in ("DONE", "SKIP")


def test_cancel_during_a_long_step(server: Server, alice: httpx.Client, counter: CountingServer) -> None:
    flow = make_flow(alice, [{"ref": "long", "appId": "curl", "args": {"url": f"{counter.url}/slow/long?s=4"}},
                             {"ref": "after", "appId": "var", "args": {"values": {}}}])
    pid = trigger(alice, flow)["playId"]
    wait_until(lambda: counter.count("/slow/long") == 1, what="the long step in flight")
    r = alice.post(f"/api/plays/{pid}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "FAIL", r.text
    assert r.json()["error"]["code"] == "CANCELLED"
    ended = wait_until(lambda: [lay for lay in layers(alice, pid) if lay["state"] != "RUN"], timeout=60, what="layer ended")
    assert ended[0]["ref"] == "long" and ended[0]["state"] == "FAIL"
    assert ended[0]["error"]["code"] == "CANCELLED"
    # 1 s: time for a next step to start, were the cancel not final.
    stays(lambda: [lay["ref"] for lay in layers(alice, pid)] == ["long"], 1, what="no step after the cancel")
    assert [lay["ref"] for lay in layers(alice, pid)] == ["long"]
    assert alice.get(f"/api/plays/{pid}").json()["state"] == "FAIL"


def test_resume_twice_at_once(server: Server, alice: httpx.Client) -> None:
    flow = make_flow(alice, [{"ref": "a", "appId": "var", "args": {"values": {}}}])
    pid = trigger(alice, flow, delayMs=3_600_000)["playId"]
    assert alice.post(f"/api/plays/{pid}/hold").status_code == 200
    other = clone(alice)
    codes = both([lambda: alice.post(f"/api/plays/{pid}/resume"), lambda: other.post(f"/api/plays/{pid}/resume")])
    assert codes == [200, 409]
    assert alice.get(f"/api/plays/{pid}").json()["state"] == "DEFERRED"


def test_deferred_release_lag(server: Server, alice: httpx.Client) -> None:
    flow = make_flow(alice, [{"ref": "a", "appId": "var", "args": {"values": {}}}])
    started = trigger(alice, flow, delayMs=1500)
    assert started["state"] == "DEFERRED"
    run_at = when(started["runAt"])
    done = wait_for(alice, started["playId"], timeout=60)
    lag = (when(done["startedAt"]) - run_at).total_seconds()
    print(f"deferred release lag: {lag:.3f} s")
    assert 0 <= lag < 5, lag


def test_retry_reuses_the_done_step(server: Server, alice: httpx.Client) -> None:
    srv = SwitchServer()
    try:
        flow = make_flow(alice, [
            {"ref": "count", "appId": "curl", "args": {"url": f"{srv.url}/count"}},
            {"ref": "switch", "appId": "curl", "args": {"url": f"{srv.url}/switch", "timeout": 1}},
        ])
        pid = trigger(alice, flow)["playId"]
        failed = wait_for(alice, pid)
        assert failed["state"] == "FAIL" and failed["error"]["ref"] == "switch", failed
        srv.fast.set()
        r = alice.post(f"/api/plays/{pid}/retry")
        assert r.status_code == 201, r.text
        new = r.json()["playId"]
        assert wait_for(alice, new)["state"] == "DONE"
        assert srv.hits.get("/count") == 1
        copied = next(lay for lay in layers(alice, new) if lay["ref"] == "count")
        assert copied.get("reusedFrom")
    finally:
        srv.close()
