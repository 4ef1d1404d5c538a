"""The play page (every step, resolved args, attempts, filters, loops, outputs, history),
the flow page with its Run form, and the dashboard (issue 19)."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission
from django.test import Client
from django.utils import timezone

from flows import modules
from flows.models import Flow
from plays.models import Layer, Play, State
from tenancy.models import AuditEntry, User

from .conftest import PASSWORD, client_for
from .factories import make_flow
from .test_runner import Flaky


def browser(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def step_card(html: str, ref: str) -> str:
    """The <li> of one step on the play page."""
    match = re.search(rf'<li class="step[^"]*" id="step-{ref}".*?(?=<li class="step|</ol>\s*</section>)', html, re.S)
    assert match, f"no card for step {ref}"
    return match.group(0)


@pytest.fixture(autouse=True)
def flaky_module() -> Any:
    Flaky.calls = {}
    modules.REGISTRY["test-flaky"] = Flaky()
    yield
    modules.REGISTRY.pop("test-flaky", None)


THREE_STEPS = [
    {"ref": "fetch", "appId": "var", "args": {"values": {"url": "https://api.example.test/{{ $prev.args.id }}"}}},
    {"ref": "parse", "appId": "json-parse", "args": {"input": "{{ $prev.fetch.url }}"}},
    {"ref": "notify", "appId": "var", "args": {"values": {"sent": True}}},
]


# --- every step, reached or not ----------------------------------------------------------------


def test_a_held_play_shows_every_step_with_the_unreached_as_written(api: Any, alice: User, no_enqueue: Any) -> None:
    flow = make_flow(api, THREE_STEPS)
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {"id": 7}, "start": False}, format="json").json()["playId"]
    Play.objects.get(pk=play_id).hold(alice)
    html = browser(alice).get(f"/plays/{play_id}/").content.decode()
    refs = re.findall(r'<li class="step[^"]*" id="step-(\w+)"', html)
    assert refs == ["fetch", "parse", "notify"]
    for ref in refs:
        card = step_card(html, ref)
        assert "step--unreached" in card and "not reached" in card and "Args (as written)" in card
    assert "{{ $prev.args.id }}" in step_card(html, "fetch")
    assert "0 of 3" in html  # steps reached
    assert 'data-state="ON_HOLD"' in html


def test_reached_steps_show_resolved_args_attempts_and_outputs(api: Any, alice: User, drain: Any) -> None:
    flow = make_flow(api, THREE_STEPS)
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {"id": 7}}, format="json").json()["playId"]
    drain()
    play = Play.objects.get(pk=play_id)
    assert play.state == State.FAIL  # the URL is not JSON
    html = browser(alice).get(f"/plays/{play_id}/").content.decode()
    fetch = step_card(html, "fetch")
    assert "Args (resolved)" in fetch and "https://api.example.test/7" in fetch
    assert "1 attempt" in fetch and "Output" in fetch and "Download JSON" in fetch
    parse = step_card(html, "parse")
    # The input that failed, resolved from fetch's stored output.
    assert "https://api.example.test/7" in parse and 'data-state="FAIL"' in parse
    notify = step_card(html, "notify")
    assert "not reached" in notify
    assert "2 of 3" in html


def test_resolved_args_are_redacted(api: Any, alice: User, drain: Any) -> None:
    # needsApproval: the step is reached (WAIT) and its args resolved, but nothing is sent.
    flow = make_flow(api, [
        {"ref": "call", "appId": "curl", "needsApproval": True, "args": {
            "url": "https://bob:{{ $prev.args.password }}@example.test/x",
            "method": "POST",
            "headers": {"Authorization": "Bearer {{ $prev.args.secret }}"},
            "body": {"pin": "{{ $prev.args.password }}", "note": "token {{ $prev.args.secret }}"},
        }},
    ])
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {"secret": "tok-SECRET-123", "password": "hunter2hunter2"}},
                       format="json").json()["playId"]
    drain()
    assert Play.objects.get(pk=play_id).state == State.WAIT
    html = browser(alice).get(f"/plays/{play_id}/").content.decode()
    assert "tok-SECRET-123" not in html and "hunter2hunter2" not in html
    card = step_card(html, "call")
    assert "Args (resolved)" in card and "https://bob:[REDACTED]@example.test/x" in card
    assert "&quot;Authorization&quot;: &quot;[REDACTED]&quot;" in card
    assert "&quot;pin&quot;: &quot;[REDACTED]&quot;" in card  # the URL's password, masked by value too
    assert "token [REDACTED]" in card


def test_credentials_in_args_are_never_looked_up_by_the_page(alice: User, drain: Any) -> None:
    from plays.management.commands.ensure_roles import ensure_company_admins

    alice.groups.add(ensure_company_admins())
    api = client_for(User.objects.get(pk=alice.pk))
    r = api.post("/api/credentials", {"name": "stripe", "kind": "token", "value": "sk-live-abcdefgh"}, format="json")
    assert r.status_code == 201, r.content
    flow = make_flow(api, [
        {"ref": "a", "appId": "var", "args": {"values": {"n": 1}}},
        {"ref": "b", "appId": "curl", "needsApproval": True,
         "args": {"url": "https://api.example.test/charge", "headers": {"X-Key": "{{ $credentials.stripe.token }}"}}},
    ])
    play_id = api.post(f"/api/flows/{flow['id']}/run", {}, format="json").json()["playId"]
    drain()
    assert Play.objects.get(pk=play_id).state == State.WAIT
    used = api.get("/api/credentials/stripe").json()
    html = browser(alice).get(f"/plays/{play_id}/").content.decode()
    card = step_card(html, "b")
    assert "&quot;X-Key&quot;: &quot;[REDACTED]&quot;" in card and "sk-live-abcdefgh" not in html
    assert api.get("/api/credentials/stripe").json() == used  # no use recorded by the page
    # WAIT is explained, not "0 attempts".
    assert "waiting for approval" in card and "0 attempts" not in card


def test_attempts_show_each_error_and_the_filter_verdicts_their_values(api: Any, alice: User, drain: Any) -> None:
    flow = make_flow(api, [
        {"ref": "flaky", "appId": "test-flaky", "args": {"failures": 2}, "retry": {"count": 3, "delayMs": 1}},
        {"ref": "big", "appId": "var", "args": {"values": {"x": 1}},
         "filters": [{"leftValue": "{{ $prev.args.amount }}", "operator": "gt", "rightValue": 1000, "cast": "number"}]},
    ])
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {"amount": 250}}, format="json").json()["playId"]
    drain()
    html = browser(alice).get(f"/plays/{play_id}/").content.decode()
    flaky = step_card(html, "flaky")
    assert "3 attempts" in flaky and "Attempts (3)" in flaky
    assert flaky.count("flaky failure") == 2 and "FLAKY" in flaky
    big = step_card(html, "big")
    assert 'data-state="FILTERED"' in big and "filtered out" in big
    verdict = big.split('class="table verdicts"', 1)[1]
    assert ">250<" in verdict and ">1000<" in verdict and "did not pass" in verdict and "{{ $prev.args.amount }}" in verdict


def test_the_event_history_says_who_held_and_resumed(api: Any, alice: User, no_enqueue: Any) -> None:
    flow = make_flow(api, THREE_STEPS)
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {"id": 1}}, format="json").json()["playId"]
    client = browser(alice)
    client.post(f"/plays/{play_id}/hold/")
    client.post(f"/plays/{play_id}/resume/")
    html = client.get(f"/plays/{play_id}/").content.decode()
    history = html.split('id="play-history"', 1)[1]
    assert "<strong>alice</strong>: Put a play on hold" in history
    assert "<strong>alice</strong>: Resumed a play" in history
    assert "Play RUN → ON_HOLD" in history and "Play ON_HOLD → RUN" in history
    assert "<strong>alice</strong>: Triggered a play" in history


# --- loops -----------------------------------------------------------------------------------


def test_a_50_item_loop_is_summarised_per_step_with_paged_filterable_items(api: Any, alice: User, drain: Any) -> None:
    flow = make_flow(api, [
        {"ref": "each", "appId": "iterator", "args": {"items": "{{ $prev.args.items }}", "concurrency": 5}},
        {"ref": "check", "appId": "json-parse", "args": {"input": "{{ $prev.each.item.doc }}"}, "onError": "continue"},
        {"ref": "gather", "appId": "aggregator", "args": {"sourceRef": "check"}},
    ])
    items = [{"doc": "{bad" if i % 10 == 3 else json.dumps({"n": i})} for i in range(50)]
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {"items": items}}, format="json").json()["playId"]
    drain()
    play = Play.objects.get(pk=play_id)
    assert Layer.objects.filter(play=play, iteration__isnull=False).count() == 50
    client = browser(alice)
    html = client.get(f"/plays/{play_id}/").content.decode()
    assert "Loop over 50 items" in html
    summary = html.split('class="table loop__summary"', 1)[1].split("</table>", 1)[0]
    assert re.search(r'data-state="FAIL">FAIL</span><span class="count">5<', summary), summary
    assert re.search(r'data-state="DONE">DONE</span><span class="count">45<', summary), summary
    assert "Items 1–25 of 50" in html
    items_table = html.split('class="table loop__items"', 1)[1].split("</table>", 1)[0]
    assert re.findall(r'<tr data-item="(\d+)"', items_table) == [str(i) for i in range(25)]
    assert len(html) < 250_000
    # Page 2, and the failed items only.
    second = client.get(f"/plays/{play_id}/?loop=each&lpage=1").content.decode()
    assert "Items 26–50 of 50" in second
    failed = client.get(f"/plays/{play_id}/?loop=each&lstep=check&lstate=FAIL").content.decode()
    assert "Items 1–5 of 5" in failed
    rows = failed.split('class="table loop__items"', 1)[1].split("</table>", 1)[0]
    assert re.findall(r'<tr data-item="(\d+)"', rows) == ["3", "13", "23", "33", "43"]
    # Steps after the loop are cards of their own.
    assert 'id="step-gather"' in html


# --- outputs ---------------------------------------------------------------------------------


def test_a_large_output_is_previewed_and_served_whole_on_demand(api: Any, alice: User, no_enqueue: Any) -> None:
    flow = make_flow(api, THREE_STEPS)
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {"id": 1}}, format="json").json()["playId"]
    play = Play.objects.get(pk=play_id)
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 8000  # ~2 MB
    body = base64.b64encode(pdf).decode()
    big = {"status": 200, "body": body, "rows": [{"i": i, "text": "x" * 50} for i in range(3000)],
           "headers": {"authorization": "Bearer abcdefgh"}}
    layer = Layer.objects.create(play=play, ref="fetch", app_id="var", index=0, state="DONE", attempts=1,
                                 started_at=timezone.now(), completed_at=timezone.now(), out=big)
    client = browser(alice)
    html = client.get(f"/plays/{play_id}/").content.decode()
    assert len(html) < 100_000  # the 2 MB output is not on the page
    card = step_card(html, "fetch")
    assert "Binary field <code>body</code>" in card and "application/pdf" in card and "MB" in card
    full = client.get(f"/plays/{play_id}/layers/{layer.pk}/out")
    assert full.status_code == 200 and full["Content-Type"] == "application/json"
    value = json.loads(full.content)
    assert len(value["rows"]) == 3000 and value["body"] == body
    assert value["headers"]["authorization"] == "[REDACTED]"
    download = client.get(f"/plays/{play_id}/layers/{layer.pk}/out?download=1")
    assert download["Content-Disposition"] == f'attachment; filename="{play_id}-fetch.json"'
    raw = client.get(f"/plays/{play_id}/layers/{layer.pk}/out?path=body&raw=1")
    assert raw.status_code == 200 and raw["Content-Type"] == "application/pdf" and raw.content == pdf
    assert client.get(f"/plays/{play_id}/layers/{layer.pk}/out?path=rows.5.i").json() == 5
    assert client.get(f"/plays/{play_id}/layers/{layer.pk}/out?path=nope").status_code == 404
    assert client.get(f"/plays/{play_id}/layers/{layer.pk}/out?path=status&raw=1").status_code == 404


def test_a_retry_shows_its_reused_steps(api: Any, alice: User, drain: Any) -> None:
    flow = make_flow(api, THREE_STEPS)
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {"id": 7}}, format="json").json()["playId"]
    drain()
    retry = Play.objects.get(pk=play_id).retry(alice)
    drain()
    html = browser(alice).get(f"/plays/{retry.pk}/").content.decode()
    fetch = step_card(html, "fetch")
    assert "Reused from" in fetch and f"/plays/{play_id}/" in fetch and ">reused<" in fetch.replace("\n", "").replace(" ", "")
    assert "1 step reused from it" in html
    assert "Reused from" not in step_card(html, "parse")


# --- tenancy ---------------------------------------------------------------------------------


def test_another_companys_play_flow_and_outputs_are_404(api: Any, alice: User, charlie: User, no_enqueue: Any) -> None:
    flow = make_flow(api, THREE_STEPS)
    play_id = api.post(f"/api/flows/{flow['id']}/run", {"args": {"id": 1}}, format="json").json()["playId"]
    layer = Layer.objects.create(play_id=play_id, ref="fetch", app_id="var", index=0, state="DONE", out={"a": 1})
    outsider = browser(charlie)
    for url in [f"/plays/{play_id}/", f"/plays/{play_id}/layers/{layer.pk}/out", f"/flows/{flow['id']}/",
                f"/flows/{flow['permanentId']}/dashboard/", f"/dashboard/data/?flowId={flow['id']}"]:
        assert outsider.get(url).status_code == 404, url
    assert outsider.post(f"/flows/{flow['id']}/run/", {"args": "{}"}).status_code == 404
    assert not Play.objects.filter(flow_id=flow["id"]).exclude(pk=play_id).exists()
    # charlie's dashboard does not count alice's plays.
    Play.objects.filter(pk=play_id).update(state="FAIL", started_at=timezone.now(), completed_at=timezone.now())
    assert outsider.get("/dashboard/data/").json()["totals"]["failed"] == 0
    assert browser(alice).get("/dashboard/data/").json()["totals"]["failed"] == 1


def test_pages_need_a_login(anon: Any, alice: User) -> None:
    client = Client()
    for url in ["/dashboard/", "/dashboard/data/", "/flows/x/", "/plays/x/layers/y/out"]:
        response = client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"], url


# --- flow page and Run form ------------------------------------------------------------------


def test_the_flow_page_shows_steps_and_versions(api: Any, alice: User) -> None:
    flow = make_flow(api, THREE_STEPS, name="Invoices")
    api.patch(f"/api/flows/{flow['id']}", {"layers": THREE_STEPS[:2]}, format="json")
    client = browser(alice)
    html = client.get(f"/flows/{flow['permanentId']}/").content.decode()
    assert "Steps of v2" in html and 'data-ref="notify"' not in html
    assert re.findall(r'<li class="step[^"]*" data-ref="(\w+)"', html) == ["fetch", "parse"]
    assert "v1" in html and 'href="?version=1#steps-title"' in html
    old = client.get(f"/flows/{flow['permanentId']}/?version=1").content.decode()
    assert re.findall(r'<li class="step[^"]*" data-ref="(\w+)"', old) == ["fetch", "parse", "notify"]
    assert "not the current version" in old
    assert 'action="/flows/' in html and 'name="args"' in html and 'name="idempotency_key"' in html


def test_the_run_form_starts_a_play(api: Any, alice: User, no_enqueue: Any) -> None:
    flow = make_flow(api, THREE_STEPS)
    client = browser(alice)
    response = client.post(f"/flows/{flow['permanentId']}/run/", {"args": '{"id": 42}', "idempotency_key": "k-1"})
    assert response.status_code == 302
    play = Play.objects.get(flow_id=flow["id"])
    assert response["Location"] == f"/plays/{play.pk}/"
    assert play.args == {"id": 42} and play.idempotency_key == "k-1" and play.triggered_by == alice
    assert AuditEntry.objects.filter(action="play.triggered", object_id=play.pk, actor=alice).exists()
    # The same key again: the same play, not a second one.
    again = client.post(f"/flows/{flow['permanentId']}/run/", {"args": '{"id": 42}', "idempotency_key": "k-1"})
    assert again["Location"] == f"/plays/{play.pk}/" and Play.objects.filter(flow_id=flow["id"]).count() == 1
    clash = client.post(f"/flows/{flow['permanentId']}/run/", {"args": '{"id": 43}', "idempotency_key": "k-1"})
    assert clash.status_code == 400 and f"used by play {play.pk}" in clash.content.decode()
    bad = client.post(f"/flows/{flow['permanentId']}/run/", {"args": "[1, 2]"})
    assert bad.status_code == 400 and "must be a JSON object" in bad.content.decode()
    broken = client.post(f"/flows/{flow['permanentId']}/run/", {"args": "{nope"})
    assert broken.status_code == 400 and "not valid JSON" in broken.content.decode()
    assert "{nope" in broken.content.decode()  # what was typed stays in the form
    later = client.post(f"/flows/{flow['permanentId']}/run/",
                        {"args": "{}", "run_at": "2099-01-15T10:00", "tz": "Europe/Berlin"})
    deferred = Play.objects.get(pk=later["Location"].split("/")[2])
    assert deferred.state == State.DEFERRED
    assert deferred.run_at == datetime(2099, 1, 15, 9, 0, tzinfo=UTC)


def test_running_needs_the_run_permission(api: Any, alice: User) -> None:
    flow = make_flow(api, THREE_STEPS)
    viewer = User.objects.create_user("vic", "vic@acme.test", PASSWORD, company=alice.company)
    group = Group.objects.create(name="Viewers")
    group.permissions.set(Permission.objects.filter(codename__in=["view_play", "view_flow"]))
    viewer.groups.add(group)
    client = browser(viewer)
    html = client.get(f"/flows/{flow['id']}/").content.decode()
    assert "may look at this flow but not run it" in html and 'name="args"' not in html
    assert client.post(f"/flows/{flow['id']}/run/", {"args": "{}"}).status_code == 403
    assert not Play.objects.filter(flow_id=flow["id"]).exists()


# --- dashboard -------------------------------------------------------------------------------


def _ended(flow: Flow, state: str, ms: int, ago: timedelta) -> Play:
    now = timezone.now()
    version = flow.versions.get(version=flow.version)
    return Play.objects.create(company_id=flow.company_id, flow=flow, flow_version=version, state=state, args={},
                               args_hash="x", created_at=now - ago - timedelta(milliseconds=ms),
                               started_at=now - ago - timedelta(milliseconds=ms), completed_at=now - ago)


def test_dashboard_counts_failure_rate_percentiles_and_queue(api: Any, alice: User) -> None:
    a = Flow.objects.get(pk=make_flow(api, THREE_STEPS, name="A")["id"])
    b = Flow.objects.get(pk=make_flow(api, THREE_STEPS, name="B")["id"])
    for i in range(8):
        _ended(a, "DONE", 100 * (i + 1), timedelta(minutes=i))
    for _ in range(2):
        _ended(a, "FAIL", 5000, timedelta(minutes=3))
    _ended(b, "FAIL", 50, timedelta(minutes=1))
    _ended(b, "DONE", 50, timedelta(hours=3))  # outside the hour
    version = a.versions.get(version=a.version)
    Play.objects.create(company_id=a.company_id, flow=a, flow_version=version, state="WAIT", args={}, args_hash="x")
    Play.objects.create(company_id=a.company_id, flow=a, flow_version=version, state="RUN", args={}, args_hash="x")
    data = browser(alice).get("/dashboard/data/?minutes=60").json()
    totals = data["totals"]
    assert (totals["ended"], totals["failed"]) == (11, 3)
    assert totals["failureRate"] == pytest.approx(3 / 11)
    assert totals["waitingApprovals"] == 1 and totals["queueDepth"] == 1 and totals["running"] == 1
    assert len(data["times"]) == 60 and sum(data["ended"]["FAIL"]) == 3 and sum(data["ended"]["DONE"]) == 8
    assert totals["p95"] == 5000 and totals["p50"] in (400, 500)
    assert [f["name"] for f in data["flows"]] == ["B", "A"]  # worst failure rate first
    only_a = browser(alice).get(f"/dashboard/data/?flowId={a.permanent_id}&minutes=1440").json()
    assert only_a["totals"]["ended"] == 10 and only_a["bucketMinutes"] == 15 and len(only_a["times"]) == 96
    html = browser(alice).get("/dashboard/").content.decode()
    assert "27.3 %" in html and "3 failed of 11 ended" in html
    assert "/static/flowplay/vendor/uplot/uPlot.iife.min.js" in html
    flow_html = browser(alice).get(f"/flows/{b.permanent_id}/dashboard/").content.decode()
    assert "B: dashboard" in flow_html and "100.0 %" in flow_html


def test_an_empty_dashboard_says_what_to_do(alice: User) -> None:
    html = browser(alice).get("/dashboard/").content.decode()
    assert "Nothing ran in the last 1 hour" in html and "the flows page" in html

