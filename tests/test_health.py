"""``/api/health`` (liveness: cheap, no broker connection per call) and ``/api/ready``
(database, broker, a live worker for every queue)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from rest_framework.test import APIClient

from plays import health, workers

from .factories import make_flow


@pytest.fixture(autouse=True)
def _fresh_probe() -> Any:
    health.broker_probe.reset()
    yield
    health.broker_probe.reset()


def settled(anon: APIClient) -> Any:
    """/api/health once this process's background broker probe has answered."""
    deadline = time.monotonic() + 30
    while (r := anon.get("/api/health")).json()["broker"] == "unknown" and time.monotonic() < deadline:
        time.sleep(0.05)
    return r


def test_health_keeps_the_spec_shape(anon: APIClient, db: Any) -> None:
    r = settled(anon)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "database": "ok", "broker": "ok"}


def test_health_opens_no_broker_connection_per_call(anon: APIClient, db: Any, monkeypatch: Any) -> None:
    probes: list[str] = []
    real = health.check_broker

    def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        probes.append("probe")
        return real(*args, **kwargs)

    monkeypatch.setattr(health, "check_broker", counting)
    for _ in range(20):
        assert anon.get("/api/health").status_code == 200
    assert len(probes) == 1  # the first call's background probe; the next is due in 15 s


def test_health_reports_a_broker_down_without_failing_liveness(anon: APIClient, db: Any, settings: Any) -> None:
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    body = settled(anon)
    assert body.status_code == 200
    assert body.json() == {"status": "degraded", "database": "ok", "broker": "down"}


def test_ready_when_every_queue_has_a_live_worker(anon: APIClient, api: APIClient) -> None:
    make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}}}], execution={"queue": "reports"})
    workers.beat("celery@one", ["default"])
    workers.beat("celery@two", ["reports"])
    r = anon.get("/api/ready")
    assert r.status_code == 200, r.json()
    body = r.json()
    assert body["status"] == "ok"
    assert body["database"]["status"] == "ok" and body["broker"]["status"] == "ok"
    assert body["workers"]["queues"] == {
        "default": {"status": "ok", "workers": ["celery@one"]},
        "reports": {"status": "ok", "workers": ["celery@two"]},
    }


def test_not_ready_without_any_worker(anon: APIClient, db: Any) -> None:
    r = anon.get("/api/ready")
    assert r.status_code == 503
    assert r.json()["status"] == "down"
    assert r.json()["workers"]["queues"]["default"] == {"status": "down", "workers": []}


def test_not_ready_when_no_worker_consumes_a_flows_queue(anon: APIClient, api: APIClient) -> None:
    workers.beat("celery@one", ["default"])
    make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}}}], execution={"queue": "gpu"})
    r = anon.get("/api/ready")
    assert r.status_code == 503
    body = r.json()
    assert body["workers"]["status"] == "down"
    assert body["workers"]["queues"]["gpu"] == {"status": "down", "workers": []}
    assert body["workers"]["queues"]["default"]["status"] == "ok"
    assert body["database"]["status"] == "ok" and body["broker"]["status"] == "ok"


def test_a_disabled_flows_queue_is_not_needed(anon: APIClient, api: APIClient) -> None:
    workers.beat("celery@one", ["default"])
    make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}}}], execution={"queue": "gpu"}, enabled=False)
    assert anon.get("/api/ready").status_code == 200


def test_not_ready_when_the_broker_is_down(anon: APIClient, db: Any, settings: Any) -> None:
    workers.beat("celery@one", ["default"])
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    r = anon.get("/api/ready")
    assert r.status_code == 503
    body = r.json()
    assert body["broker"]["status"] == "down" and "error" in body["broker"]
    assert body["database"]["status"] == "ok" and body["workers"]["status"] == "ok"


def test_not_ready_when_the_embedded_brokers_folder_is_gone(
    anon: APIClient, db: Any, settings: Any, tmp_path: Any
) -> None:
    workers.beat("celery@one", ["default"])
    settings.CELERY_BROKER_URL = "filesystem://"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"data_folder_in": str(tmp_path / "missing")}
    r = anon.get("/api/ready")
    assert r.status_code == 503 and r.json()["broker"]["status"] == "down"
