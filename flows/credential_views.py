"""``/api/credentials`` and the ``/credentials/`` page.

Company admins (``flows.credentials.can_manage``) create, rotate, delete and see each
credential's metadata; everybody else in the company (Operators, members, API keys without the
``credentials`` scope) lists names and kinds only. No answer ever holds a value: a fingerprint
and the last 4 characters stand for it.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import IntegrityError
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_POST
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status, viewsets
from rest_framework.response import Response

from tenancy.permissions import ANY_SCOPE

from . import credentials
from .api import ApiError, not_found, validation_error
from .models import Credential, CredentialKind


class CredentialNameSerializer(serializers.ModelSerializer):
    class Meta:
        model = Credential
        fields = ["id", "name", "kind"]


class CredentialSerializer(serializers.ModelSerializer):
    """A credential as a company admin sees it: everything but the value."""

    createdBy = serializers.SerializerMethodField()
    createdAt = serializers.DateTimeField(source="created_at")
    rotatedAt = serializers.DateTimeField(source="rotated_at")
    lastUsedAt = serializers.DateTimeField(source="last_used_at")
    lastUsedPlayId = serializers.SerializerMethodField()
    useCount = serializers.IntegerField(source="use_count")
    accessTokenExpiresAt = serializers.DateTimeField(source="access_token_expires_at")

    class Meta:
        model = Credential
        fields = [
            "id",
            "name",
            "kind",
            "description",
            "public",
            "fingerprint",
            "last4",
            "createdBy",
            "createdAt",
            "rotatedAt",
            "lastUsedAt",
            "lastUsedPlayId",
            "useCount",
            "accessTokenExpiresAt",
        ]

    def get_createdBy(self, obj: Credential) -> str | None:  # noqa: N802 - the API's camelCase
        return obj.created_by.display_name if obj.created_by_id and obj.created_by else None

    def get_lastUsedPlayId(self, obj: Credential) -> str | None:  # noqa: N802
        return obj.last_used_play_id or None


_WRITE = inline_serializer(
    "CredentialWrite",
    {
        "name": serializers.CharField(),
        "kind": serializers.ChoiceField(choices=CredentialKind.choices),
        "value": serializers.JSONField(
            help_text='a string for "token"; {username, password} for "basic"; '
            '{header, value} for "header"; {tokenUrl, clientId, clientSecret, scopes?, '
            'clientAuth?} for "oauth2-client"'
        ),
        "description": serializers.CharField(required=False),
    },
)
_ROTATE = inline_serializer(
    "CredentialRotate",
    {
        "value": serializers.JSONField(required=False),
        "kind": serializers.ChoiceField(choices=CredentialKind.choices, required=False),
        "description": serializers.CharField(required=False),
    },
)


def forbidden() -> ApiError:
    return ApiError(
        "FORBIDDEN",
        "Only company admins (and their API keys with the 'credentials' scope) can see or change credentials",
        403,
    )


class CredentialViewSet(viewsets.GenericViewSet):
    queryset = Credential.objects.none()  # for the schema
    serializer_class = CredentialSerializer
    pagination_class = None
    lookup_url_kwarg = "credential_id"
    lookup_value_regex = "[^/]+"
    # API key scopes (tenancy.permissions.ScopePermission): the list of names and kinds is for
    # any key of the company; everything else needs "credentials" (and can_manage()).
    scope = "credentials"
    scopes = {"list": ANY_SCOPE}

    def get_queryset(self) -> Any:
        return Credential.objects.filter(company_id=self.request.user.company_id).order_by("name")

    def get_object(self) -> Credential:
        key = self.kwargs["credential_id"]
        found = self.get_queryset().select_related("created_by").filter(Q(pk=key) | Q(name=key)).first()
        if found is None:
            raise not_found("credential", key)
        return found

    def _admin(self) -> None:
        if not credentials.can_manage(self.request):
            raise forbidden()

    @extend_schema(
        responses={200: CredentialSerializer(many=True)},
        description="Company admins get each credential's metadata; others its id, name and kind.",
    )
    def list(self, request: Any) -> Response:
        rows = self.get_queryset()
        if credentials.can_manage(request):
            return Response(CredentialSerializer(rows.select_related("created_by"), many=True).data)
        return Response(CredentialNameSerializer(rows, many=True).data)

    @extend_schema(responses={200: CredentialSerializer})
    def retrieve(self, request: Any, credential_id: str) -> Response:
        credential = self.get_object()
        self._admin()
        return Response(CredentialSerializer(credential).data)

    @extend_schema(request=_WRITE, responses={201: CredentialSerializer})
    def create(self, request: Any) -> Response:
        self._admin()
        data = request.data if isinstance(request.data, dict) else {}
        if not isinstance(request.data, dict):
            raise validation_error({"body": ["must be a JSON object"]})
        missing = {k: ["is required"] for k in ("name", "kind", "value") if k not in data}
        if missing:
            raise validation_error(missing)
        try:
            credential = credentials.create(
                request.user, data["name"], data["kind"], data["value"], data.get("description", "")
            )
        except credentials.Invalid as exc:
            raise validation_error(exc.details, "The credential is not valid") from None
        except IntegrityError:  # a concurrent create with the same name
            raise validation_error({"name": [f"a credential named {data['name']!r} already exists"]}) from None
        return Response(CredentialSerializer(credential).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=_ROTATE, responses={200: CredentialSerializer})
    def partial_update(self, request: Any, credential_id: str) -> Response:
        credential = self.get_object()
        self._admin()
        data = request.data
        if not isinstance(data, dict):
            raise validation_error({"body": ["must be a JSON object"]})
        unknown = sorted(set(data) - {"value", "kind", "description"})
        if unknown:
            raise validation_error(
                {k: ["cannot be changed" if k == "name" else "is not an allowed property"] for k in unknown}
            )
        try:
            credential = credentials.change(
                request.user,
                credential,
                kind=data.get("kind"),
                value=data.get("value"),
                description=data.get("description"),
            )
        except credentials.Invalid as exc:
            raise validation_error(exc.details, "The credential is not valid") from None
        return Response(CredentialSerializer(credential).data)

    @extend_schema(responses={204: None})
    def destroy(self, request: Any, credential_id: str) -> Response:
        credential = self.get_object()
        self._admin()
        credentials.delete(request.user, credential)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- The page -------------------------------------------------------------------------------


def _value_from_form(kind: str, form: Any) -> Any:
    if kind == CredentialKind.TOKEN:
        return form.get("secret", "")
    if kind == CredentialKind.BASIC:
        return {"username": form.get("username", ""), "password": form.get("secret", "")}
    if kind == CredentialKind.HEADER:
        return {"header": form.get("header", ""), "value": form.get("secret", "")}
    return {
        "tokenUrl": form.get("token_url", ""),
        "clientId": form.get("client_id", ""),
        "clientSecret": form.get("secret", ""),
        "scopes": form.get("scopes", ""),
        "clientAuth": form.get("client_auth") or "basic",
    }


@login_required
def credential_list(request: HttpRequest) -> HttpResponse:
    admin = credentials.is_company_admin(request.user)
    rows = Credential.objects.filter(company_id=request.user.company_id).select_related("created_by").order_by("name")
    return render(
        request,
        "flowplay/credentials.html",
        {
            "nav": "credentials",
            "credentials": rows,
            "admin": admin,
            "kinds": CredentialKind.choices,
        },
    )


@login_required
@require_POST
def credential_action(request: HttpRequest) -> HttpResponse:
    back = HttpResponseRedirect(reverse("pages:credentials"))
    if not credentials.is_company_admin(request.user):
        messages.error(request, "Only company admins can change credentials.")
        return back
    action = request.POST.get("action")
    form = request.POST.dict()
    try:
        if action == "create":
            kind = form.get("kind", "")
            credential = credentials.create(
                request.user,
                form.get("name", ""),
                kind,
                _value_from_form(kind, form),
                form.get("description", ""),
                source="page",
            )
            messages.success(request, f"Created credential {credential.name}.")
            return back
        credential = Credential.objects.filter(company_id=request.user.company_id, pk=form.get("id", "")).first()
        if credential is None:
            messages.error(request, "No such credential.")
            return back
        if action == "rotate":
            credentials.change(
                request.user,
                credential,
                value=_value_from_form(
                    credential.kind,
                    {
                        **form,
                        "username": form.get("username") or credential.public.get("username", ""),
                        "header": form.get("header") or credential.public.get("header", ""),
                        "token_url": form.get("token_url") or credential.public.get("tokenUrl", ""),
                        "client_id": form.get("client_id") or credential.public.get("clientId", ""),
                        "scopes": form.get("scopes") or " ".join(credential.public.get("scopes") or []),
                        "client_auth": form.get("client_auth") or credential.public.get("clientAuth", "basic"),
                    },
                ),
                source="page",
            )
            messages.success(request, f"Rotated credential {credential.name}.")
        elif action == "delete":
            credentials.delete(request.user, credential, source="page")
            messages.success(request, f"Deleted credential {credential.name}.")
        else:
            messages.error(request, "Unknown action.")
    except credentials.Invalid as exc:
        messages.error(request, f"Not saved: {exc}")
    except IntegrityError:
        messages.error(request, "Not saved: a credential with that name already exists.")
    return back
