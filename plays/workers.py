"""Worker liveness per queue: which Celery queues a live worker consumes right now.

Each Celery worker (its main process, whatever the pool) keeps one ``Worker`` row: its
name, the queues it consumes and when it was last seen. A daemon thread started on
``worker_ready`` refreshes it every ``WORKER_BEAT_SECONDS`` (10 s), and ``worker_shutdown``
deletes it. A worker that is killed stops refreshing: ``LIVE_SECONDS`` (30 s) later it no
longer counts. One small table, so it works the same on the embedded default (SQLite,
filesystem broker) and on PostgreSQL + Redis, and reading it is one query. A worker stops beating (and removes its row) as soon as its shutdown begins.

Read by ``/api/ready`` (a queue without a live worker is not ready), by the flow API and
admin (a flow saved with a queue nobody consumes gets a warning), by the play page (a play
waiting on such a queue says so) and by ``/metrics`` (``flowplay_queue_workers``).
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timedelta
from typing import Any

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from django.conf import settings
from django.db import close_old_connections, connection, models
from django.utils import timezone

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "default"


def live_seconds() -> float:
    return float(settings.FLOWPLAY.get("WORKER_LIVE_SECONDS", 30.0))


def beat_seconds() -> float:
    return float(settings.FLOWPLAY.get("WORKER_BEAT_SECONDS", 10.0))


class Worker(models.Model):
    """A Celery worker as it last reported itself."""

    name = models.CharField(primary_key=True, max_length=255, help_text="Celery's node name, e.g. celery@host.")
    queues = models.JSONField(default=list)
    pid = models.IntegerField(default=0)
    started_at = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now)

    class Meta:
        app_label = "plays"
        indexes = [
            # live_queues(): the workers seen lately.
            models.Index(fields=["last_seen"], name="plays_worker_last_seen"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({', '.join(self.queues)})"


# --- reading ---------------------------------------------------------------------------


def live_workers(now: datetime | None = None) -> list[Worker]:
    now = now or timezone.now()
    return list(Worker.objects.filter(last_seen__gte=now - timedelta(seconds=live_seconds())).order_by("name"))


def live_queues(now: datetime | None = None) -> dict[str, int]:
    """Queue name → how many live workers consume it."""
    counts: dict[str, int] = {}
    for worker in live_workers(now):
        for queue in worker.queues:
            counts[queue] = counts.get(queue, 0) + 1
    return counts


def queue_of(definition: dict[str, Any] | None) -> str:
    """The queue a flow definition's plays run on."""
    return ((definition or {}).get("execution") or {}).get("queue") or DEFAULT_QUEUE


def queue_warning(queue: str, live: dict[str, int] | None = None) -> dict[str, str] | None:
    """The warning for a flow or play on ``queue`` when no live worker consumes it."""
    if live is None:
        live = live_queues()
    if live.get(queue):
        return None
    return {
        "code": "QUEUE_WITHOUT_WORKER",
        "message": (
            f"No worker seen in the last {live_seconds():g} s consumes the queue {queue!r}: "
            f"plays of this flow wait in RUN until one does "
            f"(start one with: celery -A flowplay worker -Q {queue})."
        ),
        "queue": queue,
    }


def wanted_queues() -> set[str]:
    """The queues plays can be sent to: ``default`` and those of live (enabled) flows."""
    from flows.models import Flow

    queues = set(Flow.objects.alive().filter(enabled=True).values_list("queue", flat=True).distinct())
    return queues | {DEFAULT_QUEUE}


# --- writing (in a worker) ---------------------------------------------------------------


def beat(name: str, queues: list[str], pid: int | None = None, now: datetime | None = None) -> None:
    """Record that worker ``name`` is alive and consumes ``queues``."""
    now = now or timezone.now()
    pid = os.getpid() if pid is None else pid
    n = Worker.objects.filter(pk=name).update(queues=sorted(queues), pid=pid, last_seen=now)
    if not n:
        Worker.objects.update_or_create(
            pk=name, defaults={"queues": sorted(queues), "pid": pid, "started_at": now, "last_seen": now}
        )


def forget(name: str) -> None:
    Worker.objects.filter(pk=name).delete()


def prune(older_than: timedelta = timedelta(days=1)) -> int:
    """Delete the rows of workers gone for long (killed ones never delete their own)."""
    return Worker.objects.filter(last_seen__lt=timezone.now() - older_than).delete()[0]


def consumed_queues(consumer: Any) -> list[str]:
    """The queues a Celery consumer reads now (``-Q``, or added later with add_consumer)."""
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is not None and getattr(task_consumer, "queues", None):
        return sorted({queue.name for queue in task_consumer.queues})
    return sorted(consumer.app.amqp.queues.consume_from or [DEFAULT_QUEUE])


class Beater:
    """The thread that keeps one worker's row fresh."""

    def __init__(self, consumer: Any):
        self.consumer = consumer
        self.name = consumer.hostname
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="flowplay-worker-beat", daemon=True)

    def start(self) -> None:
        self.beat_once()
        self.thread.start()

    def beat_once(self) -> None:
        try:
            beat(self.name, consumed_queues(self.consumer))
            if not self.thread.is_alive():
                prune()
        except Exception:  # the database is down: try again next time
            log.warning("could not record worker %s as alive", self.name, exc_info=True)
            close_old_connections()
        finally:
            # Give a pooled connection back between beats (PostgreSQL); SQLite reopens cheaply.
            connection.close()

    def _loop(self) -> None:
        while not self.stopped.wait(beat_seconds()):
            self.beat_once()

    def stop(self) -> None:
        self.stopped.set()
        try:
            forget(self.name)
        except Exception:  # exiting: a stale row expires by itself
            log.warning("could not forget worker %s", self.name, exc_info=True)
        finally:
            connection.close()


_beater: Beater | None = None


@worker_ready.connect
def _start_beating(sender: Any = None, **kwargs: Any) -> None:
    global _beater
    if sender is None or not getattr(sender, "hostname", None):
        return
    _beater = Beater(sender)
    _beater.start()


@worker_shutting_down.connect
@worker_shutdown.connect
def _stop_beating(**kwargs: Any) -> None:
    """Stop counting as live as soon as a shutdown begins: a warm shutdown stops consuming
    at once, and may then wait long for running tasks (or hang in the pool's shutdown)."""
    global _beater
    if _beater is not None:
        _beater.stop()
        _beater = None


__all__ = ["Worker", "live_workers", "live_queues", "queue_warning", "queue_of", "wanted_queues", "beat", "forget"]
