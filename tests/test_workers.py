"""Worker liveness per queue (plays/workers.py) and where it shows: flows saved on a queue
no live worker consumes get a warning in the API and the admin, and a play waiting on such
a queue says so on its page (issue 16, last bullet)."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from django.test import Client
from django.utils import timezone

from plays import workers
from plays.models import Play, State
from plays.workers import Worker

from .conftest import PASSWORD
from .factories import make_flow


class FakeConsumer:
    """What the worker_ready signal sends: Celery's consumer, with its name and queues."""

    def __init__(self, name: str, queues: list[str]):
        self.hostname = name
        self.task_consumer = SimpleNamespace(queues=[SimpleNamespace(name=q) for q in queues])


def fake_consumer(name: str, queues: list[str]) -> Any:
    return FakeConsumer(name, queues)


def test_a_beat_makes_its_queues_live_until_it_is_older_than_30_s(db: Any) -> None:
    now = timezone.now()
    workers.beat("celery@a", ["default", "gpu"], pid=11, now=now - timedelta(seconds=5))
    workers.beat("celery@b", ["default"], pid=12, now=now - timedelta(seconds=31))
    assert workers.live_queues(now) == {"default": 1, "gpu": 1}
    workers.beat("celery@b", ["default"], pid=12, now=now)  # b comes back: one row, refreshed
    assert Worker.objects.count() == 2
    assert workers.live_queues(now) == {"default": 2, "gpu": 1}
    assert workers.live_queues(now + timedelta(seconds=40)) == {}


def test_forget_and_prune(db: Any) -> None:
    workers.beat("celery@a", ["default"])
    workers.beat("celery@old", ["default"], now=timezone.now() - timedelta(days=2))
    assert workers.prune() == 1
    workers.forget("celery@a")
    assert not Worker.objects.exists()


def test_a_worker_records_itself_on_ready_and_removes_itself_on_shutdown(transactional_db: Any, settings: Any) -> None:
    settings.FLOWPLAY = {**settings.FLOWPLAY, "WORKER_BEAT_SECONDS": 3600.0}
    worker_ready.send(sender=fake_consumer("celery@here", ["reports", "default"]))
    try:
        row = Worker.objects.get(pk="celery@here")
        assert row.queues == ["default", "reports"]
        assert workers.live_queues() == {"default": 1, "reports": 1}
        assert workers._beater is not None and workers._beater.thread.is_alive()
    finally:
        worker_shutdown.send(sender=None)
    assert not Worker.objects.filter(pk="celery@here").exists()
    assert workers._beater is None


def test_a_worker_stops_counting_as_soon_as_its_shutdown_begins(transactional_db: Any, settings: Any) -> None:
    """A warm shutdown stops consuming at once and may then wait (or hang) for long: the
    worker must not look live meanwhile."""
    settings.FLOWPLAY = {**settings.FLOWPLAY, "WORKER_BEAT_SECONDS": 3600.0}
    worker_ready.send(sender=fake_consumer("celery@leaving", ["default"]))
    beater = workers._beater
    assert workers.live_queues() == {"default": 1}
    worker_shutting_down.send(sender="celery@leaving", sig="SIGTERM", how="Warm", exitcode=0)
    assert workers.live_queues() == {}
    assert beater is not None and beater.stopped.is_set()
    worker_shutdown.send(sender=None)  # sent later, when the pool has stopped: nothing left to do


def test_queues_added_later_are_seen_at_the_next_beat(transactional_db: Any) -> None:
    consumer = fake_consumer("celery@grow", ["default"])
    beater = workers.Beater(consumer)
    beater.beat_once()
    consumer.task_consumer.queues.append(SimpleNamespace(name="extra"))
    beater.beat_once()
    assert Worker.objects.get(pk="celery@grow").queues == ["default", "extra"]


def test_queue_warning_names_the_queue_and_how_to_serve_it(db: Any) -> None:
    warning = workers.queue_warning("gpu", live={"default": 1})
    assert warning is not None and warning["code"] == "QUEUE_WITHOUT_WORKER" and warning["queue"] == "gpu"
    assert "celery -A flowplay worker -Q gpu" in warning["message"]
    assert workers.queue_warning("default", live={"default": 1}) is None


