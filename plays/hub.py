"""This web process's reader of the event stream: each company's events read once, in
cursor order, and handed to every listener here (the WebSocket consumers, the waiting
sync requests of ``triggers/waiting.py``).

Why a hub of our own rather than a channel layer's groups (channels-redis'
``RedisPubSubChannelLayer`` already has one subscription per group per process and a
local fan-out): a listener must see the events in cursor order with no gap, and a
commit's message is in commit order, which is not cursor order (``EventQuerySet.replay``).
Only the table, read behind the horizon, gives that order, so the messages are a doorbell
only and the table is read once per process per company, not once per connection. The
embedded default has no Redis at all: there the hub polls the table.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from .models import START, Event, Position, decode_cursor, encode_cursor
from .outbox import company_group

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


class LiveEvent(NamedTuple):
    """An event as the hub hands it out: what listeners filter on, and its JSON text
    (encoded once for every listener of the process)."""

    cursor: str
    play_id: str | None
    flow_id: str | None
    type: str | None
    text: str
    created: float | None  # its timestamp, seconds since the epoch


class LiveRange(NamedTuple):
    """The company's events after ``after`` up to ``reached``, in cursor order, none left out."""

    after: Position
    events: list[LiveEvent]
    reached: Position


# Called by the hub on its event loop, synchronously: it must only queue the range.
Listener = Callable[[LiveRange], None]


def live_event(message: dict[str, Any]) -> LiveEvent:
    return LiveEvent(
        message["cursor"],
        message.get("playId"),
        message.get("flowId"),
        message.get("type"),
        json.dumps(message),
        created(message),
    )


