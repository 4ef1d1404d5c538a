"""``POST /api/flows/{id}/run``: its round trips are pinned (issue 15: the request path came
near the API floor only once the role check, the flow + version lookup and the writes stopped
costing a query each), and what the one-statement write must keep: the event, the audit entry,
the company's running-play limit, idempotency, roles read with the key.
"""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from flows.models import Flow
from plays.models import Event, Play
from tenancy.models import ApiKey, AuditEntry, User

from .conftest import PASSWORD
from .factories import make_flow

ONE_STEP = [{"ref": "v", "appId": "var", "args": {"values": {}}}]
POSTGRES = connection.vendor == "postgresql"

# The queries of one run request, on each setup. PostgreSQL: the API key (with its user,
# company and whether the user has a role), the flow with its current version, and one
# statement that checks the company's running-play limit, inserts the play, its event and
# its audit entry, and reads the idempotency key's holder. SQLite (one writer, in process,
# where a query is no round trip): the ORM's path, with the key's SELECT first and the
# company's count, then the play, its event (seq reserved on the play) and the audit entry
# in a transaction (a savepoint in the test's).
RUN_QUERIES = 3 if POSTGRES else 10
KEYED_QUERIES = 3 if POSTGRES else 11
# A repeat of an idempotency key: the same statement inserts nothing and reads the holder.
REPEAT_QUERIES = 3 if POSTGRES else 3


def bearer(user: User, scopes: list[str] | None = None) -> APIClient:
    _, token = ApiKey.issue(user, "script", scopes=scopes)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    client.get("/api/auth/me")  # the key's first use writes last_used_at (once a minute)
    return client


def run(client: APIClient, flow_id: str, body: dict[str, Any]) -> tuple[Any, list[str]]:
    with CaptureQueriesContext(connection) as queries:
        response = client.post(f"/api/flows/{flow_id}/run", body, format="json")
    return response, [q["sql"] for q in queries.captured_queries]


def test_a_run_request_makes_a_pinned_number_of_queries(
    api: APIClient, alice: User, no_enqueue: list[str], settings: Any, monkeypatch: Any
) -> None:
    # After-commit work runs at once (the test's transaction never commits): it is counted too.
    monkeypatch.setattr(transaction, "on_commit", lambda func, using=None, robust=False: func())
    settings.FLOWPLAY = {**settings.FLOWPLAY, "MAX_RUNNING_PLAYS_PER_COMPANY": 50}
    flow = make_flow(api, ONE_STEP)
    script = bearer(alice, ["run", "read"])
    run(script, flow["id"], {"args": {}})  # the flow's first run makes its version's snapshot

    r, queries = run(script, flow["id"], {"args": {"n": 1}})
    assert r.status_code == 201, r.content
    assert len(queries) == RUN_QUERIES, "\n".join(queries)
    r, queries = run(script, flow["permanentId"], {"args": {"n": 2}, "idempotencyKey": "k-1"})
    assert r.status_code == 201 and len(queries) == KEYED_QUERIES, "\n".join(queries)
    again, queries = run(script, flow["id"], {"args": {"n": 2}, "idempotencyKey": "k-1"})
    assert again.status_code == 200 and again.json()["playId"] == r.json()["playId"]
    assert len(queries) == REPEAT_QUERIES, "\n".join(queries)

    # What the statement wrote is what the ORM's path writes.
    play = Play.objects.get(pk=r.json()["playId"])
    assert (play.state, play.event_seq, play.idempotency_key, play.args) == ("RUN", 1, "k-1", {"n": 2})
    assert play.triggered_by == alice and play.trigger_source == {"kind": "api"}
    assert r.json() == {
        "playId": play.id,
        "state": "RUN",
        "startedAt": r.json()["startedAt"],
        "createdAt": r.json()["createdAt"],
        "idempotencyKey": "k-1",
        "runAt": None,
    } and r.json()["startedAt"] is not None
    event = Event.objects.get(play=play)
    assert (event.seq, event.type, event.company_id, event.flow_id) == (1, "play:started", play.company_id, flow["id"])
    assert event.payload["seq"] == 1 and event.payload["playId"] == play.id and event.payload["state"] == "RUN"
    if POSTGRES:
        assert event.xid > 0  # the writing transaction's id: the event's cursor
    entry = AuditEntry.objects.get(object_id=play.id)
    assert (entry.action, entry.actor, entry.company_id, entry.details) == (
        "play.triggered", alice, play.company_id, {"flowId": flow["id"]},
    )
    assert no_enqueue[-1] == play.id and no_enqueue.count(play.id) == 1  # a repeat sends nothing


def test_the_same_key_with_other_args_is_refused_and_writes_nothing(
    api: APIClient, alice: User, no_enqueue: list[str]
) -> None:
    flow = make_flow(api, ONE_STEP)
    script = bearer(alice)
    first = script.post(f"/api/flows/{flow['id']}/run", {"args": {"a": 1}, "idempotencyKey": "k"}, format="json")
    assert first.status_code == 201
    other = script.post(f"/api/flows/{flow['id']}/run", {"args": {"a": 2}, "idempotencyKey": "k"}, format="json")
    assert other.status_code == 409 and other.json()["error"] == "IDEMPOTENCY_KEY_REUSED"
    assert first.json()["playId"] in other.json()["message"]
    assert Play.objects.count() == 1 and Event.objects.count() == 1
    assert AuditEntry.objects.filter(action="play.triggered").count() == 1


