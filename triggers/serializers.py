"""Schedules, channels and routes in the API's camelCase shape."""

from __future__ import annotations

import re
from typing import Any

from django.utils import timezone
from django.utils.text import slugify
from rest_framework import serializers

from flows import expr
from flows.expr import check as check_expressions
from flows.models import Flow
from plays.models import iso

from . import cron
from .models import (
    METHODS,
    PARAM_RE,
    SEGMENT_RE,
    AuthMode,
    Catchup,
    Channel,
    ChannelRequest,
    HmacFormat,
    Overlap,
    ResponseMode,
    Route,
    Schedule,
)


class ScheduleSerializer(serializers.ModelSerializer):
    """A schedule: ``cron`` or ``intervalSeconds``, in ``timezone``, with the args of its plays."""

    flowId = serializers.CharField(source="flow_id", read_only=True)
    name = serializers.CharField(required=False, allow_blank=True, max_length=200)
    cron = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=200,
        help_text="5-field cron expression or a preset (@hourly, @daily, …)",
    )
    intervalSeconds = serializers.IntegerField(
        source="interval_seconds", required=False, allow_null=True, min_value=1, max_value=366 * 24 * 3600
    )
    timezone = serializers.CharField(
        source="time_zone", required=False, max_length=64, help_text="IANA time zone the cron expression is read in"
    )
    args = serializers.JSONField(required=False, help_text="Args of each play; $schedule.id and $schedule.firedAt")
    overlap = serializers.ChoiceField(choices=Overlap.choices, required=False)
    catchup = serializers.ChoiceField(choices=Catchup.choices, required=False)
    catchupWindowSeconds = serializers.IntegerField(
        source="catchup_window_seconds", required=False, min_value=1, max_value=366 * 24 * 3600
    )
    enabled = serializers.BooleanField(required=False)
    endAt = serializers.DateTimeField(source="end_at", required=False, allow_null=True)

    class Meta:
        model = Schedule
        fields = [
            "id",
            "flowId",
            "name",
            "cron",
            "intervalSeconds",
            "timezone",
            "args",
            "overlap",
            "catchup",
            "catchupWindowSeconds",
            "enabled",
            "endAt",
        ]
        read_only_fields = ["id"]

    def validate_args(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise serializers.ValidationError("args must be a JSON object")
        problems = check_expressions(value)
        if problems:
            raise serializers.ValidationError(
                [f"{path or 'args'}: {'; '.join(msgs)}" for path, msgs in problems.items()]
            )
        return value

    def validate_cron(self, value: str) -> str:
        if not value:
            return ""
        try:
            return cron.expand(value)
        except cron.ScheduleSpecError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate_timezone(self, value: str) -> str:
        try:
            cron.zone(value)
        except cron.ScheduleSpecError as exc:
            raise serializers.ValidationError(str(exc)) from None
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        instance = self.instance
        cron_expr = attrs.get("cron", instance.cron if instance else "")
        interval = attrs.get("interval_seconds", instance.interval_seconds if instance else None)
        if "cron" in attrs and attrs["cron"] and "interval_seconds" not in attrs:
            interval = None  # switching a schedule from an interval to cron
        if "interval_seconds" in attrs and attrs["interval_seconds"] and "cron" not in attrs:
            cron_expr = ""
        if bool(cron_expr) == bool(interval):
            raise serializers.ValidationError({"cron": ["Give cron or intervalSeconds (one of them)"]})
        attrs["cron"], attrs["interval_seconds"] = cron_expr, interval
        return attrs

    def save(self, **kwargs: Any) -> Schedule:
        timing = {"cron", "interval_seconds", "time_zone", "enabled", "end_at"}
        changed = self.instance is None or any(
            name in self.validated_data and self.validated_data[name] != getattr(self.instance, name) for name in timing
        )
        schedule = super().save(**kwargs, updated_at=timezone.now())
        if changed:
            now = timezone.now()
            if self.instance is not None and "interval_seconds" in self.validated_data:
                schedule.anchor_at = now
            schedule.schedule_from(now)
            Schedule.objects.filter(pk=schedule.pk).update(
                anchor_at=schedule.anchor_at, next_fire_at=schedule.next_fire_at
            )
        return schedule

    def to_representation(self, schedule: Schedule) -> dict[str, Any]:
        last_play = schedule.last_play
        return {
            "id": schedule.id,
            "flowId": schedule.flow_id,
            "name": schedule.name,
            "cron": schedule.cron or None,
            "intervalSeconds": schedule.interval_seconds,
            "timezone": schedule.time_zone,
            "description": cron.explain(schedule.cron) if schedule.cron else f"Every {schedule.interval_seconds} s",
            "args": schedule.args,
            "overlap": schedule.overlap,
            "catchup": schedule.catchup,
            "catchupWindowSeconds": schedule.catchup_window_seconds,
            "enabled": schedule.enabled,
            "endAt": iso(schedule.end_at),
            "nextFireAt": iso(schedule.next_fire_at) if schedule.enabled else None,
            "nextFireTimes": [iso(t) for t in schedule.next_fire_times(5)],
            "lastFiredAt": iso(schedule.last_fired_at),
            "lastPlay": {"id": last_play.id, "state": last_play.state} if last_play else None,
            "queuedPlayId": schedule.queued_play_id,
            "lastError": schedule.last_error or None,
            "fireCount": schedule.fire_count,
            "skippedCount": schedule.skipped_count,
            "createdAt": iso(schedule.created_at),
            "updatedAt": iso(schedule.updated_at),
        }


class ScheduleOutSerializer(serializers.Serializer):
    """The schedule as the API returns it (for the schema)."""

    id = serializers.CharField()
    flowId = serializers.CharField()
    name = serializers.CharField()
    cron = serializers.CharField(allow_null=True)
    intervalSeconds = serializers.IntegerField(allow_null=True)
    timezone = serializers.CharField()
    description = serializers.CharField()
    args = serializers.DictField()
    overlap = serializers.ChoiceField(choices=Overlap.choices)
    catchup = serializers.ChoiceField(choices=Catchup.choices)
    catchupWindowSeconds = serializers.IntegerField()
    enabled = serializers.BooleanField()
    endAt = serializers.DateTimeField(allow_null=True)
    nextFireAt = serializers.DateTimeField(allow_null=True)
    nextFireTimes = serializers.ListField(child=serializers.DateTimeField())
    lastFiredAt = serializers.DateTimeField(allow_null=True)
    lastPlay = serializers.DictField(allow_null=True)
    queuedPlayId = serializers.CharField(allow_null=True)
    lastError = serializers.CharField(allow_null=True)
    fireCount = serializers.IntegerField()
    skippedCount = serializers.IntegerField()
    createdAt = serializers.DateTimeField()
    updatedAt = serializers.DateTimeField()


# --- HTTP channels --------------------------------------------------------------------


SLUG_RE = r"^[a-z0-9][a-z0-9-]{0,99}$"


class ChannelSerializer(serializers.ModelSerializer):
    slug = serializers.RegexField(
        SLUG_RE,
        required=False,
        max_length=100,
        error_messages={"invalid": "slug must be lowercase letters, digits and dashes"},
    )
    authMode = serializers.ChoiceField(
        source="auth_mode", choices=AuthMode.choices, required=False, default=AuthMode.PUBLIC
    )
    hmacFormat = serializers.ChoiceField(
        source="hmac_format", choices=HmacFormat.choices, required=False, default=HmacFormat.GITHUB
    )
    enabled = serializers.BooleanField(required=False, default=True)
    toleranceSeconds = serializers.IntegerField(
        source="tolerance_seconds", required=False, min_value=1, max_value=86400, default=300
    )
    maxBodyBytes = serializers.IntegerField(
        source="max_body_bytes", required=False, allow_null=True, min_value=1, max_value=100 * 1024 * 1024
    )
    # Write-only: an HMAC secret the sender chose (Stripe hands you its own); without one
    # the server generates it. Shown back only in the answer that set it.
    secret = serializers.CharField(required=False, write_only=True, min_length=16, max_length=255)
    createdAt = serializers.DateTimeField(source="created_at", read_only=True)
    updatedAt = serializers.DateTimeField(source="updated_at", read_only=True)

    class Meta:
        model = Channel
        fields = [
            "id",
            "name",
            "slug",
            "authMode",
            "hmacFormat",
            "enabled",
            "toleranceSeconds",
            "maxBodyBytes",
            "secret",
            "createdAt",
            "updatedAt",
        ]
        read_only_fields = ["id"]

    def to_representation(self, channel: Channel) -> dict[str, Any]:
        data = super().to_representation(channel)
        data["url"] = f"/hooks/{channel.slug}"
        data["routes"] = RouteSerializer(channel.routes.all(), many=True).data
        return data

    def validate_slug(self, value: str) -> str:
        taken = Channel.objects.filter(slug=value)
        if self.instance is not None:
            taken = taken.exclude(pk=self.instance.pk)
        if taken.exists():
            raise serializers.ValidationError(f"slug {value!r} is already used")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        mode = attrs.get("auth_mode", self.instance.auth_mode if self.instance else AuthMode.PUBLIC)
        if attrs.get("secret") and mode != AuthMode.HMAC:
            raise serializers.ValidationError({"secret": ["a secret is for authMode hmac only"]})
        return attrs

    @staticmethod
    def unique_slug(name: str) -> str:
        base = re.sub(r"[^a-z0-9-]+", "-", slugify(name)).strip("-")[:90].strip("-") or "channel"
        taken = set(Channel.objects.filter(slug__startswith=base).values_list("slug", flat=True))
        slug, n = base, 2
        while slug in taken:
            slug, n = f"{base}-{n}", n + 1
        return slug


class RouteSerializer(serializers.ModelSerializer):
    method = serializers.CharField(required=False, default="POST", max_length=8)
    path = serializers.CharField(max_length=500)
    flowIds = serializers.ListField(
        source="flow_ids", child=serializers.CharField(max_length=200), min_length=1, max_length=20
    )
    responseMode = serializers.ChoiceField(
        source="response_mode", choices=ResponseMode.choices, required=False, default=ResponseMode.ASYNC
    )
    timeoutMs = serializers.IntegerField(
        source="timeout_ms", required=False, min_value=1, max_value=120_000, default=30_000
    )
    idempotencyKey = serializers.CharField(
        source="idempotency_key", required=False, allow_blank=True, allow_null=True, max_length=500, default=""
    )
    rateLimitPerMinute = serializers.IntegerField(
        source="rate_limit_per_minute", required=False, allow_null=True, min_value=1, max_value=1_000_000
    )
    channelId = serializers.CharField(source="channel_id", read_only=True)
    createdAt = serializers.DateTimeField(source="created_at", read_only=True)

    class Meta:
        model = Route
        fields = [
            "id",
            "channelId",
            "method",
            "path",
            "flowIds",
            "responseMode",
            "timeoutMs",
            "idempotencyKey",
            "rateLimitPerMinute",
            "createdAt",
        ]
        read_only_fields = ["id"]

    def validate_method(self, value: str) -> str:
        if value.upper() not in METHODS:
            raise serializers.ValidationError(f"method must be one of {', '.join(METHODS)}")
        return value.upper()

    def validate_path(self, value: str) -> str:
        path = "/" + value.strip().strip("/")
        names = []
        for segment in path.strip("/").split("/") if path != "/" else []:
            if not SEGMENT_RE.match(segment):
                raise serializers.ValidationError(
                    f"segment {segment!r}: a path is /-separated words or {{name}} parameters, like /orders/{{orderId}}"
                )
            names += PARAM_RE.findall(segment)
        if len(names) != len(set(names)):
            raise serializers.ValidationError("a path parameter name is used twice")
        return path

    def validate_flowIds(self, value: list[str]) -> list[str]:  # noqa: N802 - the API's field name
        company_id = self.context["company_id"]
        ids, missing = [], []
        for key in value:
            flow = Flow.objects.resolve(company_id, key)
            if flow is None:
                missing.append(key)
            elif flow.pk not in ids:
                ids.append(flow.pk)
        if missing:
            raise serializers.ValidationError(f"no flow {', '.join(repr(m) for m in missing)}")
        return ids

    def validate_idempotencyKey(self, value: str | None) -> str:  # noqa: N802
        value = value or ""
        if not value:
            return ""
        errors = expr.check({"key": value})
        if errors:
            raise serializers.ValidationError([m for messages in errors.values() for m in messages])
        try:
            refs = expr.references(value)
        except Exception:  # noqa: BLE001 - reported by check() above
            refs = set()
        if refs:
            raise serializers.ValidationError(f"the key can only read the request ($prev.args), not {sorted(refs)}")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        channel = self.context["channel"]
        method = attrs.get("method", self.instance.method if self.instance else "POST")
        path = attrs.get("path", self.instance.path if self.instance else "/")
        clash = Route.objects.filter(channel=channel, method=method, path=path)
        if self.instance is not None:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            raise serializers.ValidationError({"path": [f"{method} {path} already has a route on this channel"]})
        return attrs


class RequestLogEntrySerializer(serializers.ModelSerializer):
    class Meta:
        model = ChannelRequest
        fields = ["id"]

    def to_representation(self, entry: ChannelRequest) -> dict[str, Any]:
        return entry.as_dict()
