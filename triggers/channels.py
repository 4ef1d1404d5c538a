"""``/hooks/<channel-slug>/<path>``: HTTP channels, served by the main web process.

A plain ASGI app (mounted in ``flowplay/asgi.py``), not a Django view: a sync route waits
up to two minutes for its play, and Django's middleware stack holds a thread for the
whole request as soon as one middleware is sync-only (WhiteNoise is). Here a waiting
request is a coroutine on Daphne's event loop and nothing else; its short database calls
run on the shared thread pool (``triggers.waiting.db``).

One request, in order: the channel by slug (unknown or disabled: 404), the body (over the
channel's limit: 413), the credentials (401), the route by method and path (404 / 405),
the route's rate limit (429 with Retry-After), then one play per flow of the route, whose
args are the request. ``async`` routes answer 202 at once; ``sync`` ones wait for the
first flow's play (``triggers.waiting.wait_for_end``) and answer with its last step's
output. Every request to a known channel is logged (``ChannelRequest``), redacted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from django.conf import settings

from flows import expr
from plays.models import IdempotencyConflict, Play, State, TriggerKind
from plays.redaction import MASK, redact
from tenancy.ids import new_id
from tenancy.models import hash_token
from tenancy.storable import MAX_JSON_DEPTH, UnstorableValue, json_depth_exceeds, storable

from .models import AuthMode, Channel, ChannelRequest, HmacFormat, ResponseMode, Route
from .waiting import db, error_body, last_output, wait_for_end

log = logging.getLogger(__name__)

PREFIX = "/hooks/"
# Headers that carry the channel's credentials: never in a play's args, masked in the log.
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "x-hook-token",
        "x-hub-signature",
        "x-hub-signature-256",
        "stripe-signature",
        "x-signature",
    }
)
# What a flow's response may not set: the server frames the response itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
RESPONSE_KEYS = frozenset({"statusCode", "headers", "body"})
MAX_LOGGED_BODY = 64 * 1024
MAX_TIMEOUT_MS = 120_000


class Refused(Exception):
    """The request is answered with an error body (and logged with its code)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


# --- Authentication -------------------------------------------------------------------------


def _signature(secret: str, payload: bytes) -> str:
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.strip().lower().encode(), expected.encode())


def _fresh(channel: Channel, stamp: str, now: float) -> int:
    try:
        moment = int(stamp)
    except (TypeError, ValueError):
        raise Refused(401, "UNAUTHORIZED", "The signature's timestamp is missing or not a number") from None
    if abs(now - moment) > channel.tolerance_seconds:
        raise Refused(
            401,
            "SIGNATURE_EXPIRED",
            f"The signature's timestamp is more than {channel.tolerance_seconds} s away from now",
        )
    return moment


def authenticate(channel: Channel, headers: dict[str, str], body: bytes, now: float) -> str | None:
    """Check the request's credentials against the channel; raise ``Refused`` (401).

    Returns the signature to remember against replays (HMAC channels), else None. Every
    comparison is constant-time.
    """
    if channel.auth_mode == AuthMode.PUBLIC:
        return None
    if channel.auth_mode == AuthMode.HEADER_TOKEN:
        token = headers.get("x-hook-token", "")
        scheme, _, rest = headers.get("authorization", "").partition(" ")
        if not token and scheme.lower() == "bearer":
            token = rest.strip()
        if not token or not channel.token_hash or not hmac.compare_digest(hash_token(token), channel.token_hash):
            raise Refused(401, "UNAUTHORIZED", "Missing or wrong token (X-Hook-Token or Authorization: Bearer)")
        return None
    if not channel.secret:
        raise Refused(401, "UNAUTHORIZED", "The channel has no secret")
    if channel.hmac_format == HmacFormat.GITHUB:
        given = headers.get("x-hub-signature-256", "")
        expected = _signature(channel.secret, body)
        if not given.startswith("sha256=") or not _same(given[7:], expected):
            raise Refused(401, "UNAUTHORIZED", "Missing or wrong X-Hub-Signature-256")
        return expected
    if channel.hmac_format == HmacFormat.STRIPE:
        parts: dict[str, list[str]] = {}
        for item in headers.get("stripe-signature", "").split(","):
            key, _, value = item.strip().partition("=")
            parts.setdefault(key, []).append(value)
        stamp = (parts.get("t") or [""])[0]
        expected = _signature(channel.secret, f"{stamp}.".encode() + body)
        if not parts.get("v1") or not any(_same(v, expected) for v in parts["v1"]):
            raise Refused(401, "UNAUTHORIZED", "Missing or wrong Stripe-Signature")
        _fresh(channel, stamp, now)
        return expected
    stamp = headers.get("x-signature-timestamp", "")
    given = headers.get("x-signature", "")
    given = given[7:] if given.lower().startswith("sha256=") else given
    expected = _signature(channel.secret, f"{stamp}.".encode() + body)
    if not given or not _same(given, expected):
        raise Refused(401, "UNAUTHORIZED", "Missing or wrong X-Signature")
    _fresh(channel, stamp, now)
    return expected


