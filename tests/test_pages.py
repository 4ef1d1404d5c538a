"""The server-rendered pages: login, flows, play history, play detail and the operator buttons."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.cache import cache
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from flows.models import Flow
from plays.models import Layer, Play, State
from tenancy.models import AuditEntry, User

from .conftest import PASSWORD
from .factories import flow_row, make_flow, make_play

ONE_STEP = [{"ref": "a", "appId": "var", "args": {"values": {"id": "{{ $prev.args.id }}"}}}]


@pytest.fixture(autouse=True)
def _fresh_login_throttle() -> Iterator[None]:
    # The login throttle counts in the default cache, shared with the API's login tests.
    cache.clear()
    yield
    cache.clear()


def browser(user: User | None = None, **kwargs: Any) -> Client:
    client = Client(**kwargs)
    if user is not None:
        client.force_login(user)
    return client


@pytest.fixture
def page(alice: User) -> Client:
    """alice's logged-in browser."""
    return browser(alice)


@pytest.fixture
def flow(api: Any) -> Flow:
    return flow_row(api, ONE_STEP, name="Invoice processing", category="Finance")


def seed_history(flow: Flow, n: int = 30) -> list[Play]:
    template = Play.objects.filter(flow=flow).first() or make_play(flow, flow.company.users.first())
    now = timezone.now()
    rows = [
        Play(company_id=flow.company_id, flow=flow, flow_version_id=template.flow_version_id,
             state=["DONE", "FAIL", "SKIP"][i % 3], args={"i": i}, args_hash="x",
             created_at=now - timedelta(days=i, minutes=1), idempotency_key=f"key-{i}")
        for i in range(n)
    ]
    return Play.objects.bulk_create(rows)


def row_ids(html: str) -> list[str]:
    return re.findall(r'<tr data-play-id="([^"]+)"', html)


def buttons(html: str) -> set[str]:
    section = html.split('id="play-actions"', 1)[1].split('id="play-error"', 1)[0]
    return set(re.findall(r'<button type="submit" class="btn btn--\w+" name="(?:verb|decision)" value="(\w+)"', section))


# --- access ---------------------------------------------------------------------------


def test_anonymous_visitors_are_sent_to_the_login_page(flow: Flow, alice: User) -> None:
    play = make_play(flow, alice)
    anon = Client()
    for url in ["/flows/", f"/flows/{flow.pk}/plays/", "/plays/", f"/plays/{play.pk}/"]:
        response = anon.get(url)
        assert response.status_code == 302, url
        assert response["Location"] == f"/login/?next={url}"
    assert anon.post(f"/plays/{play.pk}/hold/").status_code == 302
    assert Play.objects.get(pk=play.pk).state == State.RUN
    assert anon.get("/").status_code == 302


def test_the_login_page_takes_an_email_and_lands_on_the_flows(alice: User) -> None:
    client = Client()
    form = client.get("/login/")
    assert form.status_code == 200
    assert 'type="email"' in form.content.decode() and 'for="id_username"' in form.content.decode()
    wrong = client.post("/login/", {"username": "alice@acme.test", "password": "nope"})
    assert wrong.status_code == 200 and "Wrong email or password." in wrong.content.decode()
    right = client.post("/login/", {"username": "ALICE@acme.test", "password": PASSWORD})
    assert right.status_code == 302 and right["Location"] == "/flows/"
    assert client.get("/flows/").status_code == 200
    back = client.post("/login/?next=/plays/", {"username": "alice@acme.test", "password": PASSWORD, "next": "/plays/"})
    assert back["Location"] == "/plays/"


def test_logging_out_takes_a_post_and_ends_the_session(page: Client) -> None:
    assert page.get("/flows/").status_code == 200
    response = page.post("/logout/")
    assert response.status_code == 302 and response["Location"] == "/login/"
    assert page.get("/flows/").status_code == 302


def test_the_login_page_shares_the_api_logins_throttle(alice: User) -> None:
    client = Client()
    codes = [client.post("/login/", {"username": "nobody@acme.test", "password": "x"}).status_code for _ in range(11)]
    assert codes[:10] == [200] * 10
    assert codes[10] == 429
    blocked = client.post("/login/", {"username": "alice@acme.test", "password": PASSWORD})
    assert blocked.status_code == 429 and "Too many login attempts" in blocked.content.decode()


