"""What starts plays besides the API: HTTP channels (and, with triggers/mcp.py, MCP tools).

A ``Channel`` is a company's inbound endpoint, served at ``/hooks/<slug>/…`` by the ASGI
app in ``triggers/channels.py``; its ``Route``s map a method and a path to flows. Every
request that reaches a known channel leaves a ``ChannelRequest`` row (the request log).
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, models, transaction
from django.db.models import F, Q
from django.utils import timezone

from flows.ids import new_id
from flows.models import Company, Flow, hash_token


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
    flow_ids = models.JSONField(default=list)
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
    headers = models.JSONField(default=dict, blank=True)
    query = models.JSONField(default=dict, blank=True)
    body = models.JSONField(null=True, blank=True)

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