# --- The request as args --------------------------------------------------------------------


def parse_body(content_type: str, raw: bytes) -> Any:
    """JSON when the content type says so (a malformed body is a 400), a form as an object,
    anything else as text."""
    if not raw:
        return None
    media = content_type.split(";")[0].strip().lower()
    text = raw.decode("utf-8", errors="replace")
    if media == "application/json" or media.endswith("+json"):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise Refused(400, "VALIDATION_ERROR", "Malformed JSON body") from None
        if json_depth_exceeds(value):
            raise Refused(400, "VALIDATION_ERROR", f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
        return value
    if media == "application/x-www-form-urlencoded":
        return _flat(parse_qs(text, keep_blank_values=True))
    return text


def _flat(values: dict[str, list[str]]) -> dict[str, Any]:
    return {k: v[0] if len(v) == 1 else v for k, v in values.items()}


def match(routes: list[Route], method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route for ``method`` and ``path`` with its path parameters; Refused 404 / 405."""
    allowed = []
    for route in routes:
        found = route.pattern.match(path)
        if found is None:
            continue
        if route.method == method:
            return route, found.groupdict()
        allowed.append(route.method)
    if allowed:
        raise Refused(
            405, "METHOD_NOT_ALLOWED", f"{method} is not allowed on {path}", {"allow": ", ".join(sorted(set(allowed)))}
        )
    raise Refused(404, "ROUTE_NOT_FOUND", f"No route for {method} {path}")


def response_of(out: Any) -> tuple[int, dict[str, str], bytes]:
    """The HTTP answer for a sync route from its last step's output.

    An object with an integer ``statusCode`` and no keys besides ``statusCode``,
    ``headers`` and ``body`` is the response itself; any other output is sent as JSON
    with 200.
    """
    if (
        isinstance(out, dict)
        and isinstance(out.get("statusCode"), int)
        and not isinstance(out.get("statusCode"), bool)
        and 100 <= out["statusCode"] <= 599
        and set(out) <= RESPONSE_KEYS
    ):
        headers = {
            str(k).lower(): str(v)
            for k, v in (out.get("headers") or {}).items()
            if isinstance(out.get("headers"), dict) and str(k).lower() not in HOP_BY_HOP
        }
        content = out.get("body")
        if content is None:
            payload = b""
        elif isinstance(content, str):
            payload = content.encode()
            headers.setdefault("content-type", "text/plain; charset=utf-8")
        else:
            payload = json.dumps(content).encode()
            headers.setdefault("content-type", "application/json")
        return out["statusCode"], headers, payload
    return 200, {"content-type": "application/json"}, json.dumps(out).encode()


def logged_body(value: Any, secret: str) -> Any:
    value = redact(value, [secret] if secret else [])
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > MAX_LOGGED_BODY:
        return {"truncated": True, "size": len(text), "preview": text[:MAX_LOGGED_BODY]}
    return value


# --- Database steps (each one call on the shared thread pool) --------------------------------


@db
def load_channel(slug: str) -> Channel | None:
    channel = Channel.objects.filter(slug=slug).first()
    if channel is not None:
        channel.route_list = list(channel.routes.all())  # type: ignore[attr-defined]
    return channel


@dataclass
class Accepted:
    plays: list[tuple[Play, bool]] = field(default_factory=list)


def _same_request(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("method", "path", "params", "query", "body")
    return all(a.get(k) == b.get(k) for k in keys)


@db
def accept(channel: Channel, route: Route, args: dict[str, Any], key: str | None, request_id: str) -> Accepted:
    """Count the request against the route's rate limit and start its plays."""
    wait = route.take_rate_slot()
    if wait:
        raise Refused(
            429,
            "TOO_MANY_REQUESTS",
            f"Rate limit of {route.rate_limit_per_minute} requests a minute",
            {"retry-after": str(wait)},
        )
    flows = route.flows()
    if not flows:
        raise Refused(404, "FLOW_NOT_FOUND", "The route's flows do not exist any more")
    enabled = [f for f in flows if f.enabled]
    if not enabled:
        raise Refused(409, "FLOW_DISABLED", "The route's flows are disabled")
    source = {"kind": TriggerKind.CHANNEL, "channelId": channel.pk, "routeId": route.pk, "requestId": request_id}
    accepted = Accepted()
    for flow in enabled:
        try:
            accepted.plays.append(Play.trigger(flow, args, idempotency_key=key, source=source))
        except IdempotencyConflict as exc:
            # A sender's retry differs in headers (a new timestamp, a trace id): the same
            # request again is a duplicate, another one under the same key a conflict.
            if not _same_request(exc.play.args, args):
                raise Refused(
                    409,
                    "IDEMPOTENCY_KEY_REUSED",
                    f"Idempotency key {key!r} was used by play {exc.play.id} for another request",
                ) from None
            accepted.plays.append((exc.play, False))
    return accepted


@db
def outcome(play_id: str) -> tuple[Play, Any]:
    play = Play.objects.get(pk=play_id)
    return play, last_output(play) if play.state == State.DONE else None


@db
def record(entry: ChannelRequest) -> None:
    entry.save(force_insert=True)


# --- The ASGI app ---------------------------------------------------------------------------


async def _read_body(receive: Any, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "VALIDATION_ERROR", "The client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Refused(413, "PAYLOAD_TOO_LARGE", f"The body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send(send: Any, status: int, headers: dict[str, str], payload: bytes) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1", errors="replace")) for k, v in headers.items()]
    raw.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def _json(status: int, data: Any, extra: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"content-type": "application/json", **(extra or {})}, json.dumps(data).encode()


async def hooks_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI: answer one request to ``/hooks/<slug>/<path>``."""
    started = time.monotonic()
    slug, _, rest = scope["path"][len(PREFIX) :].partition("/")
    method = scope["method"].upper()
    path = "/" + rest
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    query = _flat(parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
    channel = await load_channel(slug) if slug else None
    if channel is None or not channel.enabled:
        status, out_headers, payload = _json(404, error_body("CHANNEL_NOT_FOUND", f"No channel {slug!r}", 404))
        await _send(send, status, out_headers, payload)
        if channel is not None:
            await record(
                ChannelRequest(
                    channel=channel,
                    method=method,
                    path=path,
                    status=404,
                    error="CHANNEL_DISABLED",
                    latency_ms=_ms(started),
                    remote_addr=_client(scope),
                    query=query,
                    headers=_logged_headers(headers),
                )
            )
        return
    request_id = new_id()
    entry = ChannelRequest(
        id=request_id,
        channel=channel,
        method=method,
        path=path,
        remote_addr=_client(scope),
        headers=_logged_headers(headers),
        query=query,
    )
    limit = channel.max_body_bytes or settings.FLOWPLAY["HOOK_MAX_BODY_BYTES"]
    try:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise Refused(413, "PAYLOAD_TOO_LARGE", f"The body is larger than {limit} bytes")
        raw = await _read_body(receive, limit)
        status, out_headers, payload = await _serve(channel, entry, method, path, headers, query, raw)
    except Refused as exc:
        status, out_headers, payload = _json(exc.status, error_body(exc.code, exc.message, exc.status), exc.headers)
        entry.error = exc.code
    except Exception:
        log.exception("channel %s: request failed", channel.slug)
        status, out_headers, payload = _json(500, error_body("INTERNAL_ERROR", "Internal server error", 500))
        entry.error = "INTERNAL_ERROR"
    out_headers["x-flowplay-request-id"] = request_id
    if entry.play_id:
        out_headers["x-flowplay-play-id"] = entry.play_id
    await _send(send, status, out_headers, payload)
    entry.status, entry.latency_ms = status, _ms(started)
    try:
        await record(entry)
    except Exception:  # the answer is out; a lost log row must not break the server
        log.exception("channel %s: could not record request %s", channel.slug, request_id)


async def _serve(
    channel: Channel,
    entry: ChannelRequest,
    method: str,
    path: str,
    headers: dict[str, str],
    query: dict[str, Any],
    raw: bytes,
) -> tuple[int, dict[str, str], bytes]:
    body = parse_body(headers.get("content-type", ""), raw)
    entry.body = logged_body(body, channel.secret)
    digest = authenticate(channel, headers, raw, time.time())
    route, params = match(channel.route_list, method, path)  # type: ignore[attr-defined]
    entry.route = route
    if digest is not None and not await db(channel.remember_signature)(digest):
        raise Refused(401, "SIGNATURE_REPLAYED", "This signature was already used")
    args = {
        "method": method,
        "path": path,
        "params": params,
        "query": query,
        "headers": {k: v for k, v in headers.items() if k not in SECRET_HEADERS},
        "body": body,
    }
    try:
        # Senders cannot fix their bodies: NUL, lone surrogates and the like are repaired the
        # way every stored value is, before the args are hashed for dedup.
        args = storable(args)
    except UnstorableValue:
        raise Refused(400, "VALIDATION_ERROR", "The request cannot be stored (nested too deep)") from None
    key = _idempotency_key(route, args, headers)
    accepted = await accept(channel, route, args, key, entry.pk)
    play, created = accepted.plays[0]
    entry.play_id = play.pk
    if route.response_mode == ResponseMode.ASYNC:
        data: dict[str, Any] = {"playId": play.pk, "status": "queued"}
        if len(accepted.plays) > 1:
            data["playIds"] = [p.pk for p, _ in accepted.plays]
        if not created:
            data["duplicate"] = True
        return _json(202, data)
    timeout = min(route.timeout_ms or 30_000, MAX_TIMEOUT_MS) / 1000
    state = await wait_for_end(play, timeout)
    play, out = await outcome(play.pk)
    if state == State.DONE:
        return response_of(out)
    if state == State.FAIL:
        error = play.error or {}
        data = error_body(error.get("code", "PLAY_FAILED"), error.get("message", "The play failed"), 500)
        data["playId"] = play.pk
        return _json(500, data)
    if play.state in (State.SKIP, State.FILTERED):
        return _json(200, {"playId": play.pk, "state": play.state})
    return _json(202, {"playId": play.pk, "status": "running", "state": play.state})


def _idempotency_key(route: Route, args: dict[str, Any], headers: dict[str, str]) -> str | None:
    key: Any = None
    if route.idempotency_key:
        try:
            key = expr.render(route.idempotency_key, expr.Scope(prev={"args": args}))
        except expr.ExpressionError as exc:
            raise Refused(400, "VALIDATION_ERROR", f"The route's idempotencyKey expression failed: {exc}") from None
    if key in (None, ""):
        key = headers.get("idempotency-key") or None
    if key is None:
        return None
    key = key if isinstance(key, str) else json.dumps(key)
    if len(key) > 255:
        raise Refused(400, "VALIDATION_ERROR", "The idempotency key is longer than 255 characters")
    return key


def _logged_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: MASK if k in SECRET_HEADERS else v for k, v in redact(headers).items()}


def _client(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return str(client[0])[:64] if client else ""


def _ms(started: float) -> int:
    return max(0, round((time.monotonic() - started) * 1000))


__all__ = ["hooks_app", "authenticate", "response_of", "match", "parse_body", "Refused"]
