"""Flow endpoints, the run verb, and session/API-key authentication endpoints."""

from __future__ import annotations

from typing import Any

import django_filters
from django import forms
from django.contrib.auth import login, logout
from django.db import transaction
from django.utils.decorators import method_decorator
from django.views.decorators.csrf import ensure_csrf_cookie
from drf_spectacular.utils import OpenApiResponse, extend_schema
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework import exceptions, mixins, permissions, status, viewsets
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.throttling import AnonRateThrottle
from rest_framework.views import APIView

from tenancy.audit import record
from tenancy.auth import authenticate_by_login
from tenancy.models import ApiKey, KeyScopeError
from tenancy.permissions import ANY_SCOPE, VIEW_FLOW, request_key

from .api import ApiError, ErrorSerializer, not_found, validation_error
from .models import Flow, Flowlet
from .serializers import (
    ApiKeyCreatedSerializer,
    ApiKeySerializer,
    FlowletSerializer,
    FlowSerializer,
    LoginSerializer,
    MeSerializer,
    UserSerializer,
    _ordered,
    validate_steps,
)


def get_flow(request: Any, key: str, *, for_update: bool = False) -> Flow:
    """The caller's live flow by id or permanentId; another company's flow is a 404."""
    flows = Flow.objects.select_for_update() if for_update else Flow.objects
    flow = flows.resolve(request.user.company_id, key)
    if flow is None:
        raise not_found("flow", key)
    return flow


class StrictBooleanField(forms.Field):
    """``true`` or ``false``, as the OpenAPI document says (not Django's ``null``/``1``/``unknown``)."""

    def clean(self, value: Any) -> bool | None:
        if value is None:
            return None
        if value not in ("true", "false"):
            raise forms.ValidationError("Must be true or false", code="invalid")
        return value == "true"


class StrictBooleanFilter(django_filters.BooleanFilter):
    field_class = StrictBooleanField


class FlowFilter(django_filters.FilterSet):
    category = django_filters.CharFilter(field_name="category")
    enabled = StrictBooleanFilter(field_name="enabled")
    q = django_filters.CharFilter(field_name="name", lookup_expr="icontains")

    class Meta:
        model = Flow
        fields = ["category", "enabled", "q"]


# The flow definitions; ``plays.views.FlowViewSet`` serves them, with the run verb.
class FlowViewSet(viewsets.ModelViewSet):

    queryset = Flow.objects.none()  # for the schema; get_queryset() scopes to the company
    serializer_class = FlowSerializer
    filterset_class = FlowFilter
    lookup_field = "pk"
    lookup_url_kwarg = "flow_id"
    lookup_value_regex = "[^/]+"
    # API key scopes and roles (tenancy/permissions.py): reading needs "read", the rest "flows";
    # the role's Django permissions are the admin's.
    write_scope = "flows"
    read_perm = VIEW_FLOW
    perms = {"create": "flows.add_flow", "update": "flows.change_flow", "partial_update": "flows.change_flow",
             "destroy": "flows.delete_flow"}

    def get_queryset(self) -> Any:
        return (
            Flow.objects.alive()
            .for_company(self.request.user.company_id)
            .prefetch_related("flowlets")
            .order_by("name", "id")
        )

    def get_object(self) -> Flow:
        return get_flow(self.request, self.kwargs["flow_id"])

    def perform_create(self, serializer: Any) -> None:
        super().perform_create(serializer)
        record(self.request.user, "flow.created", serializer.instance)

    def perform_update(self, serializer: Any) -> None:
        super().perform_update(serializer)
        record(self.request.user, "flow.changed", serializer.instance, version=serializer.instance.version)

    def perform_destroy(self, instance: Flow) -> None:
        instance.soft_delete()
        record(self.request.user, "flow.deleted", instance)


