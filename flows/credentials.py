"""Credentials: secrets that flows use by name and nobody reads back.

A ``flows.models.Credential`` is stored encrypted (``flows.vault``). Flows use one in two ways:

* ``{{ $credentials.<name>.<field> }}`` in a step's args; the fields per kind are ``FIELDS``
  (``token`` → ``.token``, ``basic`` → ``.username`` / ``.password``, ``header`` →
  ``.header`` / ``.value``, ``oauth2-client`` → ``.token`` (a current access token) /
  ``.clientId``). The runner puts ``CredentialsView`` in the expression scope: a credential is
  read from the database only when an expression names it, and each read counts as a use.
* a module's ``auth`` argument naming a credential (``curl``); the runner resolves it with
  ``resolve_auth`` before the step runs and hands the result to the module in
  ``RunContext.auth``.

Whatever a step receives is registered with ``vault.reveal``, so the runner masks it by value
in the step's out, error and events, and the log filter in every log line.

Only modules with ``uses_credentials`` may read ``$credentials``, and never in filters:
``check_flow`` refuses the rest when the flow is saved, together with unknown names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from django.db import transaction
from django.db.models import F
from django.utils import timezone
from django.utils.crypto import salted_hmac

from . import vault
from .models import Credential, CredentialKind

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# The fields an expression may read, per kind.
FIELDS: dict[str, tuple[str, ...]] = {
    CredentialKind.TOKEN: ("token",),
    CredentialKind.BASIC: ("username", "password"),
    CredentialKind.HEADER: ("header", "value"),
    CredentialKind.OAUTH2_CLIENT: ("token", "clientId"),
}
# Secrets shorter than this are not shown by their last characters.
LAST4_MIN_LENGTH = 12
TOKEN_TIMEOUT_SECONDS = 10.0
# An access token is refreshed when less than this is left (or half its lifetime, if shorter).
REFRESH_MARGIN_SECONDS = 60.0

# The API key scope that lets a company admin's key manage credentials.
SCOPE = "credentials"


class CredentialError(Exception):
    """A credential cannot be used (unknown, undecryptable, token endpoint refused)."""

    def __init__(self, message: str, code: str = "CREDENTIAL_ERROR", retryable: bool = False):
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable


# --- Values -------------------------------------------------------------------------------


def _text(value: Any, field: str, errors: dict[str, list[str]], *, min_length: int = 1) -> str:
    if not isinstance(value, str) or len(value) < min_length:
        errors.setdefault(f"value.{field}" if field else "value", []).append(
            f"must be a string of at least {min_length} characters"
        )
        return ""
    if "\r" in value or "\n" in value or "\x00" in value:
        errors.setdefault(f"value.{field}" if field else "value", []).append("must not contain line breaks or NUL")
    return value


def parse_value(kind: str, value: Any) -> tuple[dict[str, Any], dict[str, Any], str, dict[str, list[str]]]:
    """Check a credential's value for its kind: (secret, public, the secret string, errors)."""
    errors: dict[str, list[str]] = {}
    least = vault.MIN_SECRET_LENGTH
    if kind == CredentialKind.TOKEN:
        if isinstance(value, dict):
            value = value.get("token")
        token = _text(value, "", errors, min_length=least)
        return {"token": token}, {}, token, errors
    if not isinstance(value, dict):
        return {}, {}, "", {"value": [f"must be an object for a {kind} credential"]}
    known = {
        CredentialKind.BASIC: {"username", "password"},
        CredentialKind.HEADER: {"header", "value"},
        CredentialKind.OAUTH2_CLIENT: {"tokenUrl", "clientId", "clientSecret", "scopes", "clientAuth"},
    }.get(kind, set())
    for extra in sorted(set(value) - known):
        errors.setdefault(f"value.{extra}", []).append("is not an allowed property")
    if kind == CredentialKind.BASIC:
        username = _text(value.get("username"), "username", errors)
        password = _text(value.get("password"), "password", errors, min_length=least)
        if ":" in username:
            errors.setdefault("value.username", []).append("must not contain ':'")
        return {"username": username, "password": password}, {"username": username}, password, errors
    if kind == CredentialKind.HEADER:
        header = _text(value.get("header"), "header", errors)
        if header and not _HEADER_NAME.match(header):
            errors.setdefault("value.header", []).append("is not a valid header name")
        secret = _text(value.get("value"), "value", errors, min_length=least)
        return {"header": header, "value": secret}, {"header": header}, secret, errors
    if kind == CredentialKind.OAUTH2_CLIENT:
        url = _text(value.get("tokenUrl"), "tokenUrl", errors)
        if url:
            try:
                parts = urlsplit(url)
                ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            except ValueError:
                ok = False
            if not ok:
                errors.setdefault("value.tokenUrl", []).append("must be an http:// or https:// URL with a host")
        client_id = _text(value.get("clientId"), "clientId", errors)
        client_secret = _text(value.get("clientSecret"), "clientSecret", errors, min_length=least)
        scopes = value.get("scopes") or []
        if isinstance(scopes, str):
            scopes = scopes.split()
        if not isinstance(scopes, list) or not all(isinstance(s, str) and s and " " not in s for s in scopes):
            errors.setdefault("value.scopes", []).append(
                "must be a list of scope names (or one space-separated string)"
            )
            scopes = []
        client_auth = value.get("clientAuth", "basic")
        if client_auth not in ("basic", "body"):
            errors.setdefault("value.clientAuth", []).append('must be "basic" or "body"')
        public = {"tokenUrl": url, "clientId": client_id, "scopes": scopes, "clientAuth": client_auth}
        return {**public, "clientSecret": client_secret}, public, client_secret, errors
    return {}, {}, "", {"kind": [f"must be one of: {', '.join(CredentialKind.values)}"]}


