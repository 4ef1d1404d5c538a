"""The event contract of issue 15: ``seq`` per play, ``cursor`` company-wide, no lock shared
by two plays (spec §4).

The concurrency tests run on PostgreSQL, where transactions of one company really write
side by side; on SQLite one transaction writes at a time, and the cursor is the row id.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, connections, transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.models import Flow
from plays.models import START, Event, EventType, Play, decode_cursor, emit, encode_cursor

from .factories import flow_row

postgres_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="concurrent writers need PostgreSQL")
# A writer that had to wait for another transaction's lock would wait this long and fail.
LOCK_TIMEOUT = "2s"
STEP_TIMEOUT = 20.0


def event(ref: str) -> tuple[str, dict[str, Any]]:
    return EventType.LAYER_STARTED, {"layerId": "L", "ref": ref, "state": "RUN"}


@pytest.fixture
def flow(api: Any) -> Flow:
    return flow_row(api, [{"ref": "a", "appId": "var", "args": {"values": {"x": 1}}}])


def new_play(flow: Flow) -> Play:
    return Play.trigger(flow, {}, start=False)[0]


class Writer:
    """A thread with its own database connection that runs what it is given, one call at a
    time, inside one transaction it opens on ``begin`` and ends on ``commit``."""

    def __init__(self) -> None:
        self.calls: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self.results: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.atomic: Any = None

    def _run(self) -> None:
        try:
            while (call := self.calls.get()) is not None:
                try:
                    self.results.put((True, call()))
                except Exception as exc:  # handed to the test thread
                    self.results.put((False, exc))
        finally:
            connections.close_all()

    def do(self, call: Callable[[], Any]) -> Any:
        """Run ``call`` in the writer's thread; fail if it does not finish in time."""
        self.calls.put(call)
        ok, value = self.results.get(timeout=STEP_TIMEOUT)
        if not ok:
            raise value
        return value

    def begin(self) -> None:
        def begin() -> None:
            self.atomic = transaction.atomic()
            self.atomic.__enter__()
            with connection.cursor() as cursor:
                cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")

        self.do(begin)

    def commit(self) -> None:
        self.do(lambda: self.atomic.__exit__(None, None, None))

    def stop(self) -> None:
        self.calls.put(None)
        self.thread.join(timeout=STEP_TIMEOUT)


def read_all(company_id: str, after: tuple[int, int], size: int = 7) -> tuple[list[str], tuple[int, int]]:
    """The company-wide replay after ``after``, a page of ``size`` at a time, to its end."""
    got: list[str] = []
    while True:
        events, after = Event.objects.replay(company_id, after, size)
        got += [e["cursor"] for e in events]
        if len(events) < size:
            return got, after


def read_until(company_id: str, after: tuple[int, int], count: int) -> list[str]:
    """``read_all`` until ``count`` events came (polling with a deadline): a transaction of
    another database of the cluster can keep the horizon back for a while."""
    deadline = time.monotonic() + STEP_TIMEOUT
    got: list[str] = []
    while len(got) < count and time.monotonic() < deadline:
        more, after = read_all(company_id, after)
        got += more
        if len(got) < count:
            time.sleep(0.01)
    return got


# --- seq ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_seq_numbers_each_plays_events_and_the_cursor_orders_the_company(flow: Flow) -> None:
    one, two = new_play(flow), new_play(flow)
    emit(one, [event("a"), event("b")])
    emit(two, [event("a")])
    emit(one, [event("c")])
    assert list(one.events.order_by("seq").values_list("seq", "payload__seq")) == [(1, 1), (2, 2), (3, 3)]
    assert list(two.events.values_list("seq", flat=True)) == [1]
    assert Play.objects.get(pk=one.pk).event_seq == 3
    cursors, _ = read_all(flow.company_id, START)
    stored = list(Event.objects.filter(company_id=flow.company_id).order_by("xid", "id"))
    assert cursors == [e.cursor for e in stored] == sorted(cursors)
    assert decode_cursor(stored[0].cursor) == (stored[0].xid, stored[0].pk)


