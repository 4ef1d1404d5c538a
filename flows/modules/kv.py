"""`kv-set`, `kv-get`, `kv-append`: a small key/value store shared by a company's plays.

Entries are ``flows.models.KV`` rows, scoped to the company (``global``) or to the play's
flow (``flow``). Every write is a read-modify-write of one row under ``select_for_update``
(PostgreSQL row lock; on SQLite the IMMEDIATE transaction takes the write lock), so
counters (``kv-set`` with ``increment``) and appends stay exact when plays run at once.
A missing row is created in a savepoint; losing that race to another play raises
IntegrityError on the unique constraint, and the loop then locks the row the winner made.
Values are stored encrypted (``flows.vault``, the credentials' keys); the modules see them plain.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from .. import vault
from .base import Module, RunContext, StepError, _invalid, _obj, register

MAX_KV_VALUE_CHARS = 1024 * 1024
_ATTEMPTS = 5

_KEY = {"type": "string", "minLength": 1, "maxLength": 255}
_SCOPE = {"type": "string", "enum": ["global", "flow"], "default": "global"}
_VALUE_OUT = _obj({"value": {}, "found": {"type": "boolean"}}, ["value", "found"])


def _entries(ctx: RunContext, scope: str) -> Any:
    from flows.models import KV

    if not ctx.company_id:
        raise StepError("kv modules need the play's company", "INTERNAL", retryable=False)
    if scope == "flow":
        if not ctx.flow_id:
            raise StepError("scope flow needs the play's flow", "INTERNAL", retryable=False)
        return KV.objects.filter(company_id=ctx.company_id, flow_id=ctx.flow_id)
    return KV.objects.filter(company_id=ctx.company_id, flow__isnull=True)


def _size_checked(value: Any) -> Any:
    if len(json.dumps(value, separators=(",", ":"))) > MAX_KV_VALUE_CHARS:
        raise _invalid(f"The stored value would be larger than {MAX_KV_VALUE_CHARS} characters")
    return value


def _update(ctx: RunContext, scope: str, key: str, change: Callable[[Any, bool], Any]) -> tuple[Any, bool]:
    """Apply ``change(old, found) -> new`` to one entry atomically; return (new, found)."""
    from flows.models import KV

    for _ in range(_ATTEMPTS):
        try:
            with transaction.atomic():
                # The row lock is what makes concurrent increments and appends exact.
                entry = _entries(ctx, scope).select_for_update().filter(key=key).first()
                if entry is not None:
                    value = _size_checked(change(vault.unseal(entry.value), True))
                    entry.value = vault.seal(value)
                    entry.updated_at = timezone.now()
                    entry.save(update_fields=["value", "updated_at"])
                    return value, True
                value = _size_checked(change(None, False))
                with transaction.atomic():  # a savepoint: the IntegrityError must not spoil the outer block
                    KV.objects.create(
                        company_id=ctx.company_id,
                        flow_id=ctx.flow_id if scope == "flow" else None,
                        key=key,
                        value=vault.seal(value),
                    )
                return value, False
        except IntegrityError:
            continue  # another play created the entry first: lock and update it
    raise StepError(f"Could not write key {key!r}", "KV_CONFLICT")


class _KVModule(Module):
    inline = True  # only touches flowplay's own database


@register
class KVGet(_KVModule):
    app_id = "kv-get"
    name = "KV get"
    summary = "Read a stored value (`found` is false, and `value` the `default`, when the key is not set)."
    args_schema = _obj({"key": _KEY, "scope": _SCOPE, "default": {"default": None}}, ["key"])
    out_schema = _VALUE_OUT

    def execute(self, args: dict, ctx: RunContext) -> Any:
        entry = _entries(ctx, args["scope"]).filter(key=args["key"]).only("value").first()
        if entry is None:
            return {"value": args["default"], "found": False}
        return {"value": vault.unseal(entry.value), "found": True}


@register
class KVSet(_KVModule):
    app_id = "kv-set"
    name = "KV set"
    summary = "Store a value, or add `increment` to a stored number (a counter, exact under concurrent plays)."
    args_schema = _obj(
        {
            "key": _KEY,
            "value": {},
            "increment": {"type": "number", "description": "added to the stored number (a missing key counts as 0)"},
            "scope": _SCOPE,
        },
        ["key"],
    )
    out_schema = _VALUE_OUT

    def extra_checks(self, args: dict, lenient: bool) -> Iterable[tuple[str, str]]:
        if "value" in args and "increment" in args:
            yield "increment", "cannot be combined with value"
        elif "value" not in args and "increment" not in args:
            yield "value", "is required (or increment)"

    def execute(self, args: dict, ctx: RunContext) -> Any:
        if "increment" in args:
            step = args["increment"]

            def change(old: Any, found: bool) -> Any:
                if old is None:
                    old = 0
                if isinstance(old, bool) or not isinstance(old, (int, float)):
                    raise _invalid(f"Key {args['key']!r} holds {type(old).__name__}, not a number")
                return old + step
        else:

            def change(old: Any, found: bool) -> Any:
                return args["value"]

        value, found = _update(ctx, args["scope"], args["key"], change)
        return {"value": value, "found": found}


@register
class KVAppend(_KVModule):
    app_id = "kv-append"
    name = "KV append"
    summary = "Append `value` to the list stored under `key` (created when missing), atomically."
    args_schema = _obj(
        {
            "key": _KEY,
            "value": {},
            "scope": _SCOPE,
            "maxItems": {"type": "integer", "minimum": 1, "description": "keep only the newest items"},
        },
        ["key", "value"],
    )
    out_schema = _obj(
        {"value": {"type": "array"}, "found": {"type": "boolean"}, "count": {"type": "integer"}},
        ["value", "found", "count"],
    )

    def execute(self, args: dict, ctx: RunContext) -> Any:
        def change(old: Any, found: bool) -> Any:
            if old is None:
                old = []
            if not isinstance(old, list):
                raise _invalid(f"Key {args['key']!r} holds {type(old).__name__}, not a list")
            items = [*old, args["value"]]
            if "maxItems" in args:
                items = items[-args["maxItems"] :]
            return items

        value, found = _update(ctx, args["scope"], args["key"], change)
        return {"value": value, "found": found, "count": len(value)}
