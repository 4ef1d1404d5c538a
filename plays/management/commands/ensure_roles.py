"""Create or update the "Operators" group: act on plays in the admin, read flows, edit nothing;
and the "Company admins" group: manage the company's credentials (API, page and admin).

Idempotent; run it after migrating. Give a staff user the role with
``user.groups.add(Group.objects.get(name="Operators"))`` or in the admin.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.contrib.auth.management import create_permissions
from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand

from tenancy.permissions import MEMBER_PERMISSIONS

OPERATORS = "Operators"
OPERATOR_PERMISSIONS = [
    ("plays", "operate_play"),
    ("plays", "view_play"),
    ("plays", "view_layer"),
    ("plays", "view_approval"),
    ("plays", "view_event"),
    ("flows", "view_flow"),
    ("flows", "view_flowlet"),
]


COMPANY_ADMINS = "Company admins"
# A role is all its holder may do (tenancy/permissions.py): a company admin is a member (edits
# flows, runs and operates plays) who also manages the company's credentials.
COMPANY_ADMIN_PERMISSIONS = [
    *(tuple(perm.split(".", 1)) for perm in sorted(MEMBER_PERMISSIONS)),
    ("flows", "view_credential"),
    ("flows", "add_credential"),
    ("flows", "change_credential"),
    ("flows", "delete_credential"),
]


def ensure_company_admins() -> Group:
    for app in ("plays", "flows"):
        create_permissions(apps.get_app_config(app), verbosity=0)
    group, _ = Group.objects.get_or_create(name=COMPANY_ADMINS)
    perms = [Permission.objects.get(content_type__app_label=app, codename=code) for app, code in COMPANY_ADMIN_PERMISSIONS]
    group.permissions.set(perms)
    return group


def ensure_operators() -> Group:
    for app in ("plays", "flows"):
        # Permissions are normally created after migrate; make sure they exist now.
        create_permissions(apps.get_app_config(app), verbosity=0)
    group, _ = Group.objects.get_or_create(name=OPERATORS)
    perms = [Permission.objects.get(content_type__app_label=app, codename=code) for app, code in OPERATOR_PERMISSIONS]
    group.permissions.set(perms)
    return group


class Command(BaseCommand):
    help = 'Create or update the "Operators" group (act on plays in the admin; read-only flows) and "Company admins".'

    def handle(self, *args: Any, **options: Any) -> None:
        for group in (ensure_operators(), ensure_company_admins()):
            self.stdout.write(f"{group.name}: {', '.join(sorted(p.codename for p in group.permissions.all()))}")
