"""``GET /api/modules``: what every step can call, from the module registry."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .modules import describe

_MODULES = inline_serializer(
    "Module",
    {
        "appId": serializers.CharField(),
        "name": serializers.CharField(),
        "description": serializers.CharField(),
        "args": serializers.JSONField(help_text="JSON Schema of the args (checked when a flow is saved)"),
        "out": serializers.JSONField(help_text="JSON Schema of the step's out"),
    },
    many=True,
)


class ModuleListView(APIView):
    """The module list, sorted by appId (not paginated: it is short and fixed per release)."""

    @extend_schema(operation_id="modules_list", responses={200: _MODULES}, tags=["modules"])
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return Response(describe())
