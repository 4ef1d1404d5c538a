"""Flows in the admin (companies, users and API keys: ``tenancy.admin``).

Flows are validated like the API does (``FlowletSerializer`` for each step, then
``validate_steps`` for the whole flow) and saving bumps the version with a fresh snapshot.
Staff who are not superusers see their own company's flows only.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db import transaction

from tenancy.admin import TenantMixin

from .models import Flow, Flowlet
from .serializers import FlowletSerializer, _ordered, validate_steps


class PrettyJSONField(forms.JSONField):
    """A JSON field shown indented."""

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, forms.fields.InvalidJSONInput):
            return value
        return json.dumps(value, indent=2, ensure_ascii=False)


class FlowletForm(forms.ModelForm):
    args = PrettyJSONField(required=False, initial=dict)
    filters = PrettyJSONField(required=False, initial=list)
    retry = PrettyJSONField(required=False, initial=dict)

    class Meta:
        model = Flowlet
        fields = ["ref", "name", "app_id", "args", "filters", "timeout", "retry", "on_error", "needs_approval"]


class FlowletFormSet(forms.BaseInlineFormSet):
    """Check the steps as the API would, all of them together."""

    def clean(self) -> None:
        super().clean()
        if any(self.errors):
            return
        rows = []
        for form in sorted(self.forms, key=lambda f: (10**6 if f.instance._state.adding else f.instance.index)):
            data = getattr(form, "cleaned_data", None)
            if not data or data.get("DELETE"):
                continue
            rows.append({
                "ref": data["ref"], "name": data.get("name") or "", "appId": data["app_id"],
                "args": data.get("args") if data.get("args") is not None else {},
                "filters": data.get("filters") if data.get("filters") is not None else [],
                "timeout": data.get("timeout"), "retry": data.get("retry") or None,
                "onError": data.get("on_error") or "fail", "needsApproval": bool(data.get("needs_approval")),
            })
        steps = FlowletSerializer(data=rows, many=True)
        if not steps.is_valid():
            raise ValidationError([f"{rows[i]['ref']}: {field}: {'; '.join(map(str, msgs))}"
                                   for i, errs in enumerate(steps.errors) for field, msgs in errs.items()])
        flow = self.instance
        errors = validate_steps(_ordered([dict(s) for s in steps.validated_data]), flow.filters or [],
                                company_id=flow.company_id, flow_id=flow.pk if not flow._state.adding else None)
        if errors:
            raise ValidationError([f"{path}: {'; '.join(msgs)}" for path, msgs in errors.items()])


class FlowletInline(admin.StackedInline):
    model = Flowlet
    form = FlowletForm
    formset = FlowletFormSet
    extra = 0
    ordering = ["index"]
    readonly_fields = ["index"]


class FlowForm(forms.ModelForm):
    filters = PrettyJSONField(required=False, initial=list)

    class Meta:
        model = Flow
        fields = ["company", "name", "permanent_id", "category", "enabled", "filters", "timeout",
                  "max_concurrency", "queue", "retention_days", "retention_keep"]


@admin.register(Flow)
class FlowAdmin(TenantMixin, admin.ModelAdmin):
    form = FlowForm
    list_display = ["name", "permanent_id", "company", "version", "enabled", "updated_at", "deleted_at"]
    list_filter = ["enabled", "category"]
    search_fields = ["=id", "name", "permanent_id"]
    list_select_related = ["company"]
    readonly_fields = ["id", "version", "created_at", "updated_at", "deleted_at"]
    inlines = [FlowletInline]

    def get_readonly_fields(self, request: Any, obj: Any = None) -> Any:
        fields = list(super().get_readonly_fields(request, obj))
        if not request.user.is_superuser:
            fields.append("company")
        return fields

    def save_form(self, request: Any, form: Any, change: bool) -> Any:
        obj = super().save_form(request, form, change)
        if not obj.company_id:
            obj.company_id = request.user.company_id
        return obj

    def save_model(self, request: Any, obj: Flow, form: Any, change: bool) -> None:
        if not change and not obj.company_id:
            obj.company_id = request.user.company_id
        if obj.filters is None:
            obj.filters = []
        super().save_model(request, obj, form, change)

    def save_formset(self, request: Any, form: Any, formset: Any, change: bool) -> None:
        flowlets = formset.save(commit=False)
        for deleted in formset.deleted_objects:
            deleted.delete()
        top = max([f.index for f in form.instance.flowlets.all()] + [-1])
        for flowlet in flowlets:
            if flowlet._state.adding:
                top += 1
                flowlet.index = top
            for name, empty in (("args", {}), ("filters", []), ("retry", {})):
                if getattr(flowlet, name) is None:
                    setattr(flowlet, name, empty)
            flowlet.save()
        formset.save_m2m()

    @transaction.atomic
    def save_related(self, request: Any, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        flow = form.instance
        flow.renumber()
        if change:
            flow.bump()  # version + 1 and a fresh snapshot, as PATCH /api/flows/{id} does
        else:
            flow.snapshot()