def created(message: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(message["timestamp"].replace("Z", "+00:00")).timestamp()
    except (KeyError, AttributeError, ValueError):
        return None


# DB reads run on the default thread pool, not on the single thread that Django's sync
# views share, so that reads of the stream do not queue API requests.
def db_read(func: Any) -> Any:
    return database_sync_to_async(func, thread_sensitive=False)


class Hub:
    """For each company with listeners here: a position, and the events after it read from
    the table (``Event.objects.replay``: only what is final in cursor order) and handed to
    each listener as a ``LiveRange``. It reads when woken:

    - with Redis, by the doorbell that writers publish after commit (``outbox.py``) on the
      company's pub/sub channel, which this process subscribes to once; when the events
      rung for are not final yet (an older transaction still runs) it reads again shortly;
      and every ``POLL_SECONDS`` anyway, for doorbells lost (pub/sub delivers at most once);
    - without Redis (embedded), every ``RELAY_SECONDS``.

    A listener that drops a range (its queue full) sees that the next one starts past its
    position, or that the hub is ahead, and reads the table itself.
    """

    RELAY_SECONDS = 0.05
    RETRY_SECONDS = (0.002, 0.005, 0.01, 0.02, 0.05)
    BATCH = 1000
    CHUNK = 100
    # Subscriptions that failed (Redis down) are tried again this often; pub/sub
    # subscriptions themselves are restored by redis-py when it reconnects.
    JOIN_SECONDS = 5.0

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listeners: dict[str, set[Listener]] = {}
        self.positions: dict[str, Position] = {}
        self.rung: dict[str, str] = {}  # company -> the newest cursor rung for
        self.joined: set[str] = set()
        self.wake = asyncio.Event()
        self.channel: str | None = None
        self.tasks: list[asyncio.Task] = []

    def position(self, company_id: str) -> Position:
        """How far the hub has handed out the company's events (START if not listened to)."""
        return self.positions.get(company_id, START)

    async def listen(self, company_id: str, listener: Listener) -> None:
        self._bind()
        if company_id not in self.listeners:
            # New listeners catch up by themselves; the hub goes on from the head.
            head = await self._head(company_id)
            if company_id not in self.listeners:
                self.listeners[company_id], self.positions[company_id] = set(), head
        self.listeners[company_id].add(listener)
        if company_id not in self.joined:
            await self._join()

    async def unlisten(self, company_id: str, listener: Listener) -> None:
        if self.loop is not asyncio.get_running_loop():
            return
        listeners = self.listeners.get(company_id)
        if listeners is None:
            return
        listeners.discard(listener)
        if not listeners:
            del self.listeners[company_id]
            self.positions.pop(company_id, None)
            self.rung.pop(company_id, None)
            if company_id in self.joined:
                self.joined.discard(company_id)
                try:
                    await get_channel_layer().group_discard(company_group(company_id), self.channel)
                except Exception:  # Redis down: the subscription ends with the connection
                    log.warning("event hub could not leave a Redis channel", exc_info=True)

    def ring(self, company_id: str, cursor: str) -> None:
        """Events of the company up to ``cursor`` were committed: read them soon."""
        if company_id in self.listeners:
            self.rung[company_id] = max(self.rung.get(company_id, ""), cursor)
            self.wake.set()

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is loop:
            return
        # A new event loop (tests run one per case): what belonged to the old one is gone.
        self.loop, self.wake = loop, asyncio.Event()
        self.listeners, self.positions, self.rung, self.joined = {}, {}, {}, set()
        self.channel = None
        self.tasks = [loop.create_task(self._pump())]
        if settings.REDIS_URL:
            self.tasks.append(loop.create_task(self._doorbells()))

    async def _doorbells(self) -> None:
        """With Redis: ring for each doorbell on this process's channel. (Never cancel a
        pub/sub layer's ``receive``: it takes the cancellation for the channel's end.)"""
        layer = get_channel_layer()
        while self.channel is None:
            try:
                self.channel = await layer.new_channel("flowplay-hub.")
            except Exception:
                log.warning("event hub cannot reach Redis; it polls the event table meanwhile", exc_info=True)
                await asyncio.sleep(1)
        self.tasks.append(asyncio.get_running_loop().create_task(self._joiner()))
        while True:
            message = await layer.receive(self.channel)
            self.ring(message.get("company"), message.get("cursor") or "")

    async def _join(self) -> None:
        """Subscribe to the channels of the companies listened to and not joined yet."""
        if self.channel is None:
            return
        for company_id in [c for c in self.listeners if c not in self.joined]:
            try:
                await get_channel_layer().group_add(company_group(company_id), self.channel)
                self.joined.add(company_id)
            except Exception:  # Redis down: polled meanwhile, joined again later
                log.warning("event hub could not join a Redis channel; it polls the event table", exc_info=True)
                return

    async def _joiner(self) -> None:
        while True:
            await self._join()
            await asyncio.sleep(self.JOIN_SECONDS)

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
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
                    waiting |= await self._relay(company_id)
                retries = retries + 1 if waiting else 0
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event hub could not read the event table; listeners poll it themselves")
                await asyncio.sleep(1)

    async def _relay(self, company_id: str) -> bool:
        """Hand the company's new events to its listeners; True if some that were rung for
        are not final yet."""
        while company_id in self.listeners:
            after = self.positions[company_id]
            events, _ = await self._read(company_id, after)
            if company_id not in self.listeners or self.positions.get(company_id) != after:
                return False  # unlistened (and maybe listened to again) meanwhile
            if events:
                # Position and hand-out in one step of the loop: a listener that finds the
                # hub ahead of it once its queue is empty has dropped a range.
                self.positions[company_id] = decode_cursor(events[-1]["cursor"])
                listeners = list(self.listeners[company_id])
                start_after = after
                for start in range(0, len(events), self.CHUNK):
                    chunk = [live_event(e) for e in events[start : start + self.CHUNK]]
                    reached = decode_cursor(chunk[-1].cursor)
                    live = LiveRange(start_after, chunk, reached)
                    for listener in listeners:
                        try:
                            listener(live)
                        except Exception:
                            log.exception("event hub listener failed")
                    start_after = reached
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


hub = Hub()
