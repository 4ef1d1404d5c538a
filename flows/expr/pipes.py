"""Pipe filters (``{{ x | upper }}``) and ``is`` tests available inside expressions.

Only what is listed here exists: the environment starts with no filters or tests.
Missing values are ``None``; most filters pass ``None`` through so that
``default(...)`` can still apply at the end of a chain.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Context, Decimal
from typing import Any

from . import limits
from .errors import ExpressionError
from .values import a_type, dump_json, to_text

_NO_DEFAULT: Any = object()


def _pipe(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a filter so each call counts against the time and work budget."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        limits.check_deadline()
        result = func(*args, **kwargs)
        if type(result) is str and len(result) > 64:
            limits.charge(len(result))
        return result

    return wrapper


def _fail(name: str, message: str) -> ExpressionError:
    return ExpressionError(f"filter '{name}': {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_size(name: str, size: int) -> None:
    if size > limits.MAX_OUTPUT_CHARS:
        raise _fail(name, f"result is too large (limit {limits.MAX_OUTPUT_CHARS} characters)")


def upper(value: Any) -> Any:
    return None if value is None else to_text(value).upper()


def lower(value: Any) -> Any:
    return None if value is None else to_text(value).lower()


def trim(value: Any, chars: str | None = None) -> Any:
    if value is None:
        return None
    if chars is not None and not isinstance(chars, str):
        raise _fail("trim", "characters to strip must be a string")
    return to_text(value).strip(chars)


def length(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, (str, list, tuple, Mapping)):
        return len(value)
    raise _fail("length", f"{a_type(value)} has no length")


def default(value: Any, default_value: Any = "", boolean: bool = False) -> Any:
    """``value`` unless it is missing/null (or, with ``boolean=true``, falsy)."""
    if value is None or (boolean and not value):
        return default_value
    return value


def join(value: Any, separator: Any = "") -> Any:
    if value is None:
        return None
    sep = to_text(separator)
    if isinstance(value, str):
        items: Any = value
    elif isinstance(value, Mapping):
        items = list(value.keys())
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise _fail("join", f"expected a list, got {a_type(value)}")
    # Check as we go: a long separator or repeated big items must fail before allocating.
    size = len(sep) * max(len(items) - 1, 0)
    _check_size("join", size)
    parts = []
    for item in items:
        text = to_text(item)
        size += len(text)
        _check_size("join", size)
        parts.append(text)
    return sep.join(parts)


def tojson(value: Any, indent: Any = None) -> str:
    if indent is not None and (not isinstance(indent, int) or isinstance(indent, bool) or not 0 <= indent <= 8):
        raise _fail("tojson", "indent must be a whole number from 0 to 8")
    return dump_json(value, indent=indent)


def _parse_float(text: str) -> float | None:
    try:
        number = float(text)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def to_int(value: Any, default: Any = _NO_DEFAULT, base: int = 10) -> Any:
    """Integer of a number or numeric string; ``default`` (if given) when impossible."""
    if not isinstance(base, int) or isinstance(base, bool) or not (base == 0 or 2 <= base <= 36):
        raise _fail("int", "base must be 0 or from 2 to 36")
    result: int | None = None
    if isinstance(value, bool):
        result = int(value)
    elif isinstance(value, int):
        result = value
    elif isinstance(value, float):
        result = int(value) if math.isfinite(value) else None
    elif isinstance(value, str):
        text = value.strip()
        try:
            result = int(text, base)
        except ValueError:
            # "3.7" -> 3, like Jinja's int filter.
            number = _parse_float(text) if base == 10 else None
            result = int(number) if number is not None else None
    if result is None:
        if default is not _NO_DEFAULT:
            return default
        raise _fail("int", f"cannot convert {_describe(value)} to an integer")
    return result


def to_float(value: Any, default: Any = _NO_DEFAULT) -> Any:
    """Float of a number or numeric string; ``default`` (if given) when impossible."""
    result: float | None = None
    if isinstance(value, (int, float)):
        try:
            result = float(value)
        except OverflowError:
            result = None
        if result is not None and not math.isfinite(result):
            result = None
    elif isinstance(value, str):
        result = _parse_float(value.strip())
    if result is None:
        if default is not _NO_DEFAULT:
            return default
        raise _fail("float", f"cannot convert {_describe(value)} to a number")
    return result


_ROUNDING = {"common": ROUND_HALF_UP, "floor": ROUND_FLOOR, "ceil": ROUND_CEILING}
# Enough digits for any finite float, so quantize never runs out of precision.
_DECIMAL_CONTEXT = Context(prec=400)


def round_(value: Any, precision: Any = 0, method: str = "common") -> Any:
    """Round half away from zero ("common"), down ("floor") or up ("ceil").

    With ``precision`` 0 or less the result is an integer, otherwise a float.
    """
    if not _is_number(value):
        raise _fail("round", f"expected a number, got {_describe(value)}")
    if not isinstance(precision, int) or isinstance(precision, bool) or not -20 <= precision <= 20:
        raise _fail("round", "precision must be a whole number from -20 to 20")
    if method not in _ROUNDING:
        raise _fail("round", "method must be 'common', 'floor' or 'ceil'")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail("round", f"cannot round {value}")
    if isinstance(value, int) and precision >= 0:
        return value
    # repr() keeps the decimal digits people see, so 2.675 rounds like it reads.
    number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    rounded = number.quantize(Decimal(1).scaleb(-precision), rounding=_ROUNDING[method], context=_DECIMAL_CONTEXT)
    if precision <= 0:
        return int(rounded)
    return float(rounded)


def abs_(value: Any) -> Any:
    if not _is_number(value):
        raise _fail("abs", f"expected a number, got {_describe(value)}")
    return abs(value)


def _ends(name: str, value: Any, index: int) -> Any:
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = list(value.keys())
    if isinstance(value, (str, list, tuple)):
        return value[index] if value else None
    raise _fail(name, f"expected a list or string, got {a_type(value)}")


def first(value: Any) -> Any:
    return _ends("first", value, 0)


def last(value: Any) -> Any:
    return _ends("last", value, -1)


def replace(value: Any, old: Any, new: Any, count: Any = None) -> Any:
    if value is None:
        return None
    text, old_text, new_text = to_text(value), to_text(old), to_text(new)
    if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
        raise _fail("replace", "count must be a whole number")
    hits = text.count(old_text)
    if count is not None and count >= 0:
        hits = min(hits, count)
    _check_size("replace", len(text) + hits * (len(new_text) - len(old_text)))
    return text.replace(old_text, new_text, -1 if count is None else count)


def string(value: Any) -> str:
    return to_text(value)


def _extreme(name: str, pick: Callable[..., Any], value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = list(value.keys())
    if not isinstance(value, (str, list, tuple)):
        raise _fail(name, f"expected a list, got {a_type(value)}")
    if not value:
        return None
    try:
        return pick(value)
    except TypeError:
        raise _fail(name, "items cannot be compared with each other") from None


def min_(value: Any) -> Any:
    return _extreme("min", min, value)


def max_(value: Any) -> Any:
    return _extreme("max", max, value)


def sum_(value: Any, start: Any = 0) -> Any:
    if value is None:
        return start
    if not isinstance(value, (list, tuple)):
        raise _fail("sum", f"expected a list, got {a_type(value)}")
    if not _is_number(start) or not all(_is_number(item) for item in value):
        raise _fail("sum", "can only add numbers")
    return sum(value, start)


def keys(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return list(value.keys())
    raise _fail("keys", f"expected an object, got {a_type(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return repr(shown)
    if value is None or isinstance(value, (bool, int, float)):
        return to_text(value) if value is not None else "null"
    return f"{a_type(value)}"


# Internal helpers the compiler substitutes for `~` and slices; users cannot name them.
def concat_(items: Any) -> str:
    size = 0
    parts = []
    for item in items:
        text = to_text(item)
        size += len(text)
        if size > limits.MAX_OUTPUT_CHARS:
            raise ExpressionError(f"'~' result is too large (limit {limits.MAX_OUTPUT_CHARS} characters)")
        parts.append(text)
    return "".join(parts)


def slice_(value: Any, start: Any, stop: Any, step: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, (str, list, tuple)):
        raise ExpressionError(f"cannot slice {a_type(value)}")
    for bound in (start, stop, step):
        if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool)):
            raise ExpressionError("slice bounds must be whole numbers")
    if step == 0:
        raise ExpressionError("slice step cannot be zero")
    return value[start:stop:step]


PIPES: dict[str, Callable[..., Any]] = {
    name: _pipe(func)
    for name, func in {
        "upper": upper,
        "lower": lower,
        "trim": trim,
        "length": length,
        "default": default,
        "d": default,
        "join": join,
        "tojson": tojson,
        "int": to_int,
        "float": to_float,
        "round": round_,
        "abs": abs_,
        "first": first,
        "last": last,
        "replace": replace,
        "string": string,
        "min": min_,
        "max": max_,
        "sum": sum_,
        "keys": keys,
    }.items()
}

INTERNAL_PIPES: dict[str, Callable[..., Any]] = {"_concat": _pipe(concat_), "_slice": _pipe(slice_)}


def _divisibleby(value: Any, num: Any) -> bool:
    if not _is_number(value) or not _is_number(num):
        raise ExpressionError("'divisibleby' needs numbers")
    if num == 0:
        raise ExpressionError("division by zero")
    return value % num == 0


def _parity(name: str, remainder: int) -> Callable[[Any], bool]:
    def test(value: Any) -> bool:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ExpressionError(f"'{name}' needs a whole number")
        return value % 2 == remainder

    return test


def _cmp(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    return lambda a, b: op(a, b)


def _in(value: Any, seq: Any) -> bool:
    return value in seq


# Missing values are None here, so `defined` means "not null".
TESTS: dict[str, Callable[..., bool]] = {
    "defined": lambda v: v is not None,
    "undefined": lambda v: v is None,
    "none": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "true": lambda v: v is True,
    "false": lambda v: v is False,
    "number": _is_number,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, float),
    "string": lambda v: isinstance(v, str),
    "mapping": lambda v: isinstance(v, Mapping),
    "list": lambda v: isinstance(v, (list, tuple)),
    "even": _parity("even", 0),
    "odd": _parity("odd", 1),
    "divisibleby": _divisibleby,
    "eq": _cmp(lambda a, b: a == b),
    "ne": _cmp(lambda a, b: a != b),
    "lt": _cmp(lambda a, b: a < b),
    "le": _cmp(lambda a, b: a <= b),
    "gt": _cmp(lambda a, b: a > b),
    "ge": _cmp(lambda a, b: a >= b),
    "in": _in,
}
for _alias, _name in (("==", "eq"), ("!=", "ne"), ("<", "lt"), ("<=", "le"), (">", "gt"), (">=", "ge")):
    TESTS[_alias] = TESTS[_name]
