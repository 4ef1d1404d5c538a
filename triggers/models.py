"""What starts plays besides a person: schedules, HTTP channels (and, with triggers/mcp.py,
MCP tools).

A ``Schedule`` fires plays of a flow at cron or interval times. A ``Channel`` is a
company's inbound endpoint, served at ``/hooks/<slug>/…`` by the ASGI app in
``triggers/channels.py``; its ``Route``s map a method and a path to flows. Every request
that reaches a known channel leaves a ``ChannelRequest`` row (the request log).
"""

from __future__ import annotations

import logging
import re
import secrets
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models import F, Q
from django.utils import timezone

from flows.models import Flow
from plays.models import NON_TERMINAL, IdempotencyConflict, Play, State, TriggerKind, iso
from tenancy.ids import new_id
from tenancy.models import Company, hash_token
from tenancy.storable import StorableJSONField

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
    args = StorableJSONField(default=dict, blank=True)
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


# --- HTTP channels --------------------------------------------------------------------


class AuthMode(models.TextChoices):
    PUBLIC = "public"
    """Anyone who knows the URL."""
    HEADER_TOKEN = "header_token"
    """A generated token in ``Authorization: Bearer …`` or ``X-Hook-Token``; stored hashed."""
    HMAC = "hmac"
    """An HMAC-SHA256 signature of the raw body with a shared secret (see HmacFormat)."""


class HmacFormat(models.TextChoices):
    GITHUB = "github"
    """``X-Hub-Signature-256: sha256=<hex of HMAC(secret, body)>``."""
    STRIPE = "stripe"
    """``Stripe-Signature: t=<unix>,v1=<hex of HMAC(secret, "<t>.<body>")>``."""
    GENERIC = "generic"
    """``X-Signature-Timestamp: <unix>`` and ``X-Signature: sha256=<hex of HMAC(secret, "<t>.<body>")>``."""


class ResponseMode(models.TextChoices):
    SYNC = "sync"
    """Wait for the play (up to the route's timeout) and answer with its last step's output."""
    ASYNC = "async"
    """Answer 202 with the play id at once."""


class ChannelQuerySet(models.QuerySet):
    def for_company(self, company_id: str) -> ChannelQuerySet:
        return self.filter(company_id=company_id)


