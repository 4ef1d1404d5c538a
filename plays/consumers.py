"""The live event stream: ``ws://<host>:4454/api/ws``.

Each connection has a ``position`` in its company's event stream (see
``EventQuerySet.replay``): every event at or before it has been delivered or filtered
out, none after it. Events reach it two ways:

1. from this process's hub (``plays/hub.py``), which reads each listened-to company's
   events from the table once, in cursor order, and queues every connection a contiguous
   range: the events after ``after``, the hub's previous position;
2. by reading the ``Event`` table itself: on connect (``?since=<cursor>``), when a range
   starts past the connection's position (its queue was full and dropped one), when the
   hub is further than the connection with nothing queued (the end of a burst was
   dropped), and every ``FULL_CHECK_ROUNDS`` quiet seconds.

Both sources are prefixes of one order that never grows in the middle, so "every event
after ``position``, in order" is exactly what the client must see next, whichever path
brings it: no gap, no duplicate. One task per connection sends both, in order.

Who may connect, the parameters and the close codes: ``plays/wsauth.py``. A refused
connection is first accepted, then closed with its code: a close before the accept would
reach the client as a bare HTTP 403 (Daphne), whatever the reason. 4008 closes a client
that reads too slowly (its send buffer stayed over the high-water mark for
``STALL_SECONDS``, or it fell more than ``MAX_LAG`` events behind); 1011 an internal
error. Either way the client reconnects with ``?since=<the last cursor received>``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer

from .hub import LiveRange, created, db_read, hub
from .metrics import REPLAY_SECONDS, WS_EVENT_LAG
from .models import Event, Position, decode_cursor, encode_cursor
from .wsauth import (
    CLOSE_ERROR,
    CLOSE_TOO_SLOW,
    CLOSE_UNAUTHORIZED,
    SEND_BACKLOG,
    SERVER_SEND,
    Admission,
    Refused,
    admit,
    still_authorized,
)

log = logging.getLogger(__name__)

CATCH_UP_BATCH = 500
FULL_CHECK_ROUNDS = 30
POLL_SECONDS = 1.0
AUTH_CHECK_SECONDS = 10.0
# Ranges queued from the hub; past this the newest are dropped and read from the table.
QUEUED_RANGES = 100

# Back-pressure. Past the high-water mark of unsent bytes the consumer stops sending (and
# reading: new events wait in the database) until the buffer is under the low-water mark.
SEND_HIGH_WATER = 1024 * 1024
SEND_LOW_WATER = 256 * 1024
STALL_SECONDS = 15.0
MAX_LAG = 20000


class TooSlow(Exception):
    pass


class PlayEventsConsumer(AsyncWebsocketConsumer):
    # Events come from the hub, not from a channel layer: no channel per connection.
    channel_layer_alias = None
    who: Admission | None = None
    position: Position = (0, 0)
    sender: asyncio.Task | None = None
    closing = False

    async def connect(self) -> None:
        try:
            who = await admit(self.scope)
        except Refused as refused:
            self.closing = True
            await self.accept()
            await self.close(code=refused.code)
            return
        self.who = who
        self.queue: deque[LiveRange] = deque()
        self.queued = asyncio.Event()
        head = await self._head()
        # A since beyond the stream's head cannot be a cursor this stream gave out (a
        # database restored from a backup, another server): start at the head instead of
        # silently skipping the events still to come up to it.
        self.position = head if who.since is None else min(who.since, head)
        await hub.listen(who.company_id, self._offer)
        await self.accept()
        # The sender's first round replays ?since= before anything else is sent.
        self.sender = asyncio.create_task(self._send_loop())

    async def disconnect(self, code: int) -> None:
        self.closing = True
        if self.sender is not None:
            self.sender.cancel()
        if self.who is not None:
            await hub.unlisten(self.who.company_id, self._offer)

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

    def _offer(self, live: LiveRange) -> None:
        """The hub's listener: queue the range for the sender (drop it when full)."""
        if len(self.queue) < QUEUED_RANGES:
            self.queue.append(live)
        self.queued.set()

    async def _send_loop(self) -> None:
        assert self.who is not None
        loop = asyncio.get_running_loop()
        next_auth = loop.time() + AUTH_CHECK_SECONDS
        quiet_rounds = 0
        try:
            await self._catch_up()  # ?since=
            while not self.closing:
                try:
                    await asyncio.wait_for(self.queued.wait(), POLL_SECONDS)
                except TimeoutError:
                    quiet_rounds += 1
                self.queued.clear()
                while self.queue and not self.closing:
                    await self._send_range(self.queue.popleft())
                # With nothing queued the hub being ahead means a range was dropped.
                if quiet_rounds >= FULL_CHECK_ROUNDS or hub.position(self.who.company_id) > self.position:
                    quiet_rounds = 0
                    await self._catch_up()
                now = loop.time()
                if now >= next_auth:
                    next_auth = now + AUTH_CHECK_SECONDS
                    if not await self._still_authorized():
                        self.closing = True
                        await self.close(code=CLOSE_UNAUTHORIZED, reason="credentials revoked")
                        return
        except asyncio.CancelledError:
            raise
        except TooSlow as exc:
            await self._close_too_slow(str(exc))
        except Exception:
            log.exception("event stream failed; closing so that the client reconnects with ?since=")
            self.closing = True
            await self.close(code=CLOSE_ERROR)

    async def _send_range(self, live: LiveRange) -> None:
        assert self.who is not None
        if live.after > self.position:
            # A range before this one was dropped: the table has it, and maybe this one too.
            await self._catch_up()
        mine = encode_cursor(self.position)
        play_id, flow_id = self.who.play_id, self.who.flow_id
        for event in live.events:
            if event.cursor > mine:  # fixed-width cursors sort as strings
                self.position = decode_cursor(event.cursor)
                if (not play_id or event.play_id == play_id) and (not flow_id or event.flow_id == flow_id):
                    await self._send_event(event.text, event.created)
        self.position = max(self.position, live.reached)

    async def _catch_up(self) -> None:
        while not self.closing:
            messages, reached = await self._read(self.position)
            for payload in messages:
                if self.closing:
                    return
                self.position = decode_cursor(payload["cursor"])
                await self._send_event(json.dumps(payload), created(payload))
            self.position = max(self.position, reached)
            if len(messages) < CATCH_UP_BATCH:
                break

    async def _send_event(self, text: str, stamp: float | None) -> None:
        if self.closing:
            return  # closed by us (too slow, revoked) while this task was on its way here
        # Straight to the server (wsauth.SendBacklogMiddleware says why), so the delivery
        # lag is observed here, not by the metrics middleware; replays are not lag.
        send = self.scope.get(SERVER_SEND) or self.base_send
        await send({"type": "websocket.send", "text": text})
        if stamp is not None and 0 <= (lag := time.time() - stamp) < REPLAY_SECONDS:
            WS_EVENT_LAG.observe(lag)
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
        assert self.who is not None
        log.info("closing slow WebSocket client of company %s at %s: %s", self.who.company_id, self.position, why)
        self.closing = True
        await self.close(code=CLOSE_TOO_SLOW, reason="too far behind; reconnect with since")

    # -- database -------------------------------------------------------------------------

    @db_read
    def _read(self, after: Position) -> tuple[list[dict[str, Any]], Position]:
        """This connection's events after ``after`` and the position read up to."""
        assert self.who is not None
        return Event.objects.replay(
            self.who.company_id, after, CATCH_UP_BATCH, play_id=self.who.play_id, flow_id=self.who.flow_id
        )

    @db_read
    def _head(self) -> Position:
        assert self.who is not None
        return Event.objects.head(self.who.company_id)

    @db_read
    def _lag(self) -> int:
        """How many of the company's events are after this connection's position (up to
        MAX_LAG + 1)."""
        assert self.who is not None
        return Event.objects.after(self.who.company_id, self.position)[: MAX_LAG + 1].count()

    @db_read
    def _still_authorized(self) -> bool:
        assert self.who is not None
        return still_authorized(self.scope, self.who)
