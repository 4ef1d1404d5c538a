"""Play endpoints: trigger, read, history, and the operator verbs."""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime, time, timedelta
from typing import Any

import django_filters
from django import forms
from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from flowplay import rows
from flows import views as flow_views
from flows.api import ApiError, invalid_state, not_found
from flows.models import Flow, FlowVersion
from flows.serializers import FlowSerializer
from flows.strict import NO_NUL
from flows.views import get_flow
from tenancy.audit import entry as audit_entry
from tenancy.permissions import OPERATE_PLAY, RUN_FLOW, VIEW_PLAY

from . import workers
from .models import (
    START,
    Event,
    IdempotencyConflict,
    InvalidState,
    Layer,
    Play,
    State,
    TriggerKind,
    decode_cursor,
    encode_cursor,
    iso,
)
from .redaction import redact
from .serializers import (
    ApproveSerializer,
    LayerSerializer,
    PayloadSerializer,
    PlayDetailSerializer,
    PlaySerializer,
    RetryResponseSerializer,
    RunResponseSerializer,
    RunSerializer,
)

# --- Trigger --------------------------------------------------------------------------


def run_flow(request: Any, flow_key: str) -> Response:
    """POST /api/flows/{flowId}/run: the caller's live flow (by id or permanentId; another
    company's is a 404) and its current version's snapshot in one query, then ``trigger``.

    A flow without a snapshot of its current version yet (never run since its last change
    by another way than the API) is read alone; ``Play.trigger`` makes the snapshot."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(_flow_sql(connection.vendor), [request.user.company_id, flow_key, flow_key])
        row = cursor.fetchone()
    if row is None:
        return trigger(request, get_flow(request, flow_key))
    (version, flow), _ = rows.instances(row, (FlowVersion, Flow), connection)
    version.flow = flow
    return trigger(request, flow, version)


@functools.cache
def _flow_sql(vendor: str) -> str:
    """``run_flow``'s query, written once (compiling the ORM's cost more than the rest of the
    request): the company's live flow by id or permanentId with its current version."""
    from django.db import connection

    quote = connection.ops.quote_name
    return f"""
        SELECT {rows.columns(FlowVersion, "v", connection)}, {rows.columns(Flow, "f", connection)}
        FROM {quote(FlowVersion._meta.db_table)} v JOIN {quote(Flow._meta.db_table)} f ON f.id = v.flow_id
        WHERE f.company_id = %s AND f.deleted_at IS NULL AND v.version = f.version AND (f.id = %s OR f.permanent_id = %s)
        ORDER BY v.id LIMIT 1
    """


def trigger(request: Any, flow: Flow, version: FlowVersion | None = None) -> Response:
    """POST /api/flows/{flowId}/run for ``flow`` (``version``: its current snapshot, if read)."""
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
            version=version,
            audit=lambda play: audit_entry(request.user, "play.triggered", play, flowId=flow.id),
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


class QueueWarningSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="QUEUE_WITHOUT_WORKER")
    message = serializers.CharField()
    queue = serializers.CharField()


class FlowSavedSerializer(FlowSerializer):
    """A flow as saved, with what may keep its plays from running (additive to the flow)."""

    warnings = QueueWarningSerializer(many=True, read_only=True)

    class Meta(FlowSerializer.Meta):
        fields = [*FlowSerializer.Meta.fields, "warnings"]


def with_queue_warnings(response: Response) -> Response:
    """Add ``warnings`` to a saved flow: its queue has no live worker (plays/workers.py)."""
    if response.status_code in (200, 201) and isinstance(response.data, dict) and "execution" in response.data:
        warning = workers.queue_warning((response.data.get("execution") or {}).get("queue") or "default")
        response.data["warnings"] = [warning] if warning else []
    return response