def test_a_cursor_names_one_position_and_sorts_as_a_string() -> None:
    positions = [(0, 1), (0, 2), (5, 0), (5, 16), (2**40, 3)]
    cursors = [encode_cursor(p) for p in positions]
    assert cursors == sorted(cursors) and [decode_cursor(c) for c in cursors] == positions
    for bad in ["", "12", "x" * 32, "f" * 32, encode_cursor((0, 1)).upper() + "0"]:
        with pytest.raises(ValueError):
            decode_cursor(bad)


@pytest.mark.django_db
def test_rest_replays_per_play_by_seq_and_company_wide_by_cursor(api: Any, flow: Flow) -> None:
    one, two = new_play(flow), new_play(flow)
    for i in range(3):
        emit(one, [event(f"one{i}")])
        emit(two, [event(f"two{i}")])
    body = api.get(f"/api/plays/{one.pk}/events?since=1").json()
    assert [e["seq"] for e in body] == [2, 3] and all(e["playId"] == one.pk and e["cursor"] for e in body)
    page = api.get("/api/events?size=4").json()
    assert len(page["data"]) == 4 and page["more"] is True
    rest = api.get(f"/api/events?since={page['next']}&size=4").json()
    assert len(rest["data"]) == 2 and rest["more"] is False
    cursors = [e["cursor"] for e in page["data"] + rest["data"]]
    stored = Event.objects.filter(company_id=flow.company_id).order_by("xid", "id")
    assert cursors == [e.cursor for e in stored]
    # Nothing new: the next cursor of an idle stream gives an empty page.
    assert api.get(f"/api/events?since={rest['next']}").json()["data"] == []
    for bad in ["nope", "-1", "f" * 32]:
        response = api.get(f"/api/events?since={bad}")
        assert response.status_code == 400 and response.json()["error"] == "VALIDATION_ERROR"
    assert api.get("/api/events?size=0").status_code == 400


# --- no shared lock, commit order -------------------------------------------------------


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_two_transactions_of_one_company_that_write_events_do_not_wait_on_each_other(flow: Flow) -> None:
    """One transaction writes events and stays open; another one of the same company
    writes events, triggers and starts a play (the POST /run path) and commits, under a
    lock timeout: with a company-wide row lock it would wait for the first and fail."""
    held, other = new_play(flow), new_play(flow)
    a, b = Writer(), Writer()
    try:
        a.begin()
        a.do(lambda: emit(held, [event("held")]))
        b.begin()
        b.do(lambda: emit(other, [event("free")]))
        b.do(lambda: Play.trigger(flow, {"n": 1}))
        b.commit()
        # A reader sees nothing of b's yet: a began first and has not ended.
        assert a.do(lambda: Event.objects.filter(play=held).count()) == 1
        cursors, _ = read_all(flow.company_id, START)
        assert not Event.objects.filter(company_id=flow.company_id, play=held).exists()
        assert cursors == []
        a.commit()
    finally:
        a.stop()
        b.stop()
    cursors = read_until(flow.company_id, START, 3)
    stored = list(Event.objects.filter(company_id=flow.company_id).order_by("xid", "id"))
    assert cursors == [e.cursor for e in stored] and len(stored) == 3
    assert stored[0].play_id == held.pk  # its transaction began first: its cursor is first


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_reader_sees_every_event_once_in_cursor_order_while_writers_commit_out_of_order(flow: Flow) -> None:
    plays = [new_play(flow) for _ in range(3)]
    writers = [Writer() for _ in plays]
    seen: list[str] = []
    position = Event.objects.head(flow.company_id)
    try:
        for writer, play in zip(writers, plays, strict=True):
            writer.begin()
            writer.do(lambda play=play: emit(play, [event("x"), event("y")]))
        for i in (2, 0, 1):  # commits in another order than the transactions began
            writers[i].commit()
            got, position = read_all(flow.company_id, position, size=1)
            seen += got
        seen += read_until(flow.company_id, position, 6 - len(seen))
    finally:
        for writer in writers:
            writer.stop()
    stored = [e.cursor for e in Event.objects.filter(company_id=flow.company_id).order_by("xid", "id")]
    assert seen == stored and len(seen) == 6