class FlowletViewSet(
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """``/api/flows/{flowId}/layers``: the flow's steps one by one. Each change is a new version."""

    queryset = Flowlet.objects.none()  # for the schema
    serializer_class = FlowletSerializer
    pagination_class = None
    lookup_url_kwarg = "layer_id"
    write_scope = "flows"
    read_perm = VIEW_FLOW
    write_perm = "flows.change_flow"  # a layer is part of its flow, as in the admin's inline

    def flow(self, for_update: bool = False) -> Flow:
        return get_flow(self.request, self.kwargs["flow_id"], for_update=for_update)

    def get_queryset(self) -> Any:
        return self.flow().flowlets.all()

    def get_object(self) -> Flowlet:
        flowlet = self.get_queryset().filter(pk=self.kwargs["layer_id"]).first()
        if flowlet is None:
            raise not_found("layer", self.kwargs["layer_id"])
        return flowlet

    def _save(self, flow: Flow, layers: list[dict[str, Any]]) -> None:
        from .serializers import _replace_flowlets

        ordered = _ordered(layers)
        errors = validate_steps(ordered, flow.filters, company_id=flow.company_id, flow_id=flow.pk)
        if errors:
            raise validation_error(errors, "The flow's steps are not valid")
        _replace_flowlets(flow, ordered)
        flow.bump()

    def _current(self, flow: Flow) -> list[dict[str, Any]]:
        return [f.definition() | {"app_id": f.app_id, "on_error": f.on_error, "needs_approval": f.needs_approval}
                for f in flow.flowlets.all()]

    @transaction.atomic
    def create(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        flow = self.flow(for_update=True)
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        new = dict(serializer.validated_data)
        layers = self._current(flow)
        position = min(new.pop("index", len(layers)), len(layers))
        layers = [dict(layer, index=i if i < position else i + 1) for i, layer in enumerate(layers)]
        new["index"] = position
        layers.append(new)
        layers.sort(key=lambda layer: layer["index"])
        self._save(flow, [_snake(layer) for layer in layers])
        created = flow.flowlets.get(ref=new["ref"])
        record(request.user, "flow.changed", flow, version=flow.version, layerAdded=created.ref)
        return Response(FlowletSerializer(created).data, status=status.HTTP_201_CREATED)

    @transaction.atomic
    def update(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        partial = kwargs.pop("partial", False)
        flow = self.flow(for_update=True)
        flowlet = self.get_object()
        serializer = self.get_serializer(flowlet, data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        changes = dict(serializer.validated_data)
        layers = [layer for layer in self._current(flow)]
        target = next(layer for layer in layers if layer["id"] == flowlet.id)
        base = {} if not partial else {k: v for k, v in _snake(target).items()}
        merged = {**base, **changes, "id": flowlet.id}
        if not partial:
            merged.setdefault("index", flowlet.index)
        new_index = merged.get("index", flowlet.index)
        others = [_snake(layer) for layer in layers if layer["id"] != flowlet.id]
        others.insert(min(new_index, len(others)), merged)
        self._save(flow, [dict(layer, index=i) for i, layer in enumerate(others)])
        record(request.user, "flow.changed", flow, version=flow.version, layerChanged=flowlet.ref)
        return Response(FlowletSerializer(flow.flowlets.get(pk=flowlet.id)).data)

    @transaction.atomic
    def destroy(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        flow = self.flow(for_update=True)
        flowlet = self.get_object()
        layers = [_snake(layer) for layer in self._current(flow) if layer["id"] != flowlet.id]
        self._save(flow, [dict(layer, index=i) for i, layer in enumerate(layers)])
        record(request.user, "flow.changed", flow, version=flow.version, layerRemoved=flowlet.ref)
        return Response(status=status.HTTP_204_NO_CONTENT)


def _snake(layer: dict[str, Any]) -> dict[str, Any]:
    """A flowlet definition (API keys) as the serializer's validated data (model names)."""
    names = {"appId": "app_id", "onError": "on_error", "needsApproval": "needs_approval"}
    return {names.get(k, k): v for k, v in layer.items()}


# --- Authentication -------------------------------------------------------------------


class LoginThrottle(AnonRateThrottle):
    scope = "login"

    def get_cache_key(self, request: Any, view: Any) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


@method_decorator(ensure_csrf_cookie, name="dispatch")
class LoginView(APIView):
    permission_classes = [permissions.AllowAny]
    authentication_classes: list[Any] = []
    throttle_classes = [LoginThrottle]

    @extend_schema(request=LoginSerializer, responses={
        200: UserSerializer,
        401: OpenApiResponse(ErrorSerializer, description="Wrong email or password (UNAUTHORIZED)"),
    })
    def post(self, request: Any) -> Response:
        data = LoginSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        authed = authenticate_by_login(request, data.validated_data["email"], data.validated_data["password"])
        if authed is None:
            raise ApiError("UNAUTHORIZED", "Wrong email or password", 401)
        login(request, authed)
        return Response(UserSerializer(authed).data)


class LogoutView(APIView):
    scope = ANY_SCOPE
    @extend_schema(request=None, responses={204: None})
    def post(self, request: Any) -> Response:
        logout(request)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MeView(APIView):
    scope = ANY_SCOPE
    @extend_schema(responses={200: MeSerializer})
    def get(self, request: Any) -> Response:
        return Response(MeSerializer(request.user).data)


class ApiKeyViewSet(mixins.ListModelMixin, mixins.CreateModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    queryset = ApiKey.objects.none()  # for the schema
    serializer_class = ApiKeySerializer
    pagination_class = None
    lookup_url_kwarg = "key_id"
    scope = "keys"

    def get_queryset(self) -> Any:
        keys = ApiKey.objects.active().filter(user=self.request.user).order_by("-created_at")
        caller = request_key(self.request)
        if caller is not None and caller.scopes:
            # A scoped key manages itself and the keys it minted, not its user's other keys.
            keys = keys.filter(pk__in=caller.family_ids())
        return keys

    def get_object(self) -> ApiKey:
        key = self.get_queryset().filter(pk=self.kwargs["key_id"]).first()
        if key is None:
            raise not_found("api_key", self.kwargs["key_id"])
        return key

    @extend_schema(responses={201: ApiKeyCreatedSerializer})
    def create(self, request: Any, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            key, token = ApiKey.issue(request.user, serializer.validated_data["name"],
                                      serializer.validated_data.get("scopes"), parent=request_key(request))
        except KeyScopeError as exc:
            raise ApiError("FORBIDDEN", str(exc), 403) from None
        key.token = token
        record(request.user, "api_key.created", key)
        return Response(ApiKeyCreatedSerializer(key).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance: ApiKey) -> None:
        instance.revoke()
        record(self.request.user, "api_key.revoked", instance)


class SchemaView(SpectacularAPIView):
    """GET /api/schema: the OpenAPI document (YAML, or JSON with ?format=json or Accept).

    Its errors (401 without credentials) are the API's JSON error body, whatever format the
    document itself would have been rendered in.
    """

    def finalize_response(self, request: Any, response: Any, *args: Any, **kwargs: Any) -> Any:
        response = super().finalize_response(request, response, *args, **kwargs)
        if response.status_code >= 400:
            response.accepted_renderer = JSONRenderer()
            response.accepted_media_type = "application/json"
        return response


class _DocsPage:
    """The interactive docs are pages for people: anonymous visitors go to the login page."""

    def handle_exception(self, exc: Exception) -> Any:
        if isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed)):
            from django.contrib.auth.views import redirect_to_login

            return redirect_to_login(self.request.get_full_path())  # type: ignore[attr-defined]
        return super().handle_exception(exc)  # type: ignore[misc]


class SwaggerView(_DocsPage, SpectacularSwaggerView):
    """GET /api/docs: Swagger UI, from local static files (drf-spectacular-sidecar)."""


class RedocView(_DocsPage, SpectacularRedocView):
    """GET /api/redoc: ReDoc, from local static files.

    Its template leaves out Google Fonts, and images from other sites are off (ReDoc's
    footer shows Redocly's logo from their CDN, and hides it when it does not load).
    """

    template_name = "flowplay/redoc.html"

    def finalize_response(self, request: Any, response: Any, *args: Any, **kwargs: Any) -> Any:
        response = super().finalize_response(request, response, *args, **kwargs)
        response["Content-Security-Policy"] = "img-src 'self' data:"
        return response

