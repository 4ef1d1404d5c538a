"""Bulk actions (plays/bulk.py and its pages), the approval inbox and the list pages' additions."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.db import transaction

from flows.models import Flow
from plays import bulk
from plays.bulk import Action, BulkItem, BulkJob, JobState
from plays.models import Play, State
from tenancy.models import AuditEntry, User

from .factories import make_flow
from .test_pages import ONE_STEP, browser, row_ids, seed_history


def run(flow: Flow, user: User) -> Play:
    """A play left RUN: nothing drains the queue, so no step runs."""
    play, created = Play.trigger(flow, {}, user=user)
    assert created and play.state == State.RUN
    return play


APPROVAL = [
    {"ref": "ask", "appId": "var", "args": {"values": {"x": 1}}, "needsApproval": True},
]


@pytest.fixture
def flow(api: Any) -> Flow:
    return Flow.objects.get(pk=make_flow(api, ONE_STEP, name="Invoice processing", category="Finance")["id"])


@pytest.fixture
def enqueued(monkeypatch: Any) -> list[str]:
    """Bulk jobs enqueued (after commit, which the test transaction fires at once)."""
    from plays import tasks

    jobs: list[str] = []
    monkeypatch.setattr(transaction, "on_commit", lambda func, using=None, robust=False: func())
    monkeypatch.setattr(tasks.run_bulk_job, "delay", lambda job_id: jobs.append(job_id))
    monkeypatch.setattr(tasks.run_play, "apply_async", lambda args, **kw: None)
    return jobs


def failed(flow: Flow, user: User, n: int) -> list[Play]:
    plays = []
    for _ in range(n):
        play = run(flow, user)
        play.cancel(user)
        play.refresh_from_db()
        plays.append(play)
    return plays


# --- the dry run and the job ------------------------------------------------------------------


def test_the_dry_run_counts_what_will_be_retried_and_why_the_rest_will_not(
        flow: Flow, alice: User, enqueued: list[str]) -> None:
    fails = failed(flow, alice, 5)
    running = run(flow, alice)
    already = failed(flow, alice, 1)[0]
    already.retry(alice)
    dry = bulk.classify(Action.RETRY, alice.company_id, [p.pk for p in fails] + [running.pk, already.pk, "nope"])
    assert sorted(dry["will"]) == sorted(p.pk for p in fails)
    assert dict(dry["skip"]) == {"not FAIL": [running.pk], "already retried": [already.pk], "not found": ["nope"]}
    assert bulk.summary(Action.RETRY, dry) == "5 will be retried, 1 is already retried, 1 is not FAIL, 1 is not found"


def test_a_bulk_retry_retries_each_failed_play_once_and_writes_one_audit_entry_for_the_batch(
        flow: Flow, alice: User, enqueued: list[str]) -> None:
    fails = failed(flow, alice, 3)
    done = run(flow, alice)
    job = bulk.create(alice, Action.RETRY, [p.pk for p in fails] + [done.pk], note="bad night")
    assert enqueued == [job.pk] and job.state == JobState.PENDING and job.total == 4
    before = AuditEntry.objects.count()
    assert bulk.run(job.pk) is True
    job.refresh_from_db()
    assert job.state == JobState.DONE and job.processed == 4 and job.percent == 100
    for play in fails:
        retry = Play.objects.get(retry_of=play)
        assert retry.trigger_kind == "retry"
        assert BulkItem.objects.get(job=job, play_id=play.pk).new_play_id == retry.pk
    item = BulkItem.objects.get(job=job, play_id=done.pk)
    assert item.outcome == "refused" and "only FAIL plays can be retried" in item.message
    entries = list(AuditEntry.objects.order_by("id")[before:])
    # One entry for the batch; each play's own history also says it was retried, by whom,
    # from a bulk job (the verb writes that entry in its transaction, as for every caller).
    assert [e.action for e in entries] == ["play.retried"] * 3 + ["bulk.retried"]
    assert {(e.object_id, e.details["source"]) for e in entries[:3]} == {(p.pk, "bulk") for p in fails}
    batch = entries[-1]
    assert batch.object_id == job.pk and batch.details["counts"] == {"done": 3, "refused": 1}
    assert batch.details["note"] == "bad night" and len(batch.details["plays"]) == 3


def test_running_a_job_again_acts_on_no_play_twice(flow: Flow, alice: User, enqueued: list[str]) -> None:
    fails = failed(flow, alice, 3)
    job = bulk.create(alice, Action.RETRY, [p.pk for p in fails])
    # A worker died after the first play: the redelivered task picks up where it stopped.
    assert bulk.run_one(job, fails[0].pk) is True
    assert bulk.run_one(job, fails[0].pk) is False
    BulkJob.objects.filter(pk=job.pk).update(state=JobState.RUN)
    assert bulk.run(job.pk) is True
    assert bulk.run(job.pk) is False  # a duplicate delivery of a finished job
    assert Play.objects.filter(retry_of__in=fails).count() == 3
    assert BulkItem.objects.filter(job=job).count() == 3
    assert AuditEntry.objects.filter(action="bulk.retried", object_id=job.pk).count() == 1
    # A second job over the same plays finds them already retried.
    again = bulk.create(alice, Action.RETRY, [p.pk for p in fails])
    bulk.run(again.pk)
    assert set(again.items.values_list("outcome", flat=True)) == {"refused"}
    assert Play.objects.filter(retry_of__in=fails).count() == 3


def test_a_job_never_touches_another_companys_plays(
        flow: Flow, alice: User, charlie: User, charlie_api: Any, enqueued: list[str]) -> None:
    theirs = Flow.objects.get(pk=make_flow(charlie_api, ONE_STEP, name="Theirs")["id"])
    their_play = failed(theirs, charlie, 1)[0]
    ours = failed(flow, alice, 1)[0]
    assert bulk.classify(Action.RETRY, alice.company_id, [their_play.pk])["will"] == []
    job = bulk.create(alice, Action.RETRY, [ours.pk, their_play.pk])
    bulk.run(job.pk)
    assert not Play.objects.filter(retry_of=their_play).exists()
    assert BulkItem.objects.get(job=job, play_id=their_play.pk).outcome == "missing"
    assert Play.objects.filter(retry_of=ours).exists()
    # ... and its page is another company's 404.
    assert browser(charlie).get(f"/plays/bulk/{job.pk}/").status_code == 404


def test_bulk_cancel_hold_and_decide(api: Any, flow: Flow, alice: User, enqueued: list[str]) -> None:
    plays = [run(flow, alice) for _ in range(2)]
    job = bulk.create(alice, Action.HOLD, [p.pk for p in plays])
    bulk.run(job.pk)
    assert set(Play.objects.filter(pk__in=[p.pk for p in plays]).values_list("state", flat=True)) == {State.ON_HOLD}
    job = bulk.create(alice, Action.CANCEL, [p.pk for p in plays])
    bulk.run(job.pk)
    assert set(Play.objects.filter(pk__in=[p.pk for p in plays]).values_list("state", flat=True)) == {State.FAIL}


# --- the pages -------------------------------------------------------------------------------


def test_retry_all_failed_plays_matching_a_filter_from_the_history_page(
        flow: Flow, alice: User, enqueued: list[str]) -> None:
    fails = failed(flow, alice, 3)
    other = run(flow, alice)
    client = browser(alice)
    page = client.get(f"/flows/{flow.permanent_id}/plays/?state=FAIL").content.decode()
    assert 'id="bulk-form"' in page and "All 3 matching this filter" in page
    form = {"action": "retry", "scope": "all", "query": "state=FAIL", "flow": flow.pk,
            "back": f"/flows/{flow.permanent_id}/plays/?state=FAIL"}
    preview = client.post("/plays/bulk/preview/", form)
    assert preview.status_code == 200
    assert "3 will be retried." in preview.content.decode()
    assert not Play.objects.filter(retry_of__in=fails).exists()  # a dry run changes nothing
    response = client.post("/plays/bulk/confirm/", {**form, "note": "after the outage"})
    job = BulkJob.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/plays/bulk/{job.pk}/"
    assert sorted(job.play_ids) == sorted(p.pk for p in fails) and other.pk not in job.play_ids
    pending = client.get(f"/plays/bulk/{job.pk}/?format=json").json()
    assert pending == {"id": job.pk, "state": "PENDING", "total": 3, "processed": 0, "percent": 0}
    bulk.run(enqueued.pop())
    result = client.get(f"/plays/bulk/{job.pk}/").content.decode()
    for play in fails:
        retry = Play.objects.get(retry_of=play)
        assert f'href="/plays/{retry.pk}/"' in result
    # The list now says where each failed play went, and "not yet retried" empties it.
    listing = client.get(f"/flows/{flow.permanent_id}/plays/?state=FAIL").content.decode()
    assert listing.count("retried →") == 3
    assert row_ids(client.get(f"/flows/{flow.permanent_id}/plays/?state=FAIL&retried=no").content.decode()) == []
    retry_page = client.get(f"/flows/{flow.permanent_id}/plays/?trigger=retry").content.decode()
    assert retry_page.count("retry of") == 3


def test_bulk_pages_need_the_operate_permission(flow: Flow, alice: User, acme: Any, enqueued: list[str]) -> None:
    from django.contrib.auth.models import Permission

    viewer = User.objects.create_user("val", "val@acme.test", "x", company=acme)
    viewer.user_permissions.add(Permission.objects.get(codename="view_play"))
    fails = failed(flow, alice, 1)
    client = browser(viewer)
    assert 'id="bulk-form"' not in client.get("/plays/").content.decode()
    assert client.post("/plays/bulk/preview/", {"action": "retry", "scope": "selected", "play": fails[0].pk}).status_code == 404
    assert client.post("/plays/bulk/confirm/", {"action": "retry", "scope": "selected", "play": fails[0].pk}).status_code == 404
    assert not BulkJob.objects.exists()


def test_the_inbox_lists_waiting_plays_and_decides_with_a_note(
        api: Any, alice: User, drain: Any) -> None:
    flow = make_flow(api, APPROVAL, name="Payout")
    ids = [api.post(f"/api/flows/{flow['id']}/run", {"args": {"n": i}}, format="json").json()["playId"] for i in range(3)]
    drain()
    assert set(Play.objects.filter(pk__in=ids).values_list("state", flat=True)) == {State.WAIT}
    client = browser(alice)
    html = client.get("/inbox/").content.decode()
    assert row_ids(html) == sorted(ids, key=lambda i: Play.objects.get(pk=i).updated_at)
    assert re.search(r'id="waiting-count"[^>]*>3<', html)  # the header's count
    layer_id = Play.objects.get(pk=ids[0]).pending_approval().pk
    response = client.post("/inbox/decide/", {"play_id": ids[0], "layer_id": layer_id, "decision": "approved",
                                              "note": "looks right"}, follow=True)
    assert "step approved" in response.content.decode()
    approval = Play.objects.get(pk=ids[0]).approvals.get()
    assert approval.note == "looks right" and approval.decided_by == alice
    assert AuditEntry.objects.filter(action="play.approved", object_id=ids[0]).exists()
    assert re.search(r'id="waiting-count"[^>]*>2<', response.content.decode())
    # The other two declined in bulk, with one note.
    form = {"action": "decline", "scope": "selected", "play": ids[1:], "back": "/inbox/", "note": "duplicate"}
    assert "2 will be declined." in client.post("/plays/bulk/preview/", form).content.decode()
    with drain_jobs() as jobs:
        client.post("/plays/bulk/confirm/", form)
        drain.flush()  # the request's commit sends the job
    for job_id in jobs:
        bulk.run(job_id)
    for pid in ids[1:]:
        play = Play.objects.get(pk=pid)
        assert play.state == State.SKIP and play.approvals.get().note == "duplicate"
    assert 'id="waiting-count"' not in client.get("/inbox/").content.decode()


class drain_jobs:  # noqa: N801
    def __enter__(self) -> list[str]:
        from plays import tasks

        self.jobs: list[str] = []
        self.original = tasks.run_bulk_job.delay
        tasks.run_bulk_job.delay = self.jobs.append  # type: ignore[method-assign]
        return self.jobs

    def __exit__(self, *exc: Any) -> None:
        from plays import tasks

        tasks.run_bulk_job.delay = self.original  # type: ignore[method-assign]


# --- the list pages ---------------------------------------------------------------------------


def test_a_page_past_the_end_goes_to_the_last_page(flow: Flow, alice: User) -> None:
    seed_history(flow, 30)
    response = browser(alice).get(f"/flows/{flow.permanent_id}/plays/?page=999&size=25")
    assert response.status_code == 302 and response["Location"].endswith("?page=1&size=25")
    last = browser(alice).get(response["Location"]).content.decode()
    assert "Plays 26–30 of 30" in last or "Plays 26–31 of 31" in last


def test_the_flow_dropdown_shows_a_flow_given_by_its_permanent_id(api: Any, flow: Flow, alice: User) -> None:
    other = Flow.objects.get(pk=make_flow(api, ONE_STEP, name="Other")["id"])
    run(flow, alice)
    run(other, alice)
    html = browser(alice).get(f"/plays/?flowId={flow.permanent_id}").content.decode()
    assert re.search(rf'<option value="{flow.pk}" selected>', html)
    assert '"flowId": "' + flow.pk + '"' in html  # the live updates narrowed to it too
    assert len(row_ids(html)) == 1


def test_search_by_id_and_key_prefix_and_sort_by_duration(flow: Flow, alice: User) -> None:
    plays = seed_history(flow, 12)
    client = browser(alice)
    assert row_ids(client.get(f"/plays/?q={plays[3].pk}").content.decode()) == [plays[3].pk]
    assert set(row_ids(client.get("/plays/?q=key-1").content.decode())) == {plays[1].pk, plays[10].pk, plays[11].pk}
    assert client.get("/plays/?sort=-duration").status_code == 200
    assert client.get("/plays/?sort=sideways").status_code == 400


def test_the_match_endpoint_applies_the_lists_filters(flow: Flow, alice: User) -> None:
    waiting = run(flow, alice)
    done = seed_history(flow, 3)[0]
    client = browser(alice)
    body = client.get(f"/plays/match/?state=RUN&ids={waiting.pk},{done.pk}").json()
    assert body == {"match": [waiting.pk]}
    body = client.get(f"/flows/{flow.permanent_id}/plays/match/?state=DONE&ids={waiting.pk},{done.pk}").json()
    assert body == {"match": [done.pk]}


def test_empty_states_say_what_to_do(flow: Flow, alice: User) -> None:
    client = browser(alice)
    assert "This flow has not run yet" in client.get(f"/flows/{flow.permanent_id}/plays/").content.decode()
    assert "No play matches these filters" in client.get(f"/flows/{flow.permanent_id}/plays/?state=WAIT").content.decode()
    assert "Nothing is waiting for an approval" in client.get("/inbox/").content.decode()


def test_an_unexpected_error_on_one_play_does_not_stop_the_batch(
        flow: Flow, alice: User, enqueued: list[str], monkeypatch: Any) -> None:
    fails = failed(flow, alice, 2)
    original = Play.retry

    def flaky(self: Play, by: Any = None, source: str = "") -> Play:
        if self.pk == fails[0].pk:
            raise RuntimeError("disk full")
        return original(self, by=by, source=source)

    monkeypatch.setattr(Play, "retry", flaky)
    job = bulk.create(alice, Action.RETRY, [p.pk for p in fails])
    assert bulk.run(job.pk) is True
    job.refresh_from_db()
    assert job.state == JobState.DONE
    assert job.counts() == {"error": 1, "done": 1}
    assert "disk full" in BulkItem.objects.get(job=job, play_id=fails[0].pk).message
    assert not Play.objects.filter(retry_of=fails[0]).exists()


def test_an_unfinished_job_can_be_sent_again(flow: Flow, alice: User, enqueued: list[str]) -> None:
    fails = failed(flow, alice, 1)
    job = bulk.create(alice, Action.RETRY, [p.pk for p in fails])
    client = browser(alice)
    assert "Send it again" in client.get(f"/plays/bulk/{job.pk}/").content.decode()
    assert client.post(f"/plays/bulk/{job.pk}/resume/").status_code == 302
    assert enqueued == [job.pk, job.pk]
    bulk.run(job.pk)
    assert "Send it again" not in client.get(f"/plays/bulk/{job.pk}/").content.decode()
    client.post(f"/plays/bulk/{job.pk}/resume/")
    assert enqueued == [job.pk, job.pk]  # a finished job is not sent again


def test_the_reaper_sends_again_a_job_whose_worker_died_and_it_finishes_once(
    flow: Flow, alice: User, enqueued: list[str], settings: Any
) -> None:
    """A worker died in the middle of a job (RUN, one play done, no progress since): the
    reaper sends it again, the new delivery does the rest, and no play is acted on twice."""
    from datetime import timedelta

    from django.utils import timezone

    from plays import tasks

    fails = failed(flow, alice, 3)
    job = bulk.create(alice, Action.RETRY, [p.pk for p in fails])
    BulkJob.objects.filter(pk=job.pk).update(state=JobState.RUN)
    assert bulk.run_one(job, fails[0].pk)
    enqueued.clear()
    tasks.reap_stuck()
    assert enqueued == []  # it made progress a moment ago: maybe only slow
    idle = settings.FLOWPLAY["REAP_IDLE_SECONDS"]
    BulkJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(seconds=idle + 1))
    tasks.reap_stuck()
    assert enqueued == [job.pk]
    tasks.reap_stuck()
    assert enqueued == [job.pk]  # sent once: the next sweep waits for it to make progress
    assert bulk.run(job.pk) is True
    assert Play.objects.filter(retry_of__in=fails).count() == 3
    assert BulkItem.objects.filter(job=job).count() == 3
    BulkJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(seconds=idle + 1))
    tasks.reap_stuck()
    assert enqueued == [job.pk]  # a finished job is never sent again


def test_the_reaper_sends_again_a_job_that_never_reached_a_worker(
    flow: Flow, alice: User, enqueued: list[str], settings: Any
) -> None:
    """The broker was down when the job was confirmed: it stays PENDING until the reaper sends it."""
    from datetime import timedelta

    from django.utils import timezone

    from plays import tasks

    job = bulk.create(alice, Action.RETRY, [p.pk for p in failed(flow, alice, 1)])
    enqueued.clear()  # the send after commit was lost
    idle = settings.FLOWPLAY["REAP_IDLE_SECONDS"]
    BulkJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(seconds=idle + 1))
    tasks.reap_stuck()
    assert enqueued == [job.pk]
    assert bulk.run(job.pk) is True
    assert BulkJob.objects.get(pk=job.pk).state == JobState.DONE
