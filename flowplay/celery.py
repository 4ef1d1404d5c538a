"""Celery application, as in Celery's "First steps with Django"."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flowplay.settings")

app = Celery("flowplay")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
