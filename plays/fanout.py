"""Publish stored events to the WebSocket consumers through the channel layer.

The ``Event`` rows are the truth; the channel layer is only a doorbell that carries the
payloads so a consumer rarely has to read them back. With Redis configured, each process
sends through one background thread with its own event loop (so a runner never waits on
Redis, and the channels-redis connection pool lives as long as the process). Without
Redis, the web process relays new rows from the database instead (see consumers.py), so
nothing is sent from here.
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
        self._queue: queue.SimpleQueue[tuple[str, list[dict[str, Any]]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def send(self, company_id: str, payloads: list[dict[str, Any]]) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, name="flowplay-publisher", daemon=True)
                self._thread.start()
        if self._queue.qsize() >= MAX_PENDING:
            log.warning("channel-layer publisher is %d batches behind; dropping %d events", MAX_PENDING, len(payloads))
            return
        self._queue.put((company_id, payloads))

    def _run(self) -> None:
        from channels.layers import get_channel_layer

        loop = asyncio.new_event_loop()
        layer = get_channel_layer()
        while True:
            company_id, payloads = self._queue.get()
            try:
                loop.run_until_complete(
                    layer.group_send(
                        company_group(company_id), {"type": "play.events", "company": company_id, "events": payloads}
                    )
                )
            except Exception:  # Redis down: consumers catch up from the database
                log.warning("could not publish %d events to the channel layer", len(payloads), exc_info=True)


publisher = Publisher()


def publish_on_commit(company_id: str, payloads: list[dict[str, Any]]) -> None:
    events_committed(payloads)  # metrics: plays started and finished (plays/metrics.py)
    if not settings.REDIS_URL:
        return
    transaction.on_commit(lambda: publisher.send(company_id, payloads))