def test_staff_see_a_link_to_the_admin(alice: User, bob: User) -> None:
    alice.is_staff = True
    alice.save()
    assert 'href="/admin/"' in browser(alice).get("/flows/").content.decode()
    assert 'href="/admin/"' not in browser(bob).get("/flows/").content.decode()


def test_another_companys_flows_and_plays_are_404(flow: Flow, alice: User, charlie: User) -> None:
    play = make_play(flow, alice)
    outsider = browser(charlie)
    assert outsider.get(f"/flows/{flow.pk}/plays/").status_code == 404
    assert outsider.get(f"/flows/{flow.permanent_id}/plays/").status_code == 404
    missing = outsider.get(f"/plays/{play.pk}/")
    assert missing.status_code == 404 and "belongs to another company" in missing.content.decode()
    for verb in ["hold", "cancel", "resume", "retry"]:
        assert outsider.post(f"/plays/{play.pk}/{verb}/").status_code == 404
    assert outsider.post(f"/plays/{play.pk}/decide/", {"layer_id": "x", "decision": "approved"}).status_code == 404
    assert Play.objects.get(pk=play.pk).state == State.RUN
    assert play.pk not in outsider.get("/plays/").content.decode()
    assert "Invoice processing" not in outsider.get("/flows/").content.decode()


def test_teammates_see_each_others_plays(flow: Flow, alice: User, bob: User) -> None:
    play = make_play(flow, alice)
    assert browser(bob).get(f"/plays/{play.pk}/").status_code == 200


# --- flows page -----------------------------------------------------------------------


def test_flows_page_shows_last_play_and_last_day_counts(api: Any, flow: Flow, alice: User) -> None:
    quiet = flow_row(api, ONE_STEP, name="Never run", enabled=False)
    make_play(flow, alice)
    seed_history(flow, 6)  # DONE, FAIL, SKIP, … one a day: only the DONE one is within 24 hours
    latest = make_play(flow, alice)
    response = browser(alice).get("/flows/")
    html = response.content.decode()
    assert response.status_code == 200
    row = html.split(f'data-flow-id="{flow.pk}"', 1)[1].split("</tr>", 1)[0]
    assert "Invoice processing" in row and "Finance" in row and "v1" in row and ">Yes<" in row
    assert f'href="/plays/{latest.pk}/"' in row and 'data-state="RUN"' in row
    assert 'title="2 RUN plays"' in row and 'title="1 DONE play"' in row
    assert "FAIL play" not in row  # the FAIL one of the seed is 1 day old
    assert 'aria-label="3 plays in the last 24 hours"' in row
    quiet_row = html.split(f'data-flow-id="{quiet.pk}"', 1)[1].split("</tr>", 1)[0]
    assert "never run" in quiet_row and ">No<" in quiet_row


def test_flows_page_queries_do_not_grow_with_the_flows(api: Any, alice: User) -> None:
    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert browser(alice).get("/flows/").status_code == 200
        return len(queries)

    first = flow_row(api, ONE_STEP, name="One")
    make_play(first, alice)
    few = count()
    for n in range(4):
        more = flow_row(api, ONE_STEP, name=f"More {n}")
        make_play(more, alice)
        make_play(more, alice)
    assert count() == few


def test_deleted_flows_leave_the_flows_page(api: Any, flow: Flow, alice: User) -> None:
    assert api.delete(f"/api/flows/{flow.pk}").status_code == 204
    assert "Invoice processing" not in browser(alice).get("/flows/").content.decode()
    assert browser(alice).get(f"/flows/{flow.pk}/plays/").status_code == 404


# --- history --------------------------------------------------------------------------


