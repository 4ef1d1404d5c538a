"""Companies, users, API keys and the audit log in the admin.

Staff who are not superusers see their own company's rows only (``TenantMixin``, which the
other apps' admins use too).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from .models import ApiKey, AuditEntry, Company, User


class TenantMixin:
    """Staff see their own company's rows; superusers see all."""

    company_field = "company_id"

    def get_queryset(self, request: Any) -> Any:
        qs = super().get_queryset(request)  # type: ignore[misc]
        if request.user.is_superuser:
            return qs
        return qs.filter(**{self.company_field: request.user.company_id})


@admin.register(Company)
class CompanyAdmin(TenantMixin, admin.ModelAdmin):
    company_field = "pk"
    list_display = ["name", "slug", "created_at"]
    search_fields = ["name", "slug"]
    readonly_fields = ["id", "created_at"]


@admin.register(User)
class UserAdmin(TenantMixin, BaseUserAdmin):
    list_display = ["username", "email", "company", "is_staff", "is_active"]
    list_filter = ["is_staff", "is_superuser", "is_active", "groups"]
    list_select_related = ["company"]
    fieldsets = BaseUserAdmin.fieldsets + (("Company", {"fields": ["company"]}),)  # type: ignore[operator]
    add_fieldsets = BaseUserAdmin.add_fieldsets + (("Company", {"fields": ["company"]}),)  # type: ignore[operator]


@admin.register(ApiKey)
class ApiKeyAdmin(TenantMixin, admin.ModelAdmin):
    company_field = "user__company_id"
    list_display = ["name", "prefix", "user", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["name", "prefix", "user__username"]
    list_select_related = ["user"]
    readonly_fields = ["id", "user", "name", "prefix", "token_hash", "scopes", "parent", "created_at", "last_used_at",
                       "revoked_at"]
    actions = ["revoke_keys"]

    def has_add_permission(self, request: Any) -> bool:
        # Keys are issued through the API, which shows the token once.
        return False

    @admin.action(description="Revoke selected keys (and the keys they minted)", permissions=["change"])
    def revoke_keys(self, request: Any, queryset: Any) -> None:
        for key in queryset:
            key.revoke()
        self.message_user(request, f"Revoked {queryset.count()} key(s).", messages.SUCCESS)


@admin.register(AuditEntry)
class AuditEntryAdmin(TenantMixin, admin.ModelAdmin):
    """The audit log: visible to staff, read-only for everyone (superusers too)."""

    list_display = ["created_at", "actor_name", "action", "object_type", "object_id", "object_repr", "company"]
    list_filter = ["action", "object_type"]
    search_fields = ["actor_name", "object_id", "object_repr"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in AuditEntry._meta.fields]
    list_select_related = ["company"]

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
