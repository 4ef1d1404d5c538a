"""Credentials in the admin: create, rotate, delete; the value is write-only.

Registered from ``FlowsConfig.ready()``. It needs the credential permissions (superusers and
the "Company admins" group of ``manage.py ensure_roles``); staff who are not superusers see
their own company's credentials only. The value field is never filled in: it takes a new value
(a token as text; for the other kinds a JSON object, as ``POST /api/credentials`` takes it).
Every change goes through ``flows.credentials`` and lands in the audit log.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError

from . import credentials
from .models import Credential, CredentialKind


class CredentialForm(forms.ModelForm):
    value = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text='token: the token. basic: {"username": …, "password": …}. header: {"header": …, "value": …}. '
        'oauth2-client: {"tokenUrl": …, "clientId": …, "clientSecret": …, "scopes": […]}. '
        "Leave empty to keep the current value.",
    )

    class Meta:
        model = Credential
        fields = ["name", "kind", "description"]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        raw = data.get("value") or ""
        kind = data.get("kind") or (self.instance.kind if self.instance.pk else "")
        if not raw:
            if not self.instance.pk or kind != self.instance.kind:
                self.add_error("value", "A value is required.")
            data["parsed"] = None
            return data
        value: Any = raw
        if kind != CredentialKind.TOKEN:
            try:
                value = json.loads(raw)
            except ValueError:
                self.add_error("value", "Must be a JSON object for this kind.")
                return data
        _, _, _, errors = credentials.parse_value(kind, value)
        if errors:
            raise ValidationError([f"{path}: {'; '.join(msgs)}" for path, msgs in errors.items()])
        data["parsed"] = value
        return data


class CredentialAdmin(admin.ModelAdmin):
    form = CredentialForm
    list_display = [
        "name",
        "kind",
        "company",
        "fingerprint",
        "last4",
        "created_by",
        "created_at",
        "last_used_at",
        "use_count",
    ]
    list_filter = ["kind"]
    search_fields = ["name", "description"]
    list_select_related = ["company", "created_by"]
    readonly_fields = [
        "id",
        "company",
        "public",
        "fingerprint",
        "last4",
        "created_by",
        "created_at",
        "rotated_at",
        "last_used_at",
        "last_used_play_id",
        "use_count",
        "access_token_expires_at",
    ]
    actions = ["delete_credentials"]

    def get_queryset(self, request: Any) -> Any:
        qs = super().get_queryset(request)
        return qs if request.user.is_superuser else qs.filter(company_id=request.user.company_id)

    def get_readonly_fields(self, request: Any, obj: Any = None) -> Any:
        fields = list(super().get_readonly_fields(request, obj))
        return [*fields, "name"] if obj is not None else fields

    def get_actions(self, request: Any) -> Any:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # deletes without the audit entry
        return actions

    def save_model(self, request: Any, obj: Credential, form: Any, change: bool) -> None:
        data = form.cleaned_data
        try:
            if change:
                saved = credentials.change(
                    request.user,
                    Credential.objects.get(pk=obj.pk),
                    kind=data["kind"] if data["parsed"] else None,
                    value=data["parsed"],
                    description=data.get("description", ""),
                    source="admin",
                )
            else:
                saved = credentials.create(
                    request.user,
                    data["name"],
                    data["kind"],
                    data["parsed"],
                    data.get("description", ""),
                    source="admin",
                )
        except credentials.Invalid as exc:  # checked in the form; a race may still get here
            raise ValidationError(str(exc)) from None
        obj.pk = saved.pk
        obj._state.adding = False

    def delete_model(self, request: Any, obj: Credential) -> None:
        credentials.delete(request.user, obj, source="admin")

    @admin.action(description="Delete selected credentials", permissions=["delete"])
    def delete_credentials(self, request: Any, queryset: Any) -> None:
        n = 0
        for credential in queryset:
            credentials.delete(request.user, credential, source="admin")
            n += 1
        self.message_user(request, f"Deleted {n} credential(s).")


def register(site: admin.AdminSite = admin.site) -> None:
    if not site.is_registered(Credential):
        site.register(Credential, CredentialAdmin)
