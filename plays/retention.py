"""Retention: delete finished plays (with their layers and events) once they are old enough.

Per flow:
- plays that ended more than ``Flow.retention_days`` ago (default ``RETENTION_DAYS``; 0 or
  unset = for ever) are deleted;
- ``FILTERED`` plays (nothing ran) go after ``RETENTION_FILTERED_DAYS`` already, or the
  flow's own days if those are fewer;
- the newest ``Flow.retention_keep`` finished plays (default ``RETENTION_KEEP``) are kept
  whatever their age.

Only terminal plays are touched. Work goes in batches of ``RETENTION_BATCH`` plays, each in
its own short transaction that deletes rows by primary key: no statement scans or locks
the plays table as a whole, so runners and API requests go on meanwhile. The periodic
task ``plays.tasks.prune_old_plays`` calls ``prune()`` with a time budget; what is left
over is done on its next run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from flows.models import Flow

from .models import TERMINAL, Approval, Event, Iteration, Layer, Play, State

log = logging.getLogger(__name__)


def config(name: str, default: int) -> int:
    return int(settings.FLOWPLAY.get(name, default) or 0)


@dataclass(frozen=True)
class Policy:
    days: int  # 0: keep for ever
    filtered_days: int  # 0: like ``days``
    keep: int

    @classmethod
    def of(cls, flow: Flow) -> Policy:
        days = flow.retention_days if flow.retention_days is not None else config("RETENTION_DAYS", 0)
        filtered = config("RETENTION_FILTERED_DAYS", 7)
        if days and (not filtered or days < filtered):
            filtered = days
        keep = flow.retention_keep if flow.retention_keep is not None else config("RETENTION_KEEP", 100)
        return cls(days=days or 0, filtered_days=filtered or 0, keep=keep or 0)

    def candidates(self, flow_id: str, now: datetime) -> Any:
        """The flow's plays this policy deletes (a queryset of ids), or None."""
        ends = Q()
        if self.days:
            ends |= Q(completed_at__lt=now - timedelta(days=self.days))
        if self.filtered_days:
            ends |= Q(state=State.FILTERED, completed_at__lt=now - timedelta(days=self.filtered_days))
        if not ends:
            return None
        finished = Play.objects.filter(flow_id=flow_id, state__in=TERMINAL)
        qs = finished.filter(ends)
        if self.keep:
            boundary = finished.order_by("-created_at", "-id").values_list("created_at", "id")[self.keep - 1 : self.keep]
            row = list(boundary)
            if not row:
                return None  # fewer finished plays than we keep
            created, pk = row[0]
            qs = qs.filter(Q(created_at__lt=created) | Q(created_at=created, id__lt=pk))
        # No ORDER BY: any batch of deletable rows will do, and on a table of millions the
        # database can stop at the first ``batch`` matches instead of sorting them all.
        return qs.order_by().values_list("id", flat=True)


def delete_plays(ids: list[str]) -> int:
    """Delete these finished plays and everything that hangs on them, in one transaction."""
    if not ids:
        return 0
    with transaction.atomic():
        # Lock just these rows; a play that is not terminal (any more) is left alone.
        ids = list(Play.objects.select_for_update().filter(pk__in=ids, state__in=TERMINAL).values_list("id", flat=True))
        if not ids:
            return 0
        # Children first, each a single DELETE by play id; then the plays. Rows elsewhere
        # that point at them (retries, subflow children, reused layers) are set to NULL.
        Play.objects.filter(retry_of_id__in=ids).update(retry_of=None)
        Play.objects.filter(parent_id__in=ids).update(parent=None, parent_layer=None)
        Layer.objects.filter(reused_from__play_id__in=ids).update(reused_from=None)
        Event.objects.filter(play_id__in=ids).delete()
        Approval.objects.filter(play_id__in=ids).delete()
        Iteration.objects.filter(play_id__in=ids).delete()
        Layer.objects.filter(play_id__in=ids).delete()
        deleted, _ = Play.objects.filter(pk__in=ids, state__in=TERMINAL).delete()
    return len(ids) if deleted else 0


def prune(now: datetime | None = None, batch: int | None = None, budget_seconds: float = 20.0) -> int:
    """Apply every flow's retention policy; return how many plays were deleted."""
    now = now or timezone.now()
    batch = batch or config("RETENTION_BATCH", 200)
    ends = time.monotonic() + budget_seconds
    total = 0
    flows = Flow.objects.order_by("id").only("id", "retention_days", "retention_keep")
    for flow in flows.iterator(chunk_size=200):
        policy = Policy.of(flow)
        while time.monotonic() < ends:
            candidates = policy.candidates(flow.id, now)
            if candidates is None:
                break
            ids = list(candidates[:batch])
            if not ids:
                break
            n = delete_plays(ids)
            total += n
            if n == 0:
                break
        if time.monotonic() >= ends:
            break
    if total:
        log.info("retention: deleted %d finished plays", total)
    return total


__all__ = ["Policy", "prune", "delete_plays"]
