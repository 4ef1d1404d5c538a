"""The live event stream: ``ws://<host>:4454/api/ws``.

Each connection remembers ``last_seq``: every event of its company up to that number has
been delivered or filtered out. Events reach it two ways:

1. as payloads on its company's group in the process-local channel layer (the fast path),
   fed by this process's ``Hub``: from Redis, where the workers publish after commit
   (``fanout.py``), or, without Redis, from new ``Event`` rows it reads itself;
2. by reading the ``Event`` table: on connect (``?since=``), when a payload ahead of
   ``last_seq + 1`` has waited ``GAP_GRACE_SECONDS`` for its predecessors in vain (two
   workers' messages usually just cross; a full channel drops them for good), and when
   the hub already knew a second ago of events that have not arrived here since (the
   end of a burst was dropped; ``Hub.heads``), besides every ``FULL_CHECK_ROUNDS`` s.

``seq`` is allocated under a per-company row lock held until commit, so sequence order is
commit order: once seq N is visible, every event before it is. "Every event after
``last_seq``, in order" is therefore exactly what the client must see next, whichever
path brings it: no gap, no duplicate.

Close codes. A refused connection is first accepted, then closed with its code: a close
before the accept would reach the client as a bare HTTP 403 (Daphne), whatever the reason.

- 4400: bad query parameters (``since`` not a non-negative integer; see ``ws_params``).
- 4401: no credentials, an unknown or revoked API key, a bad token beside a valid cookie;
  or, later, credentials no longer valid (key revoked, user deactivated, logged out).
- 4403: credentials fine but not for this: the API key has scopes and ``read`` is not one of
  them, or the user's role may not view plays (flows/permissions.py); ``playId``/``flowId``
  names no play or flow of the caller's company; a cookie handshake from another origin's page.
- 4008: the client reads too slowly: its send buffer stayed over the high-water mark
  for ``STALL_SECONDS`` or it fell more than ``MAX_LAG`` events behind. Reconnect with
  ``?since=<last seq received>`` to lose nothing.
- 1011: an internal error; reconnect with ``?since=``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings

from flows.models import ApiKey, Company, Flow
from flows.permissions import VIEW_PLAY, key_allows

from .fanout import company_group
from .models import Event
from .wsauth import API_KEY_ID, API_KEY_SCOPES, SEND_BACKLOG, origin_allowed

log = logging.getLogger(__name__)

CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TOO_SLOW = 4008
CLOSE_ERROR = 1011

# The process-local channel layer the consumers listen on (see Hub).
LOCAL_LAYER = "local"
CATCH_UP_BATCH = 500
FULL_CHECK_ROUNDS = 30
# How long a payload that arrived ahead of its predecessor waits for it before the gap is
# filled from the table, and how many may wait.
GAP_GRACE_SECONDS = 0.2
MAX_HELD = 1000
POLL_SECONDS = 1.0
AUTH_CHECK_SECONDS = 10.0
# The hub joins its Redis groups again this often: Redis forgets them when it restarts or
# fails over (and channels-redis after a day, group_expiry). ZADD is idempotent and cheap.
REJOIN_SECONDS = 10.0

# Back-pressure. Past the high-water mark of unsent bytes the consumer stops sending (and
# reading: new events wait in the database) until the buffer is under the low-water mark.
SEND_HIGH_WATER = 1024 * 1024
SEND_LOW_WATER = 256 * 1024
STALL_SECONDS = 15.0
MAX_LAG = 20000


# DB reads of the stream run on the default thread pool, not on the single thread that
# Django's sync views share, so that a burst of catch-ups does not queue API requests.
def db_read(func: Any) -> Any:
    return database_sync_to_async(func, thread_sensitive=False)


class TooSlow(Exception):
    pass


class Refused(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def ws_params(query_string: bytes) -> dict[str, Any]:
    """The connection's query parameters, checked: ``since`` (an int or None), ``playId``,
    ``flowId`` (str or None). Raises ``Refused(4400)`` for a malformed one."""
    query = parse_qs(query_string.decode(errors="replace"))
    since_raw = (query.get("since") or [""])[0]
    since: int | None = None
    if since_raw != "":
        try:
            since = int(since_raw)
        except ValueError:
            raise Refused(CLOSE_BAD_REQUEST) from None
        if not 0 <= since < 2**63:  # seq is a bigint column
            raise Refused(CLOSE_BAD_REQUEST)
    return {
        "since": since,
        "playId": (query.get("playId") or [None])[0] or None,
        "flowId": (query.get("flowId") or [None])[0] or None,
    }


class PlayEventsConsumer(AsyncWebsocketConsumer):
    channel_layer_alias = LOCAL_LAYER
    company_id: str
    play_id: str | None = None
    flow_id: str | None = None
    last_seq = 0
    group: str | None = None
    poller: asyncio.Task | None = None
    gap_timer: asyncio.Task | None = None
    closing = False

    async def connect(self) -> None:
        try:
            params = await self._admit()
        except Refused as refused:
            self.closing = True
            await self.accept()
            await self.close(code=refused.code)
            return
        since = params["since"]
        self.lock = asyncio.Lock()
        self.held: dict[int, dict[str, Any]] = {}
        head = await self._head()
        # A since beyond the newest event cannot be a seq of this company's stream (a
        # database restored from a backup, another server): start at the head instead of
        # silently skipping the events still to come up to it.
        self.last_seq = head if since is None else min(since, head)
        self.group = company_group(self.company_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await hub.subscribe(self.company_id)
        await self.accept()
        # The poller's first round replays ?since= before anything else is sent.
        self.poller = asyncio.create_task(self._poll())

    async def _admit(self) -> dict[str, Any]:
        """Authenticate, then validate the parameters; ``Refused`` with the close code."""
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            raise Refused(CLOSE_UNAUTHORIZED)
        if not origin_allowed(self.scope):
            raise Refused(CLOSE_FORBIDDEN)
        # The API's rule for reading plays: the key's "read" scope and the role's view_play.
        if not key_allows(self.scope.get(API_KEY_SCOPES), "read") or not await db_read(user.has_perm)(VIEW_PLAY):
            raise Refused(CLOSE_FORBIDDEN)
        params = ws_params(self.scope.get("query_string", b""))
        self.company_id = user.company_id
        self.user_pk = user.pk
        self.api_key_id = self.scope.get(API_KEY_ID)
        self.session_key = getattr(self.scope.get("session"), "session_key", None)
        self.play_id = params["playId"]
        if self.play_id and not await self._play_visible(self.play_id):
            raise Refused(CLOSE_FORBIDDEN)
        self.flow_id = await self._resolve_flow(params["flowId"]) if params["flowId"] else None
        if params["flowId"] and self.flow_id is None:
            raise Refused(CLOSE_FORBIDDEN)
        return params

    async def disconnect(self, code: int) -> None:
        self.closing = True
        for task in (self.poller, self.gap_timer):
            if task is not None:
                task.cancel()
        if self.group:
            self.group = None
            await self.channel_layer.group_discard(company_group(self.company_id), self.channel_name)
            await hub.unsubscribe(self.company_id)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # Clients only listen; {"type": "ping"} gets a pong with the last seq looked at.
        try:
            content = json.loads(text_data or "")
        except ValueError:
            return
        if isinstance(content, dict) and content.get("type") == "ping" and not self.closing:
            await self.send(text_data=json.dumps({"type": "pong", "seq": self.last_seq}))

    # -- delivery -------------------------------------------------------------------------

    async def play_events(self, message: dict[str, Any]) -> None:
        """Channel-layer handler: stored events of this company, in seq order per sender."""
        if self.closing:
            return
        async with self.lock:
            try:
                for payload in message["events"]:
                    seq = payload["seq"]
                    if seq <= self.last_seq:
                        continue
                    if seq == self.last_seq + 1:
                        await self._deliver(payload)
                        await self._deliver_held()
                        continue
                    # Something before it is missing: still on its way from another worker
                    # (their messages cross), or dropped by a full channel. Hold this one
                    # briefly; if the gap does not close, read the table, which has it all
                    # (this payload was published after its commit).
                    self.held[seq] = payload
                    if len(self.held) > MAX_HELD:
                        await self._catch_up_locked()
                    elif self.gap_timer is None or self.gap_timer.done():
                        self.gap_timer = asyncio.create_task(self._close_gap())
            except TooSlow as exc:
                await self._close_too_slow(str(exc))

    async def _deliver(self, payload: dict[str, Any]) -> None:
        self.last_seq = payload["seq"]
        if self._wanted(payload):
            await self._send_event(payload)

    async def _deliver_held(self) -> None:
        while (payload := self.held.pop(self.last_seq + 1, None)) is not None:
            await self._deliver(payload)

    async def _close_gap(self) -> None:
        await asyncio.sleep(GAP_GRACE_SECONDS)
        try:
            async with self.lock:
                if self.held and not self.closing:
                    await self._catch_up_locked()
        except TooSlow as exc:
            await self._close_too_slow(str(exc))

    def _wanted(self, payload: dict[str, Any]) -> bool:
        if self.play_id and payload.get("playId") != self.play_id:
            return False
        if self.flow_id and payload.get("flowId") != self.flow_id:
            return False
        return True

    async def _send_event(self, payload: dict[str, Any]) -> None:
        if self.closing:
            return  # closed by us (too slow, revoked) while this task was on its way here
        await self.send(text_data=json.dumps(payload))
        backlog = self.scope.get(SEND_BACKLOG)
        if backlog is not None and backlog() > SEND_HIGH_WATER:
            await self._drain(backlog)

    async def _drain(self, backlog: Any) -> None:
        """Wait until the client has read most of its buffer; TooSlow if it does not."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        next_lag_check = started
        while backlog() > SEND_LOW_WATER:
            if self.closing:
                return
            now = loop.time()
            if now - started > STALL_SECONDS:
                raise TooSlow(f"send buffer over {SEND_LOW_WATER} bytes for {STALL_SECONDS:.0f} s")
            if now >= next_lag_check:
                lag = await self._head() - self.last_seq
                if lag > MAX_LAG:
                    raise TooSlow(f"{lag} events behind")
                next_lag_check = now + 1.0
            await asyncio.sleep(0.05)

    async def _close_too_slow(self, why: str) -> None:
        log.info("closing slow WebSocket client of company %s at seq %s: %s", self.company_id, self.last_seq, why)
        self.closing = True
        await self.close(code=CLOSE_TOO_SLOW, reason="too far behind; reconnect with since")

    async def _catch_up_locked(self) -> None:
        while not self.closing:
            rows, newest = await self._read(self.last_seq)
            for seq, payload in rows:
                if self.closing:
                    return
                self.last_seq = seq
                await self._send_event(payload)
            self.last_seq = max(self.last_seq, newest)
            if len(rows) < CATCH_UP_BATCH:
                break
        # Held payloads were committed before they were published, so the table had them.
        self.held = {seq: payload for seq, payload in self.held.items() if seq > self.last_seq}
        await self._deliver_held()

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        next_auth = loop.time() + AUTH_CHECK_SECONDS
        next_join = loop.time() + REJOIN_SECONDS
        rounds = 0
        seen_head: int | None = None
        try:
            while not self.closing:
                # The table is read when the hub knew of events a round ago that have not
                # arrived here since (their message was dropped), when the hub knows nothing,
                # on the first round (the ?since= replay), and every FULL_CHECK_ROUNDS anyway.
                if seen_head is None or seen_head > self.last_seq or rounds % FULL_CHECK_ROUNDS == 0:
                    async with self.lock:
                        await self._catch_up_locked()
                rounds += 1
                seen_head = hub.heads.get(self.company_id)
                now = loop.time()
                if now >= next_auth:
                    next_auth = now + AUTH_CHECK_SECONDS
                    if not await self._still_authorized():
                        self.closing = True
                        await self.close(code=CLOSE_UNAUTHORIZED, reason="credentials revoked")
                        return
                if now >= next_join and self.group:
                    next_join = now + REJOIN_SECONDS
                    await self.channel_layer.group_add(self.group, self.channel_name)
                await asyncio.sleep(POLL_SECONDS)
        except asyncio.CancelledError:
            raise
        except TooSlow as exc:
            await self._close_too_slow(str(exc))
        except Exception:
            log.exception("event stream failed; closing so that the client reconnects with ?since=")
            self.closing = True
            await self.close(code=CLOSE_ERROR)

    # -- database -------------------------------------------------------------------------

    @db_read
    def _read(self, after: int) -> tuple[list[tuple[int, dict[str, Any]]], int]:
        """Events after ``after`` (filters applied) and the seq up to which all were looked at.

        The head is read first: every event up to it is committed (commit order is seq
        order), so rows at or below it are complete, and later ones wait for the next read.
        """
        head = Company.objects.filter(pk=self.company_id).values_list("event_seq", flat=True).first() or 0
        if head <= after:
            return [], after
        events = Event.objects.filter(company_id=self.company_id, seq__gt=after, seq__lte=head)
        if self.play_id:
            events = events.filter(play_id=self.play_id)
        if self.flow_id:
            events = events.filter(flow_id=self.flow_id)
        rows = list(events.order_by("seq").values_list("seq", "payload")[:CATCH_UP_BATCH])
        if len(rows) == CATCH_UP_BATCH:
            return rows, rows[-1][0]
        return rows, head

    @db_read
    def _head(self) -> int:
        return Company.objects.filter(pk=self.company_id).values_list("event_seq", flat=True).first() or 0

    @db_read
    def _resolve_flow(self, key: str) -> str | None:
        """A flow's id from its id or permanentId (deleted flows included: their plays stay);
        None if the company has no such flow."""
        flows = Flow.objects.filter(company_id=self.company_id)
        flow_id = flows.filter(pk=key).values_list("pk", flat=True).first()
        if flow_id is None:
            flow_id = flows.filter(permanent_id=key).order_by("deleted_at").values_list("pk", flat=True).first()
        return flow_id

    @db_read
    def _play_visible(self, play_id: str) -> bool:
        from .models import Play

        return Play.objects.filter(pk=play_id, company_id=self.company_id).exists()

    @db_read
    def _still_authorized(self) -> bool:
        from django.contrib.auth import get_user_model
        from django.contrib.sessions.backends.base import SessionBase

        if self.api_key_id:
            return ApiKey.objects.active().filter(pk=self.api_key_id, user__is_active=True).exists()
        if not get_user_model().objects.filter(pk=self.user_pk, is_active=True).exists():
            return False
        session = self.scope.get("session")
        if isinstance(session, SessionBase) and self.session_key:
            return session.exists(self.session_key)
        return True