# ``/api/flows`` as served: the flow definitions, their run verb, and queue warnings on save.
# (No docstring: it would become every operation's description in the OpenAPI document.)
class FlowViewSet(flow_views.FlowViewSet):

    scopes = {"run": "run"}
    perms = {**flow_views.FlowViewSet.perms, "run": RUN_FLOW}

    @extend_schema(responses={201: FlowSavedSerializer})
    def create(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        return with_queue_warnings(super().create(request, *args, **kwargs))

    @extend_schema(responses={200: FlowSavedSerializer})
    def update(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        return with_queue_warnings(super().update(request, *args, **kwargs))

    @extend_schema(responses={200: FlowSavedSerializer})
    def partial_update(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        return super().partial_update(request, *args, **kwargs)  # → update()

    @extend_schema(
        request=RunSerializer,
        responses={
            201: OpenApiResponse(RunResponseSerializer, description="A new play"),
            200: OpenApiResponse(RunResponseSerializer, description="The existing play of this idempotencyKey "
                                 "(the same key with the same args, while that play has not failed)"),
        },
        examples=[OpenApiExample("Run with a key", request_only=True,
                                 value={"args": {"invoiceId": "INV-001"}, "idempotencyKey": "invoice-INV-001"})],
    )
    @action(detail=True, methods=["post"])
    def run(self, request: Any, flow_id: str) -> Response:
        return run_flow(request, flow_id)


# --- History --------------------------------------------------------------------------


class StateListField(forms.CharField):
    """``state``: one state or a comma-separated list (also given as repeated parameters)."""

    def clean(self, value: Any) -> list[str] | None:
        value = super().clean(value)
        if not value:
            return None
        states = [s.strip().upper() for s in value.split(",") if s.strip()]
        unknown = [s for s in states if s not in State.values]
        if unknown or not states:
            # The input goes in params, never into the message itself: django-filter
            # %-formats every message (`?state=%25` was a 500).
            raise forms.ValidationError(
                "Unknown state(s): %(unknown)s. Known: %(known)s",
                code="invalid_choice",
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
    """A date (YYYY-MM-DD) or a full ISO time, as the UTC bound it stands for.

    ``end``: a date means the whole day, i.e. before the next midnight. A moment that is no
    date Python can hold once in UTC (``to=9999-12-31``, ``from=0001-01-01T00:00+01:00``)
    is a validation error, not an ``OverflowError`` deep in the database adapter.
    """

    def __init__(self, *args: Any, end: bool = False, **kwargs: Any):
        self.end = end
        super().__init__(*args, **kwargs)

    def clean(self, value: Any) -> tuple[datetime, bool] | None:
        invalid = forms.ValidationError("Expected a date (YYYY-MM-DD) or an ISO-8601 time", code="invalid")
        if value is None:
            return None
        value = super().clean(value)
        if not value:  # given, but empty: no date at all
            raise invalid
        try:
            # A bare date first: parse_datetime() would also take "2024-01-15" as midnight.
            day = parse_date(value) if len(value) == 10 else None
            if day is not None:
                moment, is_date = datetime.combine(day, time.min, tzinfo=UTC), True
            else:
                moment, is_date = parse_datetime(value), False
        except ValueError:
            moment = None
        if moment is None:
            raise invalid
        if timezone.is_naive(moment):
            moment = timezone.make_aware(moment, UTC)
        try:
            moment = moment.astimezone(UTC)
            if is_date and self.end:
                moment += timedelta(days=1)
        except OverflowError:
            raise forms.ValidationError("The date is out of range (years 1 to 9999, in UTC)", code="out_of_range") from None
        return moment, is_date


class MomentFilter(django_filters.Filter):
    field_class = MomentField

    def filter(self, qs: Any, value: tuple[datetime, bool] | None) -> Any:
        if not value:
            return qs
        moment, is_date = value
        if self.lookup_expr == "lte":
            # "to=2024-01-15" includes the whole day: the field gave the next midnight.
            return qs.filter(created_at__lt=moment) if is_date else qs.filter(created_at__lte=moment)
        return qs.filter(created_at__gte=moment)


class PlayFilter(django_filters.FilterSet):
    state = StateListFilter()
    to = MomentFilter(field_name="created_at", lookup_expr="lte", end=True)
    idempotencyKey = django_filters.CharFilter(field_name="idempotency_key")
    flowId = django_filters.CharFilter(method="filter_flow")
    trigger = django_filters.ChoiceFilter(field_name="trigger_kind", choices=TriggerKind.choices)

    class Meta:
        model = Play
        fields: list[str] = []

    def __init__(self, data: Any = None, *args: Any, **kwargs: Any):
        if data is not None and len(data.getlist("state")) > 1:
            # state=DONE&state=FAIL (how generated clients send a list) is state=DONE,FAIL.
            data = data.copy()
            data.setlist("state", [",".join(data.getlist("state"))])
        super().__init__(data, *args, **kwargs)

    def filter_flow(self, qs: Any, name: str, value: str) -> Any:
        flow = Flow.objects.filter(company_id=self.request.user.company_id).filter(pk=value).first() or \
            Flow.objects.filter(company_id=self.request.user.company_id, permanent_id=value, deleted_at__isnull=True).first()
        return qs.filter(flow_id=flow.pk if flow else value)


# ``from`` is a Python keyword: the filter is added under its API name, so that the form,
# its errors and the OpenAPI parameter all say ``from`` (a ``from_`` attribute leaked into
# the schema as a second, phantom parameter).
PlayFilter.base_filters["from"] = MomentFilter(field_name="created_at", lookup_expr="gte")
PlayFilter.base_filters = {
    name: PlayFilter.base_filters[name] for name in ("state", "from", "to", "idempotencyKey", "flowId", "trigger")
}


MOMENT = {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]}
HISTORY_PARAMETERS = [
    OpenApiParameter(
        "state", {"type": "array", "items": {"$ref": "#/components/schemas/PlayStateEnum"}}, style="form", explode=False,
        description="One state or several: `state=DONE,FAIL` (or `state=DONE&state=FAIL`). Unknown states are a 400."),
    OpenApiParameter("from", MOMENT, description="Created at or after: a date (`2024-01-15`, from its midnight UTC) "
                     "or an ISO-8601 time. Out of range once in UTC (e.g. year 10000) is a 400."),
    OpenApiParameter("to", MOMENT, description="Created at or before: a time, or a date for the whole day "
                     "(`to=9999-12-31` is a 400: the day has no end in range)."),
    OpenApiParameter("idempotencyKey", {"type": "string", "pattern": NO_NUL}, description="Plays triggered with this key"),
    OpenApiParameter("flowId", {"type": "string", "pattern": NO_NUL}, description="The flow's id or permanentId"),
    OpenApiParameter("trigger", {"type": "string", "enum": TriggerKind.values}, description="What started the play"),
]


class PlayViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Plays of the caller's company. Another company's play is a 404."""

    queryset = Play.objects.none()  # for the schema; get_queryset() scopes to the company
    serializer_class = PlaySerializer
    filterset_class = PlayFilter
    lookup_url_kwarg = "play_id"
    # Reading needs the "read" scope and plays.view_play; every verb "operate" and
    # plays.operate_play, as the admin's actions (tenancy/permissions.py).
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

    @extend_schema(parameters=HISTORY_PARAMETERS)
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
        parameters=[
            OpenApiParameter("since", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                             description="Only events with a greater seq (default 0)"),
            OpenApiParameter("limit", {"type": "integer", "minimum": 1, "maximum": 10000},
                             description="At most this many (default 1000)"),
        ],
        responses={200: PayloadSerializer(many=True)},
        filters=False,
    )
    @action(detail=True, methods=["get"], pagination_class=None, filterset_class=None)
    def events(self, request: Any, play_id: str) -> Response:
        play = self.get_object()
        since = _int_param(request, "since", 0, minimum=0, maximum=2**63 - 1)  # a bigint column
        limit = _int_param(request, "limit", 1000, minimum=1, maximum=10000)
        # A play's writers hold its row, so its seq order is its commit order.
        events = Event.objects.filter(play=play, seq__gt=since).order_by("seq")[:limit]
        return Response([redact(e.message) for e in events])

    def _verb(self, verb: str, request: Any) -> Response:
        play = self.get_object()
        try:
            getattr(play, verb)(by=request.user)
        except InvalidState as exc:
            raise invalid_state(exc.message) from None
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
        play.refresh_from_db()
        return Response(PlayDetailSerializer(play).data)

    @extend_schema(
        request=None,
        responses={201: RetryResponseSerializer},
    )
    @action(detail=True, methods=["post"], filterset_class=None)
    def retry(self, request: Any, play_id: str) -> Response:
        play = self.get_object()
        try:
            new = play.retry(by=request.user)
        except InvalidState as exc:
            raise invalid_state(exc.message) from None
        return Response({"playId": new.id, "state": new.state, "retryOf": play.id, "startedAt": iso(new.started_at)},
                        status=status.HTTP_201_CREATED)


class EventsView(APIView):
    """GET /api/events: the company's events in cursor order, a page at a time."""

    read_perm = VIEW_PLAY  # as GET /api/plays/{id}/events (tenancy/permissions.py)

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "since",
                {"type": "string", "pattern": "^([0-7][0-9a-f]{15}[0-7][0-9a-f]{15})?$"},
                description="The cursor of the last event received (opaque); none: from the start",
            ),
            OpenApiParameter("size", {"type": "integer", "minimum": 1, "maximum": 1000},
                             description="Events per page (default 100)"),
        ],
        responses={
            200: inline_serializer(
                "EventPage",
                {
                    "data": PayloadSerializer(many=True),
                    "next": serializers.CharField(),
                    "more": serializers.BooleanField(),
                },
            )
        },
    )
    def get(self, request: Any) -> Response:
        raw = request.query_params.get("since") or ""
        try:
            since = decode_cursor(raw) if raw else START
        except ValueError:
            raise ApiError("VALIDATION_ERROR", "since must be a cursor", 400, {"since": ["not a cursor"]}) from None
        size = _int_param(request, "size", 100, minimum=1, maximum=1000)
        events, reached = Event.objects.replay(request.user.company_id, since, size)
        # next: the cursor to ask with for the events after these (the horizon when the
        # page was not full, so that an idle stream is not scanned again).
        return Response(
            {"data": [redact(e) for e in events], "next": encode_cursor(reached), "more": len(events) == size}
        )


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
