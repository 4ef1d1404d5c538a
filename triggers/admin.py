"""Schedules; channels with their routes, and the request log (read-only), in the admin.

A channel's token hash and secret are never shown; new credentials come from the API
(``POST /api/channels/{id}/rotate``). Staff who are not superusers see their company's.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from plays.admin import pretty_json
from plays.models import iso
from tenancy.admin import TenantMixin
from tenancy.audit import record

from . import cron
from .models import Channel, ChannelRequest, Route, Schedule


class ScheduleForm(forms.ModelForm):
    class Meta:
        model = Schedule
        fields = [
            "flow",
            "name",
            "cron",
            "interval_seconds",
            "time_zone",
            "args",
            "overlap",
            "catchup",
            "catchup_window_seconds",
            "enabled",
            "end_at",
        ]

    def clean_cron(self) -> str:
        value = self.cleaned_data.get("cron") or ""
        try:
            return cron.expand(value) if value else ""
        except cron.ScheduleSpecError as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_time_zone(self) -> str:
        value = self.cleaned_data.get("time_zone") or "UTC"
        try:
            cron.zone(value)
        except cron.ScheduleSpecError as exc:
            raise forms.ValidationError(str(exc)) from None
        return value

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if bool(data.get("cron")) == bool(data.get("interval_seconds")):
            raise forms.ValidationError("Give a cron expression or an interval (one of them).")
        if not isinstance(data.get("args") or {}, dict):
            self.add_error("args", "args must be a JSON object")
        return data


@admin.register(Schedule)
class ScheduleAdmin(TenantMixin, admin.ModelAdmin):
    form = ScheduleForm
    list_display = [
        "__str__",
        "flow",
        "enabled",
        "next_fire",
        "last_fired",
        "last_play_link",
        "fire_count",
        "skipped_count",
    ]
    list_filter = ["enabled", "overlap", "catchup"]
    search_fields = ["=id", "name", "flow__name", "flow__permanent_id"]
    list_select_related = ["flow", "last_play"]
    raw_id_fields = ["flow"]
    readonly_fields = [
        "id",
        "next_fire_times_list",
        "last_fired_at",
        "last_play_link",
        "recent_plays",
        "last_error",
        "fire_count",
        "skipped_count",
        "args_pretty",
        "created_at",
        "updated_at",
    ]
    actions = ["pause_selected", "resume_selected", "fire_selected"]

    @admin.display(description="next fire (UTC)", ordering="next_fire_at")
    def next_fire(self, schedule: Schedule) -> str:
        return iso(schedule.next_fire_at) if schedule.enabled and schedule.next_fire_at else "-"

    @admin.display(description="last fire (UTC)", ordering="last_fired_at")
    def last_fired(self, schedule: Schedule) -> str:
        return iso(schedule.last_fired_at) or "-"

    @admin.display(description="last play")
    def last_play_link(self, schedule: Schedule) -> str:
        play = schedule.last_play
        if play is None:
            return "-"
        return format_html(
            '<a href="{}">{}</a> {}', reverse("admin:plays_play_change", args=[play.pk]), play.pk, play.state
        )

    @admin.display(description="next fire times (UTC)")
    def next_fire_times_list(self, schedule: Schedule) -> str:
        times = [iso(t) for t in schedule.next_fire_times(5)] if schedule.pk else []
        return format_html_join(", ", "{}", ((t,) for t in times)) or "-"

    @admin.display(description="recent plays")
    def recent_plays(self, schedule: Schedule) -> str:
        if not schedule.pk:
            return "-"
        rows = (
            (reverse("admin:plays_play_change", args=[p.pk]), p.pk, p.state, (p.trigger_info or {}).get("firedAt"))
            for p in schedule.recent_plays(10)
        )
        return format_html_join(format_html("<br>"), '<a href="{}">{}</a> {} (fired {})', rows) or "-"

    @admin.display(description="args")
    def args_pretty(self, schedule: Schedule) -> str:
        return pretty_json(schedule.args)

    def get_queryset(self, request: Any) -> Any:
        return super().get_queryset(request).filter(flow__deleted_at__isnull=True)

    def formfield_for_foreignkey(self, db_field: Any, request: Any, **kwargs: Any) -> Any:
        field = super().formfield_for_foreignkey(db_field, request, **kwargs)
        if db_field.name == "flow" and not request.user.is_superuser:
            field.queryset = field.queryset.filter(company_id=request.user.company_id)
        return field

    def save_model(self, request: Any, obj: Schedule, form: Any, change: bool) -> None:
        now = timezone.now()
        obj.company_id = obj.flow.company_id
        obj.updated_at = now
        if not change:
            obj.created_by = request.user
        if "interval_seconds" in form.changed_data:
            obj.anchor_at = now
        if not change or set(form.changed_data) & {"cron", "interval_seconds", "time_zone", "enabled", "end_at"}:
            obj.schedule_from(now)
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            record(request.user, "schedule.changed" if change else "schedule.created", obj, source="admin")

    def _each(self, request: Any, queryset: Any, label: str, apply: Any) -> None:
        done = 0
        for schedule in queryset:
            with transaction.atomic():
                if apply(schedule):
                    done += 1
        messages.info(request, f"{label}: {done} schedule(s).")

    @admin.action(description="Pause selected schedules")
    def pause_selected(self, request: Any, queryset: Any) -> None:
        def apply(schedule: Schedule) -> bool:
            schedule.pause()
            record(request.user, "schedule.paused", schedule, source="admin")
            return True

        self._each(request, queryset, "Paused", apply)

    @admin.action(description="Resume selected schedules")
    def resume_selected(self, request: Any, queryset: Any) -> None:
        def apply(schedule: Schedule) -> bool:
            schedule.resume()
            record(request.user, "schedule.resumed", schedule, source="admin")
            return True

        self._each(request, queryset, "Resumed", apply)

    @admin.action(description="Fire selected schedules now")
    def fire_selected(self, request: Any, queryset: Any) -> None:
        def apply(schedule: Schedule) -> bool:
            play = schedule.fire(timezone.now(), manual=True)
            if play is None:
                messages.error(request, f"{schedule}: {schedule.last_error or 'could not fire'}")
                return False
            record(request.user, "schedule.triggered", schedule, source="admin", playId=play.id)
            return True

        self._each(request, queryset, "Fired", apply)


# --- HTTP channels --------------------------------------------------------------------


class RouteInline(admin.TabularInline):
    model = Route
    extra = 0
    fields = ["method", "path", "flow_ids", "response_mode", "timeout_ms", "idempotency_key", "rate_limit_per_minute"]


@admin.register(Channel)
class ChannelAdmin(TenantMixin, admin.ModelAdmin):
    list_display = ["name", "slug", "company", "auth_mode", "hmac_format", "enabled", "created_at"]
    list_filter = ["enabled", "auth_mode"]
    search_fields = ["name", "slug"]
    list_select_related = ["company"]
    fields = [
        "name",
        "slug",
        "company",
        "auth_mode",
        "hmac_format",
        "tolerance_seconds",
        "max_body_bytes",
        "enabled",
        "created_at",
    ]
    readonly_fields = ["company", "auth_mode", "hmac_format", "created_at"]
    inlines = [RouteInline]

    def has_add_permission(self, request: Any) -> bool:
        return False  # created through the API, which hands out the credential once


@admin.register(ChannelRequest)
class ChannelRequestAdmin(TenantMixin, admin.ModelAdmin):
    company_field = "channel__company_id"
    list_display = ["received_at", "channel", "method", "path", "status", "error", "latency_ms", "play_link"]
    list_filter = ["status", "channel"]
    search_fields = ["=id", "=play_id", "path"]
    list_select_related = ["channel"]
    show_full_result_count = False
    readonly_fields = [
        "id",
        "channel",
        "route",
        "received_at",
        "method",
        "path",
        "status",
        "error",
        "latency_ms",
        "remote_addr",
        "play_link",
        "headers_pretty",
        "query_pretty",
        "body_pretty",
    ]
    exclude = ["headers", "query", "body", "play_id"]

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    @admin.display(description="play")
    def play_link(self, entry: ChannelRequest) -> str:
        if not entry.play_id:
            return "—"
        return format_html('<a href="/plays/{}/">{}</a>', entry.play_id, entry.play_id)

    def _pre(self, value: Any) -> str:
        return format_html("<pre>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False))

    @admin.display(description="headers (redacted)")
    def headers_pretty(self, entry: ChannelRequest) -> str:
        return self._pre(entry.headers)

    @admin.display(description="query")
    def query_pretty(self, entry: ChannelRequest) -> str:
        return self._pre(entry.query)

    @admin.display(description="body (redacted)")
    def body_pretty(self, entry: ChannelRequest) -> str:
        return self._pre(entry.body)
