"""``/api/schedules`` and ``/api/flows/{flowId}/schedules``."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from flows.api import not_found
from flows.audit import record
from flows.permissions import RUN_FLOW, VIEW_FLOW
from flows.views import get_flow
from plays.serializers import PlaySerializer

from .models import Schedule
from .serializers import ScheduleOutSerializer, ScheduleSerializer


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
    # API key scopes and roles (flows/permissions.py): a schedule is part of a flow's set-up
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
        return super().create(request, *args, **kwargs)

    @extend_schema(responses=ScheduleOutSerializer(many=True))
    def list(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        return super().list(request, *args, **kwargs)

    def perform_create(self, serializer: Any) -> None:
        flow = get_flow(self.request, self.kwargs["flow_id"])
        with transaction.atomic():
            serializer.save(company_id=flow.company_id, flow=flow, created_by=self.request.user)
            record(self.request.user, "schedule.created", serializer.instance, flowId=flow.id)
