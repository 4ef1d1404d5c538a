"""Keep credentials out of what flowplay stores and prints.

A flowlet's args may carry credentials (``bearerToken``, ``basicAuth``, headers named like
``Authorization``, ``Cookie`` or ``X-Api-Key``). They are needed to run the step, but they
must not come back in the layer's ``out`` or ``error`` (a server that echoes the request, an
error message quoting the URL), in the events built from them, in pages or in logs.

- ``redact(value, secrets)`` masks, anywhere in a JSON value, the values of keys named like a
  credential header or a password, every occurrence of the given secret strings, and in every
  string the credentials that text shows (``redact_credentials_in_text``): the password of a
  URL (``http://user:[REDACTED]@host``), ``Bearer``/``Basic`` credentials, credential header
  lines (``Private-Token: …``), ``"password": "…"`` inside JSON text and ``password=…`` pairs.
- ``secrets_of(args)`` collects the secret strings of a step's rendered args.
- ``RedactingFilter`` masks the same in every log record (wired in ``settings.LOGGING``), and
  ``token=…`` pairs and flowplay API keys besides.

The one redaction of everything shown: the runner applies it to what a step returns before it
is stored (with the step's secrets), and the API (args, outputs, errors, events), the pages
and the admin apply it again to what they show, so that values stored before a rule existed
(and run args, which are stored as given) are masked too.

Key names that only *may* be credentials in a response body (``token``,
``access_token``) are left alone, so that a later step can use a login step's token; the
token sent by a step itself is masked by value.

Framework-free: imported by the logging configuration before Django's apps are ready.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

MASK = "[REDACTED]"

# Header and field names whose values are credentials wherever they appear.
SENSITIVE_KEYS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "apikey",
    "x-auth-token", "x-access-token", "x-csrftoken", "password", "passwd", "secret", "client_secret",
    "bearertoken", "private_key", "private-token", "x-gitlab-token", "x-vault-token",
})
# Shorter strings are not worth masking by value (and would mangle ordinary text).
MIN_SECRET_LENGTH = 4

_KEY_NAMES = "|".join(re.escape(k) for k in sorted(SENSITIVE_KEYS, key=len, reverse=True))
_HEADER_NAMES = "|".join(re.escape(k) for k in sorted(SENSITIVE_KEYS, key=len, reverse=True) if "-" in k or k in (
    "authorization", "cookie", "apikey"))


def _basic(match: re.Match) -> str:
    """``Basic <base64 of user:password>``, not the word "basic" in a sentence."""
    try:
        decoded = base64.b64decode(match.group(2) + "=" * (-len(match.group(2)) % 4), validate=True)
    except (ValueError, binascii.Error):
        return match.group(0)
    return f"{match.group(1)} {MASK}" if b":" in decoded else match.group(0)


# Credentials a text shows by its form, wherever it is: a log line or any string of a value.
_TEXT_PATTERNS = [
    # http://user:password@host (httpx's "HTTP Request: GET http://u:PASS@host/" log line).
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s/:@\"'<>]*):[^\s/@\"'<>]+@"), lambda m: f"{m.group(1)}:{MASK}@"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]{8,}"), lambda m: f"{m.group(1)} {MASK}"),
    (re.compile(r"(?i)\b(basic)\s+([A-Za-z0-9+/]{4,}={0,2})"), _basic),
    # "password": "…" in JSON text, also escaped once (\"password\": \"…\").
    (re.compile(r'(?i)("(?:' + _KEY_NAMES + r')"\s*:\s*")((?:[^"\\]|\\.)*)(")'), lambda m: f"{m.group(1)}{MASK}{m.group(3)}"),
    (re.compile(r'(?i)(\\"(?:' + _KEY_NAMES + r')\\"\s*:\s*\\")(.*?)(\\")'), lambda m: f"{m.group(1)}{MASK}{m.group(3)}"),
    # A credential header as a line of text: "Private-Token: …", "Authorization: …".
    (re.compile(r"(?im)^(\s*(?:" + _HEADER_NAMES + r")\s*:\s*)(\S[^\r\n]*)"), lambda m: f"{m.group(1)}{MASK}"),
    # password=… in a query string or a form body.
    (re.compile(r"(?i)\b(password|passwd|secret|client_secret)=([^&\s\"'<>]+)"), lambda m: f"{m.group(1)}={MASK}"),
    (re.compile(r"\bfp_[0-9a-f]{8}_[A-Za-z0-9_\-]{8,}"), lambda m: MASK),
]
_LOG_PATTERNS = [
    *_TEXT_PATTERNS,
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{4,}"), lambda m: f"{m.group(1)} {MASK}"),
    (re.compile(r"(?i)\b(password|passwd|secret|api[_-]?key|token|authorization|cookie)(\"?'?\s*[:=]\s*\"?'?)([^\"'\s,&;}]{2,})"),
     lambda m: f"{m.group(1)}{m.group(2)}{MASK}"),
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
    url = args.get("url")
    if isinstance(url, str) and "@" in url:
        # http://user:password@host: httpx sends it as Basic credentials, which a server may echo.
        try:
            parts = urlsplit(url)
            user, password = parts.username, parts.password
        except ValueError:
            user = password = None
        if password:
            for form in {password, unquote(password)}:
                add(form)
                add(base64.b64encode(f"{unquote(user or '')}:{form}".encode()).decode())
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
    return redact_credentials_in_text(text)


def redact_credentials_in_text(text: str) -> str:
    """Mask the credentials ``text`` shows by their form (``_TEXT_PATTERNS``)."""
    for pattern, replacement in _TEXT_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of the JSON ``value`` with credentials masked (the input is not changed)."""
    secrets = tuple(s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LENGTH)
    return _redact(value, secrets, 0)


def _redact(value: Any, secrets: tuple[str, ...], depth: int) -> Any:
    if depth > 200:
        return value
    if isinstance(value, str):
        return redact_text(value, secrets)
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


__all__ = ["MASK", "redact", "redact_text", "redact_credentials_in_text", "secrets_of", "RedactingFilter",
           "redact_log_text"]