# --- the flow API -----------------------------------------------------------------------


LAYERS = [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}]


def test_saving_a_flow_on_a_queue_without_worker_warns(api: Any, db: Any) -> None:
    workers.beat("celery@a", ["default"])
    created = make_flow(api, LAYERS, execution={"queue": "gpu"})
    assert [w["code"] for w in created["warnings"]] == ["QUEUE_WITHOUT_WORKER"]
    assert created["warnings"][0]["queue"] == "gpu"
    # The flow itself is unchanged by the additive field.
    assert created["execution"]["queue"] == "gpu" and created["layers"][0]["ref"] == "a"

    moved = api.patch(f"/api/flows/{created['id']}", {"execution": {"queue": "default"}}, format="json")
    assert moved.status_code == 200 and moved.json()["warnings"] == []

    workers.beat("celery@gpu", ["gpu"])
    back = api.put(
        f"/api/flows/{created['id']}",
        {"name": "Test flow", "layers": LAYERS, "execution": {"queue": "gpu"}},
        format="json",
    )
    assert back.status_code == 200 and back.json()["warnings"] == []


def test_the_warning_is_in_the_schema(api: Any) -> None:
    schema = api.get("/api/schema", HTTP_ACCEPT="application/json").json()
    saved = schema["components"]["schemas"]["FlowSaved"]
    assert "warnings" in saved["properties"]
    post = schema["paths"]["/api/flows"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
    assert post["$ref"].endswith("/FlowSaved")


def test_the_admin_warns_when_a_flow_is_saved_on_a_queue_without_worker(alice: Any) -> None:
    alice.is_staff = alice.is_superuser = True
    alice.save()
    client = Client()
    assert client.login(username=alice.username, password=PASSWORD)
    data = {
        "name": "Admin flow",
        "permanent_id": "admin-flow",
        "company": alice.company_id,
        "category": "",
        "enabled": "on",
        "queue": "nobody-here",
        "retention_keep": "100",
        "filters": "[]",
        "flowlets-TOTAL_FORMS": "0",
        "flowlets-INITIAL_FORMS": "0",
        "flowlets-MIN_NUM_FORMS": "0",
        "flowlets-MAX_NUM_FORMS": "1000",
    }
    response = client.post("/admin/flows/flow/add/", data, follow=True)
    assert response.status_code == 200
    text = response.content.decode()
    assert "No worker seen in the last 30 s consumes the queue &#x27;nobody-here&#x27;" in text, text[:3000]


# --- the play page ------------------------------------------------------------------------


@pytest.fixture
def page(alice: Any) -> Client:
    client = Client()
    assert client.login(username=alice.username, password=PASSWORD)
    return client


def test_a_play_waiting_on_a_queue_without_worker_says_so_on_its_page(api: Any, page: Client, no_enqueue: Any) -> None:
    flow = make_flow(api, LAYERS, execution={"queue": "gpu"})
    play_id = api.post(f"/api/flows/{flow['id']}/run", {}, format="json").json()["playId"]
    assert Play.objects.get(pk=play_id).state == State.RUN
    html = page.get(f"/plays/{play_id}/").content.decode()
    assert 'id="queue-warning"' in html and "<code>gpu</code>" in html
    assert "celery -A flowplay worker -Q gpu" in html

    workers.beat("celery@gpu", ["gpu"])
    assert 'id="queue-warning"' not in page.get(f"/plays/{play_id}/").content.decode()


def test_a_play_a_runner_holds_has_no_warning(api: Any, page: Client, no_enqueue: Any) -> None:
    flow = make_flow(api, LAYERS, execution={"queue": "gpu"})
    play_id = api.post(f"/api/flows/{flow['id']}/run", {}, format="json").json()["playId"]
    Play.objects.filter(pk=play_id).update(runner="host:1:abc")
    assert 'id="queue-warning"' not in page.get(f"/plays/{play_id}/").content.decode()