def test_history_matches_the_api_for_the_same_query(api: Any, flow: Flow, alice: User) -> None:
    make_play(flow, alice)
    seed_history(flow)
    client = browser(alice)
    for query in ["state=FAIL&page=0&size=4", "state=FAIL,SKIP&page=1&size=5", "page=2&size=10",
                  "idempotencyKey=key-7", "state=DONE"]:
        html = client.get(f"/flows/{flow.pk}/plays/?{query}")
        assert html.status_code == 200, query
        expected = [p["id"] for p in api.get(f"/api/flows/{flow.pk}/plays?{query}").json()["data"]]
        assert row_ids(html.content.decode()) == expected, query
        everywhere = client.get(f"/plays/?{query}")
        assert row_ids(everywhere.content.decode()) == [p["id"] for p in api.get(f"/api/plays?{query}").json()["data"]]


def test_history_is_newest_first_with_state_badges_and_pages(flow: Flow, alice: User) -> None:
    newest = make_play(flow, alice, {"invoiceId": "INV-001"})
    seed_history(flow)
    html = browser(alice).get(f"/flows/{flow.permanent_id}/plays/?state=FAIL&page=0&size=4").content.decode()
    ids = row_ids(html)
    fails = list(Play.objects.filter(flow=flow, state=State.FAIL).order_by("-created_at").values_list("pk", flat=True))
    assert ids == fails[:4]
    assert html.count('class="badge badge--fail" data-state="FAIL"') >= 4
    assert "Plays 1–4 of 10" in html and "Page 1 of 3" in html
    assert 'href="/flows/invoice-processing/plays/?state=FAIL&amp;page=1&amp;size=4" rel="next"' in html
    assert 'id="f-size"' in html and '<option value="25">' in html
    second = browser(alice).get(f"/flows/{flow.pk}/plays/?state=FAIL&page=1&size=4").content.decode()
    assert row_ids(second) == fails[4:8] and 'rel="prev"' in second
    everything = browser(alice).get(f"/flows/{flow.pk}/plays/").content.decode()
    assert row_ids(everything)[0] == newest.pk
    assert "invoiceId=INV-001" in everything


def test_history_queries_do_not_grow_with_the_rows(api: Any, flow: Flow, alice: User) -> None:
    other = flow_row(api, ONE_STEP, name="Payroll")
    make_play(flow, alice)
    make_play(other, alice)

    def count(url: str) -> int:
        with CaptureQueriesContext(connection) as queries:
            response = browser(alice).get(url)
        assert response.status_code == 200
        assert row_ids(response.content.decode())
        return len(queries)

    few = (count("/plays/"), count(f"/flows/{flow.pk}/plays/"))
    seed_history(flow, 20)
    seed_history(other, 20)
    assert (count("/plays/"), count(f"/flows/{flow.pk}/plays/")) == few


def test_history_filters_by_dates_and_key(flow: Flow, alice: User) -> None:
    make_play(flow, alice)
    seed_history(flow)
    client = browser(alice)
    day = (timezone.now() - timedelta(days=5, minutes=1)).date().isoformat()
    one_day = row_ids(client.get(f"/flows/{flow.pk}/plays/?from={day}&to={day}").content.decode())
    assert [Play.objects.get(pk=i).args for i in one_day] == [{"i": 5}]
    keyed = row_ids(client.get("/plays/?idempotencyKey=key-7").content.decode())
    assert [Play.objects.get(pk=i).args for i in keyed] == [{"i": 7}]


def test_checkbox_states_and_empty_fields_redirect_to_the_apis_query(flow: Flow, alice: User) -> None:
    response = browser(alice).get(
        f"/flows/{flow.pk}/plays/", {"state": ["FAIL", "DONE"], "from": "", "to": "", "idempotencyKey": "", "page": "0", "size": "25"}
    )
    assert response.status_code == 302
    assert response["Location"] == f"/flows/{flow.pk}/plays/?state=FAIL,DONE&page=0&size=25"
    landed = browser(alice).get(response["Location"])
    assert landed.status_code == 200
    html = landed.content.decode()
    assert re.search(r'value="FAIL" checked', html) and re.search(r'value="DONE" checked', html)
    assert not re.search(r'value="RUN" checked', html)


def test_bad_filters_are_shown_not_crashed_on(flow: Flow, alice: User) -> None:
    client = browser(alice)
    for query, words in [("state=BOGUS", "Unknown state(s): BOGUS"), ("size=1000", "size must be between 1 and 100"),
                         ("page=-1", "page must be 0 or more"), ("from=yesterday", "Expected a date")]:
        response = client.get(f"/plays/?{query}")
        assert response.status_code == 400, query
        assert words in response.content.decode(), query


