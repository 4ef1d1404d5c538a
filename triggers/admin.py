"""Channels with their routes, and the request log (read-only), in the admin.

A channel's token hash and secret are never shown; new credentials come from the API
(``POST /api/channels/{id}/rotate``). Staff who are not superusers see their company's.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.utils.html import format_html

from flows.admin import TenantMixin

from .models import Channel, ChannelRequest, Route


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
