"""Play endpoints: trigger, read, history, and the operator verbs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta
from typing import Any

import django_filters
from django import forms
from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from flows.api import ApiError, invalid_state, not_found
from flows.audit import PLAY_VERBS, record
from flows.models import Flow
from flows.permissions import OPERATE_PLAY, VIEW_PLAY
from flows.views import get_flow

from .models import Event, IdempotencyConflict, InvalidState, Layer, Play, State, TriggerKind, iso
from .redaction import redact
from .serializers import (
    ApproveSerializer,
    LayerSerializer,
    PayloadSerializer,
    PlayDetailSerializer,
    PlaySerializer,
    RunSerializer,
)

# --- Trigger --------------------------------------------------------------------------


def trigger(request: Any, flow: Flow) -> Response:
    """POST /api/flows/{flowId}/run."""
    limit = settings.FLOWPLAY["MAX_ARGS_BYTES"]
    if len(request.body or b"") > limit + 4096:
        raise ApiError("PAYLOAD_TOO_LARGE", f"The request body is larger than {limit} bytes", 413)
    data = RunSerializer(data=request.data if request.data is not None else {})
    data.is_valid(raise_exception=True)
    values = data.validated_data
    args = values.get("args") or {}
    if len(json.dumps(args, separators=(",", ":"))) > limit:
        raise ApiError("PAYLOAD_TOO_LARGE", f"args are larger than {limit} bytes", 413)
    if not flow.enabled:
        raise ApiError("FLOW_DISABLED", f"Flow {flow.permanent_id} is disabled", 409)
    run_at = values.get("runAt")
    if values.get("delayMs"):
        run_at = timezone.now() + timedelta(milliseconds=values["delayMs"])
    try:
        play, created = Play.trigger(
            flow, args, idempotency_key=values.get("idempotencyKey"), run_at=run_at, user=request.user,
            start=values.get("start", True),
            on_created=lambda play: record(request.user, "play.triggered", play, flowId=flow.id),
        )
    except IdempotencyConflict as exc:
        raise ApiError(
            "IDEMPOTENCY_KEY_REUSED",
            f"Idempotency key {values.get('idempotencyKey')!r} was used by play {exc.play.id} with different args",
            409,
        ) from None
    body = {
        "playId": play.id,
        "state": play.state,
        "startedAt": iso(play.started_at),
        "createdAt": iso(play.created_at),
        "idempotencyKey": play.idempotency_key,
        "runAt": iso(play.run_at),
    }
    return Response(body, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


# --- History --------------------------------------------------------------------------


class StateListField(forms.CharField):
    def clean(self, value: Any) -> list[str] | None:
        value = super().clean(value)
        if not value:
            return None
        states = [s.strip().upper() for s in value.split(",") if s.strip()]
        unknown = [s for s in states if s not in State.values]
        if unknown:
            # Params, not an f-string: a "%" in the caller's value must not be a format directive.
            raise forms.ValidationError(
                "Unknown state(s): %(unknown)s. Known: %(known)s",
                params={"unknown": ", ".join(unknown), "known": ", ".join(State.values)},
            )
        return states


class StateListFilter(django_filters.Filter):
    field_class = StateListField

    def filter(self, qs: Any, value: list[str] | None) -> Any:
        if not value:
            return qs
        return qs.filter(state=value[0]) if len(value) == 1 else qs.filter(state__in=value)


class MomentField(forms.CharField):
    """A date (YYYY-MM-DD) or a full ISO time."""

    def __init__(self, *args: Any, end: bool = False, **kwargs: Any):
        self.end = end
        super().__init__(*args, **kwargs)

    def clean(self, value: Any) -> tuple[datetime, bool] | None:
        value = super().clean(value)
        if not value:
            return None
        try:
            # A bare date first: parse_datetime() would also take "2024-01-15" as midnight.
            day = parse_date(value) if len(value) == 10 else None
            if day is not None:
                return datetime.combine(day, time.min, tzinfo=UTC), True
            moment = parse_datetime(value)
        except ValueError:
            moment = None
        if moment is None:
            raise forms.ValidationError("Expected a date (YYYY-MM-DD) or an ISO-8601 time")
        if timezone.is_naive(moment):
            moment = timezone.make_aware(moment, UTC)
        return moment, False


class MomentFilter(django_filters.Filter):
    field_class = MomentField

    def filter(self, qs: Any, value: tuple[datetime, bool] | None) -> Any:
        if not value:
            return qs
        moment, is_date = value
        if self.lookup_expr == "lte":
            # "to=2024-01-15" includes the whole day.
            return qs.filter(created_at__lt=moment + timedelta(days=1)) if is_date else qs.filter(created_at__lte=moment)
        return qs.filter(created_at__gte=moment)


class PlayFilter(django_filters.FilterSet):
    state = StateListFilter()
    from_ = MomentFilter(field_name="created_at", lookup_expr="gte", label="from")
    to = MomentFilter(field_name="created_at", lookup_expr="lte")
    idempotencyKey = django_filters.CharFilter(field_name="idempotency_key")
    flowId = django_filters.CharFilter(method="filter_flow")
    trigger = django_filters.ChoiceFilter(field_name="trigger_kind", choices=TriggerKind.choices)

    class Meta:
        model = Play
        fields: list[str] = []

    def __init__(self, data: Any = None, *args: Any, **kwargs: Any):
        if data is not None and "from" in data:
            data = data.copy()
            data["from_"] = data.get("from")
        super().__init__(data, *args, **kwargs)

    def filter_flow(self, qs: Any, name: str, value: str) -> Any:
        flow = Flow.objects.filter(company_id=self.request.user.company_id).filter(pk=value).first() or \
            Flow.objects.filter(company_id=self.request.user.company_id, permanent_id=value, deleted_at__isnull=True).first()
        return qs.filter(flow_id=flow.pk if flow else value)


class PlayViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Plays of the caller's company. Another company's play is a 404."""

    queryset = Play.objects.none()  # for the schema; get_queryset() scopes to the company
    serializer_class = PlaySerializer
    filterset_class = PlayFilter
    lookup_url_kwarg = "play_id"
    # Reading needs the "read" scope and plays.view_play; every verb "operate" and
    # plays.operate_play, as the admin's actions (flows/permissions.py).
    write_scope = "operate"
    read_perm = VIEW_PLAY
    write_perm = OPERATE_PLAY

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular building the schema
            return Play.objects.none()
        qs = Play.objects.for_company(self.request.user.company_id).select_related("flow_version")
        if "flow_id" in self.kwargs:
            qs = qs.filter(flow=get_flow(self.request, self.kwargs["flow_id"]))
        # Newest first; the id breaks ties within one timestamp so pages never overlap.
        return qs.order_by("-created_at", "-id")

    def get_object(self) -> Play:
        play = (
            Play.objects.for_company(self.request.user.company_id)
            .select_related("flow_version")
            .filter(pk=self.kwargs["play_id"])
            .first()
        )
        if play is None:
            raise not_found("play", self.kwargs["play_id"])
        return play

    @extend_schema(
        parameters=[
            OpenApiParameter("state", str, description="One state or a comma-separated list"),
            OpenApiParameter("from", str, description="Created at or after (date or ISO time)"),
            OpenApiParameter("to", str, description="Created at or before (date = the whole day)"),
            OpenApiParameter("idempotencyKey", str),
            OpenApiParameter("flowId", str),
            OpenApiParameter("trigger", str, enum=TriggerKind.values, description="What started the play"),
        ]
    )
    def list(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(responses={200: PlayDetailSerializer})
    def retrieve(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        return Response(PlayDetailSerializer(self.get_object()).data)

    @extend_schema(responses={200: LayerSerializer(many=True)}, filters=False)
    @action(detail=True, methods=["get"], pagination_class=None, filterset_class=None)
    def layers(self, request: Any, play_id: str) -> Response:
        play = self.get_object()
        return Response(LayerSerializer(play.layers.order_by("index", "iteration"), many=True).data)

    @extend_schema(
        parameters=[OpenApiParameter("since", int), OpenApiParameter("limit", int)],
        responses={200: PayloadSerializer(many=True)},
        filters=False,
    )
    @action(detail=True, methods=["get"], pagination_class=None, filterset_class=None)
    def events(self, request: Any, play_id: str) -> Response:
        play = self.get_object()
        since = _int_param(request, "since", 0, minimum=0, maximum=2**63 - 1)  # a bigint column
        limit = _int_param(request, "limit", 1000, minimum=1, maximum=10000)
        events = Event.objects.filter(play=play, seq__gt=since).order_by("seq")[:limit]
        return Response([redact(e.payload) for e in events])

    def _verb(self, verb: str, request: Any) -> Response:
        play = self.get_object()
        try:
            getattr(play, verb)(by=request.user)
        except InvalidState as exc:
            raise invalid_state(exc.message) from None
        record(request.user, PLAY_VERBS[verb], play)
        play.refresh_from_db()
        return Response(PlayDetailSerializer(play).data)

    @extend_schema(request=None, responses={200: PlayDetailSerializer})
    @action(detail=True, methods=["post"], filterset_class=None)
    def hold(self, request: Any, play_id: str) -> Response:
        return self._verb("hold", request)

    @extend_schema(request=None, responses={200: PlayDetailSerializer})
    @action(detail=True, methods=["post"], filterset_class=None)
    def resume(self, request: Any, play_id: str) -> Response:
        return self._verb("resume", request)

    @extend_schema(request=None, responses={200: PlayDetailSerializer})
    @action(detail=True, methods=["post"], filterset_class=None)
    def cancel(self, request: Any, play_id: str) -> Response:
        return self._verb("cancel", request)

    @extend_schema(request=None, responses={200: PlayDetailSerializer})
    @action(detail=True, methods=["post"], filterset_class=None)
    def start(self, request: Any, play_id: str) -> Response:
        return self._verb("begin", request)

    @extend_schema(request=ApproveSerializer, responses={200: PlayDetailSerializer})
    @action(detail=True, methods=["post"], filterset_class=None)
    def approve(self, request: Any, play_id: str) -> Response:
        play = self.get_object()
        data = ApproveSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            play.decide(data.validated_data["layerId"], data.validated_data["decision"], request.user,
                        data.validated_data.get("note", ""))
        except InvalidState as exc:
            raise invalid_state(exc.message) from None
        record(request.user, f"play.{data.validated_data['decision']}", play, layerId=data.validated_data["layerId"])
        play.refresh_from_db()
        return Response(PlayDetailSerializer(play).data)

    @extend_schema(
        request=None,
        responses={201: inline_serializer("RetryResponse", {
            "playId": serializers.CharField(), "state": serializers.CharField(), "retryOf": serializers.CharField()})},
    )
    @action(detail=True, methods=["post"], filterset_class=None)
    def retry(self, request: Any, play_id: str) -> Response:
        play = self.get_object()
        try:
            new = play.retry(by=request.user)
        except InvalidState as exc:
            raise invalid_state(exc.message) from None
        record(request.user, "play.retried", play, newPlayId=new.id)
        return Response({"playId": new.id, "state": new.state, "retryOf": play.id, "startedAt": iso(new.started_at)},
                        status=status.HTTP_201_CREATED)


def _int_param(request: Any, name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError("VALIDATION_ERROR", f"{name} must be an integer", 400, {name: ["must be an integer"]}) from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ApiError("VALIDATION_ERROR", f"{name} is out of range", 400, {name: [f"must be between {minimum} and {maximum}"]})
    return value


class FlowPlaysViewSet(PlayViewSet):
    """GET /api/flows/{flowId}/plays: one flow's history."""


__all__ = ["Layer", "trigger", "PlayViewSet", "FlowPlaysViewSet"]
