"""Arbitrary JSON through run → step output → history → play page: no 500, nothing left RUN.

Issue 13. The values carry NUL, lone surrogates, numbers JSON cannot hold (1e400, a
5,000-digit integer) and deep nesting, once as run args (the API refuses what it could not
store: 400) and once as JSON text that a ``json-parse`` step turns into its output (the
runner stores it repaired, or fails the step with a clear error). Run it on both setups:
the embedded default, and PostgreSQL with DATABASE_URL set.
"""

from __future__ import annotations

import json
from typing import Any

from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plays.models import TERMINAL, Play
from tenancy.models import User

from .factories import make_flow

odd_text = st.text(
    alphabet=st.one_of(st.characters(), st.sampled_from(["\x00", "\ud800", "\udc00", "\udbff", "\ud83d"])),
    max_size=12,
)
numbers = st.sampled_from(["1e400", "-1e400", "1" * 5000, "0.1", "-0", "123456789012345678901234567890", "7"])
leaves = st.one_of(
    st.sampled_from(["null", "true", "false"]),
    numbers,
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    odd_text.map(json.dumps),  # ensure_ascii: NUL and surrogates arrive as \u escapes
)
json_text = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
        st.lists(st.tuples(odd_text, children), max_size=4).map(
            lambda pairs: "{" + ",".join(json.dumps(k) + ":" + v for k, v in pairs) + "}"
        ),
    ),
    max_leaves=12,
)
deep_text = st.integers(min_value=90, max_value=400).map(lambda d: "[" * d + '"\\u0000"' + "]" * d)
any_json_text = st.one_of(json_text, deep_text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(text=any_json_text)
def test_arbitrary_json_through_run_step_history_and_pages(api: Any, drain: Any, alice: User, text: str) -> None:
    flow = make_flow(api, [
        {"ref": "p", "appId": "json-parse", "args": {"input": "{{ $prev.args.text }}"}},
        {"ref": "echo", "appId": "var", "args": {"values": {"v": "{{ $prev.p.result }}", "raw": "{{ $prev.args }}"}}},
    ])
    url = f"/api/flows/{flow['id']}/run"
    # The text as a value of the run args: taken as sent, or refused with the spec's error body.
    r = api.post(url, data=('{"args": {"text": ' + json.dumps(text) + ', "value": ' + text + "}}").encode(),
                 content_type="application/json")
    assert r.status_code in (201, 400), r.content
    if r.status_code == 400:
        assert r.json()["error"] == "VALIDATION_ERROR" and r.json()["statusCode"] == 400
    # The text as a string: always taken; the json-parse step makes it its output.
    r = api.post(url, data=('{"args": {"text": ' + json.dumps(text) + "}}").encode(), content_type="application/json")
    assert r.status_code == 201, r.content
    drain()
    plays = list(Play.objects.filter(flow_id=flow["id"]))
    assert all(play.state in TERMINAL for play in plays), [(p.state, p.error) for p in plays]
    pages = Client()
    pages.force_login(alice)
    admin = Client()
    admin.force_login(User.objects.get_or_create(username="root", defaults={
        "email": "root@acme.test", "is_staff": True, "is_superuser": True, "company": alice.company})[0])
    for path in ("/api/plays", f"/api/flows/{flow['id']}/plays", "/api/plays?state=FAIL"):
        assert api.get(path).status_code == 200, path
    for play in plays:
        for path in (f"/api/plays/{play.pk}", f"/api/plays/{play.pk}/layers", f"/api/plays/{play.pk}/events"):
            response = api.get(path)
            assert response.status_code == 200, (path, response.content[:300])
            json.loads(response.content)
        assert pages.get(f"/plays/{play.pk}/").status_code == 200
        assert admin.get(f"/admin/plays/play/{play.pk}/change/").status_code == 200
    assert pages.get("/plays/").status_code == 200
    assert pages.get(f"/flows/{flow['id']}/plays/").status_code == 200
    assert admin.get("/admin/plays/play/").status_code == 200
