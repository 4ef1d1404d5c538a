"""Celery application, as in Celery's "First steps with Django"."""

from __future__ import annotations

import os

from celery import Celery
from celery.fixups.django import DjangoWorkerFixup
from celery.signals import worker_init, worker_process_init, worker_process_shutdown
from kombu.transport import TRANSPORT_ALIASES

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flowplay.settings")

# kombu's alias table, so that every filesystem:// URL (web, worker, beat) gets the
# transport that publishes atomically (flowplay/broker.py). Checked in tests/test_shims.py.
TRANSPORT_ALIASES["filesystem"] = "flowplay.broker:Transport"

app = Celery("flowplay")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
def _leave_the_parents_database_pool(**kwargs: object) -> None:
    """A prefork child must not use a connection pool its parent opened: the pool's threads
    do not survive the fork and its connections are the parent's sockets. Forget it; the
    child opens its own on first use. (Celery's Django fixup closes plain connections.)"""
    from django.db.backends.postgresql.base import DatabaseWrapper

    # Django's private pool per process and alias (no public way to drop it without closing
    # the parent's connections). Checked in tests/test_shims.py.
    DatabaseWrapper._connection_pools.clear()


def _close_connections_keep_pool(self: DjangoWorkerFixup) -> None:
    """Celery's clean-up before and after each task, without closing the connection pool.

    Celery's Django fixup closes each connection (with a pool: hands it back) and then, in
    a prefork child, the whole pool, so every task's first query opened a new pool and a
    new PostgreSQL connection: ~10 ms of a play's start (celery/celery#10554). A child's
    pool is its own (``_leave_the_parents_database_pool``); it is closed when the child
    exits (``_close_the_childs_database_pool``)."""
    for conn in self._db.connections.all(initialized_only=True):
        try:
            conn.close()
        except self.interface_errors:
            pass
        except self.DatabaseError as exc:
            if "closed" not in str(exc) and "not connected" not in str(exc):
                raise


# A private method of Celery's Django fixup, replaced whole: Celery offers no setting for it.
# tests/test_shims.py checks that Celery still calls it before and after each task.
DjangoWorkerFixup._close_database = _close_connections_keep_pool


@worker_process_shutdown.connect
def _close_the_childs_database_pool(**kwargs: object) -> None:
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        close_pool = getattr(conn, "close_pool", None)
        if close_pool is not None:
            try:
                close_pool()
            except Exception:  # noqa: BLE001  (exiting: a pool already gone is fine)
                pass


@worker_init.connect
def _clean_metrics(**kwargs: object) -> None:
    """Drop the metric files of processes of a previous start (plays/metrics.py)."""
    from plays.metrics import clean_multiproc_dir

    clean_multiproc_dir()


@worker_process_shutdown.connect
def _drop_live_gauges(pid: int | None = None, **kwargs: object) -> None:
    from plays.metrics import process_exited

    process_exited(pid or os.getpid())
