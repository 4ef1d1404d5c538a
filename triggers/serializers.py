from __future__ import annotations

from typing import Any

from django.utils import timezone
from rest_framework import serializers

from flows.expr import check as check_expressions
from plays.models import iso

from . import cron
from .models import Catchup, Overlap, Schedule


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