# --- The hub: one subscription per process --------------------------------------------


class Hub:
    """Bring each company's events into this process once, for all its consumers here.

    Consumers join groups of the process-local channel layer (``"local"``). The hub feeds
    those groups from one of two sources:

    - with Redis: one channel of this process in each listened-to company's Redis group,
      so a worker's ``group_send`` costs one Redis message per web process instead of one
      per WebSocket, and one receive loop here hands it to every local consumer;
    - without Redis (embedded), the workers cannot reach this process's memory at all: the
      hub reads what they committed instead, every ``RELAY_SECONDS``: one query over the
      heads of the companies that have listeners here, and for each head that moved, the
      rows after the last one published (by ``seq``, which is commit order, so none is
      passed over).

    Either way a message the hub misses (a full channel, Redis down) only costs latency:
    consumers notice the hole in ``seq`` and read the table. The hub also knows each
    company's newest seq (``heads``: from the table every second, or every relay round), so
    a consumer can tell that it missed the end of a burst without a query of its own.
    """

    RELAY_SECONDS = 0.05
    BATCH = 1000

    def __init__(self) -> None:
        self.listeners: Counter[str] = Counter()
        self.published: dict[str, int] = {}
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock: asyncio.Lock | None = None
        self.channel: str | None = None
        self.heads: dict[str, int] = {}
        self.watcher: asyncio.Task | None = None
        self.next_join = 0.0

    async def subscribe(self, company_id: str) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            # A new event loop (tests run one per case): what belonged to the old one is gone.
            self.loop, self.lock, self.task, self.channel = loop, asyncio.Lock(), None, None
            self.watcher = None
            self.listeners.clear()
            self.published.clear()
            self.heads.clear()
        assert self.lock is not None
        async with self.lock:
            if self.task is None or self.task.done():
                if settings.REDIS_URL:
                    self.channel = await get_channel_layer().new_channel("flowplay-hub")
                    self.next_join = loop.time() + REJOIN_SECONDS
                    self.task = loop.create_task(self._bridge())
                    self.watcher = loop.create_task(self._watch())
                    await self._join(list(self.listeners))
                else:
                    self.task = loop.create_task(self._relay())
            self.listeners[company_id] += 1
            if self.listeners[company_id] == 1 and self.channel:
                await self._join([company_id])

    async def _join(self, companies: list[str]) -> None:
        """Put this process's hub channel in the companies' Redis groups.

        Never fails the caller: without Redis the consumers read the event table, and the
        watcher joins again within ``REJOIN_SECONDS``.
        """
        try:
            for company in companies:
                await get_channel_layer().group_add(company_group(company), self.channel)
        except Exception:
            log.warning("event hub could not join its Redis groups; consumers read the event table", exc_info=True)
            self.next_join = 0.0

    async def unsubscribe(self, company_id: str) -> None:
        if self.lock is None or self.loop is not asyncio.get_running_loop():
            return
        async with self.lock:
            if company_id not in self.listeners:
                return
            self.listeners[company_id] -= 1
            if self.listeners[company_id] <= 0:
                del self.listeners[company_id]
                self.published.pop(company_id, None)
                self.heads.pop(company_id, None)
                if self.channel:
                    try:
                        await get_channel_layer().group_discard(company_group(company_id), self.channel)
                    except Exception:  # Redis down: the membership expires by itself
                        log.warning("event hub could not leave a Redis group", exc_info=True)

    async def _bridge(self) -> None:
        redis_layer, local = get_channel_layer(), get_channel_layer(LOCAL_LAYER)
        while True:
            try:
                message = await redis_layer.receive(self.channel)
                company = message.get("company")
                if company in self.listeners:
                    newest = max((p["seq"] for p in message.get("events", [])), default=0)
                    self.heads[company] = max(self.heads.get(company, 0), newest)
                    await local.group_send(company_group(company), message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event hub lost Redis; consumers read the event table meanwhile")
                self.next_join = 0.0  # a restarted Redis has forgotten the groups
                await asyncio.sleep(1)

    async def _watch(self) -> None:
        """With Redis: the heads from the table once a second, for messages Redis dropped;
        and the group memberships renewed every ``REJOIN_SECONDS``."""
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() >= self.next_join:
                self.next_join = loop.time() + REJOIN_SECONDS
                await self._join(list(self.listeners))
            try:
                companies = list(self.listeners)
                if companies:
                    for company_id, head in (await self._heads(companies)).items():
                        if company_id in self.listeners:
                            self.heads[company_id] = max(self.heads.get(company_id, 0), head)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event hub could not read the heads")
            await asyncio.sleep(POLL_SECONDS)

    @db_read
    def _heads(self, companies: list[str]) -> dict[str, int]:
        return dict(Company.objects.filter(pk__in=companies).values_list("pk", "event_seq"))

    async def _relay(self) -> None:
        local = get_channel_layer(LOCAL_LAYER)
        while True:
            try:
                companies = list(self.listeners)
                if companies:
                    batches = await self._read(companies, dict(self.published))
                    for company_id, last, payloads in batches:
                        if company_id not in self.listeners:
                            continue
                        self.published[company_id] = last
                        self.heads[company_id] = max(self.heads.get(company_id, 0), last)
                        for start in range(0, len(payloads), 50):
                            await local.group_send(
                                company_group(company_id),
                                {"type": "play.events", "company": company_id, "events": payloads[start : start + 50]},
                            )
                    if any(len(p) == self.BATCH for _, _, p in batches):
                        continue
                await asyncio.sleep(self.RELAY_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event relay failed; consumers fall back to their own polling")
                await asyncio.sleep(1)

    @db_read
    def _read(self, companies: list[str], published: dict[str, int]) -> list[tuple[str, int, list[dict[str, Any]]]]:
        out = []
        for company_id, head in Company.objects.filter(pk__in=companies).values_list("pk", "event_seq"):
            last = published.get(company_id)
            if last is None:
                # New listeners catch up by themselves; publish from here on.
                out.append((company_id, head, []))
                continue
            if head <= last:
                continue
            rows = list(
                Event.objects.filter(company_id=company_id, seq__gt=last, seq__lte=head)
                .order_by("seq")
                .values_list("seq", "payload")[: self.BATCH]
            )
            newest = rows[-1][0] if len(rows) == self.BATCH else head
            out.append((company_id, newest, [payload for _, payload in rows]))
        return out


hub = Hub()