def test_all_plays_page_names_the_flow_and_filters_by_it(api: Any, flow: Flow, alice: User) -> None:
    other = flow_row(api, ONE_STEP, name="Payroll")
    mine = make_play(flow, alice)
    theirs = make_play(other, alice)
    html = browser(alice).get("/plays/").content.decode()
    assert set(row_ids(html)) == {mine.pk, theirs.pk}
    assert ">Payroll</a>" in html and ">Invoice processing</a>" in html
    only = browser(alice).get(f"/plays/?flowId={other.permanent_id}").content.decode()
    assert row_ids(only) == [theirs.pk]


# --- detail ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrange", "legal"),
    [
        ("new", {"start", "hold", "cancel"}),
        ("run", {"hold", "cancel"}),
        ("hold", {"resume", "cancel"}),
        ("cancel", {"retry"}),
        ("done", set()),
    ],
)
def test_buttons_appear_only_when_the_action_is_legal(flow: Flow, alice: User, drain: Any, arrange: str,
                                                      legal: set[str]) -> None:
    play, _ = Play.trigger(flow, {}, user=alice, start=arrange != "new")
    if arrange == "new":
        assert play.state == State.NEW
    elif arrange == "hold":
        play.hold(alice)
    elif arrange == "cancel":
        play.cancel(alice)
    elif arrange == "done":
        drain()
    else:
        # drain's on-commit patch ran the play already; put a fresh one in RUN.
        play = Play.objects.create(company_id=flow.company_id, flow=flow, flow_version=play.flow_version,
                                   state=State.RUN, args={}, args_hash="x", started_at=timezone.now())
    html = browser(alice).get(f"/plays/{play.pk}/").content.decode()
    assert buttons(html) == legal


def test_a_waiting_play_offers_approve_and_decline(api: Any, alice: User, drain: Any) -> None:
    flow = make_flow(api, [{"ref": "pay", "appId": "var", "args": {"values": {"ok": True}}, "needsApproval": True}])
    play_id = api.post(f"/api/flows/{flow['id']}/run", {}, format="json").json()["playId"]
    drain()
    assert Play.objects.get(pk=play_id).state == State.WAIT
    html = browser(alice).get(f"/plays/{play_id}/").content.decode()
    assert buttons(html) == {"hold", "cancel", "approved", "declined"}
    layer = Layer.objects.get(play_id=play_id, ref="pay")
    assert f'name="layer_id" value="{layer.pk}"' in html and 'for="approval-note"' in html

    response = browser(alice).post(f"/plays/{play_id}/decide/", {"layer_id": layer.pk, "decision": "approved", "note": "ok by me"},
                                   follow=True)
    drain()
    assert Play.objects.get(pk=play_id).state == State.DONE
    assert "Step approved" in response.content.decode()
    after = browser(alice).get(f"/plays/{play_id}/").content.decode()
    assert "Approved</strong> step <code>pay</code> by Alice" in after and "ok by me" in after
    assert buttons(after) == set()
    assert AuditEntry.objects.filter(action="play.approved", object_id=play_id, actor=alice).exists()


def test_detail_links_retries_and_parents(flow: Flow, alice: User) -> None:
    play = make_play(flow, alice)
    play.cancel(alice)
    retry = play.retry(alice)
    child = Play.objects.create(company_id=flow.company_id, flow=flow, flow_version=play.flow_version,
                                state=State.DONE, args={}, args_hash="x", parent=retry)
    original = browser(alice).get(f"/plays/{play.pk}/").content.decode()
    assert "Retried as" in original and f'href="/plays/{retry.pk}/"' in original
    second = browser(alice).get(f"/plays/{retry.pk}/").content.decode()
    assert "Retry of" in second and f'href="/plays/{play.pk}/"' in second
    assert "Subflow plays" in second and f'href="/plays/{child.pk}/"' in second
    assert "Parent play" in browser(alice).get(f"/plays/{child.pk}/").content.decode()


# --- verbs ----------------------------------------------------------------------------


