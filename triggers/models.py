"""What starts plays besides a person: schedules (and, beside them, HTTP channels and MCP)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone

from flows.ids import new_id
from flows.models import Company, Flow
from plays.models import NON_TERMINAL, IdempotencyConflict, Play, State, TriggerKind, iso

from . import cron

log = logging.getLogger(__name__)


class Overlap(models.TextChoices):
    SKIP = "skip"
    """A fire while the schedule's previous play has not ended is skipped."""
    QUEUE = "queue"
    """A fire while the previous play runs waits (NEW) and starts when it ends; one at most."""
    ALLOW = "allow"
    """Every fire starts a play."""


class Catchup(models.TextChoices):
    NONE = "none"
    """Fires missed while no scheduler ran are dropped."""
    LATEST = "latest"
    """Only the newest missed fire happens."""
    ALL = "all"
    """Every missed fire within the catch-up window happens (the newest 100 at most)."""


def schedule_config(name: str) -> Any:
    return settings.FLOWPLAY[name]


class Schedule(models.Model):
    """Starts plays of a flow at the times of a cron expression or a fixed interval.

    Each fire has an idempotency key derived from the schedule and its nominal time
    (``schedule:<id>:<time>``), so two schedulers, a restarted one or a retried task
    cannot start one fire twice: the play table's unique constraint decides.
    """

    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    company = models.ForeignKey(Company, on_delete=models.CASCADE, related_name="+")
    flow = models.ForeignKey(Flow, on_delete=models.CASCADE, related_name="schedules")
    name = models.CharField(max_length=200, blank=True, default="")
    cron = models.CharField(max_length=200, blank=True, default="")
    interval_seconds = models.PositiveIntegerField(null=True, blank=True)
    time_zone = models.CharField(max_length=64, default="UTC")
    args = models.JSONField(default=dict, blank=True)
    overlap = models.CharField(max_length=8, choices=Overlap, default=Overlap.SKIP)
    catchup = models.CharField(max_length=8, choices=Catchup, default=Catchup.NONE)
    catchup_window_seconds = models.PositiveIntegerField(default=86400)
    enabled = models.BooleanField(default=True)
    end_at = models.DateTimeField(null=True, blank=True)
    # Intervals count from here: fire times are anchor_at + k × interval.
    anchor_at = models.DateTimeField(default=timezone.now)
    # The next nominal fire time; null once end_at has passed.
    next_fire_at = models.DateTimeField(null=True, blank=True)
    last_fired_at = models.DateTimeField(null=True, blank=True)
    last_play = models.ForeignKey(Play, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # overlap=queue: the play created NEW while the previous one ran; started when it ends.
    queued_play = models.ForeignKey(Play, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    last_error = models.TextField(blank=True, default="")
    fire_count = models.PositiveIntegerField(default=0)
    skipped_count = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            # fire_due_one(): enabled schedules by next fire time.
            models.Index(fields=["next_fire_at"], condition=Q(enabled=True), name="triggers_schedule_due"),
            # start_queued_one(): schedules holding a queued play.
            models.Index(
                fields=["updated_at"], condition=Q(queued_play__isnull=False), name="triggers_schedule_queued"
            ),
        ]

    def __str__(self) -> str:
        return self.name or f"{self.cron or f'every {self.interval_seconds} s'} ({self.time_zone})"

    # -- time -----------------------------------------------------------------------------

    @property
    def spec(self) -> cron.Spec:
        return cron.Spec(
            cron=cron.expand(self.cron) if self.cron else None,
            interval=self.interval_seconds,
            tz=cron.zone(self.time_zone),
            anchor=self.anchor_at,
        )

    def next_fire_times(self, count: int = 5, after: datetime | None = None) -> list[datetime]:
        """The next ``count`` nominal fire times (none past ``end_at``)."""
        if not self.enabled:
            return []
        start = after or max(timezone.now(), (self.next_fire_at or timezone.now()) - timedelta(microseconds=1))
        times = []
        for t in self.spec.after(start):
            if self.end_at is not None and t > self.end_at or len(times) == count:
                break
            times.append(t)
        return times

    def schedule_from(self, moment: datetime) -> None:
        """Set the next fire time to the first one after ``moment`` (unsaved)."""
        following = next(self.spec.after(moment))
        self.next_fire_at = None if self.end_at is not None and following > self.end_at else following

    # -- verbs ----------------------------------------------------------------------------

    def pause(self) -> None:
        Schedule.objects.filter(pk=self.pk).update(enabled=False, updated_at=timezone.now())
        self.enabled = False

    def resume(self) -> None:
        """Fires go on from now; what fell due while paused is not caught up."""
        now = timezone.now()
        self.enabled = True
        self.schedule_from(now)
        Schedule.objects.filter(pk=self.pk).update(enabled=True, next_fire_at=self.next_fire_at, updated_at=now)

    def fire_due(self, now: datetime) -> int:
        """Fire what is due at ``now`` by the catch-up and overlap policies; return the
        number of plays started or queued. Call inside a transaction holding the row."""
        assert self.next_fire_at is not None
        fires, following = cron.plan(
            self.spec,
            self.next_fire_at,
            now,
            catchup=self.catchup,
            grace=schedule_config("SCHEDULE_GRACE_SECONDS"),
            window=self.catchup_window_seconds,
        )
        if self.end_at is not None:
            fires = [t for t in fires if t <= self.end_at]
        made = sum(1 for t in fires if self.fire(t) is not None)
        self.next_fire_at = None if self.end_at is not None and following > self.end_at else following
        Schedule.objects.filter(pk=self.pk).update(next_fire_at=self.next_fire_at, updated_at=now)
        return made

    def fire(self, nominal: datetime, *, manual: bool = False) -> Play | None:
        """Start (or queue) the play of the fire at ``nominal``, by the overlap policy.

        Returns the play, or None when the fire was skipped (overlap, flow disabled, args
        that do not render) or had already happened. ``manual``: POST …/trigger, which
        fires at once whatever the overlap policy says.
        """
        from flows.expr import ExpressionError, Scope, render

        flow = Flow.objects.filter(pk=self.flow_id).first()
        fired_at = iso(nominal)
        key = f"schedule:{self.pk}:{fired_at}"
        if flow is None or flow.deleted_at is not None or not flow.enabled:
            return self._skipped(f"fire at {fired_at} skipped: the flow is disabled or deleted")
        if Play.objects.filter(flow_id=self.flow_id, idempotency_key=key).exists():
            return None  # fired already (a FAIL play too: its key would be free again)
        start = True
        if not manual and self.overlap != Overlap.ALLOW:
            running = self._running().exists()
            queued = self.queued_play_id is not None and self._running(states=[State.NEW]).exists()
            if queued or (running and self.overlap == Overlap.SKIP):
                return self._skipped("")
            start = not running
        try:
            args = render(
                self.args or {},
                Scope(prev={"args": {}}, flow_id=self.flow_id, schedule={"id": self.pk, "firedAt": fired_at}),
            )
        except ExpressionError as exc:
            return self._skipped(f"fire at {fired_at} skipped: args: {exc}")
        if not isinstance(args, dict):
            return self._skipped(f"fire at {fired_at} skipped: args must be an object")
        try:
            play, created = Play.trigger(
                flow,
                args,
                idempotency_key=key,
                start=start,
                source={"kind": TriggerKind.SCHEDULE, "scheduleId": self.pk, "firedAt": fired_at},
            )
        except IdempotencyConflict:
            return None  # another scheduler fired it with args rendered a moment apart
        if not created:
            return None
        changes: dict[str, Any] = {
            "last_fired_at": nominal,
            "last_play": play,
            "fire_count": models.F("fire_count") + 1,
            "last_error": "",
            "updated_at": timezone.now(),
        }
        if not start:
            changes["queued_play"] = play
        Schedule.objects.filter(pk=self.pk).update(**changes)
        self.last_fired_at, self.last_play, self.last_error = nominal, play, ""
        if not start:
            self.queued_play = play
        return play

    def start_queued(self) -> bool:
        """overlap=queue: start the queued play once no earlier play of the schedule runs."""
        if self.queued_play_id is None or self._running(exclude=self.queued_play_id).exists():
            return False
        play = Play.objects.select_related("flow_version").filter(pk=self.queued_play_id, state=State.NEW).first()
        Schedule.objects.filter(pk=self.pk).update(queued_play=None, updated_at=timezone.now())
        self.queued_play = None
        return play is not None and play.start()

    def _running(self, states: Any = None, exclude: str | None = None) -> Any:
        """This schedule's plays that have not ended (by default: not NEW either)."""
        qs = Play.objects.filter(
            flow_id=self.flow_id,
            state__in=list(states or (NON_TERMINAL - {State.NEW})),
            trigger_kind=TriggerKind.SCHEDULE,
            trigger_info__scheduleId=self.pk,
        )
        return qs.exclude(pk=exclude) if exclude else qs

    def _skipped(self, error: str) -> None:
        if error:
            log.warning("schedule %s: %s", self.pk, error)
        Schedule.objects.filter(pk=self.pk).update(
            skipped_count=models.F("skipped_count") + 1, last_error=error[:2000], updated_at=timezone.now()
        )
        self.last_error = error
        return None

    def recent_plays(self, count: int = 5) -> list[Play]:
        return list(
            Play.objects.filter(
                flow_id=self.flow_id, trigger_kind=TriggerKind.SCHEDULE, trigger_info__scheduleId=self.pk
            )
            .select_related("flow_version")
            .order_by("-created_at", "-id")[:count]
        )


def fire_due_one(now: datetime | None = None) -> bool:
    """Fire one due schedule. Return False when none is due."""
    now = now or timezone.now()
    with transaction.atomic():
        # skip_locked: several schedulers share the work; the fire's key keeps each fire
        # single even if two ever handled one schedule.
        schedule = (
            Schedule.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(enabled=True, next_fire_at__lte=now, flow__deleted_at__isnull=True)
            .order_by("next_fire_at")
            .first()
        )
        if schedule is None:
            return False
        try:
            schedule.fire_due(now)
        except cron.ScheduleSpecError as exc:  # a time zone that vanished from tzdata
            Schedule.objects.filter(pk=schedule.pk).update(enabled=False, last_error=str(exc))
    return True


def start_queued_one() -> bool:
    """Start one queued play whose schedule's previous play has ended."""
    with transaction.atomic():
        for schedule in Schedule.objects.select_for_update(skip_locked=True).filter(queued_play__isnull=False)[:50]:
            if schedule.start_queued():
                return True
    return False
