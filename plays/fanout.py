"""After commit, ring the doorbell of the company's live stream.

The ``Event`` rows are the truth: each web process's hub (``plays/hub.py``) reads them
from the table in cursor order. With Redis configured, a commit that stored events
publishes the newest cursor on the company's pub/sub channel (channels-redis'
``RedisPubSubChannelLayer``), which wakes the hubs at once. Each process sends through one
background thread with its own event loop (so a runner never waits on Redis); doorbells
that queue up meanwhile are merged, one per company. Without Redis the hubs poll the
table, so nothing is sent from here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from typing import Any

from django.conf import settings
from django.db import transaction

from .metrics import events_committed

log = logging.getLogger(__name__)


# Payload batches waiting for Redis in one process. Past this the publisher drops new ones
# (the consumers read them from the table) rather than grow without bound while Redis is
# slow or down.
MAX_PENDING = 10000


def company_group(company_id: str) -> str:
    return f"company.{company_id}"


class Publisher:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def send(self, company_id: str, cursor: str) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, name="flowplay-publisher", daemon=True)
                self._thread.start()
        if self._queue.qsize() >= MAX_PENDING:
            log.warning("channel-layer publisher is %d doorbells behind; dropping one", MAX_PENDING)
            return
        self._queue.put((company_id, cursor))

    def _run(self) -> None:
        from channels.layers import get_channel_layer

        loop = asyncio.new_event_loop()
        layer = get_channel_layer()
        while True:
            newest = dict([self._queue.get()])
            while not self._queue.empty():  # merge what queued up meanwhile
                company_id, cursor = self._queue.get()
                newest[company_id] = max(newest.get(company_id, ""), cursor)
            for company_id, cursor in newest.items():
                try:
                    loop.run_until_complete(layer.group_send(company_group(company_id), doorbell(company_id, cursor)))
                except Exception:  # Redis down: the hubs poll the table
                    log.warning("could not ring the live stream's doorbell", exc_info=True)


def doorbell(company_id: str, cursor: str) -> dict[str, Any]:
    """The message: the company's events up to ``cursor`` are committed."""
    return {"type": "events.committed", "company": company_id, "cursor": cursor}


publisher = Publisher()


def publish_on_commit(company_id: str, payloads: list[dict[str, Any]]) -> None:
    events_committed(payloads)  # metrics: plays started and finished (plays/metrics.py)
    if not settings.REDIS_URL:
        return
    if payloads:
        newest = max(p["cursor"] for p in payloads)
        transaction.on_commit(lambda: publisher.send(company_id, newest))