def test_hold_and_resume_buttons_call_the_model_verbs(flow: Flow, alice: User) -> None:
    play = make_play(flow, alice)
    client = browser(alice)
    held = client.post(f"/plays/{play.pk}/hold/", follow=True)
    assert held.redirect_chain == [(f"/plays/{play.pk}/", 302)]
    assert Play.objects.get(pk=play.pk).state == State.ON_HOLD
    assert "Hold: play is now ON_HOLD." in held.content.decode()
    assert buttons(held.content.decode()) == {"resume", "cancel"}
    resumed = client.post(f"/plays/{play.pk}/resume/", follow=True)
    assert Play.objects.get(pk=play.pk).state == State.RUN
    assert "Resume: play is now RUN." in resumed.content.decode()
    assert list(AuditEntry.objects.filter(object_id=play.pk).order_by("id").values_list("action", flat=True)) == [
        "play.held", "play.resumed"]


def test_start_begins_a_play_created_without_starting(flow: Flow, alice: User) -> None:
    play, _ = Play.trigger(flow, {}, user=alice, start=False)
    response = browser(alice).post(f"/plays/{play.pk}/start/", follow=True)
    assert "Start: play is now RUN." in response.content.decode()
    assert Play.objects.get(pk=play.pk).state == State.RUN
    assert AuditEntry.objects.filter(action="play.started", object_id=play.pk).exists()
    again = browser(alice).post(f"/plays/{play.pk}/start/", follow=True)
    assert f"Play {play.pk} is RUN, not NEW" in again.content.decode()


def test_an_illegal_verb_shows_a_message_and_changes_nothing(flow: Flow, alice: User) -> None:
    play = make_play(flow, alice)
    response = browser(alice).post(f"/plays/{play.pk}/resume/", follow=True)
    assert response.status_code == 200
    assert f"Play {play.pk} is RUN, not ON_HOLD" in response.content.decode()
    assert 'class="message message--error"' in response.content.decode()
    assert Play.objects.get(pk=play.pk).state == State.RUN
    retry = browser(alice).post(f"/plays/{play.pk}/retry/", follow=True)
    assert "only FAIL plays can be retried" in retry.content.decode()
    assert not Play.objects.filter(retry_of=play).exists()


def test_cancel_then_retry_lands_on_the_new_play(flow: Flow, alice: User) -> None:
    play = make_play(flow, alice)
    client = browser(alice)
    client.post(f"/plays/{play.pk}/cancel/")
    play.refresh_from_db()
    assert play.state == State.FAIL and play.error["code"] == "CANCELLED"
    response = client.post(f"/plays/{play.pk}/retry/")
    new = Play.objects.get(retry_of=play)
    assert response.status_code == 302 and response["Location"] == f"/plays/{new.pk}/"


def test_verbs_take_only_post(flow: Flow, alice: User) -> None:
    play = make_play(flow, alice)
    assert browser(alice).get(f"/plays/{play.pk}/hold/").status_code == 405
    assert browser(alice).post(f"/plays/{play.pk}/explode/").status_code == 404
    assert Play.objects.get(pk=play.pk).state == State.RUN


def test_verb_forms_are_csrf_protected(flow: Flow, alice: User) -> None:
    play = make_play(flow, alice)
    client = browser(alice, enforce_csrf_checks=True)
    assert client.post(f"/plays/{play.pk}/hold/").status_code == 403
    assert Play.objects.get(pk=play.pk).state == State.RUN
    html = client.get(f"/plays/{play.pk}/").content.decode()
    form = html.split(f'action="/plays/{play.pk}/hold/"', 1)[1]
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form).group(1)
    response = client.post(f"/plays/{play.pk}/hold/", {"csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert Play.objects.get(pk=play.pk).state == State.ON_HOLD


# --- assets ---------------------------------------------------------------------------


def test_static_assets_are_served_by_the_app(page: Client) -> None:
    for path, kind in [("/static/flowplay/app.css", "text/css"), ("/static/flowplay/live.js", "javascript")]:
        response = page.get(path)
        assert response.status_code == 200, path
        assert kind in response["Content-Type"]
        body = b"".join(response.streaming_content) if response.streaming else response.content
        assert len(body) > 1000
