"""Who may do what: API key scopes, and the roles shared by the API, the pages and the admin.

**Scopes** limit what one API key may do, on top of what its user may do. A key created
without ``scopes`` has its user's full access (keys made before scopes were enforced, and the
README's examples, keep working). The vocabulary (``SCOPES``):

=============== ==========================================================================
``read``        read flows, layers, plays, events, schedules, modules, the schema; the WebSocket
``run``         trigger plays: ``POST /api/flows/{id}/run``, ``POST /api/schedules/{id}/trigger``
``operate``     start, hold, resume, cancel, approve/decline and retry plays
``flows``       create, change and delete flows, their layers and schedules
``keys``        list, create and revoke API keys
``credentials`` manage stored credentials
``mcp``         use the MCP endpoint
=============== ==========================================================================

Scopes do not imply each other (a CI key that triggers and polls has ``["read", "run"]``).
``/api/auth/me`` and ``/api/auth/logout`` need none. A key mints only keys within its own
scopes (asking for none gives the new key the minting key's scopes), and revoking a key
revokes every key it minted, recursively (``ApiKey.parent``).

``ScopePermission`` is the one check, a DRF permission class in ``DEFAULT_PERMISSION_CLASSES``.
A view names the scope each request needs: ``scopes = {"<action or method>": "<scope>"}``,
else ``scope`` (every request), else ``read`` for GET/HEAD/OPTIONS and ``write_scope`` for the
other methods; a request that no scope covers is refused to scoped keys (fail closed). A
new feature's view sets e.g. ``scope = "credentials"``.

**Roles** are Django permissions, the admin's own rule, checked the same way by the API
(``RolePermission``), the pages and the admin. A user with no role (no group, no permission of
their own, not a superuser) is a company *member* with ``MEMBER_PERMISSIONS`` (``MemberBackend``):
they edit flows, run and operate plays of their company, everywhere. A user given a role gets
exactly that role: the **Operators** group (``manage.py ensure_roles``) views flows and plays
and operates plays, but edits no flow and triggers no play — in the API as in the admin.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.backends import BaseBackend
from rest_framework.permissions import SAFE_METHODS, BasePermission

SCOPES: dict[str, str] = {
    "read": "read flows, layers, plays, events, schedules, modules and the schema; the WebSocket",
    "run": "trigger plays (POST /api/flows/{id}/run, POST /api/schedules/{id}/trigger)",
    "operate": "start, hold, resume, cancel, approve/decline and retry plays",
    "flows": "create, change and delete flows, their layers and schedules",
    "keys": "list, create and revoke API keys",
    "credentials": "manage stored credentials",
    "mcp": "use the MCP endpoint",
}
# A view's "scope" for requests any key may make (e.g. /api/auth/me).
ANY_SCOPE = "*"


def key_allows(scopes: list[str] | None, scope: str) -> bool:
    """Whether a key with ``scopes`` (empty: its user's full access) may act under ``scope``."""
    return scope == ANY_SCOPE or not scopes or scope in scopes


def request_key(request: Any) -> Any:
    """The API key a DRF request was authenticated with, or None (a session)."""
    from .models import ApiKey

    auth = getattr(request, "auth", None)
    return auth if isinstance(auth, ApiKey) else None


def required_scope(request: Any, view: Any) -> str | None:
    scopes = getattr(view, "scopes", None) or {}
    action = getattr(view, "action", None)
    for name in (action, request.method.lower()):
        if name and name in scopes:
            return scopes[name]
    if getattr(view, "scope", None):
        return view.scope
    if request.method in SAFE_METHODS:
        return "read"
    return getattr(view, "write_scope", None)


class ScopePermission(BasePermission):
    """An API key needs the scope its view names for the request (see the module docstring)."""

    message = "This API key's scopes do not cover this request"

    def has_permission(self, request: Any, view: Any) -> bool:
        key = request_key(request)
        if key is None:
            return True  # a session: the user's role decides (RolePermission)
        scope = required_scope(request, view)
        if scope is None:
            self.message = "No API key scope covers this request; use a key without scopes or a session"
            return bool(not key.scopes)
        if key_allows(key.scopes, scope):
            return True
        self.message = f"This API key lacks the '{scope}' scope"
        return False


def required_perm(request: Any, view: Any) -> str | None:
    perms = getattr(view, "perms", None) or {}
    action = getattr(view, "action", None)
    for name in (action, request.method.lower()):
        if name and name in perms:
            return perms[name]
    if request.method in SAFE_METHODS:
        return getattr(view, "read_perm", None)
    return getattr(view, "write_perm", None)


class RolePermission(BasePermission):
    """The user needs the Django permission the view names (``perms``/``read_perm``/``write_perm``)."""

    message = "Your role does not allow this"

    def has_permission(self, request: Any, view: Any) -> bool:
        perm = required_perm(request, view)
        if perm is None:
            return True
        if request.user.has_perm(perm):
            return True
        self.message = f"Your role does not allow this (it needs the {perm} permission)"
        return False


# --- Roles ---------------------------------------------------------------------------------

VIEW_FLOW = "flows.view_flow"
VIEW_PLAY = "plays.view_play"
OPERATE_PLAY = "plays.operate_play"
RUN_FLOW = "plays.add_play"

MEMBER_PERMISSIONS = frozenset(
    {
        "flows.view_flow",
        "flows.add_flow",
        "flows.change_flow",
        "flows.delete_flow",
        "flows.view_flowlet",
        "flows.add_flowlet",
        "flows.change_flowlet",
        "flows.delete_flowlet",
        "plays.view_play",
        "plays.add_play",
        "plays.operate_play",
        "plays.view_layer",
        "plays.view_approval",
        "plays.view_event",
    }
)


def has_role(user: Any) -> bool:
    """Whether the user was given a role (superuser, a group, or permissions of their own)."""
    cached = getattr(user, "_flowplay_has_role", None)
    if cached is None:
        cached = bool(user.is_superuser or user.groups.exists() or user.user_permissions.exists())
        user._flowplay_has_role = cached
    return cached


class MemberBackend(BaseBackend):
    """Grants ``MEMBER_PERMISSIONS`` to active users with no role (see the module docstring).

    Listed after Django's ModelBackend in ``AUTHENTICATION_BACKENDS``; it authenticates nobody.
    Objects are checked by company elsewhere (querysets), so object permissions are not given.
    """

    def get_all_permissions(self, user_obj: Any, obj: Any = None) -> set[str]:
        if obj is not None or not user_obj.is_active or user_obj.is_anonymous or has_role(user_obj):
            return set()
        return set(MEMBER_PERMISSIONS)

    def has_perm(self, user_obj: Any, perm: str, obj: Any = None) -> bool:
        return perm in self.get_all_permissions(user_obj, obj)

    def has_module_perms(self, user_obj: Any, app_label: str) -> bool:
        return any(perm.startswith(app_label + ".") for perm in self.get_all_permissions(user_obj))
