"""Conversions between evaluated Python values and JSON values / text."""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from . import limits
from .errors import ExpressionError

# Strings at least this long are tracked by identity when counting duplicated output;
# shorter ones are not, because json.loads shares dict keys and they are harmless.
_SHARED_STR_MIN = 64
# Python refuses to print integers over 4,300 digits (about 14,284 bits).
_PRINTABLE_INT_BITS = 14_200


def _check_int(value: int) -> int:
    if value.bit_length() > _PRINTABLE_INT_BITS:
        raise ExpressionError("number is too large")
    return value


def type_name(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float, Decimal)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def a_type(value: Any) -> str:
    """``type_name`` with an article: "a number", "an object", "null"."""
    name = type_name(value)
    if name == "null":
        return name
    return ("an " if name[0] in "aeiou" else "a ") + name


def _too_large(what: str = "result") -> ExpressionError:
    return ExpressionError(f"{what} is too large (limit {limits.MAX_OUTPUT_CHARS} characters)")


class _Converter:
    """Copies a value into plain JSON types (dict, list, str, int, float, bool, None).

    Operators and literals can build values that share sub-containers
    (``[[x] * 1000] * 1000``): tiny in memory, huge once serialised. Each repeat of a
    container (or long string) is charged to a budget, so such duplication is limited
    while large data passed through from earlier steps is not. ``total`` estimates
    the serialised size, for callers that cap text output.
    """

    __slots__ = ("sizes", "copies", "duplicated", "total", "cap")

    def __init__(self, cap: int | None = None) -> None:
        self.sizes: dict[int, int] = {}
        self.copies: dict[int, Any] = {}
        self.duplicated = 0
        self.total = 0
        # When set, conversion stops as soon as the serialised size would exceed it.
        self.cap = cap

    def _grow(self, amount: int) -> None:
        self.total += amount
        if self.cap is not None and self.total > self.cap:
            raise _too_large()

    def _repeat(self, obj: Any) -> bool:
        size = self.sizes.get(id(obj))
        if size is None:
            return False
        self.duplicated += size
        if self.duplicated > limits.MAX_OUTPUT_CHARS:
            raise _too_large("result (once repeated parts are expanded)")
        self._grow(size)
        return True

    def convert(self, value: Any) -> Any:
        kind = type(value)
        if kind is str:
            if len(value) >= _SHARED_STR_MIN:
                if not self._repeat(value):
                    self.sizes[id(value)] = len(value)
                    self._grow(len(value) + 2)
            else:
                self._grow(len(value) + 2)
            return value
        if value is None or kind is bool:
            self._grow(5)
            return value
        if kind is int:
            self._grow(5)
            return _check_int(value)
        if kind is float:
            return self._float(value)
        if kind is dict or (kind is not list and kind is not tuple and isinstance(value, Mapping)):
            if self._repeat(value):
                return _clone(self.copies[id(value)])
            before = self.total
            out = {self._key(k): self.convert(v) for k, v in value.items()}
            self._grow(2)
            self.sizes[id(value)] = self.total - before
            self.copies[id(value)] = out
            return out
        if kind is list or kind is tuple:
            if self._repeat(value):
                return _clone(self.copies[id(value)])
            limits.check_deadline()
            before = self.total
            items = [self.convert(v) for v in value]
            self._grow(2)
            self.sizes[id(value)] = self.total - before
            self.copies[id(value)] = items
            return items
        return self._other(value)

    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            self._grow(len(key) + 3)
            return str(key)
        if key is None or isinstance(key, (bool, int, float)):
            text = "null" if key is None else to_text(key)
            self._grow(len(text) + 3)
            return text
        raise ExpressionError(f"object keys must be strings, not {type_name(key)}")

    def _float(self, value: float) -> float:
        if not math.isfinite(value):
            raise ExpressionError(f"result is not a finite number ({value})")
        self._grow(8)
        return value

    def _other(self, value: Any) -> Any:
        if isinstance(value, str):  # str subclasses such as Markup
            return self.convert(str(value))
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):
            return self.convert(int(value))
        if isinstance(value, float):
            return self._float(float(value))
        if isinstance(value, Decimal):
            if not value.is_finite():
                raise ExpressionError(f"result is not a finite number ({value})")
            if value == value.to_integral_value():
                return self.convert(int(value))
            return self._float(float(value))
        if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
            return self.convert(value.isoformat())
        if isinstance(value, (list, tuple)):
            return self.convert(list(value))
        # Functions, Undefined and other Python objects have no JSON form.
        return None


def _clone(value: Any) -> Any:
    """Deep copy of an already converted JSON value."""
    if type(value) is dict:
        return {k: _clone(v) for k, v in value.items()}
    if type(value) is list:
        return [_clone(v) for v in value]
    return value


def to_json(value: Any) -> Any:
    """A JSON-able copy of ``value``: new containers, tuples as lists, no Python objects."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        return _check_int(value)
    try:
        return _Converter().convert(value)
    except RecursionError:
        raise ExpressionError("result is nested too deeply") from None


def dump_json(value: Any, *, indent: int | None = None) -> str:
    """Compact (or indented) JSON text of ``value``, capped at the output limit."""
    cap = limits.MAX_OUTPUT_CHARS
    try:
        data = _Converter(cap).convert(value)
        if indent is None:
            text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        else:
            text = json.dumps(data, ensure_ascii=False, indent=indent, allow_nan=False)
    except RecursionError:
        raise ExpressionError("value is nested too deeply to convert to JSON") from None
    except ValueError as exc:
        raise ExpressionError(f"value cannot be converted to JSON: {exc}") from None
    if len(text) > cap:
        raise _too_large()
    return text


def to_text(value: Any) -> str:
    """How a value reads inside text: null as "", booleans as true/false, containers as JSON."""
    kind = type(value)
    if kind is str:
        return value
    if value is None:
        return ""
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(_check_int(value))
    if kind is float:
        if not math.isfinite(value):
            raise ExpressionError(f"result is not a finite number ({value})")
        return repr(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bool, int, float, Decimal)):
        return to_text(to_json(value))
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, (Mapping, list, tuple)):
        return dump_json(value)
    return ""
