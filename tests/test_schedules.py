"""Schedules: fire times (cron, intervals, DST), catch-up, overlap, each fire once, the API."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from flows.models import Flow
from plays.models import Play, State
from triggers import cron
from triggers.models import Schedule, fire_due_one, start_queued_one
from triggers.tasks import fire_schedules

from .conftest import client_for
from .factories import flow_row

ONE_STEP = [{"ref": "a", "appId": "var", "args": {"values": {"at": "{{ $prev.args.at }}"}}}]


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def spec(expr: str, tz: str = "UTC") -> cron.Spec:
    return cron.Spec(cron=cron.expand(expr), interval=None, tz=cron.zone(tz), anchor=utc(2026, 1, 1))


def take(iterator: Any, n: int) -> list[str]:
    return [next(iterator).isoformat() for _ in range(n)]


# --- fire times ---------------------------------------------------------------------------


def test_berlin_spring_forward_fires_the_skipped_time_once_at_the_first_valid_one() -> None:
    # 2026-03-29 02:00 CET jumps to 03:00 CEST: 02:30 does not exist that day.
    times = take(spec("30 2 * * *", "Europe/Berlin").after(utc(2026, 3, 27, 12)), 3)
    assert times == ["2026-03-28T01:30:00+00:00", "2026-03-29T01:00:00+00:00", "2026-03-30T00:30:00+00:00"]


def test_berlin_fall_back_fires_a_repeated_time_once() -> None:
    # 2026-10-25 03:00 CEST falls back to 02:00 CET: 02:30 happens twice, fires once.
    times = take(spec("30 2 * * *", "Europe/Berlin").after(utc(2026, 10, 24, 12)), 2)
    assert times == ["2026-10-25T00:30:00+00:00", "2026-10-26T01:30:00+00:00"]


def test_new_york_keeps_local_time_across_both_changes() -> None:
    march = take(spec("0 9 * * 1-5", "America/New_York").after(utc(2026, 3, 6, 15)), 2)
    assert march == ["2026-03-09T13:00:00+00:00", "2026-03-10T13:00:00+00:00"]  # EDT from 8 March
    november = take(spec("30 1 * * *", "America/New_York").after(utc(2026, 10, 31, 12)), 2)
    assert november == ["2026-11-01T05:30:00+00:00", "2026-11-02T06:30:00+00:00"]  # first 01:30, EDT


def test_presets_and_invalid_expressions() -> None:
    assert cron.expand("@hourly") == "0 * * * *"
    assert cron.expand("  0  9 * *   1-5 ") == "0 9 * * 1-5"
    for bad in ["* * *", "61 * * * *", "@fortnightly", "0 9 * * 1-5 2026"]:
        with pytest.raises(cron.ScheduleSpecError):
            cron.expand(bad)
    with pytest.raises(cron.ScheduleSpecError):
        cron.zone("Mars/Olympus")


def test_intervals_count_from_their_anchor() -> None:
    every = cron.Spec(cron=None, interval=300, tz=cron.zone("UTC"), anchor=utc(2026, 1, 1, 0, 0, 10))
    assert take(every.after(utc(2026, 1, 1, 0, 5, 10)), 2) == ["2026-01-01T00:10:10+00:00", "2026-01-01T00:15:10+00:00"]
    assert every.last_at_or_before(utc(2026, 1, 1, 0, 14)) == utc(2026, 1, 1, 0, 10, 10)


@pytest.mark.parametrize(
    ("catchup", "expected"),
    [
        ("none", []),
        ("latest", ["09:09"]),
        ("all", [f"09:{m:02d}" for m in range(0, 10)]),
    ],
)
def test_catchup_policies_after_ten_missed_minutes(catchup: str, expected: list[str]) -> None:
    every_minute = spec("* * * * *")
    now = utc(2026, 1, 1, 9, 10, 30)
    fires, following = cron.plan(every_minute, utc(2026, 1, 1, 9, 0), now, catchup=catchup, grace=60, window=86400)
    # 09:10 is within the grace period: on time, it always fires.
    assert [t.strftime("%H:%M") for t in fires] == [*expected, "09:10"]
    assert following == utc(2026, 1, 1, 9, 11)


def test_catchup_all_keeps_to_its_window_and_to_100_fires() -> None:
    every_minute = spec("* * * * *")
    now = utc(2026, 1, 2, 9, 0, 30)
    fires, _ = cron.plan(every_minute, utc(2026, 1, 1, 0, 0), now, catchup="all", grace=1, window=600)
    assert len(fires) == 10 and fires[0] == utc(2026, 1, 2, 8, 50, 30).replace(second=0) + timedelta(minutes=1)
    fires, _ = cron.plan(every_minute, utc(2026, 1, 1, 0, 0), now, catchup="all", grace=1, window=86400)
    assert len(fires) == 100 and (fires[0], fires[-1]) == (utc(2026, 1, 2, 7, 21), utc(2026, 1, 2, 9, 0))


# --- firing --------------------------------------------------------------------------------


@pytest.fixture
def flow(api: Any) -> Flow:
    return flow_row(api, ONE_STEP, name="Nightly")


def schedule_of(flow: Flow, **fields: Any) -> Schedule:
    fields.setdefault("cron", "* * * * *")
    schedule = Schedule.objects.create(company_id=flow.company_id, flow=flow, **fields)
    schedule.schedule_from(fields.get("anchor_at", timezone.now()) - timedelta(minutes=1))
    schedule.save()
    return schedule


def schedule_plays(schedule: Schedule) -> list[Play]:
    return list(Play.objects.filter(trigger_info__scheduleId=schedule.pk).order_by("created_at", "id"))


def test_a_due_schedule_fires_once_with_its_rendered_args(flow: Flow, no_enqueue: list[str]) -> None:
    schedule = schedule_of(flow, args={"at": "{{ $schedule.firedAt }}", "by": "{{ $schedule.id }}"})
    due = schedule.next_fire_at
    assert fire_due_one(due + timedelta(seconds=1))
    assert not fire_due_one(due + timedelta(seconds=1))
    [play] = schedule_plays(schedule)
    fired_at = due.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert play.args == {"at": fired_at, "by": schedule.pk}
    assert play.trigger_source == {"kind": "schedule", "scheduleId": schedule.pk, "firedAt": fired_at}
    assert play.idempotency_key == f"schedule:{schedule.pk}:{fired_at}" and play.state == State.RUN
    schedule.refresh_from_db()
    assert schedule.next_fire_at == due + timedelta(minutes=1) and schedule.last_play_id == play.id
    assert schedule.fire_count == 1


def test_a_stale_scheduler_cannot_fire_the_same_time_again_even_after_the_play_failed(
    flow: Flow, no_enqueue: list[str]
) -> None:
    schedule = schedule_of(flow)
    due = schedule.next_fire_at
    fire_due_one(due)
    [play] = schedule_plays(schedule)
    play.cancel()  # FAIL frees an idempotency key for API callers; not for a fire
    Schedule.objects.filter(pk=schedule.pk).update(next_fire_at=due)  # a restarted scheduler's view
    assert fire_due_one(due)
    assert schedule_plays(schedule) == [play]


@pytest.mark.django_db(transaction=True)
def test_two_schedulers_racing_start_one_play_per_fire(alice: Any, no_enqueue: list[str]) -> None:
    flow = flow_row(client_for(alice), ONE_STEP, name="Race")
    schedules = [schedule_of(flow, overlap="allow") for _ in range(3)]
    now = max(s.next_fire_at for s in schedules) + timedelta(seconds=1)
    stale = now - timedelta(minutes=1)  # a fire time that every scheduler fires directly, unlocked
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def scheduler() -> None:
        try:
            barrier.wait()
            while fire_due_one(now):
                pass
            # A scheduler that read before the others committed fires from its old view.
            for schedule in schedules:
                schedule.fire(stale)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    if connection.vendor == "sqlite":
        pytest.skip("SQLite has one writer: two schedulers cannot race (run on PostgreSQL)")
    threads = [threading.Thread(target=scheduler) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for schedule in schedules:
        fired = [p.trigger_info["firedAt"] for p in schedule_plays(schedule)]
        assert len(fired) == len(set(fired)) == 2 and stale.isoformat(timespec="milliseconds")[:19] in str(fired)


def test_catchup_latest_fires_the_newest_missed_time_after_downtime(flow: Flow, no_enqueue: list[str]) -> None:
    schedule = schedule_of(flow, catchup="latest", overlap="allow")
    down_from = schedule.next_fire_at
    fire_due_one(down_from + timedelta(minutes=30, seconds=30))  # 30 minutes without a scheduler
    fired = [p.trigger_info["firedAt"] for p in schedule_plays(schedule)]
    newest_missed = (down_from + timedelta(minutes=29)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    on_time = (down_from + timedelta(minutes=30)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert fired == [newest_missed, on_time]


def test_overlap_skip_skips_while_the_previous_play_runs(flow: Flow, no_enqueue: list[str]) -> None:
    schedule = schedule_of(flow)  # overlap=skip is the default
    first = schedule.next_fire_at
    fire_due_one(first)
    fire_due_one(first + timedelta(minutes=1))
    schedule.refresh_from_db()
    assert len(schedule_plays(schedule)) == 1 and schedule.skipped_count == 1


def test_overlap_queue_keeps_one_waiting_and_starts_it_when_the_previous_ends(
    flow: Flow, drain: Any, no_enqueue: list[str]
) -> None:
    schedule = schedule_of(flow, overlap="queue")
    first = schedule.next_fire_at
    fire_due_one(first)
    no_enqueue.clear()  # the first play stays RUN: a slow flow
    fire_due_one(first + timedelta(minutes=1))
    fire_due_one(first + timedelta(minutes=2))
    running, queued = schedule_plays(schedule)
    assert running.state == State.RUN and queued.state == State.NEW
    schedule.refresh_from_db()
    assert schedule.skipped_count == 1 and schedule.queued_play_id == queued.id
    assert not start_queued_one()  # the first one still runs
    running.cancel()
    assert start_queued_one()
    queued.refresh_from_db()
    assert queued.state == State.RUN
    drain()
    queued.refresh_from_db()
    assert queued.state == State.DONE


def test_overlap_allow_starts_every_fire(flow: Flow, no_enqueue: list[str]) -> None:
    schedule = schedule_of(flow, overlap="allow")
    first = schedule.next_fire_at
    for minute in range(3):
        fire_due_one(first + timedelta(minutes=minute))
    assert [p.state for p in schedule_plays(schedule)] == [State.RUN] * 3


def test_a_paused_or_ended_schedule_does_not_fire(flow: Flow, no_enqueue: list[str]) -> None:
    schedule = schedule_of(flow)
    due = schedule.next_fire_at
    schedule.pause()
    assert not fire_due_one(due + timedelta(hours=1))
    ended = schedule_of(flow, end_at=timezone.now() - timedelta(days=1))
    assert ended.next_fire_at is None and ended.next_fire_times() == []
    assert schedule_plays(schedule) == schedule_plays(ended) == []


def test_the_beat_task_fires_what_is_due(flow: Flow, no_enqueue: list[str]) -> None:
    schedule = schedule_of(flow, interval_seconds=1, cron="", anchor_at=timezone.now() - timedelta(seconds=3))
    assert fire_schedules() >= 1
    assert len(schedule_plays(schedule)) >= 1


def test_a_disabled_flow_skips_the_fire_and_says_why(flow: Flow, no_enqueue: list[str]) -> None:
    schedule = schedule_of(flow)
    Flow.objects.filter(pk=flow.pk).update(enabled=False)
    fire_due_one(schedule.next_fire_at)
    schedule.refresh_from_db()
    assert schedule_plays(schedule) == [] and "disabled" in schedule.last_error


# --- the API ---------------------------------------------------------------------------------


def test_create_a_cron_schedule_and_read_its_next_five_fire_times(api: Any, flow: Flow) -> None:
    r = api.post(
        f"/api/flows/{flow.permanent_id}/schedules",
        {"cron": "0 9 * * 1-5", "timezone": "Europe/Berlin", "args": {"at": "{{ $schedule.firedAt }}"}},
        format="json",
    )
    assert r.status_code == 201, r.content
    body = r.json()
    assert body["flowId"] == flow.id and body["overlap"] == "skip" and body["catchup"] == "none"
    assert body["enabled"] is True and body["intervalSeconds"] is None and body["timezone"] == "Europe/Berlin"
    assert len(body["nextFireTimes"]) == 5 and body["nextFireAt"] == body["nextFireTimes"][0]
    for t in body["nextFireTimes"]:
        local = datetime.fromisoformat(t.replace("Z", "+00:00")).astimezone(cron.zone("Europe/Berlin"))
        assert (local.hour, local.minute) == (9, 0) and local.weekday() < 5
    assert api.get(f"/api/schedules/{body['id']}").json()["id"] == body["id"]
    assert [s["id"] for s in api.get("/api/schedules").json()["data"]] == [body["id"]]
    assert [s["id"] for s in api.get(f"/api/flows/{flow.id}/schedules").json()["data"]] == [body["id"]]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"cron": "0 9 * * *", "intervalSeconds": 60},
        {"cron": "61 * * * *"},
        {"intervalSeconds": 0},
        {"cron": "@hourly", "timezone": "Mars/Olympus"},
        {"cron": "@hourly", "args": [1]},
        {"cron": "@hourly", "args": {"x": "{{ 1 + }}"}},
        {"cron": "@hourly", "overlap": "sometimes"},
        {"cron": "@hourly", "endAt": "tomorrow"},
    ],
)
def test_bad_schedules_are_400_with_the_field(api: Any, flow: Flow, body: dict[str, Any]) -> None:
    r = api.post(f"/api/flows/{flow.id}/schedules", body, format="json")
    assert r.status_code == 400, r.content
    assert r.json()["error"] == "VALIDATION_ERROR" and r.json()["details"]


def test_pause_resume_patch_trigger_and_delete(api: Any, flow: Flow, no_enqueue: list[str]) -> None:
    sid = api.post(f"/api/flows/{flow.id}/schedules", {"intervalSeconds": 300}, format="json").json()["id"]
    paused = api.post(f"/api/schedules/{sid}/pause").json()
    assert paused["enabled"] is False and paused["nextFireTimes"] == [] and paused["nextFireAt"] is None
    resumed = api.post(f"/api/schedules/{sid}/resume").json()
    assert resumed["enabled"] is True and len(resumed["nextFireTimes"]) == 5
    patched = api.patch(f"/api/schedules/{sid}", {"cron": "@daily"}, format="json").json()
    assert patched["cron"] == "0 0 * * *" and patched["intervalSeconds"] is None
    assert patched["nextFireTimes"][0].endswith("T00:00:00.000Z")
    fired = api.post(f"/api/schedules/{sid}/trigger")
    assert fired.status_code == 201 and fired.json()["trigger"]["kind"] == "schedule"
    history = api.get(f"/api/flows/{flow.id}/plays?trigger=schedule").json()["data"]
    assert [p["id"] for p in history] == [fired.json()["id"]]
    assert api.delete(f"/api/schedules/{sid}").status_code == 204
    assert api.get(f"/api/schedules/{sid}").status_code == 404


def test_another_companys_schedule_is_a_404(api: Any, flow: Flow, charlie: Any) -> None:
    sid = api.post(f"/api/flows/{flow.id}/schedules", {"cron": "@hourly"}, format="json").json()["id"]
    other = client_for(charlie)
    for method, path in [("get", ""), ("patch", ""), ("delete", ""), ("post", "/pause"), ("post", "/trigger")]:
        assert getattr(other, method)(f"/api/schedules/{sid}{path}").status_code == 404
    assert other.get("/api/schedules").json()["data"] == []
    assert other.post(f"/api/flows/{flow.id}/schedules", {"cron": "@hourly"}, format="json").status_code == 404


def test_the_admin_lists_and_creates_schedules_with_their_next_fire(
    alice: Any, flow: Flow, client: Any, no_enqueue: list[str]
) -> None:
    alice.is_staff = alice.is_superuser = True
    alice.save()
    client.force_login(alice)
    r = client.post(
        "/admin/triggers/schedule/add/",
        {
            "flow": flow.pk,
            "name": "weekday mornings",
            "cron": "0 9 * * 1-5",
            "time_zone": "UTC",
            "args": "{}",
            "overlap": "skip",
            "catchup": "none",
            "catchup_window_seconds": 86400,
            "enabled": "on",
        },
    )
    assert r.status_code == 302, r.content[:2000]
    schedule = Schedule.objects.get(name="weekday mornings")
    assert schedule.next_fire_at is not None and schedule.next_fire_at.hour == 9
    page = client.get("/admin/triggers/schedule/").content.decode()
    assert "weekday mornings" in page and schedule.next_fire_at.strftime("%Y-%m-%dT%H:%M") in page


def test_the_flow_page_shows_its_schedules_and_fired_plays_say_so(
    alice: Any, flow: Flow, client: Any, no_enqueue: list[str]
) -> None:
    schedule = schedule_of(flow, name="every minute")
    fire_due_one(schedule.next_fire_at)
    [play] = schedule_plays(schedule)
    client.force_login(alice)
    page = client.get(f"/flows/{flow.permanent_id}/plays/").content.decode()
    assert "every minute" in page and f'data-schedule-id="{schedule.pk}"' in page and play.pk in page
    assert f"Fired by schedule {schedule.pk}" in page
    only = client.get(f"/flows/{flow.permanent_id}/plays/?trigger=schedule")
    assert only.status_code == 200 and play.pk in only.content.decode()
    assert (
        f'data-play-id="{play.pk}"' not in client.get(f"/flows/{flow.permanent_id}/plays/?trigger=api").content.decode()
    )
    detail = client.get(f"/plays/{play.pk}/").content.decode()
    assert "Started by" in detail and schedule.pk in detail