def fingerprint(secret: dict[str, Any]) -> str:
    """A keyed hash of the value (Django's SECRET_KEY): tells two values apart, reveals nothing."""
    return salted_hmac("flowplay.credential", json.dumps(secret, sort_keys=True), algorithm="sha256").hexdigest()[:16]


def set_value(credential: Credential, kind: str, secret: dict[str, Any], public: dict[str, Any], shown: str) -> None:
    """Put a (checked) value on an unsaved or rotated credential; forget a cached access token."""
    credential.kind = kind
    credential.secret = vault.encrypt(secret)
    credential.public = public
    credential.fingerprint = fingerprint(secret)
    credential.last4 = shown[-4:] if len(shown) >= LAST4_MIN_LENGTH else ""
    credential.access_token = ""
    credential.access_token_expires_at = None


def secret_of(credential: Credential) -> dict[str, Any]:
    """The decrypted value. Everything read here is revealed (masked from then on)."""
    try:
        value = vault.decrypt(credential.secret)
    except vault.SecretKeyError as exc:
        raise CredentialError(f"Credential {credential.name!r}: {exc}", "CREDENTIAL_KEY_ERROR") from None
    if credential.kind == CredentialKind.BASIC:
        vault.reveal(value["password"], vault.basic_token(value["username"], value["password"]))
    elif credential.kind == CredentialKind.TOKEN:
        vault.reveal(value["token"])
    elif credential.kind == CredentialKind.HEADER:
        vault.reveal(value["value"])
    elif credential.kind == CredentialKind.OAUTH2_CLIENT:
        vault.reveal(value["clientSecret"], vault.basic_token(value["clientId"], value["clientSecret"]))
    return value


def record_use(credential: Credential, play_id: str) -> None:
    Credential.objects.filter(pk=credential.pk).update(
        last_used_at=timezone.now(), last_used_play_id=play_id or "", use_count=F("use_count") + 1
    )


def find(company_id: str, name: str) -> Credential:
    credential = Credential.objects.filter(company_id=company_id, name=name).first()
    if credential is None:
        raise CredentialError(f"Unknown credential {name!r}", "CREDENTIAL_NOT_FOUND")
    return credential


# --- OAuth2 client credentials -----------------------------------------------------------