def test_the_company_limit_holds_on_the_one_statement_path(
    api: APIClient, alice: User, charlie: User, no_enqueue: list[str], settings: Any
) -> None:
    settings.FLOWPLAY = {**settings.FLOWPLAY, "MAX_RUNNING_PLAYS_PER_COMPANY": 2}
    flow = make_flow(api, ONE_STEP)
    script = bearer(alice)
    states = [script.post(f"/api/flows/{flow['id']}/run", {"args": {}}, format="json").json()["state"]
              for _ in range(3)]
    assert states == ["RUN", "RUN", "DEFERRED"]
    # A deferred play got its event and its audit entry on the general path too.
    deferred = Play.objects.get(state="DEFERRED")
    assert [e.payload["state"] for e in Event.objects.filter(play=deferred)] == ["DEFERRED"]
    assert AuditEntry.objects.filter(object_id=deferred.pk, action="play.triggered").exists()
    # A subflow's or another company's plays do not count against it.
    other = bearer(charlie)
    other_flow = other.post("/api/flows", {"name": "theirs", "layers": ONE_STEP}, format="json").json()
    assert other.post(f"/api/flows/{other_flow['id']}/run", {"args": {}}, format="json").json()["state"] == "RUN"


def test_roles_read_with_the_key_decide_as_before(alice: User, no_enqueue: list[str]) -> None:
    call_command("ensure_roles", stdout=io.StringIO())
    flow = make_flow(bearer(alice), ONE_STEP)
    url = f"/api/flows/{flow['id']}/run"
    # A member (no role): runs.
    assert bearer(alice).post(url, {"args": {}}, format="json").status_code == 201
    # An operator (a group without plays.add_play): refused, also with a key.
    olga = User.objects.create_user("olga", "olga@acme.test", PASSWORD, company=alice.company)
    olga.groups.add(Group.objects.get(name="Operators"))
    r = bearer(olga).post(url, {"args": {}}, format="json")
    assert r.status_code == 403 and r.json()["error"] == "FORBIDDEN"
    # A role given as a permission of the user's own: exactly that permission.
    rita = User.objects.create_user("rita", "rita@acme.test", PASSWORD, company=alice.company)
    rita.user_permissions.add(Permission.objects.get(codename="add_play", content_type__app_label="plays"))
    assert bearer(rita).post(url, {"args": {}}, format="json").status_code == 201
    assert bearer(rita).get(f"/api/flows/{flow['id']}").status_code == 403  # no view_flow: not a member
    # A group with no permission at all is still a role: nothing.
    nina = User.objects.create_user("nina", "nina@acme.test", PASSWORD, company=alice.company)
    nina.groups.add(Group.objects.create(name="Nothing"))
    assert bearer(nina).post(url, {"args": {}}, format="json").status_code == 403
    # A superuser: everything.
    root = User.objects.create_user("root", "root@acme.test", PASSWORD, company=alice.company, is_superuser=True)
    assert bearer(root).post(url, {"args": {}}, format="json").status_code == 201
    # Scopes still apply on top.
    assert bearer(alice, ["read"]).post(url, {"args": {}}, format="json").status_code == 403


@pytest.mark.parametrize("key", ["", "k-tenant"])
def test_another_companys_flow_is_a_404(api: APIClient, alice: User, charlie: User, no_enqueue: list[str],
                                         key: str) -> None:
    flow = make_flow(api, ONE_STEP)
    body: dict[str, Any] = {"args": {}, **({"idempotencyKey": key} if key else {})}
    assert bearer(alice).post(f"/api/flows/{flow['id']}/run", body, format="json").status_code == 201
    for ref in (flow["id"], flow["permanentId"]):
        r = bearer(charlie).post(f"/api/flows/{ref}/run", body, format="json")
        assert r.status_code == 404 and r.json()["error"] == "FLOW_NOT_FOUND", r.content
    assert Play.objects.count() == 1


# --- two requests with one key, the second while the first is not committed -----------------

STEP_TIMEOUT = 20.0


def lock_waiters() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0]


@pytest.mark.skipif(not POSTGRES, reason="concurrent writers need PostgreSQL")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("first_ends", ["commit", "rollback"])
def test_a_key_taken_by_a_transaction_still_open_is_waited_for(
    api: APIClient, no_enqueue: list[str], first_ends: str
) -> None:
    """The one statement meets the key's row of a transaction that has not ended: it waits
    (the unique index), then returns that play once it commits (the statement's own read
    began before that commit: ``_insert_started`` reads it again), or inserts its own when
    the other rolls back."""
    flow = Flow.objects.get(pk=make_flow(api, ONE_STEP)["id"])
    flow.snapshot()
    inserted, release = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    class Rollback(Exception):
        pass

    def first() -> None:
        try:
            with transaction.atomic():
                results["first"] = Play.trigger(flow, {"a": 1}, idempotency_key="k")
                inserted.set()
                release.wait(STEP_TIMEOUT)
                if first_ends == "rollback":
                    raise Rollback
        except Rollback:
            pass
        finally:
            connections.close_all()

    def second() -> None:
        try:
            results["second"] = Play.trigger(flow, {"a": 1}, idempotency_key="k")
        except Exception as exc:  # handed to the test thread
            results["second"] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=first, daemon=True), threading.Thread(target=second, daemon=True)]
    threads[0].start()
    assert inserted.wait(STEP_TIMEOUT)
    threads[1].start()
    deadline = time.monotonic() + STEP_TIMEOUT
    while lock_waiters() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lock_waiters() == 1  # the second request waits for the first's transaction
    release.set()
    for thread in threads:
        thread.join(STEP_TIMEOUT)
    (play, created), second_result = results["first"], results["second"]
    assert created is True and not isinstance(second_result, Exception), second_result
    stored = Play.objects.get(idempotency_key="k")
    if first_ends == "commit":
        assert second_result == (play, False) and stored.pk == play.pk
    else:
        assert second_result == (stored, True) and stored.pk != play.pk
    assert Event.objects.filter(play=stored).count() == 1 and Play.objects.count() == 1
