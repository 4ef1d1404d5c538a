"""Celery tasks of the triggers: the schedule sweep run by the scheduler (beat)."""

from __future__ import annotations

import time

from celery import shared_task

from .models import fire_due_one, start_queued_one


@shared_task(ignore_result=True)
def fire_schedules(budget: float = 2.0) -> int:
    """Periodic: fire every due schedule, then start queued plays whose turn has come."""
    done = 0
    ends = time.monotonic() + budget
    while time.monotonic() < ends and fire_due_one():
        done += 1
    while time.monotonic() < ends and start_queued_one():
        done += 1
    return done
