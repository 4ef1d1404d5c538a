"""The audit log in the admin: visible to staff, read-only for everyone (superusers too).

Registered from ``FlowsConfig.ready()`` so that ``flows/admin.py`` stays free of it.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin

from .models import AuditEntry


class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ["created_at", "actor_name", "action", "object_type", "object_id", "object_repr", "company"]
    list_filter = ["action", "object_type"]
    search_fields = ["actor_name", "object_id", "object_repr"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in AuditEntry._meta.fields]
    list_select_related = ["company"]

    def get_queryset(self, request: Any) -> Any:
        qs = super().get_queryset(request)
        # Staff see their own company's entries; superusers see all.
        if request.user.is_superuser:
            return qs
        return qs.filter(company_id=request.user.company_id)

    def has_view_permission(self, request: Any, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_staff)

    def has_module_permission(self, request: Any) -> bool:
        return self.has_view_permission(request)

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


def register(site: admin.AdminSite = admin.site) -> None:
    if not site.is_registered(AuditEntry):
        site.register(AuditEntry, AuditEntryAdmin)
