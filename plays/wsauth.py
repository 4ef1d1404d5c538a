"""Who may open ``/api/ws`` and what they asked for: authentication, the query
parameters, the checks that refuse a handshake, and the send-buffer probe.

Credentials are the session cookie or ``?token=<api key>``; a token, when given, wins over
the cookie (a bad token is refused even beside a valid session). Cookie-authenticated
handshakes coming from a browser page must come from the same origin (or one of
``CSRF_TRUSTED_ORIGINS``): a browser sends the cookie with a WebSocket handshake from any
page of the same site, so without this check another page on the same host could read a
logged-in user's events (cross-site WebSocket hijacking). Non-browser clients send no
``Origin`` and are not concerned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.models import AnonymousUser

from flows.models import Flow
from tenancy.models import ApiKey
from tenancy.permissions import VIEW_PLAY, key_allows

from .models import Play, Position, decode_cursor

# Scope keys this module adds (ASGI allows extension keys).
API_KEY_ID = "flowplay.api_key_id"
API_KEY_SCOPES = "flowplay.api_key_scopes"
SEND_BACKLOG = "flowplay.send_backlog"
SERVER_SEND = "flowplay.server_send"


@database_sync_to_async
def _key_for_token(token: str) -> ApiKey | None:
    return ApiKey.lookup(token)


class TokenMiddleware:
    def __init__(self, inner: Any):
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
        token = (query.get("token") or [""])[0]
        if token:
            key = await _key_for_token(token)
            scope = dict(
                scope,
                user=key.user if key is not None else AnonymousUser(),
                **{
                    API_KEY_ID: key.pk if key is not None else None,
                    API_KEY_SCOPES: list(key.scopes) if key is not None else [],
                },
            )
        return await self.inner(scope, receive, send)


class SendBacklogMiddleware:
    """Give the consumer the server's own ``send`` (``SERVER_SEND``) and a way to see how many
    bytes wait in its connection's send buffer.

    The event frames go out through the server's ``send`` directly: the session and metrics
    wrappers between have nothing to do for them (no cookie rides on a frame; the consumer
    observes the delivery lag itself), and for a connection that gets every event of its
    company they cost as much as the send itself (profiled under wsbench).

    Daphne hands every message to Twisted, whose transport buffers without limit when the
    client reads slower than we write; ASGI has no back-pressure for WebSocket sends. Daphne
    passes ``send`` as ``partial(server.handle_reply, protocol)``, so the protocol and its
    transport are reachable here; the count is Twisted's own bookkeeping of unwritten bytes.
    Under another server the probe is absent and the consumer does not throttle.
    """

    def __init__(self, inner: Any):
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        scope = dict(scope, **{SERVER_SEND: send})
        probe = _backlog_probe(send)
        if probe is not None:
            scope[SEND_BACKLOG] = probe
        return await self.inner(scope, receive, send)


# Reads Daphne's ``send`` (``partial(server.handle_reply, protocol)``) and Twisted's write
# buffer (``FileDescriptor.dataBuffer``, ``offset``, ``_tempDataLen``): no public API says how
# many bytes wait unwritten. Checked in tests/test_shims.py.
def _backlog_probe(send: Any) -> Callable[[], int] | None:
    if not isinstance(send, functools.partial) or not send.args:
        return None
    transport = getattr(send.args[0], "transport", None)
    if transport is None or not hasattr(transport, "dataBuffer") or not hasattr(transport, "_tempDataLen"):
        return None

    def backlog() -> int:
        if not getattr(transport, "connected", False):
            return 0
        return len(transport.dataBuffer) - getattr(transport, "offset", 0) + transport._tempDataLen

    return backlog


def origin_allowed(scope: dict[str, Any]) -> bool:
    """False for a cookie-authenticated handshake from a browser page of another origin."""
    if scope.get(API_KEY_ID):
        return True
    headers = dict(scope.get("headers") or [])
    origin = headers.get(b"origin", b"").decode("latin1")
    if not origin:
        return True
    if origin in getattr(settings, "CSRF_TRUSTED_ORIGINS", []):
        return True
    host = headers.get(b"host", b"").decode("latin1")
    parts = urlsplit(origin)
    return bool(host) and parts.netloc == host and parts.scheme in ("http", "https")


def ApiKeyOrSessionAuthMiddleware(inner: Any) -> Any:  # noqa: N802 (a middleware factory)
    # TokenMiddleware runs inside the session one, so its user replaces the cookie's.
    return SendBacklogMiddleware(AuthMiddlewareStack(TokenMiddleware(inner)))


# --- The handshake's checks ----------------------------------------------------------------

# Close codes (README "Live events"): a refused handshake is accepted, then closed with one.
CLOSE_BAD_REQUEST = 4400  # a malformed query parameter
CLOSE_UNAUTHORIZED = 4401  # no or bad credentials, or credentials no longer valid
CLOSE_FORBIDDEN = 4403  # valid credentials, but not for this (scope, role, play, flow, origin)
CLOSE_TOO_SLOW = 4008  # the client reads too slowly; reconnect with ?since=
CLOSE_ERROR = 1011  # an internal error; reconnect with ?since=


class Refused(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def ws_params(query_string: bytes) -> dict[str, Any]:
    """The connection's query parameters, checked: ``since`` (a cursor's position or None), ``playId``,
    ``flowId`` (str or None). Raises ``Refused(4400)`` for a malformed one."""
    query = parse_qs(query_string.decode(errors="replace"))
    since_raw = (query.get("since") or [""])[0]
    try:
        since = decode_cursor(since_raw) if since_raw else None
    except ValueError:
        raise Refused(CLOSE_BAD_REQUEST) from None
    return {
        "since": since,
        "playId": (query.get("playId") or [None])[0] or None,
        "flowId": (query.get("flowId") or [None])[0] or None,
    }


@dataclass(frozen=True)
class Admission:
    """An admitted connection: whose it is, what it follows, where it starts."""

    company_id: str
    user_pk: Any
    api_key_id: str | None
    session_key: str | None
    play_id: str | None
    flow_id: str | None
    since: Position | None


async def admit(scope: dict[str, Any]) -> Admission:
    """Authenticate the handshake, then check its parameters; ``Refused`` with the close code."""
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        raise Refused(CLOSE_UNAUTHORIZED)
    if not origin_allowed(scope):
        raise Refused(CLOSE_FORBIDDEN)
    # The API's rule for reading plays: the key's "read" scope and the role's view_play.
    if not key_allows(scope.get(API_KEY_SCOPES), "read") or not await _db(user.has_perm)(VIEW_PLAY):
        raise Refused(CLOSE_FORBIDDEN)
    params = ws_params(scope.get("query_string", b""))
    play_id = params["playId"]
    if play_id and not await _db(_play_visible)(user.company_id, play_id):
        raise Refused(CLOSE_FORBIDDEN)
    flow_id = await _db(_resolve_flow)(user.company_id, params["flowId"]) if params["flowId"] else None
    if params["flowId"] and flow_id is None:
        raise Refused(CLOSE_FORBIDDEN)
    return Admission(
        company_id=user.company_id,
        user_pk=user.pk,
        api_key_id=scope.get(API_KEY_ID),
        session_key=getattr(scope.get("session"), "session_key", None),
        play_id=play_id,
        flow_id=flow_id,
        since=params["since"],
    )


def still_authorized(scope: dict[str, Any], who: Admission) -> bool:
    """Whether an open connection's credentials are still valid (key not revoked, user
    active, session not logged out). Sync: call it through ``database_sync_to_async``."""
    from django.contrib.auth import get_user_model
    from django.contrib.sessions.backends.base import SessionBase

    if who.api_key_id:
        return ApiKey.objects.active().filter(pk=who.api_key_id, user__is_active=True).exists()
    if not get_user_model().objects.filter(pk=who.user_pk, is_active=True).exists():
        return False
    session = scope.get("session")
    if isinstance(session, SessionBase) and who.session_key:
        return session.exists(who.session_key)
    return True


def _db(func: Any) -> Any:
    # The shared thread pool, not the single thread of Django's sync views.
    return database_sync_to_async(func, thread_sensitive=False)


def _play_visible(company_id: str, play_id: str) -> bool:
    return Play.objects.filter(pk=play_id, company_id=company_id).exists()


def _resolve_flow(company_id: str, key: str) -> str | None:
    """A flow's id from its id or permanentId (deleted flows included: their plays stay);
    None if the company has no such flow."""
    flows = Flow.objects.filter(company_id=company_id)
    flow_id = flows.filter(pk=key).values_list("pk", flat=True).first()
    if flow_id is None:
        flow_id = flows.filter(permanent_id=key).order_by("deleted_at").values_list("pk", flat=True).first()
    return flow_id
