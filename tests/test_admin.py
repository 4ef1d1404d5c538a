"""The operators' admin: bulk actions call the model verbs; permissions and tenants hold."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.test import Client

from flows.models import ApiKey, Company, Flow, User
from plays.models import Layer, Play

from .conftest import PASSWORD, make_flow
from .test_operators import ALL, make_in_state, state

ACTIONS = {"hold_plays": "hold", "resume_plays": "resume", "cancel_plays": "cancel", "retry_plays": "retry",
           "approved_plays": "approve", "declined_plays": "decline"}
LEGAL = {"hold": {"NEW", "RUN", "DEFERRED", "WAIT"}, "resume": {"ON_HOLD"},
         "cancel": {"NEW", "RUN", "DEFERRED", "WAIT", "ON_HOLD"}, "retry": {"FAIL"},
         "approve": {"WAIT"}, "decline": {"WAIT"}}
AFTER = {"hold": "ON_HOLD", "cancel": "FAIL", "decline": "SKIP", "approve": "RUN"}


def staff(company: Company, name: str, *, operator: bool = False, superuser: bool = False) -> User:
    user = User.objects.create_user(name, f"{name}@x.test", PASSWORD, company=company, is_staff=True,
                                    is_superuser=superuser)
    if operator:
        call_command("ensure_roles", stdout=io.StringIO())
        user.groups.add(Group.objects.get(name="Operators"))
    return user


def login(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def act(client: Client, action: str, *ids: str) -> tuple[Any, list[str]]:
    r = client.post("/admin/plays/play/", {"action": action, "_selected_action": list(ids)}, follow=True)
    return r, [str(m) for m in r.context["messages"]] if r.context else []


@pytest.fixture
def operator(acme: Company) -> User:
    return staff(acme, "olga", operator=True)


@pytest.mark.parametrize("action", sorted(ACTIONS))
@pytest.mark.parametrize("source", ALL)
def test_admin_actions_from_each_state(api: Any, drain: Any, operator: User, source: str, action: str) -> None:
    pid = make_in_state(api, drain, source)
    verb = ACTIONS[action]
    r, msgs = act(login(operator), action, pid)
    assert r.status_code == 200
    if source in LEGAL[verb]:
        assert any("1 play(s)" in m and "refused" not in m for m in msgs), msgs
        if verb in AFTER:
            assert state(pid) == AFTER[verb]
        if verb == "cancel":
            assert Play.objects.get(pk=pid).error["code"] == "CANCELLED"
        if verb == "retry":
            assert Play.objects.filter(retry_of_id=pid).count() == 1
    else:
        assert state(pid) == source
        assert any("refused" in m and pid in m for m in msgs), msgs


def test_mixed_selection_reports_successes_and_names_each_refusal(api: Any, drain: Any, operator: User) -> None:
    ok = [make_in_state(api, drain, "NEW"), make_in_state(api, drain, "WAIT")]
    bad = [make_in_state(api, drain, "DONE"), make_in_state(api, drain, "FAIL")]
    _, msgs = act(login(operator), "hold_plays", *ok, *bad)
    assert any(m.startswith("Hold: 2 play(s)") for m in msgs), msgs
    refusal = next(m for m in msgs if "refused" in m)
    assert all(pid in refusal for pid in bad) and not any(pid in refusal for pid in ok)


def test_approve_action_continues_the_play(api: Any, drain: Any, operator: User) -> None:
    pid = make_in_state(api, drain, "WAIT")
    act(login(operator), "approved_plays", pid)
    drain()
    assert state(pid) == "DONE"
    approval = Play.objects.get(pk=pid).approvals.get()
    assert approval.decided_by == operator and approval.decision == "approved"
    page = login(operator).get(f"/admin/plays/play/{pid}/change/")
    html = page.content.decode()
    assert page.status_code == 200 and 'id="approvals-group"' in html
    approvals = html.split('id="approvals-group"')[1].split('id="events-group"')[0]
    assert "olga" in approvals and "Approved" in approvals and "Approve in the admin" in approvals


def test_non_operator_staff_cannot_act_or_see(api: Any, drain: Any, acme: Company) -> None:
    pid = make_in_state(api, drain, "NEW")
    # A staff user whose role (a group) has no permission on plays. (A user with no role at all
    # is a company member, who operates plays in the admin as through the API: flows/permissions.py.)
    sam = staff(acme, "sam")
    sam.groups.add(Group.objects.create(name="Auditors"))
    plain = login(sam)
    assert plain.get("/admin/plays/play/").status_code == 403
    r = plain.post("/admin/plays/play/", {"action": "hold_plays", "_selected_action": [pid]})
    assert r.status_code == 403
    assert state(pid) == "NEW"


def test_operator_can_view_flows_but_not_edit_them(api: Any, operator: User) -> None:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"n": 1}}}])
    client = login(operator)
    assert client.get("/admin/flows/flow/").status_code == 200
    r = client.post(f"/admin/flows/flow/{flow['id']}/change/", {"name": "hacked"})
    assert r.status_code == 403
    assert Flow.objects.get(pk=flow["id"]).name == "Test flow"


def test_staff_see_only_their_company(api: Any, drain: Any, operator: User, globex: Company) -> None:
    pid = make_in_state(api, drain, "NEW")
    stranger = staff(globex, "gus", operator=True)
    listing = login(stranger).get("/admin/plays/play/")
    assert listing.status_code == 200 and pid.encode() not in listing.content
    assert login(stranger).get(f"/admin/plays/play/{pid}/change/").status_code == 302  # "does not exist"
    _, msgs = act(login(stranger), "cancel_plays", pid)
    assert state(pid) == "NEW"
    assert pid.encode() in login(operator).get("/admin/plays/play/").content
    root = staff(globex, "root", superuser=True)
    assert pid.encode() in login(root).get("/admin/plays/play/").content


def test_play_page_is_read_only_and_pretty_prints_escaped_json(api: Any, drain: Any, operator: User) -> None:
    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"html": "<b>x</b>"}}}])
    pid = api.post(f"/api/flows/{flow['id']}/run", {"args": {}}, format="json").json()["playId"]
    drain()
    page = login(operator).get(f"/admin/plays/play/{pid}/change/").content.decode()
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert '&quot;html&quot;: &quot;&lt;b&gt;' in page  # indented JSON, escaped
    assert 'name="_save"' not in page


def test_list_filters_and_search(api: Any, drain: Any, operator: User) -> None:
    pid = make_in_state(api, drain, "NEW")
    Play.objects.filter(pk=pid).update(idempotency_key="order-77")
    client = login(operator)
    assert pid.encode() in client.get("/admin/plays/play/", {"q": "order-77"}).content
    assert pid.encode() in client.get("/admin/plays/play/", {"q": pid}).content
    assert pid.encode() in client.get("/admin/plays/play/", {"state__exact": "NEW"}).content
    assert pid.encode() not in client.get("/admin/plays/play/", {"state__exact": "DONE"}).content


def flow_post(flow: Flow, layers: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": fields.get("name", flow.name), "permanent_id": flow.permanent_id, "category": "", "enabled": "on",
        "filters": "[]", "queue": "default", "company": flow.company_id,
        "flowlets-TOTAL_FORMS": str(len(layers)), "flowlets-INITIAL_FORMS": str(sum(1 for lay in layers if lay.get("id"))),
        "flowlets-MIN_NUM_FORMS": "0", "flowlets-MAX_NUM_FORMS": "1000",
    }
    for i, layer in enumerate(layers):
        for key, value in layer.items():
            data[f"flowlets-{i}-{key}"] = value
        data[f"flowlets-{i}-flow"] = flow.pk
        data.setdefault(f"flowlets-{i}-on_error", "fail")
    return data


def test_flow_edit_validates_like_the_api_and_bumps_the_version(api: Any, acme: Company) -> None:
    created = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {"n": 1}}}])
    flow = Flow.objects.get(pk=created["id"])
    editor = login(staff(acme, "ed", superuser=True))
    a = flow.flowlets.get()
    page = editor.get(f"/admin/flows/flow/{flow.pk}/change/").content.decode()
    assert "&quot;values&quot;: {" in page  # args shown as indented JSON

    bad = flow_post(flow, [{"id": a.id, "ref": "a", "app_id": "nope", "args": "{}", "filters": "[]", "retry": "{}"}])
    r = editor.post(f"/admin/flows/flow/{flow.pk}/change/", bad)
    assert r.status_code == 200 and b"nope" in r.content
    flow.refresh_from_db()
    assert flow.version == 1

    good = flow_post(flow, [
        {"id": a.id, "ref": "a", "app_id": "var", "args": json.dumps({"values": {"n": 2}}), "filters": "[]", "retry": "{}"},
        {"ref": "b", "app_id": "var", "args": json.dumps({"values": {"m": "{{ $prev.a.n }}"}}), "filters": "[]", "retry": "{}"},
    ], name="Edited")
    r = editor.post(f"/admin/flows/flow/{flow.pk}/change/", good)
    assert r.status_code == 302, [(f.prefix, f.errors, f.non_form_errors()) for f in r.context["inline_admin_formsets"][0:1] for f in [f.formset]] + [r.context["adminform"].form.errors]
    flow.refresh_from_db()
    assert flow.version == 2 and flow.name == "Edited"
    assert [f.ref for f in flow.flowlets.order_by("index")] == ["a", "b"]
    snapshot = flow.versions.get(version=2).definition if hasattr(flow, "versions") else flow.snapshot().definition
    assert [lay["ref"] for lay in snapshot["layers"]] == ["a", "b"]
    assert api.get(f"/api/flows/{flow.pk}").json()["version"] == 2


def test_api_key_revoke_action_and_hash_read_only(alice: User, acme: Company) -> None:
    key, token = ApiKey.issue(alice, "ci")
    root = login(staff(acme, "root", superuser=True))
    page = root.get(f"/admin/flows/apikey/{key.pk}/change/").content.decode()
    assert key.token_hash in page and token not in page and 'name="token_hash"' not in page
    root.post("/admin/flows/apikey/", {"action": "revoke_keys", "_selected_action": [key.pk]})
    assert ApiKey.lookup(token) is None


def test_ensure_roles_is_idempotent(db: Any) -> None:
    call_command("ensure_roles", stdout=io.StringIO())
    call_command("ensure_roles", stdout=io.StringIO())
    perms = set(Group.objects.get(name="Operators").permissions.values_list("codename", flat=True))
    assert "operate_play" in perms and "view_flow" in perms
    assert "change_flow" not in perms and "change_play" not in perms


def test_layer_outputs_shown_for_each_step(api: Any, drain: Any, operator: User) -> None:
    pid = make_in_state(api, drain, "DONE")
    page = login(operator).get(f"/admin/plays/play/{pid}/change/").content.decode()
    layer = Layer.objects.get(play_id=pid)
    assert layer.ref in page and "&quot;n&quot;: 1" in page  # the layer and its out
    assert 'id="events-group"' in page and "Play Started" in page  # the events


def test_play_list_query_count_does_not_grow_with_plays(api: Any, operator: User) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    flow = make_flow(api, [{"ref": "a", "appId": "var", "args": {"values": {}}}])
    client = login(operator)

    def count(n: int) -> int:
        for _ in range(n):
            api.post(f"/api/flows/{flow['id']}/run", {"args": {}, "start": False}, format="json")
        with CaptureQueriesContext(connection) as queries:
            assert client.get("/admin/plays/play/").status_code == 200
        return len(queries)

    assert count(2) == count(20)


def test_a_huge_play_page_shows_the_first_rows_and_links_to_the_rest(api: Any, drain: Any, operator: User,
                                                                       monkeypatch: Any) -> None:
    from plays import admin as plays_admin

    monkeypatch.setattr(plays_admin, "INLINE_ROWS", 3)
    flow = make_flow(api, [{"ref": f"s{i}", "appId": "var", "args": {"values": {"i": i}}} for i in range(6)])
    pid = api.post(f"/api/flows/{flow['id']}/run", {"args": {}}, format="json").json()["playId"]
    drain()
    page = login(operator).get(f"/admin/plays/play/{pid}/change/").content.decode()
    assert "6 layers, 14 events" in page and "Layers 1–3 of 6 below" in page and "Events 1–3 of 14 below" in page
    assert f'href="/plays/{pid}/"' in page and f'href="/api/plays/{pid}/events"' in page

    def shown(html: str) -> list[str]:
        return [ref for ref in ("s0", "s1", "s2", "s3", "s4", "s5") if f"<p>{ref}</p>" in html or f">{ref}<" in html]

    assert shown(page) == ["s0", "s1", "s2"]
    second = login(operator).get(f"/admin/plays/play/{pid}/change/", {"layers": 1}).content.decode()
    assert shown(second) == ["s3", "s4", "s5"] and "Layers 4–6 of 6 below" in second


def test_a_600_kb_output_leaves_the_admin_page_small_with_a_link_to_the_whole(
        api: Any, drain: Any, operator: User) -> None:
    big = "x" * 600_000
    flow = make_flow(api, [{"ref": "big", "appId": "var", "args": {"values": {"blob": "{{ $prev.args.blob }}"}}}])
    pid = api.post(f"/api/flows/{flow['id']}/run", {"args": {"n": 1}}, format="json").json()["playId"]
    drain()
    Layer.objects.filter(play_id=pid).update(out={"blob": big})
    client = login(operator)
    response = client.get(f"/admin/plays/play/{pid}/change/")
    assert response.status_code == 200
    assert len(response.content) < 200_000, len(response.content)
    html = response.content.decode()
    layer = Layer.objects.get(play_id=pid)
    url = f"/admin/plays/play/{pid}/value/layer-out/{layer.pk}/"
    assert f'href="{url}"' in html and "the whole value" in html
    assert client.get(url).json() == {"blob": big}
    assert " UTC" in html and re.search(r"\d{2}:\d{2}:\d{2} UTC", html)  # seconds and the zone


def test_the_play_list_has_yesterday_and_not_yet_retried_filters_and_a_bulk_dry_run(
        api: Any, drain: Any, operator: User) -> None:
    from datetime import timedelta

    from django.utils import timezone

    old = make_in_state(api, drain, "FAIL")
    now = make_in_state(api, drain, "FAIL")
    midnight = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    Play.objects.filter(pk=old).update(created_at=midnight - timedelta(hours=3))
    client = login(operator)
    yesterday = client.get("/admin/plays/play/", {"created": "yesterday"}).content.decode()
    assert old in yesterday and now not in yesterday
    act(client, "retry_plays", old)
    not_retried = client.get("/admin/plays/play/", {"retried": "no", "state__exact": "FAIL"}).content.decode()
    assert now in not_retried and old not in not_retried
    r = client.post("/admin/plays/play/", {"action": "bulk_retry_plays", "_selected_action": [old, now]})
    assert r.status_code == 200
    assert "1 will be retried, 1 is already retried" in r.content.decode()
