"""The live event stream: ``ws://<host>:4454/api/ws``.

Each connection has a ``position`` in its company's event stream (see
``EventQuerySet.replay``): every event at or before it has been delivered or filtered
out, none after it. Events reach it two ways:

1. from this process's ``Hub``, which reads each listened-to company's events from the
   table in cursor order (woken by the Redis doorbell that writers ring after commit, or
   polling without Redis) and hands every consumer a contiguous range: the events after
   ``after``, the hub's previous position;
2. by reading the ``Event`` table itself: on connect (``?since=<cursor>``), when a range
   from the hub starts past the connection's position (a message dropped by a full
   channel), when the hub is further than the connection (the end of a burst was
   dropped), and every ``FULL_CHECK_ROUNDS`` s.

Both sources are prefixes of one order that never grows in the middle, so "every event
after ``position``, in order" is exactly what the client must see next, whichever path
brings it: no gap, no duplicate.

Close codes. A refused connection is first accepted, then closed with its code: a close
before the accept would reach the client as a bare HTTP 403 (Daphne), whatever the reason.

- 4400: bad query parameters (``since`` not a cursor; see ``ws_params``).
- 4401: no credentials, an unknown or revoked API key, a bad token beside a valid cookie;
  or, later, credentials no longer valid (key revoked, user deactivated, logged out).
- 4403: credentials fine but not for this: the API key has scopes and ``read`` is not one of
  them, or the user's role may not view plays (flows/permissions.py); ``playId``/``flowId``
  names no play or flow of the caller's company; a cookie handshake from another origin's page.
- 4008: the client reads too slowly: its send buffer stayed over the high-water mark
  for ``STALL_SECONDS`` or it fell more than ``MAX_LAG`` events behind. Reconnect with
  ``?since=<the last cursor received>`` to lose nothing.
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

from flows.models import Flow
from tenancy.models import ApiKey
from tenancy.permissions import VIEW_PLAY, key_allows

from .fanout import company_group
from .models import START, Event, Position, decode_cursor, encode_cursor
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
    """The connection's query parameters, checked: ``since`` (a cursor's position or None), ``playId``,
    ``flowId`` (str or None). Raises ``Refused(4400)`` for a malformed one."""
    query = parse_qs(query_string.decode(errors="replace"))
    since_raw = (query.get("since") or [""])[0]
    try:
        since = decode_cursor(since_raw) if since_raw else None
    except ValueError:
        raise Refused(CLOSE_BAD_REQUEST) from None
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
    position: Position = START
    group: str | None = None
    poller: asyncio.Task | None = None
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
        head = await self._head()
        # A since beyond the stream's head cannot be a cursor this stream gave out (a
        # database restored from a backup, another server): start at the head instead of
        # silently skipping the events still to come up to it.
        self.position = head if since is None else min(since, head)
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
        if self.poller is not None:
            self.poller.cancel()
        if self.group:
            self.group = None
            await self.channel_layer.group_discard(company_group(self.company_id), self.channel_name)
            await hub.unsubscribe(self.company_id)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # Clients only listen; {"type": "ping"} gets a pong with the position: the cursor to
        # resume from if nothing arrived yet.
        try:
            content = json.loads(text_data or "")
        except ValueError:
            return
        if isinstance(content, dict) and content.get("type") == "ping" and not self.closing:
            await self.send(text_data=json.dumps({"type": "pong", "cursor": encode_cursor(self.position)}))

    # -- delivery -------------------------------------------------------------------------

    async def play_events(self, message: dict[str, Any]) -> None:
        """Channel-layer handler: the hub's next range of this company's events, each as
        ``[cursor, playId, flowId, text]`` (encoded once for all the process's consumers)."""
        if self.closing:
            return
        async with self.lock:
            try:
                if tuple(message["after"]) > self.position:
                    # A range before this one never arrived (a full channel dropped it):
                    # the table has it, and maybe this one's events already.
                    await self._catch_up_locked()
                mine = encode_cursor(self.position)
                for cursor, play_id, flow_id, text in message["events"]:
                    if cursor > mine:  # fixed-width cursors sort as strings
                        self.position = decode_cursor(cursor)
                        if self._wanted({"playId": play_id, "flowId": flow_id}):
                            await self._send_text(text)
                self.position = max(self.position, tuple(message["reached"]))
            except TooSlow as exc:
                await self._close_too_slow(str(exc))

    def _wanted(self, payload: dict[str, Any]) -> bool:
        if self.play_id and payload.get("playId") != self.play_id:
            return False
        if self.flow_id and payload.get("flowId") != self.flow_id:
            return False
        return True

    async def _send_event(self, payload: dict[str, Any]) -> None:
        await self._send_text(json.dumps(payload))

    async def _send_text(self, text: str) -> None:
        if self.closing:
            return  # closed by us (too slow, revoked) while this task was on its way here
        await self.send(text_data=text)
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
                lag = await self._lag()
                if lag > MAX_LAG:
                    raise TooSlow(f"{lag} events behind")
                next_lag_check = now + 1.0
            await asyncio.sleep(0.05)

    async def _close_too_slow(self, why: str) -> None:
        log.info("closing slow WebSocket client of company %s at %s: %s", self.company_id, self.position, why)
        self.closing = True
        await self.close(code=CLOSE_TOO_SLOW, reason="too far behind; reconnect with since")

    async def _catch_up_locked(self) -> None:
        while not self.closing:
            messages, reached = await self._read(self.position)
            for payload in messages:
                if self.closing:
                    return
                self.position = decode_cursor(payload["cursor"])
                await self._send_event(payload)
            self.position = max(self.position, reached)
            if len(messages) < CATCH_UP_BATCH:
                break

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        next_auth = loop.time() + AUTH_CHECK_SECONDS
        next_join = loop.time() + REJOIN_SECONDS
        rounds = 0
        try:
            while not self.closing:
                # The table is read on the first round (the ?since= replay), when the hub has
                # gone further than this connection (the end of a burst did not arrive here),
                # and every FULL_CHECK_ROUNDS anyway.
                if rounds % FULL_CHECK_ROUNDS == 0 or hub.positions.get(self.company_id, START) > self.position:
                    async with self.lock:
                        await self._catch_up_locked()
                rounds += 1
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
    def _read(self, after: Position) -> tuple[list[dict[str, Any]], Position]:
        """This connection's events after ``after`` and the position read up to."""
        return Event.objects.replay(self.company_id, after, CATCH_UP_BATCH, play_id=self.play_id, flow_id=self.flow_id)

    @db_read
    def _head(self) -> Position:
        return Event.objects.head(self.company_id)

    @db_read
    def _lag(self) -> int:
        """How many of the company's events are after this connection's position (up to
        MAX_LAG + 1)."""
        return Event.objects.after(self.company_id, self.position)[: MAX_LAG + 1].count()

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


# --- The hub: one reader per process --------------------------------------------------


class Hub:
    """Bring each company's events into this process once, in cursor order, for all its
    consumers here.

    Consumers join groups of the process-local channel layer (``"local"``). For each
    company with listeners here the hub keeps a position and reads the events after it
    from the table (``Event.objects.replay``: only what is final in cursor order), then
    hands them to the company's local group as one range (``after``, the events,
    ``reached``). It reads when woken:

    - with Redis, by the doorbell the writers ring after commit (``fanout.py``): one
      channel of this process in each listened-to company's Redis group, so a commit
      costs one Redis message per web process, not per WebSocket. When the events rung
      for are not final yet (an older transaction still runs), it reads again shortly;
      and it reads every ``POLL_SECONDS`` anyway, for doorbells Redis dropped;
    - without Redis (embedded), every ``RELAY_SECONDS``.

    A range a consumer misses (a full channel) only costs latency: the consumer sees
    that the next one starts past its position, or that the hub is ahead, and reads the
    table.
    """

    RELAY_SECONDS = 0.05
    RETRY_SECONDS = (0.002, 0.005, 0.01, 0.02, 0.05)
    BATCH = 1000

    def __init__(self) -> None:
        self.listeners: Counter[str] = Counter()
        self.positions: dict[str, Position] = {}
        # Companies rung for, with the newest cursor rung.
        self.rung: dict[str, str] = {}
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.pump: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock: asyncio.Lock | None = None
        self.channel: str | None = None
        self.watcher: asyncio.Task | None = None
        self.next_join = 0.0

    async def subscribe(self, company_id: str) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            # A new event loop (tests run one per case): what belonged to the old one is gone.
            self.loop, self.lock, self.task, self.pump, self.channel = loop, asyncio.Lock(), None, None, None
            self.watcher = None
            self.wake = asyncio.Event()
            self.listeners.clear()
            self.positions.clear()
            self.rung.clear()
        assert self.lock is not None
        async with self.lock:
            if self.listeners[company_id] == 0:
                # New listeners catch up by themselves; the hub goes on from here.
                self.positions[company_id] = await self._head(company_id)
            self.listeners[company_id] += 1
            if self.pump is None or self.pump.done():
                self.pump = loop.create_task(self._pump())
            if settings.REDIS_URL and (self.task is None or self.task.done()):
                self.channel = await get_channel_layer().new_channel("flowplay-hub")
                self.next_join = loop.time() + REJOIN_SECONDS
                self.task = loop.create_task(self._bridge())
                self.watcher = loop.create_task(self._watch())
                await self._join(list(self.listeners))
            elif self.listeners[company_id] == 1 and self.channel:
                await self._join([company_id])

    async def _join(self, companies: list[str]) -> None:
        """Put this process's hub channel in the companies' Redis groups.

        Never fails the caller: without Redis the hub polls the event table, and the
        watcher joins again within ``REJOIN_SECONDS``.
        """
        try:
            for company in companies:
                await get_channel_layer().group_add(company_group(company), self.channel)
        except Exception:
            log.warning("event hub could not join its Redis groups; it polls the event table", exc_info=True)
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
                self.positions.pop(company_id, None)
                self.rung.pop(company_id, None)
                if self.channel:
                    try:
                        await get_channel_layer().group_discard(company_group(company_id), self.channel)
                    except Exception:  # Redis down: the membership expires by itself
                        log.warning("event hub could not leave a Redis group", exc_info=True)

    def ring(self, company_id: str, cursor: str) -> None:
        """Events of the company up to ``cursor`` were committed: read them soon."""
        if company_id in self.listeners and self.wake is not None:
            self.rung[company_id] = max(self.rung.get(company_id, ""), cursor)
            self.wake.set()

    async def _bridge(self) -> None:
        """With Redis: the writers' doorbells, from this process's hub channel."""
        redis_layer = get_channel_layer()
        while True:
            try:
                message = await redis_layer.receive(self.channel)
                events = message.get("events") or []
                if events:
                    self.ring(message.get("company"), max(e["cursor"] for e in events))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event hub lost Redis; it polls the event table meanwhile")
                self.next_join = 0.0  # a restarted Redis has forgotten the groups
                await asyncio.sleep(1)

    async def _watch(self) -> None:
        """With Redis: the group memberships renewed every ``REJOIN_SECONDS``."""
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() >= self.next_join:
                self.next_join = loop.time() + REJOIN_SECONDS
                await self._join(list(self.listeners))
            await asyncio.sleep(min(POLL_SECONDS, REJOIN_SECONDS))

    async def _pump(self) -> None:
        assert self.wake is not None
        loop = asyncio.get_running_loop()
        local = get_channel_layer(LOCAL_LAYER)
        retries = 0
        next_sweep = 0.0
        while True:
            try:
                redis = bool(settings.REDIS_URL)
                if self.rung and retries:
                    timeout = self.RETRY_SECONDS[min(retries, len(self.RETRY_SECONDS)) - 1]
                else:
                    timeout = max(0.0, next_sweep - loop.time()) if redis else self.RELAY_SECONDS
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout)
                except TimeoutError:
                    pass
                self.wake.clear()
                if not redis or loop.time() >= next_sweep:
                    companies = list(self.listeners)
                    next_sweep = loop.time() + POLL_SECONDS
                else:
                    companies = [c for c in self.rung if c in self.listeners]
                waiting = False
                for company_id in companies:
                    waiting |= await self._relay(local, company_id)
                retries = retries + 1 if waiting else 0
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event hub could not read the event table; consumers poll it themselves")
                await asyncio.sleep(1)

    async def _relay(self, local: Any, company_id: str) -> bool:
        """Send the company's new events to its local group; True if some that were rung
        for are not final yet."""
        while company_id in self.listeners:
            after = self.positions[company_id]
            events, reached = await self._read(company_id, after)
            if company_id not in self.listeners or self.positions.get(company_id) != after:
                return False  # unsubscribed (and maybe subscribed again) meanwhile
            if events:
                last = decode_cursor(events[-1]["cursor"])
                self.positions[company_id] = last
                for start in range(0, len(events), 100):
                    chunk = events[start : start + 100]
                    await local.group_send(
                        company_group(company_id),
                        {
                            "type": "play.events",
                            "company": company_id,
                            "after": list(after if start == 0 else decode_cursor(events[start - 1]["cursor"])),
                            "events": [hub_event(e) for e in chunk],
                            "reached": list(decode_cursor(chunk[-1]["cursor"])),
                        },
                    )
            if len(events) < self.BATCH:
                break
        rung = self.rung.get(company_id)
        if rung is not None and rung > encode_cursor(self.positions.get(company_id, START)):
            return True
        self.rung.pop(company_id, None)
        return False

    @db_read
    def _read(self, company_id: str, after: Position) -> tuple[list[dict[str, Any]], Position]:
        return Event.objects.replay(company_id, after, self.BATCH)

    @db_read
    def _head(self, company_id: str) -> Position:
        return Event.objects.head(company_id)


def hub_event(message: dict[str, Any]) -> list[Any]:
    """An event as the hub hands it to its consumers: what they filter on, and its text."""
    return [message["cursor"], message.get("playId"), message.get("flowId"), json.dumps(message)]


hub = Hub()
