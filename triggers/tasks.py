"""Celery tasks of the triggers, run by the scheduler (beat): the schedule sweep, and the
pruning of the channels' request log and remembered signatures."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from celery import shared_task
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from .models import Channel, ChannelRequest, SeenSignature, fire_due_one, start_queued_one


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


# --- HTTP channels --------------------------------------------------------------------


log = logging.getLogger(__name__)


def prune_requests_once(now: datetime | None = None, batch: int = 500) -> int:
    """Delete logged requests older than HOOK_LOG_DAYS, keeping each channel's newest
    HOOK_LOG_KEEP, and signatures past every replay window. Returns the requests deleted."""
    now = now or timezone.now()
    days = int(settings.FLOWPLAY.get("HOOK_LOG_DAYS", 14) or 0)
    keep = int(settings.FLOWPLAY.get("HOOK_LOG_KEEP", 100) or 0)
    longest = max(Channel.objects.order_by("-tolerance_seconds").values_list("tolerance_seconds", flat=True)[:1] or [0])
    SeenSignature.objects.filter(seen_at__lt=now - timedelta(seconds=longest + 60)).delete()
    if not days:
        return 0
    total = 0
    for channel_id in Channel.objects.order_by("pk").values_list("pk", flat=True):
        old = ChannelRequest.objects.filter(channel_id=channel_id, received_at__lt=now - timedelta(days=days))
        if keep:
            row = list(
                ChannelRequest.objects.filter(channel_id=channel_id)
                .order_by("-received_at", "-id")
                .values_list("received_at", "id")[keep - 1 : keep]
            )
            if not row:
                continue
            old = old.filter(Q(received_at__lt=row[0][0]) | Q(received_at=row[0][0], id__lt=row[0][1]))
        while ids := list(old.order_by().values_list("pk", flat=True)[:batch]):
            total += ChannelRequest.objects.filter(pk__in=ids).delete()[0]
    if total:
        log.info("retention: deleted %d logged channel requests", total)
    return total


@shared_task(ignore_result=True)
def prune_requests() -> int:
    return prune_requests_once()
