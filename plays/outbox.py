"""After commit, what leaves this process: tasks to the broker, the live stream's doorbell.

Tasks (``send_on_commit``): a broker error never turns a saved change into a failure. A
verb that starts work (run, approve, resume, retry, start, a loop's next items, a freed
concurrency slot) saves its change, then hands a task to the broker once the transaction
has committed. If the broker cannot take it (Redis down), the change stays saved: the
error is logged, the play or iteration is marked as having no task (``unsent``: an expired
lease and no runner, which the reaper's next sweep requeues once the broker is back), and
the request's answer says so (``BrokerNoticeMiddleware``: header ``Flowplay-Warning`` and
a ``warning`` field in a JSON object body). Clients must not send the request again.

The doorbell (``publish_on_commit``): the ``Event`` rows are the truth, and each web
process's hub (``plays/hub.py``) reads them from the table in cursor order. With Redis
configured, a commit that stored events publishes the newest cursor on the company's
pub/sub channel (channels-redis' ``RedisPubSubChannelLayer``), which wakes the hubs at
once. Each process sends through one background thread with its own event loop (so a
runner never waits on Redis); doorbells that queue up meanwhile are merged, one per
company. Without Redis the hubs poll the table, so nothing is sent from here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from django.conf import settings
from django.db import transaction

from .metrics import events_committed

log = logging.getLogger(__name__)

# Tasks to the broker

BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"
WARNING = {
    "code": BROKER_UNAVAILABLE,
    "message": "Saved. The task queue could not be reached; the work starts when it is back "
    "(the reaper requeues it). Do not send this request again.",
}

# The tasks of the current request that could not be sent (None outside a request).
_unsent: ContextVar[list[str] | None] = ContextVar("flowplay_unsent_tasks", default=None)


def send_on_commit(send: Callable[[], Any], what: str, unsent: Callable[[], Any] | None = None) -> None:
    """Call ``send`` (e.g. ``task.apply_async``) after the current transaction commits; if
    it raises, log it, call ``unsent`` (which marks the work for the reaper) and note it for
    the request's answer."""

    def run() -> None:
        try:
            send()
        except Exception:  # kombu/redis connection errors, OSError, a full queue: never the caller's 500
            log.warning("could not send %s to the broker; the reaper will requeue it", what, exc_info=True)
            noted = _unsent.get()
            if noted is not None:
                noted.append(what)
            if unsent is not None:
                try:
                    unsent()
                except Exception:  # the database went too: the reaper's idle rule still finds it
                    log.exception("could not mark %s for the reaper", what)

    transaction.on_commit(run)


class BrokerNoticeMiddleware:
    """Tell the client that its saved change waits for the broker (see the module docstring)."""

    def __init__(self, get_response: Callable[[Any], Any]):
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        noted: list[str] = []
        token = _unsent.set(noted)
        try:
            response = self.get_response(request)
        finally:
            _unsent.reset(token)
        if noted and response.status_code < 400:
            response["Flowplay-Warning"] = BROKER_UNAVAILABLE
            data = getattr(response, "data", None)
            if isinstance(data, dict) and getattr(response, "accepted_renderer", None) is not None:
                data["warning"] = WARNING
                response.content = response.rendered_content
        return response


# The live stream's doorbell

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
