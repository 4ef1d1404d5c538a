"""Keep credentials out of what flowplay stores and prints.

A flowlet's args may carry credentials (``bearerToken``, ``basicAuth``, headers named like
``Authorization``, ``Cookie`` or ``X-Api-Key``). They are needed to run the step, but they
must not come back in the layer's ``out`` or ``error`` (a server that echoes the request, an
error message quoting the URL), in the events built from them, in pages or in logs.

- ``redact(value, secrets)`` masks, anywhere in a JSON value, the values of keys named like a
  credential header or a password, and every occurrence of the given secret strings.
- ``secrets_of(args)`` collects the secret strings of a step's rendered args.
- ``RedactingFilter`` masks ``Bearer``/``Basic`` credentials, ``password=…`` pairs and
  flowplay API keys in every log record (wired in ``settings.LOGGING``).

Key names that only *may* be credentials in a response body (``token``,
``access_token``) are left alone, so that a later step can use a login step's token; the
token sent by a step itself is masked by value.

Framework-free: imported by the logging configuration before Django's apps are ready.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterable
from typing import Any

MASK = "[REDACTED]"

# Header and field names whose values are credentials wherever they appear.
SENSITIVE_KEYS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "apikey",
    "x-auth-token", "x-access-token", "x-csrftoken", "password", "passwd", "secret", "client_secret",
    "bearertoken", "private_key",
})
# Shorter strings are not worth masking by value (and would mangle ordinary text).
MIN_SECRET_LENGTH = 4

_LOG_PATTERNS = [
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{4,}"), lambda m: f"{m.group(1)} {MASK}"),
    (re.compile(r"(?i)\b(password|passwd|secret|api[_-]?key|token|authorization|cookie)(\"?'?\s*[:=]\s*\"?'?)([^\"'\s,&;}]{2,})"),
     lambda m: f"{m.group(1)}{m.group(2)}{MASK}"),
    (re.compile(r"\bfp_[0-9a-f]{8}_[A-Za-z0-9_\-]{8,}"), lambda m: MASK),
]


def is_sensitive_key(key: Any) -> bool:
    return isinstance(key, str) and key.strip().lower() in SENSITIVE_KEYS


def secrets_of(args: Any) -> set[str]:
    """The credential strings in a step's (rendered) args."""
    found: set[str] = set()
    if not isinstance(args, dict):
        return found

    def add(value: Any) -> None:
        if isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH:
            found.add(value)
            scheme, _, rest = value.partition(" ")
            if scheme.lower() in ("bearer", "basic", "token") and len(rest.strip()) >= MIN_SECRET_LENGTH:
                found.add(rest.strip())

    add(args.get("bearerToken"))
    basic = args.get("basicAuth")
    if isinstance(basic, dict):
        add(basic.get("password"))
        user, password = basic.get("username"), basic.get("password")
        if isinstance(user, str) and isinstance(password, str) and password:
            add(base64.b64encode(f"{user}:{password}".encode()).decode())
    headers = args.get("headers")
    if isinstance(headers, dict):
        for name, value in headers.items():
            if is_sensitive_key(name):
                add(value)
    for key, value in args.items():
        if key not in ("headers", "basicAuth", "bearerToken") and is_sensitive_key(key):
            add(value)
    return found


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    # Longest first, so that a secret containing another is masked whole.
    for secret in sorted(secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of the JSON ``value`` with credentials masked (the input is not changed)."""
    secrets = tuple(s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LENGTH)
    return _redact(value, secrets, 0)


def _redact(value: Any, secrets: tuple[str, ...], depth: int) -> Any:
    if depth > 200:
        return value
    if isinstance(value, str):
        return redact_text(value, secrets) if secrets else value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if is_sensitive_key(key) and item not in (None, "", [], {}):
                out[key] = MASK
            else:
                out[key] = _redact(item, secrets, depth + 1)
        return out
    if isinstance(value, list):
        return [_redact(item, secrets, depth + 1) for item in value]
    return value


def redact_log_text(text: str) -> str:
    for pattern, replacement in _LOG_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Mask credentials in a log record's message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave the record to logging's own handling
            return True
        cleaned = redact_log_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_log_text(record.exc_text)
        return True


__all__ = ["MASK", "redact", "redact_text", "secrets_of", "RedactingFilter", "redact_log_text"]
