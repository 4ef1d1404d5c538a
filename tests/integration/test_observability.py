"""Observability against the server started with `make run` (web, worker, scheduler):
``/metrics`` summed over the processes and scraped by a real Prometheus, ``/api/ready``
and the queue warnings."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import Processes, free_port

from .conftest import Server
from .processes import make_flow, run_play, wait_terminal, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def samples(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_ready(server: Server) -> dict[str, Any]:
    def default_served() -> Any:
        body = httpx.get(f"{server.url}/api/ready", timeout=10).json()
        return body if body["workers"]["queues"].get("default", {}).get("status") == "ok" else None

    return wait_until(default_served, 60, "a worker to report that it consumes the default queue", every=0.5)


@pytest.fixture(scope="module")
def workload(server: Server, alice_session: httpx.Client) -> dict[str, Any]:
    """Six plays that succeed and two that fail, run by the real worker."""
    wait_ready(server)
    tag = secrets.token_hex(3)
    ok = make_flow(
        alice_session,
        "Observed",
        [
            {"ref": "a", "appId": "var", "args": {"values": {"n": "{{ $prev.args.n }}"}}},
            {"ref": "b", "appId": "template", "args": {"template": "n={{ n }}", "data": {"n": "{{ $prev.a.n }}"}}},
        ],
        permanentId=f"obs-ok-{tag}",
    )
    bad = make_flow(
        alice_session,
        "Observed failing",
        [
            {"ref": "parse", "appId": "json-parse", "args": {"input": "{{ $prev.args.doc }}"}},
        ],
        permanentId=f"obs-bad-{tag}",
    )
    before = samples(server)
    plays = [run_play(alice_session, ok["id"], {"n": i}) for i in range(6)]
    plays += [run_play(alice_session, bad["id"], {"doc": "{no"}) for _ in range(2)]
    finished = wait_terminal(alice_session, plays, timeout=120)
    assert sorted(p["state"] for p in finished.values()) == ["DONE"] * 6 + ["FAIL"] * 2
    return {"tag": tag, "before": before, "plays": plays, "ok": ok, "bad": bad}


def test_metrics_of_web_and_worker_processes_are_summed(server: Server, workload: dict[str, Any]) -> None:
    tag, before = workload["tag"], workload["before"]
    after = samples(server)
    # play:started is counted where the play starts (the web process, inside POST /run),
    # play:completed where it ends (a worker's prefork child): one scrape sums both.
    assert value(after, "flowplay_plays_started_total", flow=f"obs-ok-{tag}") == 6
    assert value(after, "flowplay_plays_finished_total", flow=f"obs-ok-{tag}", state="DONE") == 6
    assert value(after, "flowplay_plays_finished_total", flow=f"obs-bad-{tag}", state="FAIL") == 2
    key = ("flowplay_step_duration_seconds_count", (("module", "template"), ("outcome", "done")))
    assert after.get(key, 0) - before.get(key, 0) == 6
    assert value(after, "flowplay_queue_workers", queue="default") >= 1
    assert value(after, "flowplay_workers_live") >= 1
    folder = Path(server.env["FLOWPLAY_VAR_DIR"]) / "metrics"
    pids = {name.rsplit("_", 1)[-1] for name in os.listdir(folder) if name.endswith(".db")}
    assert len(pids) >= 2, sorted(os.listdir(folder))
    ids = set(workload["plays"])
    assert not any(i in label for (_, labels) in after for _, label in labels for i in ids)


@pytest.fixture
def prometheus(server: Server, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus package is not installed here (apt-get install prometheus)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files:\n  - " + str(Path(__file__).resolve().parents[2] / "docs/observability/alerts.yml") + "\n"
        "scrape_configs:\n  - job_name: flowplay\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n"
    )
    procs = Processes(root=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        procs.spawn("prometheus", [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ])

        def up() -> bool:
            procs.check_alive("prometheus")
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200

        wait_until(up, 60, "Prometheus to start", every=0.3)
        yield url
    finally:
        procs.stop_all(grace=15)


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def test_a_real_prometheus_scrapes_the_server(server: Server, workload: dict[str, Any], prometheus: str) -> None:
    tag = workload["tag"]

    def scraped() -> Any:
        found = query(prometheus, f'flowplay_plays_finished_total{{flow="obs-ok-{tag}",state="DONE"}}')
        return found if found and float(found[0]["value"][1]) == 6 else None

    wait_until(scraped, 60, "Prometheus to scrape the finished plays", every=0.5)
    assert float(query(prometheus, 'up{job="flowplay"}')[0]["value"][1]) == 1
    failed = query(prometheus, f'sum(flowplay_plays_finished_total{{flow="obs-bad-{tag}",state="FAIL"}})')
    assert float(failed[0]["value"][1]) == 2
    p99 = query(
        prometheus, 'histogram_quantile(0.99, sum by (le) (flowplay_step_duration_seconds_bucket{module="var"}))'
    )
    assert p99 and float(p99[0]["value"][1]) > 0
    # The alert rules file loads in this Prometheus and its rules are evaluated.
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    names = {rule["name"] for group in rules for rule in group["rules"]}
    assert {"FlowplayPlaysFailing", "FlowplayQueueWithoutWorker", "FlowplayQueueAge", "FlowplayEventLag"} <= names


def test_a_queue_without_worker_is_reported_everywhere(server: Server, alice: httpx.Client) -> None:
    wait_ready(server)
    queue = f"nobody-{secrets.token_hex(3)}"
    flow = make_flow(
        alice, "Unserved", [{"ref": "a", "appId": "var", "args": {"values": {}}}], execution={"queue": queue}
    )
    assert [w["code"] for w in flow["warnings"]] == ["QUEUE_WITHOUT_WORKER"]
    try:
        ready = httpx.get(f"{server.url}/api/ready", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["workers"]["queues"][queue] == {"status": "down", "workers": []}
        assert ready.json()["workers"]["queues"]["default"]["status"] == "ok"
        play_id = run_play(alice, flow["id"])
        page = alice.get(f"/plays/{play_id}/")
        assert page.status_code == 200 and 'id="queue-warning"' in page.text and f"<code>{queue}</code>" in page.text
        assert alice.get(f"/api/plays/{play_id}").json()["state"] == "RUN"
        found = samples(server)
        assert value(found, "flowplay_queue_depth", queue=queue) == 1
        assert value(found, "flowplay_queue_workers", queue=queue) == 0
        alice.post(f"/api/plays/{play_id}/cancel")
    finally:
        assert alice.delete(f"/api/flows/{flow['id']}").status_code == 204
    assert queue not in httpx.get(f"{server.url}/api/ready", timeout=10).json()["workers"]["queues"]


def test_health_is_cheap_and_ready_is_thorough(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        client.get("/api/health")
        started = time.perf_counter()
        for _ in range(50):
            assert client.get("/api/health").status_code == 200
        health_ms = (time.perf_counter() - started) * 1000 / 50
        body = client.get("/api/health").json()
        assert body == {"status": "ok", "database": "ok", "broker": "ok"}
        print(f"/api/health: {health_ms:.1f} ms per call over 50 calls")
