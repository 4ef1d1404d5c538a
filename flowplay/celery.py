"""Celery application, as in Celery's "First steps with Django"."""

from __future__ import annotations

import os

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flowplay.settings")

# The embedded broker publishes atomically; see flowplay/broker.py.
TRANSPORT_ALIASES["filesystem"] = "flowplay.broker:Transport"

app = Celery("flowplay")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
