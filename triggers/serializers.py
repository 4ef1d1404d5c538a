"""Channels and routes in the API's camelCase shape."""

from __future__ import annotations

import re
from typing import Any

from django.db.models import Q
from django.utils.text import slugify
from rest_framework import serializers

from flows import expr
from flows.models import Flow

from .models import METHODS, PARAM_RE, SEGMENT_RE, AuthMode, Channel, ChannelRequest, HmacFormat, ResponseMode, Route

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
            flow = Flow.objects.alive().filter(company_id=company_id).filter(Q(pk=key) | Q(permanent_id=key)).first()
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
