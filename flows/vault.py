"""Encryption at rest for credentials and KV values, and masking of revealed secrets.

Values are encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``) under a
``MultiFernet`` built from ``FLOWPLAY_SECRET_KEYS``: a comma-separated list of Fernet keys,
the first encrypts, every one decrypts. Rotation: put a new key first, keep the old ones,
run ``manage.py rotate_secret_keys`` (re-encrypts every row under the first key), then drop
the old keys. Without the variable the embedded default keeps one generated key in
``$FLOWPLAY_VAR_DIR/secret-keys`` (created on first use, mode 0600); with
``FLOWPLAY_PRODUCTION=1`` the variable is required.

Every secret string handed to a step (``reveal``) is remembered, per process, so that it
can be masked by value wherever it shows up later: in the step's out and error (the runner
collects what a step revealed, see ``collecting``) and in every log line (``SecretLogFilter``).

Framework-light: imported by the logging configuration before Django's apps are ready.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

MASK = "[REDACTED]"
# Shorter strings are not masked by value (plays.redaction.MIN_SECRET_LENGTH).
MIN_SECRET_LENGTH = 4
# The marker of an encrypted JSON value in a JSONField (KV values).
ENCRYPTED = "$fernet"
KEY_FILE = "secret-keys"


class SecretKeyError(Exception):
    """No usable key, or a value that none of the keys decrypts."""


_lock = threading.Lock()
_cache: dict[tuple[str, ...], MultiFernet] = {}


def _configured_keys() -> list[str]:
    from django.conf import settings

    return list(getattr(settings, "FLOWPLAY_SECRET_KEYS", None) or [])


def _key_file() -> Path:
    from django.conf import settings

    return Path(getattr(settings, "VAR_DIR", "var")) / KEY_FILE


_file_keys: dict[str, list[str]] = {}


def key_list() -> list[str]:
    """The keys in use, first = the one that encrypts."""
    keys = _configured_keys()
    if keys:
        return keys
    from django.conf import settings

    if getattr(settings, "PRODUCTION", False):
        raise SecretKeyError("FLOWPLAY_SECRET_KEYS must be set when FLOWPLAY_PRODUCTION is on")
    path = _key_file()
    found = _file_keys.get(str(path))
    if found is not None:
        return found
    with _lock:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written aside, then linked into place: link fails if another process was first,
            # and nobody ever reads a half-written file.
            scratch = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(Fernet.generate_key().decode() + "\n")
            try:
                os.link(scratch, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(scratch)
        text = path.read_text()
    found = [line.strip() for line in text.replace(",", "\n").splitlines() if line.strip()]
    _file_keys[str(path)] = found
    return found


def fernet() -> MultiFernet:
    keys = tuple(key_list())
    found = _cache.get(keys)
    if found is None:
        try:
            found = MultiFernet([Fernet(key.encode()) for key in keys])
        except (ValueError, TypeError) as exc:
            raise SecretKeyError(
                "FLOWPLAY_SECRET_KEYS holds a key that is not a Fernet key (32 url-safe base64 bytes, "
                "see `manage.py rotate_secret_keys --generate`)"
            ) from exc
        _cache.clear()
        _cache[keys] = found
    return found


def generate_key() -> str:
    return Fernet.generate_key().decode()


def encrypt(value: Any) -> str:
    """The JSON ``value`` encrypted under the first key, as text."""
    return fernet().encrypt(json.dumps(value, separators=(",", ":")).encode()).decode()


def decrypt(token: str) -> Any:
    try:
        return json.loads(fernet().decrypt(token.encode()))
    except InvalidToken as exc:
        raise SecretKeyError("The value cannot be decrypted with any key of FLOWPLAY_SECRET_KEYS") from exc


def rotate(token: str) -> str:
    """The same value, encrypted under the first key."""
    try:
        return fernet().rotate(token.encode()).decode()
    except InvalidToken as exc:
        raise SecretKeyError("The value cannot be decrypted with any key of FLOWPLAY_SECRET_KEYS") from exc


# --- JSON values in a JSONField (KV) ------------------------------------------------------


def seal(value: Any) -> dict[str, str]:
    return {ENCRYPTED: encrypt(value)}


def is_sealed(stored: Any) -> bool:
    return isinstance(stored, dict) and len(stored) == 1 and isinstance(stored.get(ENCRYPTED), str)


def unseal(stored: Any) -> Any:
    """The plain value of a stored JSON value; values written before encryption pass as they are."""
    return decrypt(stored[ENCRYPTED]) if is_sealed(stored) else stored


# --- Masking by value -----------------------------------------------------------------------

_RECENT_LIMIT = 2000
_recent: OrderedDict[str, None] = OrderedDict()
_collector: ContextVar[set[str] | None] = ContextVar("flowplay_revealed", default=None)


def variants(secret: str) -> set[str]:
    """The forms in which a secret may come back: as is, URL- and JSON-escaped."""
    found = {secret, quote(secret, safe=""), quote_plus(secret, safe=""), json.dumps(secret)[1:-1]}
    return {v for v in found if len(v) >= MIN_SECRET_LENGTH}


def basic_token(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode()


def reveal(*secrets: str) -> None:
    """Remember secret strings handed to a step: masked in its results and in logs."""
    collected = _collector.get()
    with _lock:
        for secret in secrets:
            if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
                continue
            for variant in variants(secret):
                if collected is not None:
                    collected.add(variant)
                _recent[variant] = None
                _recent.move_to_end(variant)
        while len(_recent) > _RECENT_LIMIT:
            _recent.popitem(last=False)


@contextmanager
def collecting(into: set[str] | None = None) -> Iterator[set[str]]:
    """Collect, in this thread, the secrets revealed inside the block."""
    found = into if into is not None else set()
    token = _collector.set(found)
    try:
        yield found
    finally:
        _collector.reset(token)


def recent_secrets() -> list[str]:
    with _lock:
        return list(_recent)


def mask_text(text: str, secrets: Any = None) -> str:
    for secret in sorted(recent_secrets() if secrets is None else secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class SecretLogFilter:
    """A logging filter: mask every secret this process revealed, by value."""

    def filter(self, record: Any) -> bool:
        if not _recent:
            return True
        try:
            message = record.getMessage()
        except Exception:
            return True
        cleaned = mask_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if getattr(record, "exc_text", None):
            record.exc_text = mask_text(record.exc_text)
        return True


__all__ = [
    "SecretKeyError",
    "encrypt",
    "decrypt",
    "rotate",
    "seal",
    "unseal",
    "is_sealed",
    "reveal",
    "collecting",
    "mask_text",
    "SecretLogFilter",
    "generate_key",
]
