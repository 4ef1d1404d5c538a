"""Celery application, as in Celery's "First steps with Django"."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_process_init
from kombu.transport import TRANSPORT_ALIASES

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flowplay.settings")

# The embedded broker publishes atomically; see flowplay/broker.py.
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

    DatabaseWrapper._connection_pools.clear()