def _cached(credential: Credential, now: datetime) -> str | None:
    if not credential.access_token:
        return None
    try:
        cached = vault.decrypt(credential.access_token)
    except vault.SecretKeyError:
        return None
    if datetime.fromisoformat(cached["refreshAt"]) <= now:
        return None
    vault.reveal(cached["token"])
    return cached["token"]


def access_token(credential: Credential) -> str:
    """A current access token of an ``oauth2-client`` credential, fetched when needed.

    The token is cached on the credential's row, encrypted, and refreshed before it expires.
    One refresh at a time across every worker: the refresher holds the row's lock
    (``SELECT … FOR UPDATE``; on SQLite the write lock of the IMMEDIATE transaction) while it
    asks the token endpoint, and the others, once they get the lock, find the fresh token.
    """
    now = timezone.now()
    token = _cached(credential, now)
    if token is not None:
        return token
    with transaction.atomic():
        locked = Credential.objects.select_for_update().get(pk=credential.pk)
        token = _cached(locked, timezone.now())
        if token is not None:
            return token
        token, expires_in = _request_token(locked)
        issued = timezone.now()
        lifetime = timedelta(seconds=expires_in)
        margin = timedelta(seconds=min(REFRESH_MARGIN_SECONDS, expires_in / 2))
        blob = {"token": token, "refreshAt": (issued + lifetime - margin).isoformat()}
        Credential.objects.filter(pk=locked.pk).update(
            access_token=vault.encrypt(blob), access_token_expires_at=issued + lifetime
        )
    return token


