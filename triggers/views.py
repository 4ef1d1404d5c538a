"""``/api/schedules``, ``/api/flows/{flowId}/schedules``, ``/api/channels`` and
``/api/channels/{id}/routes``."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from flows.api import not_found
from flows.views import get_flow
from plays.serializers import PlaySerializer
from tenancy.audit import record
from tenancy.permissions import RUN_FLOW, VIEW_FLOW

from .models import AuthMode, Channel, ChannelRequest, Route, Schedule
from .serializers import (
    ChannelSerializer,
    RequestLogEntrySerializer,
    RouteSerializer,
    ScheduleOutSerializer,
    ScheduleSerializer,
)


@extend_schema(responses=ScheduleOutSerializer)
class ScheduleViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """The company's schedules; another company's schedule is a 404."""

    queryset = Schedule.objects.none()  # for the schema; get_queryset() scopes to the company
    serializer_class = ScheduleSerializer
    lookup_url_kwarg = "schedule_id"
    # API key scopes and roles (tenancy/permissions.py): a schedule is part of a flow's set-up
    # ("flows", flows.change_flow); firing one now is running the flow ("run", plays.add_play).
    write_scope = "flows"
    scopes = {"trigger": "run"}
    read_perm = VIEW_FLOW
    write_perm = "flows.change_flow"
    perms = {"trigger": RUN_FLOW}

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return Schedule.objects.none()
        qs = Schedule.objects.filter(company_id=self.request.user.company_id, flow__deleted_at__isnull=True)
        if "flow_id" in self.kwargs:
            qs = qs.filter(flow=get_flow(self.request, self.kwargs["flow_id"]))
        elif self.request.query_params.get("flowId"):
            qs = qs.filter(flow=get_flow(self.request, self.request.query_params["flowId"]))
        return qs.select_related("last_play").order_by("created_at", "id")

    def get_object(self) -> Schedule:
        schedule = self.get_queryset().filter(pk=self.kwargs["schedule_id"]).first()
        if schedule is None:
            raise not_found("schedule", self.kwargs["schedule_id"])
        return schedule

    def perform_update(self, serializer: Any) -> None:
        with transaction.atomic():
            serializer.save()
            record(self.request.user, "schedule.changed", serializer.instance)

    def perform_destroy(self, instance: Schedule) -> None:
        with transaction.atomic():
            record(self.request.user, "schedule.deleted", instance, flowId=instance.flow_id)
            instance.delete()

    @extend_schema(request=None, responses=ScheduleOutSerializer)
    @action(detail=True, methods=["post"])
    def pause(self, request: Any, schedule_id: str) -> Response:
        schedule = self.get_object()
        with transaction.atomic():
            schedule.pause()
            record(request.user, "schedule.paused", schedule)
        return Response(ScheduleSerializer(schedule).data)

    @extend_schema(request=None, responses=ScheduleOutSerializer)
    @action(detail=True, methods=["post"])
    def resume(self, request: Any, schedule_id: str) -> Response:
        schedule = self.get_object()
        with transaction.atomic():
            schedule.resume()
            record(request.user, "schedule.resumed", schedule)
        return Response(ScheduleSerializer(schedule).data)

    @extend_schema(request=None, responses={201: PlaySerializer})
    @action(detail=True, methods=["post"])
    def trigger(self, request: Any, schedule_id: str) -> Response:
        """Fire now, whatever the overlap policy says (the fire's time is now)."""
        schedule = self.get_object()
        with transaction.atomic():
            play = schedule.fire(timezone.now(), manual=True)
            if play is None:
                from flows.api import ApiError

                raise ApiError("FLOW_DISABLED", schedule.last_error or "The schedule could not fire", 409)
            record(request.user, "schedule.triggered", schedule, playId=play.id)
        return Response(PlaySerializer(play).data, status=status.HTTP_201_CREATED)


class FlowScheduleViewSet(mixins.ListModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet):
    """``/api/flows/{flowId}/schedules``: list a flow's schedules and add one."""

    queryset = Schedule.objects.none()
    serializer_class = ScheduleSerializer
    get_queryset = ScheduleViewSet.get_queryset
    write_scope = "flows"
    read_perm = VIEW_FLOW
    write_perm = "flows.change_flow"

    @extend_schema(responses={201: ScheduleOutSerializer})
    def create(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        get_flow(request, self.kwargs["flow_id"])  # another company's flow is a 404 before any 400
        return super().create(request, *args, **kwargs)

    @extend_schema(responses=ScheduleOutSerializer(many=True))
    def list(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)

    def perform_create(self, serializer: Any) -> None:
        flow = get_flow(self.request, self.kwargs["flow_id"])
        with transaction.atomic():
            serializer.save(company_id=flow.company_id, flow=flow, created_by=self.request.user)
            record(self.request.user, "schedule.created", serializer.instance, flowId=flow.id)


# --- HTTP channels --------------------------------------------------------------------


def get_channel(request: Any, key: str) -> Channel:
    """The caller's channel by id or slug; another company's is a 404."""
    channel = (
        Channel.objects.for_company(request.user.company_id).filter(pk=key).first()
        or Channel.objects.for_company(request.user.company_id).filter(slug=key).first()
    )
    if channel is None:
        raise not_found("channel", key)
    return channel


def _with_credential(channel: Channel, credential: str | None) -> dict[str, Any]:
    data = ChannelSerializer(channel).data
    if credential is not None:
        data["token" if channel.auth_mode == AuthMode.HEADER_TOKEN else "secret"] = credential
    return data


class ChannelViewSet(viewsets.ModelViewSet):
    """A channel's token (``header_token``) or secret (``hmac``) is in the answer that sets
    it, never again: on create, on a change of ``authMode``, and from ``/rotate``."""

    queryset = Channel.objects.none()  # for the schema
    serializer_class = ChannelSerializer
    # Like schedules: a channel is part of the flows' set-up (tenancy/permissions.py).
    write_scope = "flows"
    read_perm = VIEW_FLOW
    write_perm = "flows.change_flow"
    lookup_url_kwarg = "channel_id"
    lookup_value_regex = "[^/]+"

    def get_queryset(self) -> Any:
        return (
            Channel.objects.for_company(self.request.user.company_id).prefetch_related("routes").order_by("name", "id")
        )

    def get_object(self) -> Channel:
        return get_channel(self.request, self.kwargs["channel_id"])

    @transaction.atomic
    def create(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        values = dict(serializer.validated_data)
        secret = values.pop("secret", None)
        channel = Channel(company_id=request.user.company_id, **values)
        channel.slug = values.get("slug") or ChannelSerializer.unique_slug(values["name"])
        credential = channel.issue_credential()
        if secret:
            channel.secret = credential = secret
        channel.save(force_insert=True)
        return Response(_with_credential(channel, credential), status=status.HTTP_201_CREATED)

    def partial_update(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        return self.update(request, *args, partial=True, **kwargs)

    @transaction.atomic
    def update(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        channel = self.get_object()
        serializer = self.get_serializer(channel, data=request.data, partial=kwargs.get("partial", False))
        serializer.is_valid(raise_exception=True)
        values = dict(serializer.validated_data)
        secret = values.pop("secret", None)
        mode_changed = "auth_mode" in values and values["auth_mode"] != channel.auth_mode
        for name, value in values.items():
            setattr(channel, name, value)
        credential = channel.issue_credential() if mode_changed else None
        if secret:
            channel.secret = credential = secret
        channel.updated_at = timezone.now()
        channel.save()
        return Response(_with_credential(channel, credential))

    @extend_schema(request=None)
    @action(detail=True, methods=["post"])
    def rotate(self, request: Any, channel_id: str) -> Response:
        """A new token or secret; the old one stops working at once."""
        channel = self.get_object()
        credential = channel.issue_credential()
        channel.updated_at = timezone.now()
        channel.save(update_fields=["token_hash", "secret", "updated_at"])
        return Response(_with_credential(channel, credential))

    @extend_schema(responses={200: RequestLogEntrySerializer(many=True)})
    @action(detail=True, methods=["get"])
    def requests(self, request: Any, channel_id: str) -> Response:
        """The channel's request log, newest first (paginated)."""
        channel = self.get_object()
        qs = ChannelRequest.objects.filter(channel=channel).order_by("-received_at", "-id")
        page = self.paginate_queryset(qs)
        return self.get_paginated_response([entry.as_dict() for entry in page])


class RouteViewSet(
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    queryset = Route.objects.none()  # for the schema
    serializer_class = RouteSerializer
    write_scope = "flows"
    read_perm = VIEW_FLOW
    write_perm = "flows.change_flow"
    pagination_class = None
    lookup_url_kwarg = "route_id"

    def channel(self) -> Channel:
        if not hasattr(self, "_channel"):
            self._channel = get_channel(self.request, self.kwargs["channel_id"])
        return self._channel

    def get_serializer_context(self) -> dict[str, Any]:
        context = super().get_serializer_context()
        if getattr(self, "swagger_fake_view", False):
            return context
        context["channel"] = self.channel()
        context["company_id"] = self.request.user.company_id
        return context

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return Route.objects.none()
        return self.channel().routes.order_by("path", "method")

    def get_object(self) -> Route:
        route = self.get_queryset().filter(pk=self.kwargs["route_id"]).first()
        if route is None:
            raise not_found("route", self.kwargs["route_id"])
        return route

    def perform_create(self, serializer: Any) -> None:
        serializer.save(channel=self.channel())
