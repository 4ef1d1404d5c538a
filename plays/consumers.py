"""The live event stream: ``ws://<host>/api/ws``.

Each connection tracks the last ``seq`` it delivered. Events reach it two ways: as
payloads on its company's channel-layer group (the fast path), and by reading the
``Event`` table (on connect with ``?since=``, when a gap in ``seq`` shows that a message
was lost or reordered, and on a periodic check). Because ``seq`` is allocated under a
per-company row lock, sequence order is commit order, so "everything after my last seq,
in order" is exactly what a client must see: no gap, no duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings

from flows.models import Company

from .fanout import company_group
from .models import Event, Play

log = logging.getLogger(__name__)

CATCH_UP_BATCH = 500
# A client that has not taken this many events is too far behind: close it; it can
# reconnect with ?since= and lose nothing.
MAX_BACKLOG = 5000
POLL_SECONDS = 1.0


class PlayEventsConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        query = parse_qs(self.scope.get("query_string", b"").decode(errors="replace"))
        self.company_id = user.company_id
        self.play_id = (query.get("playId") or [None])[0]
        self.flow_id = (query.get("flowId") or [None])[0]
        since_raw = (query.get("since") or [None])[0]
        try:
            since = int(since_raw) if since_raw not in (None, "") else None
        except ValueError:
            await self.close(code=4400)
            return
        if self.flow_id:
            self.flow_id = await self._resolve_flow(self.flow_id)
        self.lock = asyncio.Lock()
        self.last_seq = since if since is not None else await self._current_seq()
        self.group = company_group(self.company_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        if not settings.REDIS_URL:
            ensure_relay()
        await self.catch_up()
        self.poller = asyncio.create_task(self._poll())

    async def disconnect(self, code: int) -> None:
        poller = getattr(self, "poller", None)
        if poller is not None:
            poller.cancel()
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # Clients only listen; a {"type": "ping"} gets a pong so browsers can check liveness.
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong", "seq": self.last_seq})

    async def play_events(self, message: dict[str, Any]) -> None:
        """Channel-layer handler: a batch of stored events of this company."""
        async with self.lock:
            events = message["events"]
            if events and events[0]["seq"] > self.last_seq + 1:
                await self._catch_up_locked()
                return
            for payload in events:
                if payload["seq"] <= self.last_seq:
                    continue
                if payload["seq"] != self.last_seq + 1:
                    await self._catch_up_locked()
                    return
                await self._deliver(payload)

    async def _deliver(self, payload: dict[str, Any]) -> None:
        self.last_seq = payload["seq"]
        if self.play_id and payload["playId"] != self.play_id:
            return
        if self.flow_id and payload["flowId"] != self.flow_id:
            return
        await self.send_json(payload)

    async def catch_up(self) -> None:
        async with self.lock:
            await self._catch_up_locked()

    async def _catch_up_locked(self) -> None:
        while True:
            rows, newest = await self._read(self.last_seq)
            for payload in rows:
                await self.send_json(payload)
            if newest is None:
                return
            self.last_seq = newest
            if len(rows) < CATCH_UP_BATCH:
                return

    async def _poll(self) -> None:
        try:
            while True:
                await asyncio.sleep(POLL_SECONDS)
                await self.catch_up()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("event poll failed; closing so the client reconnects with ?since=")
            await self.close(code=1011)

    @database_sync_to_async
    def _read(self, after: int) -> tuple[list[dict[str, Any]], int | None]:
        """Events after ``after`` (filters applied) and the newest seq looked at."""
        seqs = list(
            Event.objects.filter(company_id=self.company_id, seq__gt=after)
            .order_by("seq")
            .values_list("seq", "play_id", "flow_id")[:CATCH_UP_BATCH]
        )
        if not seqs:
            return [], None
        wanted = [s for s, play, flow in seqs
                  if (not self.play_id or play == self.play_id) and (not self.flow_id or flow == self.flow_id)]
        payloads = list(
            Event.objects.filter(company_id=self.company_id, seq__in=wanted).order_by("seq").values_list("payload", flat=True)
        ) if wanted else []
        return payloads, seqs[-1][0]

    @database_sync_to_async
    def _current_seq(self) -> int:
        return Company.objects.filter(pk=self.company_id).values_list("event_seq", flat=True).first() or 0

    @database_sync_to_async
    def _resolve_flow(self, key: str) -> str:
        from flows.models import Flow

        flow = Flow.objects.filter(company_id=self.company_id).filter(pk=key).first() or \
            Flow.objects.filter(company_id=self.company_id, permanent_id=key, deleted_at__isnull=True).first()
        return flow.pk if flow else key


# --- Embedded relay -------------------------------------------------------------------

_relay: asyncio.Task | None = None


def ensure_relay() -> None:
    """Without Redis, workers cannot reach this process's in-memory channel layer: read new
    Event rows here and publish them to the local groups instead."""
    global _relay
    if _relay is None or _relay.done():
        _relay = asyncio.get_running_loop().create_task(_relay_loop())


async def _relay_loop() -> None:
    layer = get_channel_layer()
    last_id = await database_sync_to_async(lambda: Event.objects.order_by("-id").values_list("id", flat=True).first() or 0)()
    while True:
        try:
            rows = await database_sync_to_async(
                lambda: list(Event.objects.filter(id__gt=last_id).order_by("id").values_list("id", "company_id", "payload")[:1000])
            )()
            by_company: dict[str, list[dict[str, Any]]] = {}
            for row_id, company_id, payload in rows:
                by_company.setdefault(company_id, []).append(payload)
                last_id = row_id
            for company_id, payloads in by_company.items():
                payloads.sort(key=lambda p: p["seq"])
                await layer.group_send(company_group(company_id), {"type": "play.events", "events": payloads})
            if len(rows) < 1000:
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event relay failed")
            await asyncio.sleep(1)


__all__ = ["PlayEventsConsumer", "Play"]
