"""Plays, their layers, iterations and events: the execution state machine.

The verbs on these models are the only writers of their rows. Each one is a
compare-and-set ``UPDATE … WHERE`` (state, lease holder) whose row count says whether it
won, and stores its events in the same transaction (``emit``). ``Play.step_on`` is the
runner's hot path on PostgreSQL: ``Layer.end`` + ``Layer.open`` + the cursor in one statement.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models import F, Q
from django.utils import timezone

from flowplay import rows
from flows.models import Flow, FlowVersion
from tenancy.audit import record as audit_record
from tenancy.ids import new_id
from tenancy.models import Company
from tenancy.storable import StorableJSONField, storable

from .outbox import publish_on_commit, send_on_commit


class State(models.TextChoices):
    NEW = "NEW"
    """Created, not yet started."""
    RUN = "RUN"
    """Executing, or accepted and queued for immediate execution."""
    DONE = "DONE"
    """Completed successfully."""
    FAIL = "FAIL"
    """Failed at a step, cancelled or timed out (error.code says which)."""
    SKIP = "SKIP"
    """Skipped by logic: flow filters failed, or an approval was declined."""
    FILTERED = "FILTERED"
    """Every step was filtered out."""
    DEFERRED = "DEFERRED"
    """Queued for later: runAt ahead, sleeping, or no concurrency slot free."""
    WAIT = "WAIT"
    """Waiting for an approval."""
    ON_HOLD = "ON_HOLD"
    """Paused by an operator."""


TERMINAL = frozenset({State.DONE, State.FAIL, State.SKIP, State.FILTERED})
NON_TERMINAL = frozenset(set(State) - TERMINAL)
# States that occupy one of the flow's maxConcurrency slots.
ACTIVE = frozenset({State.RUN, State.WAIT})
HOLDABLE = frozenset({State.NEW, State.DEFERRED, State.RUN, State.WAIT})


class LayerState(models.TextChoices):
    RUN = "RUN"
    DONE = "DONE"
    FAIL = "FAIL"
    SKIP = "SKIP"
    FILTERED = "FILTERED"
    WAIT = "WAIT"


LAYER_TERMINAL = frozenset({LayerState.DONE, LayerState.FAIL, LayerState.SKIP, LayerState.FILTERED})


class TriggerKind(models.TextChoices):
    API = "api"
    """POST /api/flows/{id}/run (or the pages and the admin on a person's behalf)."""
    SCHEDULE = "schedule"
    """A schedule's fire."""
    CHANNEL = "channel"
    """A request to an HTTP channel's route."""
    MCP = "mcp"
    """An MCP tool call."""
    SUBFLOW = "subflow"
    """A `subflow` step of another play."""
    RETRY = "retry"
    """A retry of a failed play."""


class InvalidState(Exception):
    """A transition that is not legal from the play's current state (API: 409)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def duration_ms(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, round((end - start).total_seconds() * 1000))


def args_digest(args: Any) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def error_body(code: str, message: str, ref: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if ref is not None:
        body["ref"] = ref
    return body


# --- Events ---------------------------------------------------------------------------


class EventType(models.TextChoices):
    PLAY_STARTED = "play:started"
    LAYER_STARTED = "play:layer:started"
    LAYER_COMPLETED = "play:layer:completed"
    LAYER_FAILED = "play:layer:failed"
    PLAY_COMPLETED = "play:completed"
    PLAY_FAILED = "play:failed"
    PLAY_WAITING = "play:waiting"
    PLAY_STATE = "play:state"


# Where a reader of a company's event stream stands: the cursor (xid, id) of the last event
# it has, or a horizon position (xid, 0) that no event of an older transaction is behind.
Position = tuple[int, int]
START: Position = (0, 0)
CURSOR_HEX = 16


def encode_cursor(position: Position) -> str:
    """The opaque ``cursor`` of the API: fixed-width hex, so it also sorts as a string."""
    xid, pk = position
    return f"{xid:0{CURSOR_HEX}x}{pk:0{CURSOR_HEX}x}"


def decode_cursor(cursor: str) -> Position:
    """The position a cursor names; ValueError if it is not one."""
    if len(cursor) != 2 * CURSOR_HEX or cursor.strip("0123456789abcdef"):
        raise ValueError(f"not a cursor: {cursor[:40]!r}")
    position = int(cursor[:CURSOR_HEX], 16), int(cursor[CURSOR_HEX:], 16)
    if max(position) >= 2**63:  # both are bigint columns
        raise ValueError(f"not a cursor: {cursor!r}")
    return position


# The horizon of the readers of the event stream on PostgreSQL: the oldest transaction of
# this database still running when the statement's snapshot was taken, or the snapshot's
# xmax. Transactions of other databases of the cluster cannot write these rows, so unlike
# pg_snapshot_xmin() they do not hold it back. pg_stat_activity is read after the
# snapshot, so a transaction of this database that is in the snapshot's running list but
# no longer in pg_stat_activity has ended before that read: the next statement's
# snapshot (the rows are read there) sees what it wrote.
_HORIZON_SQL = """
    SELECT COALESCE(
        (SELECT MIN(x::text::bigint) FROM pg_snapshot_xip(s.snap) AS x
         WHERE xid(x) IN (SELECT backend_xid FROM pg_stat_activity
                          WHERE datname = current_database() AND backend_xid IS NOT NULL)),
        pg_snapshot_xmax(s.snap)::text::bigint)
    FROM (SELECT pg_current_snapshot() AS snap) AS s
"""


def _horizon(connection: Any) -> int:
    """The horizon, in a statement of its own: the rows behind it must be read in a later
    snapshot. A transaction running at this snapshot that commits before pg_stat_activity is
    read here is not counted, so the horizon can pass it; a later snapshot sees its rows, but
    this one does not (one statement reading both lost events under wsbench)."""
    with connection.cursor() as cursor:
        if connection.in_atomic_block:
            # pg_stat_activity is read once per transaction and kept: read it afresh.
            cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(_HORIZON_SQL)
        return cursor.fetchone()[0]


class EventQuerySet(models.QuerySet):
    def after(self, company_id: str, position: Position) -> EventQuerySet:
        """The company's events after ``position``, in cursor order (final or not)."""
        xid, pk = position
        return self.filter(Q(xid__gt=xid) | Q(xid=xid, id__gt=pk), company_id=company_id).order_by("xid", "id")

    def replay(
        self,
        company_id: str,
        after: Position,
        limit: int,
        *,
        play_id: str | None = None,
        flow_id: str | None = None,
    ) -> tuple[list[dict[str, Any]], Position]:
        """The company's events after ``after`` in cursor order (at most ``limit``, maybe of
        one play or flow), and the position read up to: the horizon when fewer came back.

        The cursor is (writing transaction's id, id). On PostgreSQL a reader takes only rows
        of transactions older than the oldest one still running (``_HORIZON_SQL``): those
        are a prefix of the final order, so resuming after the last cursor misses nothing
        and repeats nothing, with no lock shared by writers. SQLite has one writer: xid 0.
        """
        from django.db import connection

        filters, params = "", []
        if play_id:
            filters += " AND play_id = %s"
            params.append(play_id)
        if flow_id:
            filters += " AND flow_id = %s"
            params.append(flow_id)
        if connection.vendor == "postgresql":
            h = _horizon(connection)
            sql = f"""
                SELECT id, xid, payload FROM plays_event
                WHERE company_id = %s AND (xid, id) > (%s, %s)
                    AND (xid < %s OR xid = pg_current_xact_id_if_assigned()::text::bigint){filters}
                ORDER BY xid, id LIMIT %s
            """
            rows = []
            if limit:
                with connection.cursor() as cursor:
                    cursor.execute(sql, [company_id, after[0], after[1], h, *params, limit])
                    rows = cursor.fetchall()
            horizon: Position = (h, 0)
        else:
            # Read the newest id first: every row up to it is committed (one writer).
            newest = self.filter(company_id=company_id).aggregate(m=models.Max("id"))["m"] or 0
            horizon = (0, newest)
            query = self.filter(company_id=company_id, id__gt=after[1], id__lte=newest)
            if play_id:
                query = query.filter(play_id=play_id)
            if flow_id:
                query = query.filter(flow_id=flow_id)
            rows = list(query.order_by("id").values_list("id", "xid", "payload")[:limit])
        load = Event._meta.get_field("payload").from_db_value
        messages = []
        for pk, xid, payload in rows:
            if isinstance(payload, str):
                payload = load(payload, None, connection)
            messages.append({**payload, "cursor": encode_cursor((xid, pk))})
        if rows and len(rows) >= limit:
            return messages, (rows[-1][1], rows[-1][0])
        last = (rows[-1][1], rows[-1][0]) if rows else after
        return messages, max(last, horizon)

    def head(self, company_id: str) -> Position:
        """The position of a reader that starts now: every event visible in cursor order
        is behind it, every one still to come after it."""
        return self.replay(company_id, START, 0)[1]


class Event(models.Model):
    """A stored state change: the history of a play and the outbox of the WebSocket.

    ``seq`` numbers the events of one play (1, 2, 3 …, reserved on the play's row, which
    its writer holds anyway); ``(xid, id)`` is the company-wide cursor (see
    ``EventQuerySet.replay``).
    """

    company = models.ForeignKey(Company, on_delete=models.CASCADE, related_name="+")
    seq = models.BigIntegerField()
    play = models.ForeignKey("Play", on_delete=models.CASCADE, related_name="events")
    flow = models.ForeignKey(Flow, on_delete=models.CASCADE, related_name="+", db_constraint=False)
    type = models.CharField(max_length=32, choices=EventType)
    payload = StorableJSONField()
    created_at = models.DateTimeField(default=timezone.now)
    # The writing transaction's id on PostgreSQL (pg_current_xact_id()), 0 elsewhere.
    xid = models.BigIntegerField(default=0)

    objects = EventQuerySet.as_manager()

    class Meta:
        constraints = [
            # GET /api/plays/{id}/events?since=<seq> and the play's history.
            models.UniqueConstraint(fields=["play", "seq"], name="plays_event_unique_play_seq"),
        ]
        indexes = [
            # GET /api/events?since=<cursor> and the WebSocket's replay, in cursor order.
            models.Index(fields=["company", "xid", "id"], name="plays_event_company_cursor"),
        ]

    def __str__(self) -> str:
        return f"{self.play_id}#{self.seq} {self.type}"

    @property
    def cursor(self) -> str:
        return encode_cursor((self.xid, self.pk))

    @property
    def message(self) -> dict[str, Any]:
        """What /api/ws and the REST replays send: the payload with its cursor."""
        return {**self.payload, "cursor": self.cursor}


class _EventBatch(threading.local):
    items: list[tuple[Play, str, dict[str, Any]]] | None = None


_batch = _EventBatch()


@contextmanager
def batched_events() -> Iterator[None]:
    """Store the events emitted inside at the end of the block, one statement per play.

    Enter it inside the transaction that writes them (the runner's step transactions:
    fewer statements).
    """
    if _batch.items is not None:  # nested: the outer block stores them
        yield
        return
    _batch.items = []
    try:
        yield
        items = _batch.items
    finally:
        _batch.items = None
    if items:
        _store(items)


def emit(play: Play, items: Iterable[tuple[str, dict[str, Any]]]) -> list[Event]:
    """Store events of ``play`` in the current transaction and publish them after commit.

    Returns the stored events; none yet inside ``batched_events()``, which stores them at
    its end."""
    items = list(items)
    if not items:
        return []
    if _batch.items is not None:
        _batch.items.extend((play, kind, extra) for kind, extra in items)
        return []
    if not transaction.get_connection().in_atomic_block:
        # The seq reservation and the rows are one unit: both or neither.
        with transaction.atomic():
            return emit(play, items)
    return _store([(play, kind, extra) for kind, extra in items])


def event_payload(play: Play, kind: str, seq: int, extra: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The message of an event without its cursor: what is stored in ``Event.payload``."""
    # Repaired here, not only by the field: what is published is what is stored.
    return storable(
        {"type": kind, "seq": seq, "playId": play.id, "flowId": play.flow_id, **extra, "timestamp": iso(now)}
    )


# The events of one play in one statement on PostgreSQL: the play's seq counter moves on
# (its row lock orders the play's events; whoever changes the play holds it already) and
# the rows are inserted with the transaction's id. The VALUES rows are added per event.
_STORE_SQL = """
    WITH s AS (
        UPDATE plays_play SET event_seq = event_seq + %s WHERE id = %s RETURNING event_seq
    )
    INSERT INTO plays_event (company_id, play_id, flow_id, seq, xid, type, payload, created_at)
    SELECT %s, %s, %s, s.event_seq - %s + v.k, pg_current_xact_id()::text::bigint, v.type,
        v.payload || jsonb_build_object('seq', s.event_seq - %s + v.k), %s
    FROM s, (VALUES {values}) AS v (k, type, payload)
    ORDER BY v.k
    RETURNING id, seq, xid
"""


def _store(items: list[tuple[Play, str, dict[str, Any]]]) -> list[Event]:
    from django.db import connection

    by_play: dict[str, list[tuple[Play, str, dict[str, Any]]]] = {}
    for item in items:
        by_play.setdefault(item[0].pk, []).append(item)
    now = timezone.now()
    events = []
    for play_id, play_items in sorted(by_play.items()):  # one lock order: no deadlock
        play = play_items[0][0]
        n = len(play_items)
        payloads = [event_payload(play, kind, 0, extra, now) for _, kind, extra in play_items]
        batch = [
            Event(
                company_id=play.company_id,
                seq=0,
                play_id=play_id,
                flow_id=play.flow_id,
                type=kind,
                payload=payload,
                created_at=now,
            )
            for (_, kind, _), payload in zip(play_items, payloads, strict=True)
        ]
        if connection.vendor == "postgresql":
            prep = Event._meta.get_field("payload").get_db_prep_save
            values = ", ".join(["(%s, %s, %s::jsonb)"] * n)
            params: list[Any] = [n, play_id, play.company_id, play_id, play.flow_id, n, n, now]
            for k, event in enumerate(batch, 1):
                params += [k, event.type, prep(event.payload, connection)]
            with connection.cursor() as cursor:
                cursor.execute(_STORE_SQL.format(values=values), params)
                rows = cursor.fetchall()
            if len(rows) != n:
                raise Play.DoesNotExist(f"Play {play_id} does not exist")
            for event, (pk, seq, xid) in zip(batch, rows, strict=True):
                event.pk, event.seq, event.xid = pk, seq, xid
                event.payload["seq"] = seq
        else:
            Play.objects.filter(pk=play_id).update(event_seq=F("event_seq") + n)
            last = Play.objects.filter(pk=play_id).values_list("event_seq", flat=True).get()
            for k, event in enumerate(batch, 1):
                event.seq = event.payload["seq"] = last - n + k
            Event.objects.bulk_create(batch)
        publish_on_commit(play.company_id, [event.message for event in batch])
        events += batch
    return events


@functools.cache
def _step_on_sql(ended: tuple[str, ...] | None, columns: tuple[str, ...] | None, events: int) -> str:
    """Play.step_on's statement (built once per shape): ``ended`` are the columns Layer.end
    writes (None: no layer ends), ``columns`` those of the layer it opens (None: the play
    finishes instead), ``events`` how many events it stores."""
    from django.db import connection

    q = connection.ops.quote_name
    layer = ", plays_layer ll" if ended else ""
    layer_ok = "AND ll.id = %s AND ll.play_id = pp.id AND ll.state IN ('RUN', 'WAIT')" if ended else ""
    finish = ", state = 'DONE', completed_at = %s, updated_at = %s, runner = ''" if columns is None else ""
    end = (
        f""", d AS (
                UPDATE plays_layer SET {", ".join(f"{q(c)} = %s" for c in ended)},
                    started_at = COALESCE(started_at, %s)
                WHERE id = %s AND EXISTS (SELECT FROM ok)
            )"""
        if ended
        else ""
    )
    open_ = (
        f""", n AS (
                INSERT INTO plays_layer ({", ".join(q(c) for c in columns)})
                SELECT {", ".join(["%s"] * len(columns))} WHERE EXISTS (SELECT FROM ok)
            )"""
        if columns
        else ""
    )
    values = ", ".join(f"({k}, %s, %s::jsonb)" for k in range(1, events + 1))
    return f"""
            WITH ok AS MATERIALIZED (
                SELECT FROM plays_play pp{layer}
                WHERE pp.id = %s AND pp.runner = %s AND pp.state = 'RUN' {layer_ok}
                FOR UPDATE
            ), p AS (
                UPDATE plays_play SET next_index = %s, lease_until = %s, event_seq = event_seq + {events}{finish}
                WHERE id = %s AND EXISTS (SELECT FROM ok) RETURNING event_seq
            ){end}{open_}
            INSERT INTO plays_event (company_id, play_id, flow_id, seq, xid, type, payload, created_at)
            SELECT %s, %s, %s, p.event_seq - {events} + v.k, pg_current_xact_id()::text::bigint, v.type,
                v.payload || jsonb_build_object('seq', p.event_seq - {events} + v.k), %s
            FROM p, (VALUES {values}) AS v (k, type, payload)
            ORDER BY v.k
            RETURNING id, seq, xid
        """


_versions: dict[int, FlowVersion] = {}


def _version(pk: int) -> FlowVersion:
    """A flow version by pk, kept: its row never changes, and PostgreSQL never hands a
    sequence value out twice (only used there)."""
    found = _versions.get(pk)
    if found is None:
        if len(_versions) > 1000:
            _versions.clear()
        found = _versions[pk] = FlowVersion.objects.get(pk=pk)
    return found


def _one_statement() -> bool:
    """Whether ``Play.trigger`` may write a new play in one statement (PostgreSQL, and not
    inside ``batched_events``, whose events are stored at the end of its block)."""
    from django.db import connection

    return connection.vendor == "postgresql" and _batch.items is None


def _insert_fields(model: type[models.Model]) -> list[models.Field]:
    """The columns an INSERT of ``model`` writes: every concrete field but an auto primary key."""
    from django.db.models.fields import AutoFieldMixin

    return [f for f in model._meta.concrete_fields if not isinstance(f, AutoFieldMixin)]


def _insert_select(model: type[models.Model], connection: Any) -> str:
    """``INSERT INTO <table> (<columns>) SELECT <one typed parameter per column>``, for
    ``_insert_params``. The casts name the base type (``varchar``, not ``varchar(24)``, which
    would cut a long value short instead of refusing it as the ORM's INSERT does)."""
    quote = connection.ops.quote_name
    fields = _insert_fields(model)
    columns = ", ".join(quote(f.column) for f in fields)
    values = ", ".join(f"%s::{f.cast_db_type(connection).split('(')[0]}" for f in fields)
    return f"INSERT INTO {quote(model._meta.db_table)} ({columns}) SELECT {values}"


def _insert_params(obj: models.Model, connection: Any) -> list[Any]:
    """The values ``_insert_select`` takes, prepared as the ORM's own INSERT prepares them."""
    return [f.get_db_prep_save(f.pre_save(obj, True), connection) for f in _insert_fields(type(obj))]


def _event_prep(payload: dict[str, Any], connection: Any) -> Any:
    return Event._meta.get_field("payload").get_db_prep_save(payload, connection)


@functools.cache
def _trigger_sql(limited: bool, keyed: bool, audited: bool) -> str:
    """The statement of ``Play._insert_started``, on PostgreSQL: one round trip where the
    ORM took seven (count, BEGIN, play, event, audit entry, COMMIT, and the key's SELECT).

    - ``slot``: FLOWPLAY_MAX_RUNNING_PLAYS_PER_COMPANY, as ``Play._company_has_slot``
      counts it (root plays in RUN; counting stops at the limit). Soft, as there: starts
      racing each other may pass it by a few, which keeps the path free of locks.
    - ``p``: the play, RUN, only with a free slot; ``ON CONFLICT DO NOTHING`` on the
      idempotency key's partial unique index (a concurrent insert of the key is waited
      for; if it commits, nothing is inserted).
    - ``e``, ``a``: its ``play:started`` event (seq 1, the transaction's id for the cursor)
      and its audit entry, only if the play was inserted.
    - the row: whether the slot was free, the event's id and xid, and the play that held
      the key when the statement began (the one a repeat gets back).
    """
    from django.db import connection

    quote = connection.ops.quote_name
    play_table, event_table = quote(Play._meta.db_table), quote(Event._meta.db_table)
    if limited:
        slot = (
            f"SELECT COUNT(*) < %s AS free FROM (SELECT 1 FROM {play_table} WHERE company_id = %s "
            f"AND state = '{State.RUN.value}' AND parent_id IS NULL LIMIT %s) AS running"
        )
    else:
        slot = "SELECT TRUE AS free"
    sql = f"""
        WITH slot AS ({slot}),
        p AS ({_insert_select(Play, connection)} FROM slot WHERE slot.free ON CONFLICT DO NOTHING RETURNING id),
        e AS (
            INSERT INTO {event_table} (company_id, play_id, flow_id, seq, xid, type, payload, created_at)
            SELECT %s, p.id, %s, 1, pg_current_xact_id()::text::bigint, %s, %s::jsonb, %s FROM p
            RETURNING id, xid
        )"""
    if audited:
        from tenancy.models import AuditEntry

        sql += f""",
        a AS ({_insert_select(AuditEntry, connection)} FROM p)"""
    if keyed:
        sql += f"""
        SELECT slot.free, e.id, e.xid, {rows.columns(Play, "o", connection)} FROM slot LEFT JOIN e ON TRUE
        LEFT JOIN {play_table} o ON o.flow_id = %s AND o.idempotency_key = %s AND o.state <> '{State.FAIL.value}'"""
    else:
        sql += """
        SELECT slot.free, e.id, e.xid FROM slot LEFT JOIN e ON TRUE"""
    return sql


# --- Plays ----------------------------------------------------------------------------


class PlayQuerySet(models.QuerySet):
    def for_company(self, company_id: str) -> PlayQuerySet:
        return self.filter(company_id=company_id)

    def terminal(self) -> PlayQuerySet:
        return self.filter(state__in=TERMINAL)

    def active(self) -> PlayQuerySet:
        return self.filter(state__in=ACTIVE)


class Play(models.Model):
    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    company = models.ForeignKey(Company, on_delete=models.PROTECT, related_name="plays")
    flow = models.ForeignKey(Flow, on_delete=models.PROTECT, related_name="plays")
    flow_version = models.ForeignKey(FlowVersion, on_delete=models.PROTECT, related_name="plays")
    state = models.CharField(max_length=8, choices=State, default=State.NEW)
    args = StorableJSONField(default=dict, blank=True)
    args_hash = models.CharField(max_length=64, editable=False)
    # NULL, not "": the partial unique constraint on (flow, key) must ignore keyless plays.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    error = StorableJSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)
    # Due time of a DEFERRED play (runAt, delayMs or a sleep step); null = as soon as a slot frees.
    run_at = models.DateTimeField(null=True, blank=True)
    # The whole-play deadline from the flow's execution.timeout, set when the play starts.
    deadline_at = models.DateTimeField(null=True, blank=True)
    retry_of = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="retries")
    parent = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="children")
    parent_layer = models.ForeignKey("Layer", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # The play at the top of a subflow tree (null for that play itself): its descendants are
    # counted against FLOWPLAY_MAX_DESCENDANT_PLAYS with one indexed query.
    root = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    triggered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    # What started the play (TriggerKind) and its details (the schedule and fire time, the
    # channel route, ...); the API shows them together as `trigger`.
    trigger_kind = models.CharField(max_length=16, choices=TriggerKind, default=TriggerKind.API)
    trigger_info = StorableJSONField(null=True, blank=True)
    # W3C traceparent of the request that created the play (plays/observe.py): the steps a
    # worker runs later join that trace. Empty when tracing is off.
    traceparent = models.CharField(max_length=64, blank=True, default="", editable=False)
    # Index of the next flowlet to run; the runner advances it with each finished step.
    next_index = models.IntegerField(default=0)
    # The runner that currently executes this play, and how long its lease lasts without a heartbeat.
    runner = models.CharField(max_length=64, blank=True, default="")
    lease_until = models.DateTimeField(null=True, blank=True)
    # The seq of the play's newest event (see _store): its events are numbered 1, 2, 3 …
    event_seq = models.BigIntegerField(default=0, editable=False)

    objects = PlayQuerySet.as_manager()

    class Meta:
        permissions = [("operate_play", "Can hold, resume, cancel, retry and decide plays in the admin")]
        constraints = [
            # Concurrent duplicates of one run request cannot both insert; a FAIL play
            # leaves the index, so its key is free for a new attempt.
            models.UniqueConstraint(
                fields=["flow", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False) & ~Q(state="FAIL"),
                name="plays_play_unique_idempotency_key",
            ),
        ]
        indexes = [
            # GET /api/flows/{id}/plays, newest first, with and without a state filter.
            models.Index(fields=["flow", "-created_at", "-id"], name="plays_play_flow_created"),
            models.Index(fields=["flow", "state", "-created_at", "-id"], name="plays_play_flow_state_created"),
            # GET /api/plays for a company.
            models.Index(fields=["company", "-created_at", "-id"], name="plays_play_company_created"),
            models.Index(fields=["company", "state", "-created_at", "-id"], name="plays_play_company_state"),
            models.Index(fields=["flow", "idempotency_key"], name="plays_play_flow_key"),
            # The history pages' search by key prefix (LIKE 'k%' needs the pattern opclass on PostgreSQL).
            models.Index(
                fields=["company", "idempotency_key"],
                name="plays_play_company_key",
                opclasses=["varchar_pattern_ops", "varchar_pattern_ops"],
            ),
            # ?trigger= on the history lists; API plays (most of them) stay out of it.
            models.Index(
                fields=["company", "trigger_kind", "-created_at", "-id"],
                condition=~Q(trigger_kind="api"),
                name="plays_play_company_trigger",
            ),
            # release_due(): deferred plays by due time.
            models.Index(
                fields=["run_at", "created_at"], condition=Q(state="DEFERRED"), name="plays_play_deferred_due"
            ),
            # reap_stuck() and the concurrency count: running plays by lease.
            models.Index(fields=["lease_until"], condition=Q(state="RUN"), name="plays_play_running_lease"),
            # expire_timed_out(): plays with a deadline that are not finished.
            models.Index(
                fields=["deadline_at"],
                condition=Q(deadline_at__isnull=False) & Q(state__in=["RUN", "WAIT", "DEFERRED", "ON_HOLD"]),
                name="plays_play_deadline",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.state})"

    # -- derived ------------------------------------------------------------------------

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def duration(self) -> int | None:
        return duration_ms(self.started_at, self.completed_at)

    @property
    def definition(self) -> dict[str, Any]:
        return self.flow_version.definition

    @property
    def trigger_source(self) -> dict[str, Any]:
        """What started the play, as the API shows it: ``{"kind": …, **details}``."""
        return {"kind": self.trigger_kind, **(self.trigger_info or {})}

    def _cas(self, from_states: Iterable[str], **changes: Any) -> bool:
        """Compare-and-set: apply ``changes`` if the play is still in ``from_states``."""
        changes.setdefault("updated_at", timezone.now())
        n = Play.objects.filter(pk=self.pk, state__in=list(from_states)).update(**changes)
        if n:
            for name, value in changes.items():
                if not hasattr(value, "resolve_expression"):
                    setattr(self, name, value)
        return bool(n)

    def _state_event(self, previous: str) -> tuple[str, dict[str, Any]]:
        return EventType.PLAY_STATE, {"state": self.state, "previousState": previous}

    # -- creation -----------------------------------------------------------------------

    @classmethod
    def trigger(
        cls,
        flow: Flow,
        args: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        run_at: datetime | None = None,
        user: Any = None,
        start: bool = True,
        parent: Play | None = None,
        parent_layer: Layer | None = None,
        on_created: Callable[[Play], Any] | None = None,
        audit: Callable[[Play], Any] | None = None,
        source: dict[str, Any] | None = None,
        version: FlowVersion | None = None,
    ) -> tuple[Play, bool]:
        """Create a play of ``flow`` and start it; return (play, created).

        With an idempotency key, an existing play holding that key (any state but FAIL) is
        returned instead, and the same key with other args raises ``IdempotencyConflict``.
        Two concurrent requests with one key race on the partial unique constraint: the
        loser returns the winner's play. ``audit`` builds the audit entry of the new play
        (unsaved, ``tenancy.audit.entry``), stored with the play in its transaction, so a play
        never exists without the record of who triggered it; ``on_created`` runs in that
        transaction too. ``source`` is what started it: ``{"kind": <TriggerKind>, **details}``
        (default: the API, or the parent's subflow step). ``version``: the flow's current
        snapshot when the caller has it already.
        """
        digest = args_digest(args)
        source = dict(source or {"kind": TriggerKind.SUBFLOW if parent is not None else TriggerKind.API})
        kind = source.pop("kind")
        if start and parent is None and on_created is None and _one_statement():
            version = version or flow.snapshot()
            if cls._starts_at_once(version.definition, run_at):
                done = cls._insert_started(flow, version, args, digest, idempotency_key, user, kind, source, audit)
                if done is not None:
                    return done
        if idempotency_key:
            existing = cls._existing_for_key(flow, idempotency_key, digest)
            if existing is not None:
                return existing, False
        version = version or flow.snapshot()
        at_once = (
            start
            and cls._starts_at_once(version.definition, run_at)
            and cls._company_has_slot(flow.company_id, parent.pk if parent is not None else None)
        )
        now = timezone.now()
        try:
            with transaction.atomic():
                play = cls.objects.create(
                    company_id=flow.company_id,
                    flow=flow,
                    flow_version=version,
                    args=args,
                    args_hash=digest,
                    idempotency_key=idempotency_key or None,
                    run_at=run_at,
                    triggered_by=user if getattr(user, "pk", None) else None,
                    parent=parent,
                    parent_layer=parent_layer,
                    root_id=(parent.root_id or parent.pk) if parent is not None else None,
                    trigger_kind=kind,
                    trigger_info=source or None,
                    **(cls._started(version.definition, now) if at_once else {}),
                )
                if at_once:
                    # What admit() does from NEW, written with the row (one statement less).
                    emit(play, [(EventType.PLAY_STARTED, {"state": State.RUN})])
                    play.enqueue()
                elif start:
                    play.admit()
                if audit is not None:
                    from tenancy.audit import recorded

                    entry = audit(play)
                    entry.save(force_insert=True)
                    recorded(entry)
                if on_created is not None:
                    on_created(play)
        except IntegrityError:
            if not idempotency_key:
                raise
            existing = cls._existing_for_key(flow, idempotency_key, digest)
            if existing is None:
                raise
            return existing, False
        return play, True

    @classmethod
    def _insert_started(
        cls,
        flow: Flow,
        version: FlowVersion,
        args: dict[str, Any],
        digest: str,
        key: str | None,
        user: Any,
        kind: str,
        info: dict[str, Any],
        audit: Callable[[Play], Any] | None,
    ) -> tuple[Play, bool] | None:
        """``trigger``'s common case on PostgreSQL in one statement (``_trigger_sql``),
        atomic on its own: the company's running-play limit checked, the play inserted RUN
        unless its idempotency key is taken, its ``play:started`` event and its audit entry
        inserted, and the play that holds the key read. None when it inserted nothing and
        found no such play (no free slot, or a concurrent insert of the key committed after
        the statement began): ``trigger``'s general path then decides.
        """
        from django.db import connection
        from django.db.models.signals import post_save, pre_save

        now = timezone.now()
        play = cls(
            company_id=flow.company_id,
            flow=flow,
            flow_version=version,
            args=args,
            args_hash=digest,
            idempotency_key=key or None,
            triggered_by=user if getattr(user, "pk", None) else None,
            trigger_kind=kind,
            trigger_info=info or None,
            created_at=now,
            event_seq=1,
            **cls._started(version.definition, now),
        )
        # What Model.save() would send (plays/observe.py: the trace and the trigger count).
        pre_save.send(sender=cls, instance=play, raw=False, using=connection.alias, update_fields=None)
        payload = event_payload(play, EventType.PLAY_STARTED, 1, {"state": State.RUN}, now)
        entry = audit(play) if audit is not None else None
        limit = settings.FLOWPLAY["MAX_RUNNING_PLAYS_PER_COMPANY"]
        sql = _trigger_sql(bool(limit), bool(key), entry is not None)
        params: list[Any] = [limit, play.company_id, limit] if limit else []
        params += _insert_params(play, connection)
        params += [play.company_id, play.flow_id, EventType.PLAY_STARTED, _event_prep(payload, connection), now]
        if entry is not None:
            params += _insert_params(entry, connection)
        if key:
            params += [play.flow_id, key]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            free, event_id, xid, *held = cursor.fetchone()
        if event_id is not None:
            play._state.adding = False
            play._state.db = connection.alias
            post_save.send(sender=cls, instance=play, created=True, update_fields=None, raw=False, using=connection.alias)
            publish_on_commit(play.company_id, [{**payload, "cursor": encode_cursor((xid, event_id))}])
            play.enqueue()
            if entry is not None:
                from tenancy.audit import recorded

                recorded(entry)
            return play, True
        if key and held[0] is not None:
            existing = rows.instance(cls, held, connection)
            if existing.args_hash != digest:
                raise IdempotencyConflict(existing)
            return existing, False
        if key and free:
            existing = cls._existing_for_key(flow, key, digest)
            if existing is not None:
                return existing, False
        return None

    @classmethod
    def _existing_for_key(cls, flow: Flow, key: str, digest: str) -> Play | None:
        existing = cls.objects.filter(flow=flow, idempotency_key=key).exclude(state=State.FAIL).first()
        if existing is not None and existing.args_hash != digest:
            raise IdempotencyConflict(existing)
        return existing

    # -- transitions --------------------------------------------------------------------

    def admit(self, reported_from: str | None = None) -> bool:
        """NEW/DEFERRED → RUN (or DEFERRED when not due or no slot; SKIP when flow filters fail).

        Runs inside the caller's transaction; the runner task is enqueued after commit.
        ``reported_from`` is the previousState its event names when the caller passed the play
        through DEFERRED without an event of its own (a resume from ON_HOLD).
        """
        from flows.expr import ExpressionError, FilterError, Scope, evaluate_filters

        now = timezone.now()
        previous = self.state
        if previous not in (State.NEW, State.DEFERRED):
            return False
        events: list[tuple[str, dict[str, Any]]] = []
        if self.started_at is None and self.definition.get("filters"):
            try:
                passed = evaluate_filters(
                    self.definition["filters"], Scope(prev={"args": self.args}, flow_id=self.flow_id, play_id=self.id)
                )
            except FilterError as exc:
                return self._fail_now(previous, error_body("FILTER_ERROR", str(exc)))
            except ExpressionError as exc:  # a filter value's expression failed (e.g. 1 / 0)
                return self._fail_now(previous, error_body("EXPRESSION_ERROR", str(exc)))
            if not passed:
                if not self._cas([previous], state=State.SKIP, started_at=now, completed_at=now, run_at=None):
                    return False
                emit(self, [self._state_event(reported_from or previous)])
                return True
        not_due = self.run_at is not None and self.run_at > now
        if not_due or not self._slot_free():
            # Waiting for a slot is not a due time: run_at is cleared so that the due-time
            # sweep does not pick the play again; release_flow() starts it when a slot frees.
            run_at = self.run_at if not_due else None
            if previous == State.DEFERRED:
                if run_at != self.run_at:
                    self._cas([State.DEFERRED], run_at=run_at)
                return False
            if not self._cas([previous], state=State.DEFERRED, run_at=run_at):
                return False
            emit(self, [self._state_event(previous)])
            return True
        changes: dict[str, Any] = {"state": State.RUN, "run_at": None, "runner": "", "lease_until": None}
        if self.started_at is None:
            changes.update(self._started(self.definition, now))
            events.append((EventType.PLAY_STARTED, {"state": State.RUN}))
        else:
            events.append((EventType.PLAY_STATE, {"state": State.RUN, "previousState": reported_from or previous}))
        if not self._cas([previous], **changes):
            return False
        emit(self, events)
        self.enqueue()
        return True

    @staticmethod
    def _starts_at_once(definition: dict[str, Any], run_at: datetime | None) -> bool:
        """Whether admit() would take a new play straight to RUN whatever the database
        holds: not deferred, no flow filters, no concurrency limit."""
        execution = definition.get("execution", {})
        return run_at is None and not definition.get("filters") and not execution.get("maxConcurrency")

    @staticmethod
    def _started(definition: dict[str, Any], now: datetime) -> dict[str, Any]:
        """The fields admit() sets when a play first starts."""
        fields: dict[str, Any] = {"state": State.RUN, "started_at": now, "updated_at": now}
        timeout = definition.get("execution", {}).get("timeout")
        if timeout:
            fields["deadline_at"] = now + timedelta(seconds=timeout)
        return fields

    def _slot_free(self) -> bool:
        if not self._company_slot_free():
            return False
        limit = self.definition.get("execution", {}).get("maxConcurrency")
        if not limit:
            return True
        # Two triggers could each count limit-1 running plays and both start: lock the
        # flow row so that counting and starting are one step per flow.
        Flow.objects.select_for_update().filter(pk=self.flow_id).first()
        running = Play.objects.filter(flow_id=self.flow_id, state__in=ACTIVE).exclude(pk=self.pk).count()
        return running < limit

    def _company_slot_free(self) -> bool:
        """FLOWPLAY_MAX_RUNNING_PLAYS_PER_COMPANY: one tenant cannot take every worker.

        Counts root plays in RUN; subflow plays belong to their root (counting them could
        deadlock a parent that waits for its children) and are bounded by
        FLOWPLAY_MAX_DESCENDANT_PLAYS instead. A soft limit: without a lock, starts racing
        each other may pass it by a few, which keeps the trigger path lock-free.
        """
        return self._company_has_slot(self.company_id, self.parent_id, self.pk)

    @staticmethod
    def _company_has_slot(company_id: str, parent_id: str | None, exclude: str | None = None) -> bool:
        """_company_slot_free for a play that may not exist yet (Play.trigger's fast path)."""
        limit = settings.FLOWPLAY["MAX_RUNNING_PLAYS_PER_COMPANY"]
        if not limit or parent_id is not None:
            return True
        running = Play.objects.filter(company_id=company_id, state=State.RUN, parent__isnull=True)
        if exclude is not None:
            running = running.exclude(pk=exclude)
        return running.count() < limit

    def descendants(self) -> int:
        """Plays started under this play's root (subflows of subflows …), the root excluded."""
        return Play.objects.filter(root_id=self.root_id or self.pk).count()

    def enqueue(self) -> None:
        from .tasks import run_play

        queue = self.definition.get("execution", {}).get("queue") or "default"
        play_id = self.id
        send_on_commit(
            lambda: run_play.apply_async((play_id,), queue=queue), f"play {play_id}", lambda: Play.unsent(play_id)
        )

    @staticmethod
    def unsent(play_id: str) -> None:
        """The play's runner task could not be sent (broker down): give it an expired lease,
        which the reaper's next sweep requeues, instead of waiting REAP_IDLE_SECONDS."""
        Play.objects.filter(pk=play_id, state=State.RUN, runner="").update(lease_until=timezone.now())

    @staticmethod
    def take_lease(play_id: str, runner: str, lease_seconds: float) -> Play | None:
        """Take the runner's lease on a RUN play and read it (with its flow version) as it
        is now; None if it is not RUN or another live runner has it."""
        from django.db import connection

        now = timezone.now()
        until = now + timedelta(seconds=lease_seconds)
        if connection.vendor == "postgresql":  # one round trip: the update returns the row
            sql = f"""
                UPDATE plays_play SET runner = %s, lease_until = %s
                WHERE id = %s AND state = 'RUN' AND (runner = '' OR lease_until < %s OR runner = %s)
                RETURNING {", ".join(connection.ops.quote_name(f.column) for f in Play._meta.concrete_fields)}
            """
            play = next(iter(Play.objects.raw(sql, [runner, until, play_id, now, runner])), None)
            if play is not None:
                play.flow_version = _version(play.flow_version_id)
            return play
        n = (
            Play.objects.filter(pk=play_id, state=State.RUN)
            .filter(Q(runner="") | Q(lease_until__lt=now) | Q(runner=runner))
            .update(runner=runner, lease_until=until)
        )
        return Play.objects.select_related("flow_version").filter(pk=play_id).first() if n else None

    @staticmethod
    def renew_lease(play_id: str, runner: str, until: datetime) -> None:
        """The heartbeat: extend the lease that ``runner`` holds (RUN, or held while its step ends)."""
        Play.objects.filter(pk=play_id, runner=runner, state__in=[State.RUN, State.ON_HOLD]).update(lease_until=until)

    def hold_lease(self, runner: str, until: datetime | None = None) -> bool:
        """Whether ``runner`` still holds this RUN play (its lease renewed to ``until``)."""
        query = Play.objects.filter(pk=self.pk, runner=runner, state=State.RUN)
        return bool(query.update(lease_until=until) if until else query.exists())

    def move_cursor(self, runner: str, to: int) -> bool:
        """Set the next step to run (the play may be held meanwhile); False if ``runner``
        no longer holds an unfinished play."""
        n = Play.objects.filter(pk=self.pk, runner=runner).exclude(state__in=TERMINAL).update(next_index=to)
        if n:
            self.next_index = to
        return bool(n)

    def step_past(self, runner: str, to: int, until: datetime) -> bool:
        """Set the next step and renew the lease, if ``runner`` holds this play and it is RUN."""
        n = Play.objects.filter(pk=self.pk, runner=runner, state=State.RUN).update(next_index=to, lease_until=until)
        if n:
            self.next_index, self.lease_until = to, until
        return bool(n)

    def wait_for_iterations(self, runner: str) -> None:
        """Give the lease up while a loop's iterations run; the play stays RUN."""
        Play.objects.filter(pk=self.pk, runner=runner).update(runner="", lease_until=None, updated_at=timezone.now())

    def wake(self) -> None:
        """A parked play's wait is over early (its child ended): due now."""
        Play.objects.filter(pk=self.pk, state=State.DEFERRED).update(run_at=timezone.now())

    def wake_from_loop(self) -> None:
        """A loop's last iteration ended: a runner picks the play up at its iterator step."""
        if Play.objects.filter(pk=self.pk, state=State.RUN, runner="").exists():
            self.enqueue()

    def requeue(self) -> None:
        """The reaper: forget a lost runner and send the play's task again."""
        Play.objects.filter(pk=self.pk, state=State.RUN).update(runner="", lease_until=None, updated_at=timezone.now())
        self.enqueue()

    @staticmethod
    def can_step_on() -> bool:
        """Whether ``step_on`` can write here (PostgreSQL); elsewhere it writes nothing."""
        from django.db import connection

        return connection.vendor == "postgresql"

    def step_on(self, runner: str, done: Layer, out: Any, step: dict[str, Any], lease_until: datetime) -> Layer | None:
        """``Runner.succeed``'s transaction (``step_past``, ``Layer.end``, ``Layer.open``) in
        one statement on PostgreSQL: ``done`` DONE with ``out``, the cursor at ``step`` and
        the lease renewed, ``step``'s layer RUN. The new layer, or None when nothing was
        written (not PostgreSQL, the play not ours and RUN, ``done`` ended): the caller
        takes the general path."""
        return self._boundary(runner, done, out, step, step["index"], lease_until)

    def open_on(self, runner: str, step: dict[str, Any], lease_until: datetime) -> Layer | None:
        """``Runner.open``'s transaction for a step that runs now, in one statement: the
        lease renewed, ``step``'s layer RUN. None as ``step_on``."""
        return self._boundary(runner, None, None, step, step["index"], lease_until)

    def finish_on(self, runner: str, done: Layer, out: Any, to: int) -> bool:
        """After the last step, ``Runner.succeed``'s transaction (``step_past``,
        ``Layer.end``, ``finish``) in one statement: ``done`` DONE, the play DONE. False
        as ``step_on``, and for a play whose end wakes something (``ends_alone``)."""
        return self.ends_alone() and self._boundary(runner, done, out, None, to, None) is not None

    def ends_alone(self) -> bool:
        """Whether this play's end wakes nothing else (``_after_end`` has nothing to do)."""
        return not self.parent_layer_id and not self.definition.get("execution", {}).get("maxConcurrency")

    def _boundary(
        self, runner: str, done: Layer | None, out: Any, step: dict[str, Any] | None, to: int, lease_until: datetime | None
    ) -> Layer | bool | None:
        """The one statement of ``step_on``, ``open_on`` and ``finish_on``: ``done`` (if any)
        ends DONE, then ``step``'s layer opens RUN, or (``step`` None) the play finishes DONE.

        Why raw SQL: one round trip instead of five to seven on the path every step takes.
        The rows come from the same definitions (``Layer.ended``, ``Layer.build``,
        ``event_payload``); test_runner's equality tests compare them with the general
        path's. ``ok`` locks the play, then the layer, and each part writes only if ``ok``
        found them (the parts of a ``WITH`` have no condition of their own): all or nothing.
        """
        from django.db import connection

        if not Play.can_step_on() or (done is not None and done.iteration is not None):
            return None
        now = timezone.now()
        events: list[tuple[str, dict[str, Any]]] = []
        params: list[Any] = [self.pk, runner]
        if done is not None:
            params.append(done.pk)
            events.append((EventType.LAYER_COMPLETED, done.event_extra(LayerState.DONE, out=out)))
        layer = None
        if step is not None:
            layer = Layer.build(self, step, LayerState.RUN)
            layer.started_at = now
            events.append((EventType.LAYER_STARTED, {**layer.event_extra(LayerState.RUN), "attempt": 1}))
            params += [to, lease_until]
        else:
            events.append((EventType.PLAY_COMPLETED, {"state": State.DONE, "duration": duration_ms(self.started_at, now)}))
            params += [to, None, now, now]
        params.append(self.pk)
        end = Layer.ended(LayerState.DONE, out, None, now) if done is not None else None
        ended = [Layer._meta.get_field(name) for name in end] if end is not None else []
        if end is not None:
            params += [*(f.get_db_prep_save(end[f.name], connection) for f in ended), now, done.pk]
        fields = list(Layer._meta.concrete_fields) if layer is not None else []
        params += [f.get_db_prep_save(getattr(layer, f.attname), connection) for f in fields]
        payloads = [event_payload(self, kind, 0, extra, now) for kind, extra in events]
        prep = Event._meta.get_field("payload").get_db_prep_save
        params += [self.company_id, self.pk, self.flow_id, now]
        for (kind, _), payload in zip(events, payloads, strict=True):
            params += [kind, prep(payload, connection)]
        sql = _step_on_sql(
            tuple(f.column for f in ended) or None, tuple(f.column for f in fields) or None, len(events)
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall()
        if not rows:
            return None
        messages = []
        for payload, (pk, seq, xid) in zip(payloads, rows, strict=True):
            payload["seq"] = seq
            messages.append({**payload, "cursor": encode_cursor((xid, pk))})
        publish_on_commit(self.company_id, messages)
        if done is not None:
            done._set({**end, "started_at": done.started_at or now})
        self.next_index, self.lease_until = to, lease_until
        if layer is None:
            self.state, self.completed_at, self.updated_at, self.runner = State.DONE, now, now, ""
            return True
        return layer

    def release(self, runner: str) -> bool:
        """Give up the lease unless the play is RUN again (resumed meanwhile); True if released."""
        n = Play.objects.filter(pk=self.pk, runner=runner).exclude(state=State.RUN).update(runner="", lease_until=None)
        if n:
            return True
        # Still RUN (resumed while we were stopping) or lease lost: check which.
        return not Play.objects.filter(pk=self.pk, runner=runner, state=State.RUN).exists()

    def hand_back(self, runner: str) -> None:
        """Give up the lease of a RUN play and requeue it (end of a runner's time slice)."""
        with transaction.atomic():
            if Play.objects.filter(pk=self.pk, runner=runner, state=State.RUN).update(runner="", lease_until=None):
                self.enqueue()

    def park(self, runner: str, until: datetime) -> bool:
        """RUN → DEFERRED until ``until`` (a sleep step); the play holds no worker meanwhile."""
        if not self._cas([State.RUN], state=State.DEFERRED, run_at=until, runner="", lease_until=None):
            return False
        emit(self, [self._state_event(State.RUN)])
        return True

    def wait_for_approval(self, layer: Layer) -> bool:
        if not self._cas([State.RUN], state=State.WAIT, runner="", lease_until=None):
            return False
        emit(self, [(EventType.PLAY_WAITING, {"layerId": layer.id, "ref": layer.ref, "state": State.WAIT})])
        return True

    def finish(self, runner: str, filtered: bool | None = None) -> bool:
        """RUN → DONE, or FILTERED when every layer was filtered out (``filtered``: the
        caller knows already)."""
        if filtered is None:
            filtered = set(self.layers.values_list("state", flat=True)) == {LayerState.FILTERED}
        state = State.FILTERED if filtered else State.DONE
        now = timezone.now()
        n = Play.objects.filter(pk=self.pk, state=State.RUN, runner=runner).update(
            state=state, completed_at=now, updated_at=now, runner="", lease_until=None
        )
        if not n:
            return False
        self.state, self.completed_at = state, now
        if state == State.DONE:
            emit(self, [(EventType.PLAY_COMPLETED, {"state": state, "duration": self.duration})])
        else:
            emit(self, [self._state_event(State.RUN)])
        self._after_end()
        return True

    def fail(self, error: dict[str, Any], from_states: Iterable[str] = (State.RUN,)) -> bool:
        return self._fail_now(None, error, from_states=from_states)

    def _fail_now(self, previous: str | None, error: dict[str, Any], from_states: Iterable[str] | None = None) -> bool:
        now = timezone.now()
        states = list(from_states) if from_states is not None else [previous]
        current = Play.objects.filter(pk=self.pk).values_list("state", flat=True).first()
        if current not in states:
            return False
        if not self._cas(
            [current],
            state=State.FAIL,
            error=error,
            completed_at=now,
            started_at=self.started_at or now,
            runner="",
            lease_until=None,
            run_at=None,
        ):
            return False
        # Steps in flight or waiting are abandoned with the play.
        for layer in self.layers.filter(state__in=[LayerState.RUN, LayerState.WAIT]):
            layer.end(LayerState.FAIL, error=error_body(error["code"], error["message"]))
        emit(
            self,
            [
                (
                    EventType.PLAY_FAILED,
                    {"state": State.FAIL, "ref": error.get("ref"), "error": error, "duration": self.duration},
                )
            ],
        )
        self._after_end()
        return True

    def skip(self, from_states: Iterable[str]) -> bool:
        now = timezone.now()
        current = Play.objects.filter(pk=self.pk).values_list("state", flat=True).first()
        if current not in list(from_states):
            return False
        if not self._cas([current], state=State.SKIP, completed_at=now, runner="", lease_until=None):
            return False
        emit(self, [self._state_event(current)])
        self._after_end()
        return True

    # -- operator verbs (API, pages, admin): each writes its audit entry when ``by`` is given

    def _audit(self, by: Any, action: str, source: str, **details: Any) -> None:
        if by is not None:
            audit_record(by, action, self, **details, **({"source": source} if source else {}))

    def hold(self, by: Any = None, source: str = "") -> bool:
        """NEW/DEFERRED/RUN/WAIT → ON_HOLD, its subflow plays too. A step in flight
        finishes; no further step starts."""
        with transaction.atomic():
            self._hold()
            self._audit(by, "play.held", source)
        return True

    def _hold(self) -> None:
        current = Play.objects.filter(pk=self.pk).values_list("state", flat=True).first()
        if current not in HOLDABLE:
            raise InvalidState(f"Play {self.id} is {current} and cannot be held")
        if not self._cas([current], state=State.ON_HOLD):
            raise InvalidState(f"Play {self.id} changed state and cannot be held now")
        emit(self, [self._state_event(current)])
        self._after_end()
        for child in self._children(HOLDABLE):
            try:
                child._hold()
            except InvalidState:
                pass

    def resume(self, by: Any = None, source: str = "") -> bool:
        """ON_HOLD → the state it would have now (WAIT, DEFERRED, NEW or RUN), its subflow plays too."""
        with transaction.atomic():
            self._resume_tree()
            self._audit(by, "play.resumed", source)
        return True

    def _resume_tree(self) -> None:
        self._resume()
        for child in self._children([State.ON_HOLD]):
            try:
                child._resume_tree()
            except InvalidState:
                pass

    def _resume(self) -> None:
        self.refresh_from_db(fields=["state", "run_at", "started_at"])
        if self.state != State.ON_HOLD:
            raise InvalidState(f"Play {self.id} is {self.state}, not ON_HOLD")
        pending = self.layers.filter(state=LayerState.WAIT).exists()
        if pending:
            target = State.WAIT
        elif self.started_at is None and self.run_at is None and not self._ever_started_request():
            target = State.NEW
        else:
            # Re-enter through admit(), which decides between RUN and DEFERRED.
            if not self._cas([State.ON_HOLD], state=State.DEFERRED):
                raise InvalidState(f"Play {self.id} changed state and cannot be resumed now")
            self.state = State.DEFERRED
            started = self.admit(reported_from=State.ON_HOLD)
            if not started or self.state == State.DEFERRED:
                emit(self, [(EventType.PLAY_STATE, {"state": State.DEFERRED, "previousState": State.ON_HOLD})])
            return
        if not self._cas([State.ON_HOLD], state=target):
            raise InvalidState(f"Play {self.id} changed state and cannot be resumed now")
        emit(self, [(EventType.PLAY_STATE, {"state": target, "previousState": State.ON_HOLD})])

    def _ever_started_request(self) -> bool:
        # A play held while NEW was never asked to start; one held while DEFERRED was.
        return self.events.filter(type=EventType.PLAY_STATE, payload__state=State.DEFERRED).exists()

    def cancel(self, by: Any = None, source: str = "") -> bool:
        """Any non-terminal state → FAIL/CANCELLED, its subflow plays too. The runner sees
        it before its next write."""
        with transaction.atomic():
            self._cancel(getattr(by, "username", None))
            self._audit(by, "play.cancelled", source)
        return True

    def _cancel(self, who: str | None) -> None:
        current = Play.objects.filter(pk=self.pk).values_list("state", flat=True).first()
        if current not in NON_TERMINAL:
            raise InvalidState(f"Play {self.id} is {current} and cannot be cancelled")
        message = f"Cancelled by {who}" if who else "Cancelled"
        if not self._fail_now(current, error_body("CANCELLED", message)):
            raise InvalidState(f"Play {self.id} changed state and cannot be cancelled now")
        for child in self._children(NON_TERMINAL):
            try:
                child._cancel(who)
            except InvalidState:
                pass

    def begin(self, by: Any = None, source: str = "") -> bool:
        """NEW → admitted (the API's /start for a play created with start=false)."""
        with transaction.atomic():
            self.refresh_from_db(fields=["state"])
            if self.state != State.NEW:
                raise InvalidState(f"Play {self.id} is {self.state}, not NEW")
            admitted = self.admit()
            self._audit(by, "play.started", source)
        return admitted

    def _after_end(self) -> None:
        """A slot may have freed: let deferred plays of the flow start; wake a waiting parent."""
        if self.definition.get("execution", {}).get("maxConcurrency"):
            from .tasks import release_flow

            flow_id = self.flow_id
            # Unsent, release_due's sweep starts the waiting plays all the same.
            send_on_commit(lambda: release_flow.delay(flow_id), f"release of flow {flow_id}")
        if self.parent_layer_id and self.state in TERMINAL:
            self._wake_parent()

    def _wake_parent(self) -> None:
        """This subflow play ended: the parent step that waits for it looks again now.

        The parent's row is locked first, so that a parent parking at this very moment
        either parks before (and is woken here) or sees this play ended when it parks.
        """
        parent = Play.objects.select_for_update().filter(pk=self.parent_id).first()
        if parent is None:
            return
        iteration = Layer.objects.filter(pk=self.parent_layer_id).values_list("iteration", flat=True).first()
        if iteration is None:
            parent.wake()
            return
        for waiting in Iteration.objects.filter(play=parent, index=iteration, state=IterationState.RUN, runner=""):
            waiting.play = parent
            waiting.enqueue()

    def _children(self, states: Iterable[str]) -> list[Play]:
        return list(Play.objects.filter(parent_id=self.pk, state__in=list(states)))

    # -- approvals ----------------------------------------------------------------------

    def decide(self, layer_id: str, decision: str, by: Any, note: str = "", source: str = "") -> Approval:
        """Record an approval decision on the waiting layer and continue or skip the play."""
        with transaction.atomic():
            # Two people deciding at once: lock the play row so only one decision is taken.
            play = Play.objects.select_for_update().get(pk=self.pk)
            if play.state != State.WAIT:
                raise InvalidState(f"Play {self.id} is {play.state}, not WAIT")
            layer = play.layers.filter(pk=layer_id, state=LayerState.WAIT).first()
            if layer is None:
                raise InvalidState(f"Layer {layer_id} of play {self.id} is not waiting for approval")
            approval = Approval.objects.create(
                play=play,
                layer=layer,
                decision=decision,
                note=note or "",
                decided_by=by if getattr(by, "pk", None) else None,
            )
            if decision == Decision.APPROVED:
                layer.approve()  # its first attempt begins when the runner picks it up
                self._cas([State.WAIT], state=State.RUN, runner="", lease_until=None)
                emit(self, [(EventType.PLAY_STATE, {"state": State.RUN, "previousState": State.WAIT})])
                self.enqueue()
            else:
                layer.end(LayerState.SKIP, out=None)
                self.skip([State.WAIT])
            self._audit(by, f"play.{decision}", source, layerId=layer_id)
            self.refresh_from_db()
        return approval

    def pending_approval(self) -> Layer | None:
        return self.layers.filter(state=LayerState.WAIT).first()

    # -- retry --------------------------------------------------------------------------

    def retry(self, by: Any = None, source: str = "") -> Play:
        """FAIL → a new play with retryOf, the same args and version, DONE layers copied."""
        with transaction.atomic():
            self.refresh_from_db()
            if self.state != State.FAIL:
                raise InvalidState(f"Play {self.id} is {self.state}; only FAIL plays can be retried")
            key = self.idempotency_key
            if (
                key
                and Play.objects.filter(flow_id=self.flow_id, idempotency_key=key).exclude(state=State.FAIL).exists()
            ):
                key = None
            failed = (
                self.layers.exclude(state__in=[LayerState.DONE, LayerState.FILTERED, LayerState.SKIP])
                .order_by("index", "iteration")
                .first()
            )
            resume_at = failed.index if failed else self.next_index
            if failed is not None and failed.iteration is not None:
                # It failed inside a loop: the loop runs again from its iterator.
                loop = (
                    self.layers.filter(loop_concurrency__isnull=False, iteration__isnull=True, index__lt=failed.index)
                    .order_by("-index")
                    .first()
                )
                resume_at = loop.index if loop is not None else resume_at
            new = Play.objects.create(
                company_id=self.company_id,
                flow_id=self.flow_id,
                flow_version_id=self.flow_version_id,
                args=self.args,
                args_hash=self.args_hash,
                idempotency_key=key,
                retry_of=self,
                parent=self.parent,
                root_id=self.root_id,
                triggered_by=by if getattr(by, "pk", None) else None,
                trigger_kind=TriggerKind.RETRY,
                next_index=resume_at,
            )
            Layer.objects.bulk_create(
                Layer(
                    play=new,
                    ref=layer.ref,
                    app_id=layer.app_id,
                    index=layer.index,
                    iteration=layer.iteration,
                    state=layer.state,
                    attempts=layer.attempts,
                    started_at=layer.started_at,
                    completed_at=layer.completed_at,
                    out=layer.out,
                    error=layer.error,
                    reused_from=layer.reused_from or layer,
                )
                for layer in self.layers.filter(index__lt=resume_at).order_by("index", "iteration")
            )
            new.admit()
            self._audit(by, "play.retried", source, newPlayId=new.id)
        return new


class IdempotencyConflict(Exception):
    def __init__(self, play: Play):
        super().__init__(f"Idempotency key already used by play {play.id} with different args")
        self.play = play


# --- Layers ---------------------------------------------------------------------------


class Parked(models.TextChoices):
    """Why a RUN layer gave its worker up; what the runner does when the play wakes up."""

    NO = "", "not parked"
    RESULT = "result", "its result is in parked_out (a sleep)"
    RECHECK = "recheck", "the module looks again (a subflow's child, a loop's iterations)"
    RETRY = "retry", "the next attempt begins (after a retry delay)"


class Layer(models.Model):
    """One flowlet's execution inside a play."""

    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    play = models.ForeignKey(Play, on_delete=models.CASCADE, related_name="layers")
    ref = models.CharField(max_length=100)
    app_id = models.CharField(max_length=100)
    index = models.IntegerField()
    iteration = models.IntegerField(null=True, blank=True)
    state = models.CharField(max_length=8, choices=LayerState, default=LayerState.RUN)
    attempts = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    out = StorableJSONField(null=True, blank=True)
    error = StorableJSONField(null=True, blank=True)
    # Set on the layers a retry copied instead of running them again.
    reused_from = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # Why a RUN layer gave its worker up, and what it does when the play wakes (Parked).
    parked = models.CharField(max_length=8, choices=Parked, blank=True, default="")
    # Parked.RESULT: the result a sleep recorded, the step's out once the play wakes up.
    parked_out = StorableJSONField(null=True, blank=True)
    # Parked.RETRY: the error code of the attempt that failed (the next one's note).
    retry_code = models.CharField(max_length=64, blank=True, default="")
    # An iterator's layer: how many of its iterations run at once (set when it fans out).
    loop_concurrency = models.PositiveIntegerField(null=True, blank=True)
    approved = models.BooleanField(default=False)

    class Meta:
        ordering = ["index", "iteration"]
        constraints = [
            # One layer per (play, ref, iteration); NULL iterations are not equal in SQL,
            # so the non-iterated case needs its own partial constraint.
            models.UniqueConstraint(
                fields=["play", "ref"], condition=Q(iteration__isnull=True), name="plays_layer_unique_ref"
            ),
            models.UniqueConstraint(
                fields=["play", "ref", "iteration"],
                condition=Q(iteration__isnull=False),
                name="plays_layer_unique_iteration",
            ),
        ]
        indexes = [models.Index(fields=["play", "index", "iteration"], name="plays_layer_play_order")]

    def __str__(self) -> str:
        return f"{self.ref} ({self.state})"

    @property
    def duration(self) -> int | None:
        return duration_ms(self.started_at, self.completed_at)

    @classmethod
    def open(
        cls,
        play: Play,
        step: dict[str, Any],
        state: str,
        *,
        iteration: int | None = None,
        out: Any = None,
        error: dict[str, Any] | None = None,
    ) -> Layer:
        """Create the layer of a step the play has reached, with its event.

        RUN: the first attempt starts. WAIT: it needs an approval. FILTERED/FAIL: it ended
        before running (filters, a filter error).
        """
        now = timezone.now()
        ended = state in LAYER_TERMINAL
        layer = cls.build(play, step, state, iteration=iteration)
        layer.started_at, layer.completed_at = now, now if ended else None
        layer.out, layer.error = out, error
        layer.save(force_insert=True)
        extra = layer.event_extra(state, out=out, error=error)
        if state == LayerState.RUN:
            emit(play, [(EventType.LAYER_STARTED, {**extra, "attempt": 1})])
        elif state == LayerState.FAIL:
            emit(play, [(EventType.LAYER_FAILED, extra)])
        elif ended:
            emit(play, [(EventType.LAYER_COMPLETED, extra)])
        return layer

    @classmethod
    def build(cls, play: Play, step: dict[str, Any], state: str, *, iteration: int | None = None) -> Layer:
        """The unsaved layer of ``step`` in ``play``, opened in ``state``."""
        return cls(
            play=play,
            ref=step["ref"],
            app_id=step["appId"],
            index=step["index"],
            iteration=iteration,
            state=state,
            attempts=1 if state == LayerState.RUN else 0,
        )

    def event_extra(self, state: str, *, out: Any = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The layer's part of the message of its events: it is now in ``state``."""
        extra: dict[str, Any] = {"layerId": self.id, "ref": self.ref, "state": state}
        if state == LayerState.FAIL:
            extra["error"] = error
        elif state in LAYER_TERMINAL:
            extra["out"] = out
        if self.iteration is not None:
            extra["iteration"] = self.iteration
        return extra

    def begin_attempt(self, play: Play, note: str | None = None, error: dict[str, Any] | None = None) -> None:
        """Count one more attempt of a RUN layer (a retry, a resumed or an interrupted one).

        ``error``: the previous attempt's, kept in the event for the play page's attempts."""
        now = timezone.now()
        Layer.objects.filter(pk=self.pk).update(attempts=F("attempts") + 1, started_at=self.started_at or now)
        self.attempts += 1
        self.started_at = self.started_at or now
        extra: dict[str, Any] = {"layerId": self.id, "ref": self.ref, "state": LayerState.RUN, "attempt": self.attempts}
        if self.iteration is not None:
            extra["iteration"] = self.iteration
        if note:
            extra["note"] = note
        if error:
            extra["previousError"] = error
        emit(play, [(EventType.LAYER_STARTED, extra)])

    def end(self, state: str, *, out: Any = None, error: dict[str, Any] | None = None) -> bool:
        """RUN/WAIT → a final state, with its event. False if the layer had already ended."""
        now = timezone.now()
        fields = {**Layer.ended(state, out, error, now), "started_at": self.started_at or now}
        if not Layer.objects.filter(pk=self.pk, state__in=[LayerState.RUN, LayerState.WAIT]).update(**fields):
            return False
        self._set(fields)
        extra = self.event_extra(state, out=out, error=error)
        emit(self.play, [(EventType.LAYER_FAILED if state == LayerState.FAIL else EventType.LAYER_COMPLETED, extra)])
        return True


    @staticmethod
    def ended(state: str, out: Any, error: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
        """The fields a layer's end writes (``end``, and ``Play.step_on``'s statement)."""
        return {"state": state, "out": out, "error": error, "completed_at": now, **UNPARKED}

    def _set(self, fields: dict[str, Any]) -> None:
        for name, value in fields.items():
            setattr(self, name, value)

    def park(self, parked: str, out: Any = None, retry_code: str = "") -> bool:
        """RUN: give the worker up until the play wakes (``parked`` says what happens then)."""
        fields = {"parked": parked, "parked_out": out, "retry_code": retry_code}
        n = Layer.objects.filter(pk=self.pk, state=LayerState.RUN).update(**fields)
        if n:
            self._set(fields)
        return bool(n)

    def unpark(self) -> None:
        """The play woke up: the layer is an ordinary RUN layer again."""
        Layer.objects.filter(pk=self.pk).update(**UNPARKED)
        self._set(UNPARKED)

    def start_loop(self, concurrency: int) -> None:
        """An iterator's layer fans out: at most ``concurrency`` iterations at once."""
        Layer.objects.filter(pk=self.pk, state=LayerState.RUN).update(loop_concurrency=concurrency)
        self.loop_concurrency = concurrency

    def approve(self) -> bool:
        """WAIT → RUN, approved: the runner starts its first attempt when it picks it up."""
        n = Layer.objects.filter(pk=self.pk, state=LayerState.WAIT).update(state=LayerState.RUN, approved=True)
        if n:
            self.state, self.approved = LayerState.RUN, True
        return bool(n)


UNPARKED: dict[str, Any] = {"parked": Parked.NO, "parked_out": None, "retry_code": ""}


class Decision(models.TextChoices):
    APPROVED = "approved"
    DECLINED = "declined"


class Approval(models.Model):
    """A person's decision on a step that needed approval."""

    play = models.ForeignKey(Play, on_delete=models.CASCADE, related_name="approvals")
    layer = models.OneToOneField(Layer, on_delete=models.CASCADE, related_name="approval")
    decision = models.CharField(max_length=10, choices=Decision)
    note = models.TextField(blank=True, default="")
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    decided_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.decision} on {self.layer_id}"


# --- Iterations -----------------------------------------------------------------------


class IterationState(models.TextChoices):
    PENDING = "PENDING"
    RUN = "RUN"
    DONE = "DONE"
    FAIL = "FAIL"


class Iteration(models.Model):
    """One item of an ``iterator`` step: the loop body runs once per item.

    An iteration is a small play of its own inside its play: a cursor over the body's steps
    (``next_index``) and a runner lease, so that iterations run in parallel across the
    worker fleet and one whose worker dies is reaped and carried on like a play. Its
    layers are the play's layers with ``iteration`` = ``index``.
    """

    play = models.ForeignKey(Play, on_delete=models.CASCADE, related_name="iterations")
    ref = models.CharField(max_length=100, help_text="The iterator step's ref.")
    index = models.IntegerField()
    item = StorableJSONField(null=True, blank=True)
    state = models.CharField(max_length=8, choices=IterationState, default=IterationState.PENDING)
    next_index = models.IntegerField()
    runner = models.CharField(max_length=64, blank=True, default="")
    lease_until = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["index"]
        constraints = [
            models.UniqueConstraint(fields=["play", "ref", "index"], name="plays_iteration_unique_index"),
        ]
        indexes = [
            models.Index(fields=["play", "ref", "state", "index"], name="plays_iteration_state"),
            # reap_stuck(): running iterations by lease.
            models.Index(fields=["lease_until"], condition=Q(state="RUN"), name="plays_iteration_running_lease"),
        ]

    def __str__(self) -> str:
        return f"{self.play_id}/{self.ref}[{self.index}] ({self.state})"

    def enqueue(self) -> None:
        from .tasks import run_iteration

        queue = self.play.definition.get("execution", {}).get("queue") or "default"
        pk = self.pk
        send_on_commit(
            lambda: run_iteration.apply_async((pk,), queue=queue), f"iteration {pk}", lambda: Iteration.unsent(pk)
        )

    @staticmethod
    def unsent(pk: int) -> None:
        """Its task could not be sent: an expired lease, for the reaper's next sweep (see Play.unsent)."""
        Iteration.objects.filter(pk=pk, state=IterationState.RUN, runner="").update(lease_until=timezone.now())

    def claim(self, runner: str, lease_seconds: float) -> bool:
        """Take the lease of a RUN iteration of a RUN play; False if a live runner has it."""
        now = timezone.now()
        n = (
            Iteration.objects.filter(pk=self.pk, state=IterationState.RUN, play__state=State.RUN)
            .filter(Q(runner="") | Q(lease_until__lt=now) | Q(runner=runner))
            .update(runner=runner, lease_until=now + timedelta(seconds=lease_seconds), updated_at=now)
        )
        if n:
            self.refresh_from_db()
        return bool(n)

    def hold_lease(self, runner: str, until: datetime | None = None) -> bool:
        """Whether ``runner`` still holds this RUN iteration (its lease renewed to ``until``)."""
        query = Iteration.objects.filter(pk=self.pk, runner=runner, state=IterationState.RUN)
        return bool(query.update(lease_until=until) if until else query.exists())

    @staticmethod
    def renew_lease(pk: int, runner: str, until: datetime) -> None:
        """The heartbeat: extend the lease of a RUN iteration that ``runner`` holds."""
        Iteration.objects.filter(pk=pk, runner=runner, state=IterationState.RUN).update(lease_until=until)

    def move_cursor(self, runner: str, to: int) -> bool:
        """Set the next body step to run; False if ``runner`` no longer holds the iteration."""
        n = Iteration.objects.filter(pk=self.pk, runner=runner, state=IterationState.RUN).update(next_index=to)
        if n:
            self.next_index = to
        return bool(n)

    def release(self, runner: str) -> None:
        """Give the lease up; the iteration stays RUN and is relaunched when its play runs again."""
        Iteration.objects.filter(pk=self.pk, runner=runner).update(
            runner="", lease_until=None, updated_at=timezone.now()
        )

    def requeue(self) -> None:
        """The reaper: forget a lost runner and send the iteration's task again."""
        Iteration.objects.filter(pk=self.pk, state=IterationState.RUN).update(
            runner="", lease_until=None, updated_at=timezone.now()
        )
        self.enqueue()

    def end(self, runner: str, state: str) -> bool:
        """RUN → DONE/FAIL (inside the caller's transaction)."""
        return bool(
            Iteration.objects.filter(pk=self.pk, runner=runner, state=IterationState.RUN).update(
                state=state, runner="", lease_until=None, updated_at=timezone.now()
            )
        )

    @staticmethod
    def fan_out(play: Play, layer: Layer, items: list[Any], body_start: int, concurrency: int) -> None:
        """Create one iteration per item of ``layer``'s loop (in the caller's transaction)."""
        layer.start_loop(concurrency)
        Iteration.objects.bulk_create(
            Iteration(play=play, ref=layer.ref, index=i, item=item, next_index=body_start)
            for i, item in enumerate(items)
        )

    @staticmethod
    def dispatch(play: Play, layer: Layer, relaunch: bool = False) -> int | None:
        """Keep ``loop_concurrency`` iterations of the loop running; once all have ended,
        how many are DONE (None meanwhile). ``relaunch``: also send again the tasks of
        iterations that have no live runner (the play was held, or resumed)."""
        # One dispatcher at a time per play: two iterations ending together must not both
        # launch the same pending ones.
        state = Play.objects.select_for_update().filter(pk=play.pk).values_list("state", flat=True).first()
        if state != State.RUN:
            return None  # held, waiting or ended: resuming the play dispatches again
        iterations = Iteration.objects.filter(play=play, ref=layer.ref)
        counts = dict(iterations.values_list("state").annotate(n=models.Count("id")))
        running = counts.get(IterationState.RUN, 0)
        pending = counts.get(IterationState.PENDING, 0)
        if counts.get(IterationState.FAIL):
            return None
        if not running and not pending:
            return counts.get(IterationState.DONE, 0)
        now = timezone.now()
        if relaunch:
            for orphan in iterations.filter(state=IterationState.RUN).filter(Q(runner="") | Q(lease_until__lt=now)):
                orphan.play = play
                orphan.enqueue()
        free = max(1, layer.loop_concurrency or 1) - running
        if free > 0 and pending:
            ids = list(
                iterations.filter(state=IterationState.PENDING).order_by("index").values_list("pk", flat=True)[:free]
            )
            Iteration.objects.filter(pk__in=ids, state=IterationState.PENDING).update(
                state=IterationState.RUN, updated_at=now
            )
            for it in Iteration.objects.filter(pk__in=ids):
                it.play = play
                it.enqueue()
        return None


from .bulk import BulkItem, BulkJob  # noqa: E402, F401  (bulk verbs as background jobs: plays/bulk.py)
from .workers import Worker  # noqa: E402, F401  (worker liveness per queue: plays/workers.py)
