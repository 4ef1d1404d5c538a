"""Retention: finished plays past their flow's retention are deleted in small batches, the
newest N are kept, FILTERED plays go sooner, running plays are never touched, and pruning
goes on while plays keep running (integration test at the end, real processes)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from flows.models import Flow
from plays import retention
from plays.models import Event, Layer, Play, State

from .factories import make_flow


def finished(api: Any, flow: dict[str, Any], n: int, drain: Any, args: dict[str, Any] | None = None) -> list[str]:
    ids = [api.post(f"/api/flows/{flow['id']}/run", {"args": {**(args or {}), "n": i}}, format="json").json()["playId"]
            for i in range(n)]
    drain()
    return ids


def age(ids: list[str], days: float) -> None:
    """Pretend these plays were created and finished ``days`` ago, keeping their order."""
    now = timezone.now()
    for offset, play_id in enumerate(reversed(ids)):
        moment = now - timedelta(days=days, seconds=offset)
        Play.objects.filter(pk=play_id).update(created_at=moment, completed_at=moment)


@pytest.fixture
def policy(settings: Any) -> Any:
    settings.FLOWPLAY = {**settings.FLOWPLAY, "RETENTION_DAYS": 0, "RETENTION_FILTERED_DAYS": 7,
                         "RETENTION_KEEP": 2, "RETENTION_BATCH": 3}
    return settings.FLOWPLAY


def test_old_plays_of_a_flow_with_retention_are_deleted_with_their_layers_and_events(api: Any, drain: Any, policy: Any) -> None:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}])
    Flow.objects.filter(pk=flow["id"]).update(retention_days=30)
    old = finished(api, flow, 7, drain)
    recent = finished(api, flow, 2, drain)
    age(old, 40)
    age(recent, 5)
    assert retention.prune() == 7
    assert set(Play.objects.filter(flow_id=flow["id"]).values_list("id", flat=True)) == set(recent)
    assert not Layer.objects.filter(play_id__in=old).exists()
    assert not Event.objects.filter(play_id__in=old).exists()
    assert Event.objects.filter(play_id__in=recent).exists()
    assert retention.prune() == 0


def test_the_newest_n_are_kept_whatever_their_age(api: Any, drain: Any, policy: Any) -> None:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}])
    Flow.objects.filter(pk=flow["id"]).update(retention_days=1, retention_keep=3)
    ids = finished(api, flow, 5, drain)
    age(ids, 100)
    assert retention.prune() == 2
    assert set(Play.objects.filter(flow_id=flow["id"]).values_list("id", flat=True)) == set(ids[-3:])


def test_filtered_plays_go_sooner_and_flows_without_retention_keep_the_rest(api: Any, drain: Any, policy: Any) -> None:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}},
                            "filters": [{"leftValue": "{{ $prev.args.go }}", "operator": "eq", "rightValue": "yes"}]}])
    filtered = finished(api, flow, 4, drain, {"go": "no"})
    done = finished(api, flow, 4, drain, {"go": "yes"})
    assert {Play.objects.get(pk=p).state for p in filtered} == {State.FILTERED}
    assert {Play.objects.get(pk=p).state for p in done} == {State.DONE}
    age(filtered + done, 10)
    # RETENTION_DAYS = 0: DONE plays stay for ever; FILTERED ones go after 7 days. The two
    # newest finished plays of the flow (DONE ones here) are kept anyway.
    assert retention.prune() == 4
    assert set(Play.objects.filter(flow_id=flow["id"]).values_list("id", flat=True)) == set(done)


def test_unfinished_plays_are_never_deleted(api: Any, no_enqueue: list[str], drain: Any, policy: Any) -> None:
    flow = make_flow(api, [{"ref": "gate", "appId": "var", "args": {"values": {}}, "needsApproval": True}])
    Flow.objects.filter(pk=flow["id"]).update(retention_days=1, retention_keep=0)
    waiting = finished(api, flow, 3, drain)
    assert {Play.objects.get(pk=p).state for p in waiting} == {State.WAIT}
    Play.objects.filter(pk__in=waiting).update(created_at=timezone.now() - timedelta(days=50),
                                              completed_at=timezone.now() - timedelta(days=50))
    assert retention.prune() == 0
    assert retention.delete_plays(waiting) == 0
    assert Play.objects.filter(pk__in=waiting).count() == 3


def test_a_retry_survives_the_deletion_of_the_play_it_retried(api: Any, drain: Any, policy: Any) -> None:
    flow = make_flow(api, [{"ref": "p", "appId": "json-parse", "args": {"input": "{{ $prev.args.doc }}"}}])
    Flow.objects.filter(pk=flow["id"]).update(retention_days=1, retention_keep=0)
    (failed,) = finished(api, flow, 1, drain, {"doc": "{broken"})
    assert Play.objects.get(pk=failed).state == State.FAIL
    retry_id = api.post(f"/api/plays/{failed}/retry").json()["playId"]
    drain()
    age([failed], 3)
    assert retention.prune() == 1
    assert Play.objects.get(pk=retry_id).retry_of_id is None


def test_pruning_works_in_small_batches_by_primary_key(api: Any, drain: Any, policy: Any) -> None:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}])
    Flow.objects.filter(pk=flow["id"]).update(retention_days=1, retention_keep=0)
    ids = finished(api, flow, 10, drain)
    age(ids, 2)
    with CaptureQueriesContext(connection) as queries:
        assert retention.prune(batch=3) == 10
    deletes = [q["sql"] for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("DELETE")]
    play_deletes = [sql for sql in deletes if 'FROM "plays_play"' in sql]
    # 10 plays in batches of at most 3: four DELETEs of plays, each naming its rows by id.
    assert len(play_deletes) == 4
    assert all('"plays_play"."id" IN' in sql for sql in play_deletes), play_deletes
    # No statement deletes from or updates a table without a WHERE clause.
    assert all(" WHERE " in q["sql"] for q in queries.captured_queries
               if q["sql"].lstrip().upper().startswith(("DELETE", "UPDATE")))


def test_the_periodic_task_is_scheduled(settings: Any) -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["prune-old-plays"]
    assert entry["task"] == "plays.tasks.prune_old_plays"
    from plays.tasks import prune_old_plays

    assert prune_old_plays.name == "plays.tasks.prune_old_plays"


# --- While plays keep running (real processes) ------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from .integration.processes import Cluster

    root: Path = tmp_path_factory.mktemp("retention")
    c = Cluster.create(root, FLOWPLAY_RETENTION_EVERY_SECONDS="0.5", FLOWPLAY_RETENTION_BATCH="20",
                       FLOWPLAY_RETENTION_KEEP="10", FLOWPLAY_RETENTION_DAYS="30")
    try:
        c.migrate_and_seed()
        c.start("web")
        c.start("beat")
        c.start("worker-a")
        yield c
    finally:
        c.destroy()


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_old_plays_are_pruned_while_new_plays_keep_running(cluster: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from .integration.processes import make_flow as http_flow
    from .integration.processes import run_play, wait_terminal, wait_until

    alice = cluster.client("alice")
    flow = http_flow(alice, "Pruned while running", [
        {"ref": "a", "appId": "var", "args": {"values": {"i": "{{ $prev.args.i }}"}}},
        {"ref": "nap", "appId": "sleep", "args": {"ms": 300}},
        {"ref": "b", "appId": "var", "args": {"values": {"i": "{{ $prev.a.i }}"}}},
    ])
    with ThreadPoolExecutor(max_workers=6) as pool:
        old = list(pool.map(lambda i: run_play(alice, flow["id"], {"i": i}), range(150)))
    wait_terminal(alice, old, timeout=180)
    # Age them past the 30 days of retention, straight in the database.
    moment = timezone.now() - timedelta(days=40)
    # SQLite stores Django's datetimes as naive UTC text; PostgreSQL takes the aware value.
    value: Any = moment if cluster.pg_url else str(moment.replace(tzinfo=None))
    cluster.sql("UPDATE plays_play SET completed_at = ?, created_at = ? WHERE flow_id = ?", (value, value, flow["id"]))
    # New plays run while the pruner deletes the old ones in batches of 20.
    with ThreadPoolExecutor(max_workers=6) as pool:
        new = list(pool.map(lambda i: run_play(alice, flow["id"], {"i": 1000 + i}), range(60)))
    plays = wait_terminal(alice, new, timeout=180)
    assert {p["state"] for p in plays.values()} == {"DONE"}
    for play_id in new[:5]:
        layers = alice.get(f"/api/plays/{play_id}/layers").json()
        assert [x["state"] for x in layers] == ["DONE"] * 3
    # Every old play is gone; the new ones (well within retention) all stay.
    wait_until(lambda: alice.get(f"/api/flows/{flow['id']}/plays?size=1").json()["total"] == len(new), 60,
               "the old plays to be pruned")
    listed = {p["id"] for page in range(3)
              for p in alice.get(f"/api/flows/{flow['id']}/plays?size=100&page={page}").json()["data"]}
    assert listed == set(new)
    assert alice.get(f"/api/plays/{old[0]}").status_code == 404
    alice.close()


def test_the_prune_command_reports_what_it_deleted(api: Any, drain: Any, policy: Any) -> None:
    from io import StringIO

    from django.core.management import call_command

    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}])
    Flow.objects.filter(pk=flow["id"]).update(retention_days=1, retention_keep=1)
    ids = finished(api, flow, 6, drain)
    age(ids, 3)
    out = StringIO()
    call_command("prune_plays", "--batch", "2", stdout=out)
    assert out.getvalue().startswith("deleted 5 plays in ")
    assert list(Play.objects.filter(flow_id=flow["id"]).values_list("id", flat=True)) == [ids[-1]]