@postgres_only
@pytest.mark.django_db(transaction=True)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_interleaving_of_concurrent_plays_replays_exactly_the_stored_events(flow: Flow, data: Any) -> None:
    """Random interleavings of transactions of several plays (each begins, writes some
    events, maybe writes again, commits, in any order), with a reader between every two
    steps: what the reader collects is the stored events, in cursor order, each once, and
    every play's seq is 1, 2, 3 …"""
    n = data.draw(st.integers(2, 4), label="transactions")
    plays = [new_play(flow) for _ in range(n)]
    # Each transaction: begin + its first write, maybe a second write, then commit.
    script = [[("write", i)] * data.draw(st.integers(1, 2), label=f"writes {i}") + [("commit", i)] for i in range(n)]
    steps: list[tuple[str, int]] = []
    while any(script):
        i = data.draw(st.sampled_from([i for i, s in enumerate(script) if s]))
        steps.append(script[i].pop(0))
    start = Event.objects.head(flow.company_id)
    position, seen = start, []
    writers = [Writer() for _ in plays]
    begun: set[int] = set()
    try:
        for kind, i in steps:
            if kind == "write":
                if i not in begun:
                    writers[i].begin()
                    begun.add(i)
                count = data.draw(st.integers(1, 3))
                writers[i].do(lambda i=i, count=count: emit(plays[i], [event(f"e{k}") for k in range(count)]))
            else:
                writers[i].commit()
            got, position = read_all(flow.company_id, position, size=data.draw(st.integers(1, 5)))
            seen += got
    finally:
        for writer in writers:
            writer.stop()
    stored = Event.objects.after(flow.company_id, start)
    seen += read_until(flow.company_id, position, len(stored) - len(seen))
    assert seen == [e.cursor for e in stored]
    assert len(seen) == len(set(seen))
    for play in plays:
        seqs = list(play.events.order_by("seq").values_list("seq", flat=True))
        assert seqs == list(range(1, len(seqs) + 1))


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_events_of_one_play_are_numbered_on_its_row(flow: Flow) -> None:
    """Two transactions writing events of the same play: the second waits for the first on
    the play's row (here it gives up at its lock timeout), so seq has no gap and no twin."""
    from django.db.utils import OperationalError

    play = new_play(flow)
    a, b = Writer(), Writer()
    try:
        a.begin()
        a.do(lambda: emit(play, [event("first")]))
        b.begin()
        with pytest.raises(OperationalError, match="lock timeout"):
            b.do(lambda: emit(play, [event("second")]))
        b.do(lambda: b.atomic.__exit__(OperationalError, OperationalError(), None))  # rolled back
        a.commit()
        b.begin()
        b.do(lambda: emit(play, [event("second")]))
        b.commit()
    finally:
        a.stop()
        b.stop()
    assert list(play.events.order_by("seq").values_list("seq", "payload__ref")) == [(1, "first"), (2, "second")]


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_transaction_of_another_database_does_not_hold_the_stream_back(flow: Flow) -> None:
    """Transaction ids are cluster-wide: a write transaction left open in another database
    (here: one that took an id in the ``postgres`` database) would keep
    pg_snapshot_xmin() behind it; the horizon counts this database's transactions only."""
    import psycopg

    settings_dict = connection.settings_dict
    other = psycopg.connect(
        dbname="postgres",
        user=settings_dict["USER"],
        host=settings_dict["HOST"] or None,
        port=settings_dict["PORT"] or None,
        password=settings_dict["PASSWORD"] or None,
    )
    try:
        other.execute("SELECT pg_current_xact_id()")  # an id, held until the end of it
        start = Event.objects.head(flow.company_id)
        play = new_play(flow)
        emit(play, [event("a"), event("b")])  # committed (autocommit: emit's own transaction)
        got, _ = read_all(flow.company_id, start)
        assert got == [e.cursor for e in play.events.order_by("seq")]
    finally:
        other.rollback()
        other.close()