def _request_token(credential: Credential) -> tuple[str, float]:
    import httpx

    from .egress import GuardedTransport, OutboundPolicy

    value = secret_of(credential)
    form = {"grant_type": "client_credentials"}
    if value.get("scopes"):
        form["scope"] = " ".join(value["scopes"])
    auth = None
    if value.get("clientAuth", "basic") == "body":
        form |= {"client_id": value["clientId"], "client_secret": value["clientSecret"]}
    else:
        auth = (value["clientId"], value["clientSecret"])
    try:
        with httpx.Client(
            transport=GuardedTransport(OutboundPolicy.from_settings()),
            timeout=TOKEN_TIMEOUT_SECONDS,
            trust_env=False,
            follow_redirects=False,
        ) as client:
            response = client.post(value["tokenUrl"], data=form, auth=auth, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise CredentialError(
            vault.mask_text(f"Credential {credential.name!r}: token request failed: {exc}"), "CREDENTIAL_ERROR", True
        ) from None
    except Exception as exc:  # StepError from the outbound policy, among others
        message = getattr(exc, "message", None) or str(exc)
        raise CredentialError(
            vault.mask_text(f"Credential {credential.name!r}: {message}"), "CREDENTIAL_ERROR"
        ) from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        error = body.get("error") if isinstance(body, dict) else None
        raise CredentialError(
            f"Credential {credential.name!r}: the token endpoint answered {response.status_code}"
            + (f" ({error})" if isinstance(error, str) else ""),
            "CREDENTIAL_ERROR",
            retryable=response.status_code >= 500,
        )
    vault.reveal(body["access_token"])
    try:
        expires_in = float(body.get("expires_in") or 3600)
    except (TypeError, ValueError):
        expires_in = 3600.0
    return body["access_token"], max(expires_in, 1.0)


# --- Use from a play ----------------------------------------------------------------------


class _Fields(Mapping[str, Any]):
    """One credential's fields for expressions; a field is decrypted when it is read."""

    def __init__(self, credential: Credential):
        self._credential = credential
        self._fields = FIELDS.get(credential.kind, ())

    def __getitem__(self, key: str) -> Any:
        from .expr import ExpressionError

        if key not in self._fields:
            raise ExpressionError(
                f"credential {self._credential.name!r} ({self._credential.kind}) has no field {key!r}; "
                f"use {', '.join(self._fields)}"
            )
        try:
            if self._credential.kind == CredentialKind.OAUTH2_CLIENT and key == "token":
                return access_token(self._credential)
            value = secret_of(self._credential)
        except CredentialError as exc:
            raise ExpressionError(exc.message) from None
        return value[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


class CredentialsView(Mapping[str, Any]):
    """``$credentials`` of a play: the company's credentials by name, each read counted."""

    def __init__(self, company_id: str, play_id: str):
        self.company_id = company_id
        self.play_id = play_id
        self._seen: dict[str, _Fields] = {}

    def __getitem__(self, name: str) -> Any:
        from .expr import ExpressionError

        if name not in self._seen:
            try:
                credential = find(self.company_id, name)
            except CredentialError as exc:
                raise ExpressionError(exc.message) from None
            record_use(credential, self.play_id)
            self._seen[name] = _Fields(credential)
        return self._seen[name]

    def __iter__(self) -> Iterator[str]:
        return iter(())  # never listed: an expression reads one credential by name

    def __len__(self) -> int:
        return 0


def resolve_auth(company_id: str, name: str, play_id: str) -> dict[str, Any]:
    """What a module's ``auth`` argument names, ready to send:
    ``{"scheme": "bearer", "token"}``, ``{"scheme": "basic", "username", "password"}`` or
    ``{"scheme": "header", "header", "value"}`` (an oauth2-client gives a bearer access token)."""
    credential = find(company_id, name)
    record_use(credential, play_id)
    if credential.kind == CredentialKind.OAUTH2_CLIENT:
        return {"scheme": "bearer", "token": access_token(credential), "credential": name}
    value = secret_of(credential)
    if credential.kind == CredentialKind.TOKEN:
        return {"scheme": "bearer", "token": value["token"], "credential": name}
    if credential.kind == CredentialKind.BASIC:
        return {"scheme": "basic", "username": value["username"], "password": value["password"], "credential": name}
    return {"scheme": "header", "header": value["header"], "value": value["value"], "credential": name}


# --- Save-time checks ------------------------------------------------------------------------


def check_flow(layers: list[dict[str, Any]], company_id: str | None, add: Any) -> None:
    """Refuse unknown credentials, and ``$credentials`` where its value could come back."""
    from . import expr
    from .modules import get_module

    wanted: dict[str, list[str]] = {}
    for i, layer in enumerate(layers):
        ref = layer.get("ref", "")
        where = f"Flowlet {ref!r}"
        module = get_module(layer.get("app_id") or layer.get("appId") or "")
        args = layer.get("args") or {}
        raw = module.raw_args if module is not None else frozenset()
        allowed = module is not None and module.uses_credentials
        for path, names in expr.credential_paths(
            {k: v for k, v in args.items() if k not in raw} if isinstance(args, dict) else args
        ):
            full = f"layers[{i}].args.{path}" if path and not path.startswith("[") else f"layers[{i}].args{path}"
            if not allowed:
                add(
                    full,
                    f"{where}: $credentials cannot be used in {layer.get('app_id') or layer.get('appId')!r} "
                    "(its value could come back in the step's output); use it in a curl step",
                )
            for name in names:
                wanted.setdefault(name, []).append(full)
        for path, _ in expr.credential_paths(layer.get("filters") or []):
            add(
                f"layers[{i}].filters{path if path.startswith('[') else '.' + path}",
                f"{where}: $credentials cannot be used in filters",
            )
        auth = args.get("auth") if isinstance(args, dict) and allowed else None
        if isinstance(auth, str):
            if expr.is_expression(auth):
                add(f"layers[{i}].args.auth", f"{where}: auth must name a credential, not be an expression")
            else:
                wanted.setdefault(auth, []).append(f"layers[{i}].args.auth")
    if not wanted or company_id is None:
        return
    known = set(Credential.objects.filter(company_id=company_id, name__in=list(wanted)).values_list("name", flat=True))
    for name, paths in sorted(wanted.items()):
        if name not in known:
            for path in paths:
                ref = layers[int(path.split("[", 1)[1].split("]", 1)[0])].get("ref", "")
                add(path, f"Flowlet {ref!r}: unknown credential {name!r}")


# --- Changes (API, page and admin alike; each one audited) ------------------------------------


class Invalid(Exception):
    """Bad input for a credential: ``details`` as the API's VALIDATION_ERROR has them."""

    def __init__(self, details: dict[str, list[str]]):
        super().__init__("; ".join(f"{k}: {', '.join(v)}" for k, v in details.items()))
        self.details = details


def _good_description(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 500 and "\x00" not in value


@transaction.atomic
def create(user: Any, name: Any, kind: Any, value: Any, description: Any = "", *, source: str = "api") -> Credential:
    from tenancy.audit import record

    errors: dict[str, list[str]] = {}
    if not isinstance(name, str) or not NAME.match(name):
        errors["name"] = ["must start with a letter or _ and hold only letters, digits and _ (at most 100)"]
    elif Credential.objects.filter(company_id=user.company_id, name=name).exists():
        errors["name"] = [f"a credential named {name!r} already exists"]
    if kind not in CredentialKind.values:
        errors["kind"] = [f"must be one of: {', '.join(CredentialKind.values)}"]
    if not _good_description(description):
        errors["description"] = ["must be text of at most 500 characters"]
    if "kind" not in errors:
        secret, public, shown, problems = parse_value(kind, value)
        errors |= problems
    if errors:
        raise Invalid(errors)
    credential = Credential(company_id=user.company_id, name=name, description=description, created_by=user)
    set_value(credential, kind, secret, public, shown)
    credential.save()
    record(user, "credential.created", credential, kind=kind, fingerprint=credential.fingerprint, source=source)
    return credential


@transaction.atomic
def change(
    user: Any,
    credential: Credential,
    *,
    kind: Any = None,
    value: Any = None,
    description: Any = None,
    source: str = "api",
) -> Credential:
    """Rotate the value (with ``value``; ``kind`` may change with it) and/or the description."""
    from tenancy.audit import record

    errors: dict[str, list[str]] = {}
    kind = credential.kind if kind is None else kind
    if kind not in CredentialKind.values:
        errors["kind"] = [f"must be one of: {', '.join(CredentialKind.values)}"]
    elif kind != credential.kind and value is None:
        errors["value"] = ["is required to change the kind"]
    if description is not None and not _good_description(description):
        errors["description"] = ["must be text of at most 500 characters"]
    if value is not None and "kind" not in errors:
        secret, public, shown, problems = parse_value(kind, value)
        errors |= problems
    if errors:
        raise Invalid(errors)
    locked = Credential.objects.select_for_update().get(pk=credential.pk)
    fields = []
    if description is not None:
        locked.description = description
        fields.append("description")
    if value is not None:
        set_value(locked, kind, secret, public, shown)
        locked.rotated_at = timezone.now()
        fields += [
            "kind",
            "secret",
            "public",
            "fingerprint",
            "last4",
            "access_token",
            "access_token_expires_at",
            "rotated_at",
        ]
    if fields:
        locked.save(update_fields=fields)
    if value is not None:
        record(user, "credential.rotated", locked, kind=kind, fingerprint=locked.fingerprint, source=source)
    elif description is not None:
        record(user, "credential.changed", locked, source=source)
    return locked


def delete(user: Any, credential: Credential, *, source: str = "api") -> None:
    from tenancy.audit import record

    with transaction.atomic():
        record(user, "credential.deleted", credential, kind=credential.kind, source=source)
        credential.delete()


# --- Who may do what ---------------------------------------------------------------------


def is_company_admin(user: Any) -> bool:
    """Company admins manage credentials: superusers and users with ``flows.change_credential``
    (the "Company admins" group of ``manage.py ensure_roles``)."""
    return bool(getattr(user, "is_active", False) and user.has_perm("flows.change_credential"))


def can_manage(request: Any) -> bool:
    """A company admin, by session or by an API key that has the ``credentials`` scope."""
    # TODO(lead): replace with the shared DRF scope permission class when it lands.
    key = getattr(request, "auth", None)
    if key is not None and hasattr(key, "scopes") and SCOPE not in (key.scopes or []):
        return False
    return is_company_admin(request.user)


__all__ = [
    "FIELDS",
    "SCOPE",
    "CredentialError",
    "CredentialsView",
    "access_token",
    "can_manage",
    "check_flow",
    "is_company_admin",
    "parse_value",
    "resolve_auth",
    "set_value",
]