class Channel(models.Model):
    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    company = models.ForeignKey(Company, on_delete=models.CASCADE, related_name="channels")
    name = models.CharField(max_length=200)
    # Unique across companies: the URL /hooks/<slug>/… names no company.
    slug = models.SlugField(max_length=100, unique=True)
    auth_mode = models.CharField(max_length=16, choices=AuthMode, default=AuthMode.PUBLIC)
    hmac_format = models.CharField(max_length=16, choices=HmacFormat, default=HmacFormat.GITHUB)
    # header_token: only the SHA-256 of the token is kept (like API keys).
    token_hash = models.CharField(max_length=64, blank=True, default="", editable=False)
    # hmac: the shared secret itself, since checking a signature needs it; never shown
    # again after it was set (API: write-only; admin: not displayed).
    secret = models.CharField(max_length=255, blank=True, default="")
    # Seconds a signed request's timestamp may be off, and a signature is remembered
    # against replays.
    tolerance_seconds = models.PositiveIntegerField(default=300)
    max_body_bytes = models.PositiveIntegerField(
        null=True, blank=True, help_text="Default: FLOWPLAY_HOOK_MAX_BODY_BYTES"
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    objects = ChannelQuerySet.as_manager()

    class Meta:
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return f"{self.name} (/hooks/{self.slug})"

    def issue_credential(self) -> str | None:
        """Set a new token (header_token) or secret (hmac) and return it; None for public."""
        if self.auth_mode == AuthMode.HEADER_TOKEN:
            token = f"fph_{secrets.token_urlsafe(32)}"
            self.token_hash, self.secret = hash_token(token), ""
            return token
        if self.auth_mode == AuthMode.HMAC:
            self.secret, self.token_hash = secrets.token_hex(32), ""
            return self.secret
        self.secret = self.token_hash = ""
        return None

    def remember_signature(self, digest: str, now: datetime | None = None) -> bool:
        """Record a signature as used; False if it was already used within the replay window.

        The unique constraint decides, so two web processes that receive the same signed
        request at once cannot both accept it.
        """
        now = now or timezone.now()
        SeenSignature.objects.filter(
            channel=self, digest=digest, seen_at__lt=now - timedelta(seconds=self.tolerance_seconds)
        ).delete()
        try:
            with transaction.atomic():
                SeenSignature.objects.create(channel=self, digest=digest, seen_at=now)
        except IntegrityError:
            return False
        return True


PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
SEGMENT_RE = re.compile(r"^(?:[A-Za-z0-9._~!$&'()*+,;=:@%-]+|\{[A-Za-z_][A-Za-z0-9_]*\})$")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def compile_path(path: str) -> re.Pattern[str]:
    """``/orders/{orderId}`` → a regex with one named group per parameter (one segment each)."""
    parts = []
    for segment in path.strip("/").split("/") if path.strip("/") else []:
        match = PARAM_RE.fullmatch(segment)
        parts.append(f"(?P<{match.group(1)}>[^/]+)" if match else re.escape(segment))
    return re.compile("^/" + "/".join(parts) + "/?$" if parts else "^/?$")


class Route(models.Model):
    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    channel = models.ForeignKey(Channel, on_delete=models.CASCADE, related_name="routes")
    method = models.CharField(max_length=8, default="POST")
    path = models.CharField(max_length=500, help_text="e.g. /orders/{orderId}")
    # The flows this route starts, in order; the first one's play answers a sync request.
    flow_ids = StorableJSONField(default=list)
    response_mode = models.CharField(max_length=8, choices=ResponseMode, default=ResponseMode.ASYNC)
    timeout_ms = models.PositiveIntegerField(default=30_000)
    # An expression over the request (as $prev.args) whose value is the play's idempotency key.
    idempotency_key = models.CharField(max_length=500, blank=True, default="")
    rate_limit_per_minute = models.PositiveIntegerField(null=True, blank=True)
    # The rate limiter's fixed window (minute start) and the requests counted in it.
    rate_window = models.DateTimeField(null=True, blank=True, editable=False)
    rate_count = models.PositiveIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["path", "method"]
        constraints = [
            models.UniqueConstraint(fields=["channel", "method", "path"], name="triggers_route_unique_method_path"),
        ]

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def pattern(self) -> re.Pattern[str]:
        return compile_path(self.path)

    def flows(self) -> list[Flow]:
        """The route's live flows in its order (a deleted flow drops out)."""
        found = {f.pk: f for f in Flow.objects.alive().filter(company_id=self.channel.company_id, pk__in=self.flow_ids)}
        return [found[pk] for pk in self.flow_ids if pk in found]

    def take_rate_slot(self, now: datetime | None = None) -> int:
        """Count one request against the per-minute limit; return 0 if it may pass, else the
        seconds until the window ends (the Retry-After).

        Compare-and-set on the route row: counting in the current window, or opening a new
        window, is each one conditional UPDATE; a process that loses the race to open
        the window counts in it instead.
        """
        limit = self.rate_limit_per_minute
        if not limit:
            return 0
        now = now or timezone.now()
        window = now.replace(second=0, microsecond=0)
        routes = Route.objects.filter(pk=self.pk)
        for _ in range(2):
            if routes.filter(rate_window=window, rate_count__lt=limit).update(rate_count=F("rate_count") + 1):
                return 0
            if routes.filter(Q(rate_window__isnull=True) | ~Q(rate_window=window)).update(
                rate_window=window, rate_count=1
            ):
                return 0
            if routes.filter(rate_window=window, rate_count__gte=limit).exists():
                break
        return max(1, int((window + timedelta(minutes=1) - now).total_seconds() + 0.999))


class SeenSignature(models.Model):
    """A signature an HMAC channel accepted, kept for its replay window."""

    channel = models.ForeignKey(Channel, on_delete=models.CASCADE, related_name="+")
    digest = models.CharField(max_length=64)
    seen_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["channel", "digest"], name="triggers_seensignature_unique")]
        indexes = [
            # prune_requests(): expired signatures.
            models.Index(fields=["seen_at"], name="triggers_seensignature_seen"),
        ]

    def __str__(self) -> str:
        return self.digest


class ChannelRequest(models.Model):
    """One request to a channel: when, which route, what was answered, how fast, which play."""

    id = models.CharField(primary_key=True, max_length=24, default=new_id, editable=False)
    channel = models.ForeignKey(Channel, on_delete=models.CASCADE, related_name="requests")
    route = models.ForeignKey(Route, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # The play it started (or found by its idempotency key). A plain id, not a foreign
    # key: retention deletes plays and the request log keeps naming them.
    play_id = models.CharField(max_length=24, blank=True, default="")
    received_at = models.DateTimeField(default=timezone.now)
    method = models.CharField(max_length=8)
    path = models.CharField(max_length=2000)
    status = models.PositiveSmallIntegerField()
    error = models.CharField(max_length=64, blank=True, default="")
    latency_ms = models.PositiveIntegerField(default=0)
    remote_addr = models.CharField(max_length=64, blank=True, default="")
    # Redacted like step outputs (plays/redaction.py); the body is cut at MAX_LOGGED_BODY.
    headers = StorableJSONField(default=dict, blank=True)
    query = StorableJSONField(default=dict, blank=True)
    body = StorableJSONField(null=True, blank=True)

    class Meta:
        ordering = ["-received_at", "-id"]
        indexes = [
            # The channel page and its admin list, newest first.
            models.Index(fields=["channel", "-received_at", "-id"], name="triggers_request_channel"),
            # prune_requests(): the oldest rows.
            models.Index(fields=["received_at"], name="triggers_request_received"),
        ]

    def __str__(self) -> str:
        return f"{self.method} {self.path} → {self.status}"

    def as_dict(self) -> dict[str, Any]:
        from plays.models import iso

        return {
            "id": self.pk,
            "receivedAt": iso(self.received_at),
            "routeId": self.route_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "error": self.error or None,
            "latencyMs": self.latency_ms,
            "playId": self.play_id or None,
            "headers": self.headers,
            "query": self.query,
            "body": self.body,
        }
