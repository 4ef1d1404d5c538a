"""Issue 13 on a real deployment (embedded default: SQLite, filesystem broker, 2 worker
slots): one tenant's hostile input does not slow another tenant, and a timed-out step
leaves nothing running in the worker.

Before the fix, `regex` `(a+)+$` on 40 `a`s held both worker slots for hours (with the GIL:
no step timeout, no heartbeat), so tenant B's plays never ran; and a timed-out CPU-bound
step kept burning a core in its thread.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import make_pdf_bomb

from .processes import TERMINAL, Cluster, make_flow, run_play, wait_terminal, wait_until

pytestmark = pytest.mark.integration

TICKS = os.sysconf("SC_CLK_TCK")
STEP_TIMEOUT = 5  # seconds, of tenant A's pathological steps


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster.create(tmp_path_factory.mktemp("tenants"))
    if c.pg_url:
        c.destroy()
        pytest.skip("runs on the embedded default (the issue's 2 worker slots)")
    try:
        c.migrate_and_seed()
        c.start("web")
        c.start("beat")
        c.start("worker-1")
        yield c
    finally:
        c.destroy()


@pytest.fixture
def alice(cluster: Cluster) -> Iterator[httpx.Client]:
    client = cluster.client("alice")
    yield client
    client.close()


@pytest.fixture
def charlie(cluster: Cluster) -> Iterator[httpx.Client]:
    client = cluster.client("charlie")
    yield client
    client.close()


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def one_play_latency(client: httpx.Client, flow_id: str, timeout: float = 120) -> float:
    """Seconds from the run request to the play seen DONE (polling every 50 ms)."""
    started = time.monotonic()
    play_id = run_play(client, flow_id)
    deadline = started + timeout
    while time.monotonic() < deadline:
        state = client.get(f"/api/plays/{play_id}").json()["state"]
        if state in TERMINAL:
            assert state == "DONE"
            return time.monotonic() - started
        time.sleep(0.05)
    return timeout  # counted as the timeout: the assertion on p95 then fails with figures


def pathological_flows(client: httpx.Client) -> list[str]:
    pdf = base64.b64encode(make_pdf_bomb(pages=100)).decode()
    bodies = [
        ("Backtracking regex", {"appId": "regex", "args": {"input": "a" * 40 + "!", "pattern": "(a+)+$"}}),
        ("Cubic CSV header", {"appId": "csv-parse", "args": {"input": "a," * 1999 + "a\n1\n"}}),
        ("Shared-stream PDF", {"appId": "pdf-extract", "args": {"content": pdf}}),
        (
            "Huge replacement",
            {
                "appId": "regex",
                "args": {"input": "x" * 1000, "pattern": "x", "operation": "replace", "replacement": "y" * 100_000},
            },
        ),
    ]
    return [
        make_flow(client, name, [{"ref": "bad", "timeout": STEP_TIMEOUT, "onError": "continue", **body}])["id"]
        for name, body in bodies
    ]


def test_one_tenants_hostile_plays_do_not_slow_another_tenant(alice: httpx.Client, charlie: httpx.Client) -> None:
    quick = make_flow(charlie, "Quick", [{"ref": "v", "appId": "var", "args": {"values": {"ok": True}}}])["id"]
    for _ in range(3):  # warm-up: connections, caches, the first fork
        one_play_latency(charlie, quick)
    baseline = [one_play_latency(charlie, quick) for _ in range(12)]

    hostile = pathological_flows(alice)
    stop = threading.Event()
    finished: list[dict[str, Any]] = []

    def tenant_a() -> None:
        # Keeps tenant A's 4 pathological plays in flight for as long as tenant B measures.
        client = httpx.Client(base_url=alice.base_url, cookies=alice.cookies, headers=alice.headers, timeout=30)
        try:
            while not stop.is_set():
                ids = [run_play(client, flow_id) for flow_id in hostile]
                finished.extend(wait_terminal(client, ids, timeout=300).values())
        finally:
            client.close()

    worker = threading.Thread(target=tenant_a, daemon=True)
    worker.start()
    try:
        wait_until(lambda: len(finished) >= 4, 120, "tenant A's first round of pathological plays")
        loaded = [one_play_latency(charlie, quick) for _ in range(12)]
    finally:
        stop.set()
        worker.join(timeout=300)
    base, load = p95(baseline), p95(loaded)
    figures = f"baseline p95 {base:.3f} s, under load p95 {load:.3f} s, A plays finished {len(finished)}"
    print(figures)
    # Stalled means waiting for a worker slot that tenant A holds: at least A's 5 s step
    # timeout (before the fix: 43.5 s, or for ever). What is left under load is the CPU the
    # killable children of A's steps take from a 2-core machine, which a busy CI machine
    # multiplies: so the bound is the stall, halved, not a ratio to a quiet baseline.
    # (Measured on the quiet machine 2026-11-30: 0.087 -> 0.125 s, 0.098 -> 0.111 s; on a
    # machine with 8 test runs beside it: 0.159 -> 0.533 s.)
    assert load < STEP_TIMEOUT / 2, figures
    codes = {(p["error"] or {}).get("code") for p in finished}
    assert all(p["state"] == "DONE" for p in finished), figures  # onError continue: failed steps, done plays
    assert codes == {None}


def threads_cpu(pgid: int) -> dict[tuple[int, int], int]:
    """CPU ticks of every thread of every process in a process group: {(pid, tid): ticks}."""
    out: dict[tuple[int, int], int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[2]) != pgid:
                continue
            for task in (entry / "task").iterdir():
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                out[(int(entry.name), int(task.name))] = int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return out


def busiest_thread(pgid: int, seconds: float = 1.0) -> tuple[float, dict[tuple[int, int], int]]:
    """The largest share of a core one thread of the group used over ``seconds``."""
    before = threads_cpu(pgid)
    time.sleep(seconds)
    after = threads_cpu(pgid)
    deltas = {key: after[key] - before.get(key, 0) for key in after}
    top = max(deltas.values(), default=0)
    return top / TICKS / seconds, deltas


def test_a_timed_out_step_leaves_no_thread_or_process_using_cpu(cluster: Cluster, alice: httpx.Client) -> None:
    pgid = cluster.procs["worker-1"].pid  # start_new_session: the worker leads its group
    processes_before = {pid for pid, _ in threads_cpu(pgid)}
    # About 6 ms of CPU per item: 20,000 items is two minutes of work, the step has 2 s.
    heavy = {
        "ref": "heavy",
        "appId": "array-map",
        "timeout": 2,
        "args": {
            "items": "{{ $prev.args.items }}",
            "expression": "{{ ($prev.data.s | replace('a', 'bb') | length) + $prev.item }}",
            "data": {"s": "{{ $prev.args.s }}"},
        },
    }
    flow = make_flow(alice, "Heavy map", [heavy])["id"]
    play_id = run_play(alice, flow, {"items": list(range(20_000)), "s": "a" * 200_000})
    play = wait_terminal(alice, [play_id], timeout=120)[play_id]
    layer = alice.get(f"/api/plays/{play_id}/layers").json()[0]
    assert (play["state"], layer["error"]["code"]) == ("FAIL", "TIMEOUT"), layer
    time.sleep(2)  # the issue's observation: 2 s after the timeout
    share, deltas = busiest_thread(pgid)
    print(f"busiest thread of the worker 2 s after the timeout: {share:.0%} of a core")
    # An idle worker polls the filesystem broker (a few % of a core); the step, before the
    # fix, kept a thread at about a whole core for a minute.
    assert share < 0.5, deltas
    leftover = {pid for pid, _ in threads_cpu(pgid)} - processes_before
    assert not leftover, f"processes left in the worker's group: {leftover}"
